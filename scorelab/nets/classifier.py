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

__all__ = ["LeNetConfig", "LeNet", "load_domain_classifier", "DOMAIN_CLASSIFIERS", "asset_paths", "config_dict"]

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
