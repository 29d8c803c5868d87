"""``scorelab train [CONFIG | PRESET] [--key value ...] [--runs DIR] [--resume RUN]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import UsageError, build, load_data, parse_overrides, preset_names, resolve_config


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model from a YAML config or preset",
                       description="Train from CONFIG (a YAML file or a preset name; default: fmnist-rf). "
                                   "Any config key can be overridden: --train.steps 500 --model.path ddpm.")
    t.add_argument("config", nargs="?", help=f"YAML file or preset name ({', '.join(preset_names()) or 'see configs/'})")
    t.add_argument("--runs", default="runs", help="parent folder of run folders (default: runs)")
    t.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN (same step, optimizer, EMA, RNG)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config(args, rest):
    from ..train.config import RunConfig, apply_overrides, load_yaml

    overrides = parse_overrides(rest)
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise UsageError(f"cannot resume: {run_dir} is not a run folder (no config.yaml)")
        if args.config:
            raise UsageError("give either a config or --resume RUN, not both")
        raw = load_yaml(run_dir / "config.yaml")
    else:
        raw = resolve_config(args.config)
    cfg = RunConfig.from_dict(apply_overrides(raw, overrides))
    if not args.resume:
        run_dir = Path(args.runs) / cfg.name
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UsageError(f"run folder {run_dir} already exists: resume it with --resume {run_dir} or pick another --name")
    return cfg, run_dir


def sample_hook(family, dataset, run_dir: Path):
    """The trainer's ``on_sample``: a grid (images) or a scatter over the data (points), and the loss curve."""
    import torch

    from ..train.trainer import dataset_tensors
    from ..viz import plot_loss_curve, save_samples

    reference = None
    if not family.data.images:
        reference = dataset_tensors(dataset)[0][:2000].to(torch.float32)  # raw points, as the samples are

    def on_sample(tr) -> None:
        if family.capabilities().generate:
            n = 64 if family.data.images else 2000
            k = family.data.conditional_classes
            y = torch.arange(n) % k if k else None
            x = family.sample(tr.sampling_modules(), n, seed=0, y=y)
            save_samples(x, run_dir / "samples" / f"step_{tr.step:06d}.png", reference=reference, nrow=8, title=f"step {tr.step}")
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")

    return on_sample


def run(args, rest) -> int:
    import yaml

    from ..train.checkpoint import atomic_write_text
    from ..train.trainer import CKPT, Trainer

    cfg, run_dir = _config(args, rest)
    dataset = load_data(cfg)
    family = build(cfg, dataset)
    trainer = Trainer(cfg, run_dir, family, dataset, resume=bool(args.resume), progress=not args.no_progress)
    cfg.resolved["precision"] = trainer.precision.name
    cfg.resolved["precision_note"] = trainer.precision.describe()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    print(f"training {cfg.name}: {family.name} on {cfg.data.name} {family.data.shape} x{len(dataset)} -> {run_dir} "
          f"(device {trainer.device}, {trainer.precision.describe()})", file=sys.stderr)
    summary = trainer.fit(on_sample=sample_hook(family, dataset, run_dir))
    final = sorted((run_dir / "samples").glob("step_*.png"))
    if final:
        import shutil

        shutil.copyfile(final[-1], run_dir / "samples.png")
    print(json.dumps({"run": str(run_dir), **summary, "checkpoint": str(run_dir / CKPT)}))
    return 130 if summary["status"] == "interrupted" else 0
