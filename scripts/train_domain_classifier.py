"""Train the domain classifier whose features define scorelab's FID / KID / precision-recall.

Trains :class:`scorelab.nets.classifier.LeNet` on the full Fashion-MNIST train split (60k) and
reports the accuracy on the 10k test split; writes ``<out>/<stem>.safetensors`` (weights) and
``<out>/<stem>.json`` (constructor arguments, test accuracy, feature dim, training command, input
normalisation ``x = pixel / 127.5 - 1``). Deterministic for a given seed and thread count.

    .venv/bin/python scripts/train_domain_classifier.py            # 4 epochs: ~4 min on 2 idle cores
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from scorelab.data.images import load_fashion_mnist
from scorelab.nets.classifier import DOMAIN_CLASSIFIERS, LeNetConfig, config_dict, fit_lenet, lenet_accuracy

REPO = Path(__file__).resolve().parents[1]
NORMALISATION = "x = uint8_pixel / 127.5 - 1, shape (B, 1, 28, 28), values in [-1, 1]"


def load_split(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (N, 1, 28, 28) float32 in [-1, 1], labels (N,) int64)`` of split ``train`` / ``test``."""
    ds = load_fashion_mnist(data_dir, split=split)
    return ds.float_images(), ds.targets()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"), help="directory of the *-idx?-ubyte.gz files")
    p.add_argument("--name", default="fmnist", choices=sorted(DOMAIN_CLASSIFIERS), help="registry name (fixes the output file stem)")
    p.add_argument("--out-dir", type=Path, default=REPO / "scorelab" / "assets", help="where the .safetensors and .json go")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle AdamW schedule")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--channels", type=int, default=32, help="LeNetConfig.channels")
    p.add_argument("--feature-dim", type=int, default=128, help="LeNetConfig.feature_dim")
    p.add_argument("--hflip", type=float, default=0.5, help="probability of a horizontal flip (augmentation); 0 disables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (the cores are shared)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    x_train, y_train = load_split(args.data_dir, "train")
    x_test, y_test = load_split(args.data_dir, "test")
    print(f"train {tuple(x_train.shape)}  test {tuple(x_test.shape)}", flush=True)

    t0 = time.time()

    def report(epoch: int, loss: float) -> None:
        print(f"epoch {epoch + 1}/{args.epochs}  train loss {loss:.4f}  ({time.time() - t0:.0f}s)", flush=True)

    model = fit_lenet(LeNetConfig(channels=args.channels, feature_dim=args.feature_dim, n_classes=10), x_train, y_train,
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      hflip=args.hflip, seed=args.seed, on_epoch=report)
    train_seconds = time.time() - t0

    test_acc = lenet_accuracy(model, x_test, y_test)
    stem = DOMAIN_CLASSIFIERS[args.name]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights = args.out_dir / f"{stem}.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights))
    cmd = ".venv/bin/python scripts/train_domain_classifier.py" + "".join(" " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    meta = dict(
        name=args.name,
        architecture="scorelab.nets.classifier.LeNet",
        config=config_dict(model),
        feature_dim=model.config.feature_dim,
        features="penultimate layer after ReLU: LeNet.features(x) -> (B, feature_dim)",
        normalisation=NORMALISATION,
        dataset="Fashion-MNIST (train 60000 / test 10000, idx gzip files)",
        test_accuracy=round(test_acc, 4),
        test_size=len(x_test),
        train_size=len(x_train),
        training=dict(
            command=cmd,
            epochs=args.epochs,
            batch_size=args.batch_size,
            optimizer=f"AdamW(weight_decay={args.weight_decay}) + OneCycleLR(max_lr={args.lr})",
            augmentation=f"horizontal flip p={args.hflip}",
            seed=args.seed,
            threads=args.threads,
            seconds=round(train_seconds, 1),
            torch=torch.__version__,
        ),
        weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
        weights_bytes=weights.stat().st_size,
    )
    (args.out_dir / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"test accuracy {test_acc:.4f}; wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB) and {stem}.json")
    return meta


if __name__ == "__main__":
    main()
