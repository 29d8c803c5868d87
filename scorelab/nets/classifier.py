"""Small LeNet-style classifier for 28x28 grey images: the domain feature space of our metrics.

No Inception weights exist offline, so FID / KID / precision-recall (``scorelab.metrics``) are
computed in the penultimate feature space of this classifier, trained on the dataset itself
(``scripts/train_domain_classifier.py``). The same network scores the class accuracy of
label-conditioned samples.

Architecture (input ``x: (B, 1, 28, 28)`` in ``[-1, 1]``)::

    conv3x3(1 -> c)   BN ReLU  maxpool2   # (B, c, 14, 14)
    conv3x3(c -> 2c)  BN ReLU  maxpool2   # (B, 2c, 7, 7)
    conv3x3(2c -> 4c) BN ReLU  maxpool2   # (B, 4c, 3, 3)
    flatten, linear(36c -> F) ReLU        # (B, F)   = features(x)
    linear(F -> n_classes)                # (B, K)   = forward(x), logits

Shipped weights live in ``scorelab/assets/<name>_lenet.safetensors`` next to a JSON file with
the constructor arguments, the test accuracy, the training command and the input normalisation;
loading never unpickles (``safetensors.torch.load_file``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["LeNetConfig", "LeNet", "load_domain_classifier", "DOMAIN_CLASSIFIERS", "asset_paths", "config_dict", "fit_lenet",
           "lenet_accuracy"]

# name -> file stem in scorelab/assets (weights: <stem>.safetensors, metadata: <stem>.json)
DOMAIN_CLASSIFIERS = {"fmnist": "fmnist_lenet"}


@dataclass
class LeNetConfig:
    """Constructor arguments of :class:`LeNet` (stored in the weights' JSON metadata)."""

    in_channels: int = 1  # Grey images.
    channels: int = 32  # Width c of the first conv; the next two have 2c and 4c.
    feature_dim: int = 128  # F: size of the penultimate (feature) layer.
    n_classes: int = 10  # Size of the logit head.
    image_size: int = 28  # Input height = width.

    def __post_init__(self):
        for name in ("in_channels", "channels", "feature_dim", "n_classes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"LeNetConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 8:
            raise ValueError(f"LeNetConfig.image_size must be >= 8 (three 2x poolings), got {self.image_size}")


class LeNet(nn.Module):
    """LeNet-style CNN: three conv blocks, an FC feature layer and a linear class head.

    Args:
        config: a :class:`LeNetConfig` (or pass its fields as keyword arguments).
    """

    def __init__(self, config: LeNetConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = LeNetConfig(**kwargs)
        elif kwargs:
            raise ValueError(f"pass either config or keyword arguments, not both (got {sorted(kwargs)})")
        self.config = config
        c = config.channels

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.conv = nn.Sequential(block(config.in_channels, c), block(c, 2 * c), block(2 * c, 4 * c))
        side = config.image_size // 2 // 2 // 2
        self.fc = nn.Linear(4 * c * side * side, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.n_classes)
        self.dropout = nn.Dropout(0.3)  # only active in train mode, between features and head

    def _check(self, x: Tensor) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"x must be (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), got {tuple(x.shape)}"
            )

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``(B, F)`` (after ReLU) of images ``x: (B, 1, 28, 28)`` in [-1, 1]."""
        self._check(x)
        h = self.conv(x.to(self.fc.weight.dtype))  # (B, 4c, 3, 3)
        return torch.relu(self.fc(h.flatten(1)))  # (B, F)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, K)`` of images ``x: (B, 1, 28, 28)`` in [-1, 1]."""
        return self.head(self.dropout(self.features(x)))


ASSETS = Path(__file__).resolve().parent.parent / "assets"  # scorelab/assets


def asset_paths(name: str = "fmnist"):
    """``(weights, metadata)`` traversables of the shipped classifier ``name`` in scorelab/assets."""
    if name not in DOMAIN_CLASSIFIERS:
        raise ValueError(f"unknown domain classifier name={name!r}; known: {sorted(DOMAIN_CLASSIFIERS)}")
    stem = DOMAIN_CLASSIFIERS[name]
    root = ASSETS
    return root.joinpath(stem + ".safetensors"), root.joinpath(stem + ".json")


def load_domain_classifier(name: str = "fmnist", device: str | torch.device = "cpu") -> LeNet:
    """Load the shipped classifier ``name`` (safetensors + JSON metadata), in eval mode, frozen.

    The metadata dict is attached as ``model.metadata`` (test accuracy, feature dim, training
    command, input normalisation).
    """
    from safetensors.torch import load_file

    weights, meta_file = asset_paths(name)
    if not weights.is_file():
        raise FileNotFoundError(f"missing weights for domain classifier {name!r}: {weights}; "
                                "run scripts/train_domain_classifier.py")
    meta = json.loads(meta_file.read_text())
    model = LeNet(LeNetConfig(**meta["config"]))
    state = load_file(str(weights))
    model.load_state_dict(state)
    model.metadata = meta
    model.eval().requires_grad_(False)
    return model.to(device)


def config_dict(model: LeNet) -> dict:
    """The model's constructor arguments as a plain dict (for the JSON metadata)."""
    return asdict(model.config)


@torch.no_grad()
def lenet_accuracy(model: LeNet, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Fraction of ``x: (N, C, S, S)`` in [-1, 1] classified as ``y: (N,)`` (eval mode)."""
    model.eval()
    correct = sum(int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum()) for i in range(0, len(x), batch_size))
    return correct / max(len(x), 1)


def fit_lenet(config: LeNetConfig, x: Tensor, y: Tensor, epochs: int = 4, batch_size: int = 128, lr: float = 3e-3,
              weight_decay: float = 5e-4, hflip: float = 0.0, seed: int = 0, progress: bool = False,
              on_epoch=None) -> LeNet:
    """Train a :class:`LeNet` on images ``x: (N, C, S, S)`` in [-1, 1] with labels ``y: (N,)``.

    AdamW with a one-cycle schedule peaking at ``lr``; random horizontal flips with probability
    ``hflip`` (Fashion-MNIST: 0.5; digits must not be flipped: 0). Deterministic for a given seed
    and thread count. ``on_epoch(epoch, mean_loss)`` after each epoch. Returns the model in eval
    mode, frozen.
    """
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = LeNet(config)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch))
    bar = tqdm(total=epochs * steps_per_epoch, desc="feature classifier", unit="step", disable=not progress, leave=False)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = x[idx], y[idx]  # (B, C, S, S), (B,)
            if hflip > 0:
                flip = torch.rand(len(xb), generator=gen) < hflip
                xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(xb)
            n += len(xb)
            bar.update(1)
        if on_epoch is not None:
            on_epoch(epoch, total / max(n, 1))
    bar.close()
    return model.eval().requires_grad_(False)
