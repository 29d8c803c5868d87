"""Build a denoising network by name from plain config options and the data's shape."""

from __future__ import annotations

from torch import nn

from .dit import DiT, DiTConfig
from .mlp import MLP, MLPConfig
from .unet import UNet, UNetConfig

__all__ = ["NETS", "build_net"]

NETS = {"mlp": (MLP, MLPConfig), "unet": (UNet, UNetConfig), "dit": (DiT, DiTConfig)}


def build_net(name: str, options: dict, data_shape: tuple, num_classes: int = 0) -> nn.Module:
    """A net for data of ``data_shape`` (without batch): the data fixes its input size."""
    if name not in NETS:
        raise ValueError(f"unknown net {name!r}: expected one of {', '.join(NETS)}")
    cls, cfg_cls = NETS[name]
    opts = dict(options or {})
    if name == "mlp":
        if len(data_shape) != 1:
            raise ValueError(f"net 'mlp' needs flat data (D,), got shape {tuple(data_shape)}")
        opts["dim"] = data_shape[0]
    else:
        if len(data_shape) != 3:
            raise ValueError(f"net {name!r} needs images (C, H, W), got shape {tuple(data_shape)}")
        opts["in_channels"] = data_shape[0]
        if name == "dit" and data_shape[1] == data_shape[2]:
            opts.setdefault("image_size", data_shape[1])  # square images: fixes the token grid
    opts["num_classes"] = num_classes
    return cls(cfg_cls.from_dict(opts))
