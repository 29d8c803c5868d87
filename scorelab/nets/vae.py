"""Encoder and decoder networks of a VAE (networks only; the maths is :mod:`scorelab.vae`).

Both take an optional class label ``y: (B,)`` (``None`` = the learned null label of
:class:`~scorelab.nets.embeddings.LabelEmbedding`) when ``num_classes > 0``:

* ``encoder(x, y=None) -> (mean, log_var)``, each ``(B, latent_dim)``: the diagonal Gaussian
  ``q(z | x) = N(mean, diag exp(log_var))``;
* ``decoder(z, y=None) -> params: (B, P, *S)``: the ``P = out_params`` parameter maps per data value
  that a :class:`scorelab.vae.Decoder` reads (``P = decoder.num_params``: 1 for a fixed-variance
  Gaussian or a Bernoulli, 2 for a learned per-pixel scale or the discretized Gaussian).

Convolutional, for images ``x: (B, C, H, W)`` (:class:`ConvEncoder`, :class:`ConvDecoder`,
``L = len(channels)`` levels, ``s_0 = (H, W)``, ``s_{i+1} = ceil(s_i / 2)``)::

    encoder  level i: conv3x3 stride 2 (c_{i-1} -> c_i) SiLU conv3x3 SiLU            -> (c_i, s_{i+1})
             flatten [+ label] -> Linear(hidden) SiLU -> Linear(2 latent_dim)        -> mean, log_var
    decoder  z [+ label] -> Linear(hidden) SiLU -> Linear(c_{L-1} s_L) SiLU -> (c_{L-1}, s_L)
             level i = L-1..0: nearest upsampling to s_i, conv3x3 (-> c_{i-1}, c_0 at i = 0) SiLU conv3x3 SiLU
             conv3x3 -> P C channels                                                -> (B, P, C, H, W)

Upsampling goes to the encoder's exact sizes, so odd sizes work (28 -> 14 -> 7 -> 4 and back).
The default (``ConvVAEConfig()``: 28x28x1, channels (32, 64, 64), hidden 256, latent 16, P = 2)
has 0.80M parameters. MLP versions for flat data ``x: (B, D)``: :class:`MLPEncoder`,
:class:`MLPDecoder` (params ``(B, P, D)``). :func:`build_vae_nets` builds the pair from a config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import LabelEmbedding, NetConfigBase, _check

__all__ = ["ConvVAEConfig", "MLPVAEConfig", "ConvEncoder", "ConvDecoder", "MLPEncoder", "MLPDecoder", "build_vae_nets"]


def _positive(cfg, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        _check(cfg, name, isinstance(v, int) and not isinstance(v, bool) and v >= 1, "must be a positive integer")


def _int_tuple(v) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else v


@dataclass
class ConvVAEConfig:
    """Config of :class:`ConvEncoder` and :class:`ConvDecoder` (one config for the pair)."""

    in_channels: int = 1  # image channels C of x: (B, C, H, W)
    image_size: int | tuple = 28  # H = W, or (H, W)
    latent_dim: int = 16  # dimension of z
    channels: tuple = (32, 64, 64)  # c_i of each stride-2 level (28 -> 14 -> 7 -> 4)
    hidden: int = 256  # width of the fully connected layer between the feature map and z
    out_params: int = 2  # P: decoder parameter maps per subpixel (= the likelihood's num_params)
    num_classes: int = 0  # class labels (0: unconditional); a label embedding enters encoder and decoder
    label_dim: int = 32  # width of the label embedding

    from_dict = classmethod(NetConfigBase.from_dict.__func__)  # plain dict (YAML) -> config; unknown keys are an error
    to_dict = NetConfigBase.to_dict  # config -> plain dict that from_dict reads back

    def __post_init__(self):
        self.channels = _int_tuple(self.channels)
        self.image_size = _int_tuple(self.image_size)
        _positive(self, "in_channels", "latent_dim", "hidden", "out_params", "label_dim")
        _check(self, "num_classes", isinstance(self.num_classes, int) and self.num_classes >= 0, "must be a non-negative integer")
        _check(self, "channels", isinstance(self.channels, tuple) and len(self.channels) >= 1
               and all(isinstance(c, int) and c >= 1 for c in self.channels), "must be a non-empty tuple of positive integers")
        s = self.image_size
        _check(self, "image_size", (isinstance(s, int) and s >= 2) or (isinstance(s, tuple) and len(s) == 2
               and all(isinstance(v, int) and v >= 2 for v in s)), "must be an integer >= 2 or (H, W)")

    @property
    def hw(self) -> tuple[int, int]:
        """``(H, W)``."""
        return (self.image_size, self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """Spatial sizes ``s_0 = (H, W), ..., s_L`` before and after each stride-2 level."""
        out = [self.hw]
        for _ in self.channels:
            h, w = out[-1]
            out.append((math.ceil(h / 2), math.ceil(w / 2)))
        return out


@dataclass
class MLPVAEConfig:
    """Config of :class:`MLPEncoder` and :class:`MLPDecoder` for flat data ``x: (B, D)``."""

    dim: int = 2  # data dimension D
    latent_dim: int = 2  # dimension of z
    hidden: tuple = (256, 256)  # encoder hidden widths (the decoder uses them reversed)
    out_params: int = 2  # P: decoder parameter maps per data value (= the likelihood's num_params)
    num_classes: int = 0  # class labels (0: unconditional)
    label_dim: int = 32  # width of the label embedding

    from_dict = classmethod(NetConfigBase.from_dict.__func__)
    to_dict = NetConfigBase.to_dict

    def __post_init__(self):
        self.hidden = _int_tuple(self.hidden)
        _positive(self, "dim", "latent_dim", "out_params", "label_dim")
        _check(self, "num_classes", isinstance(self.num_classes, int) and self.num_classes >= 0, "must be a non-negative integer")
        _check(self, "hidden", isinstance(self.hidden, tuple) and len(self.hidden) >= 1
               and all(isinstance(c, int) and c >= 1 for c in self.hidden), "must be a non-empty tuple of positive integers")


class _Labels(nn.Module):
    """Optional label embedding: ``y: (B,) or None -> (B, label_dim)`` or an empty (B, 0) tensor."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.dim = dim if num_classes else 0
        self.emb = LabelEmbedding(num_classes, dim) if num_classes else None

    def forward(self, y: Tensor | None, like: Tensor) -> Tensor:
        if self.emb is None:
            if y is not None:
                raise ValueError("this network is unconditional (num_classes = 0) but got labels y")
            return like.new_zeros(like.shape[0], 0)
        return self.emb(y, like.shape[0], like.device).to(like.dtype)


def _check_image(x: Tensor, cfg: ConvVAEConfig, who: str) -> None:
    if x.ndim != 4 or x.shape[1] != cfg.in_channels or tuple(x.shape[2:]) != cfg.hw:
        raise ValueError(f"{who} expects x of shape (B, {cfg.in_channels}, {cfg.hw[0]}, {cfg.hw[1]}), got {tuple(x.shape)}")


class ConvEncoder(nn.Module):
    """``x: (B, C, H, W) [, y: (B,)] -> (mean, log_var)``, each ``(B, latent_dim)`` (see module docstring)."""

    def __init__(self, config: ConvVAEConfig):
        super().__init__()
        self.config = config
        layers, c_prev = [], config.in_channels
        for c in config.channels:
            layers += [nn.Conv2d(c_prev, c, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), nn.SiLU()]
            c_prev = c
        self.features = nn.Sequential(*layers)
        h, w = config.sizes[-1]
        self.labels = _Labels(config.num_classes, config.label_dim)
        self.fc = nn.Sequential(nn.Linear(c_prev * h * w + self.labels.dim, config.hidden), nn.SiLU(),
                                nn.Linear(config.hidden, 2 * config.latent_dim))

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_image(x, self.config, "ConvEncoder")
        f = self.features(x).flatten(1)  # (B, c_{L-1} h w)
        mean, log_var = self.fc(torch.cat([f, self.labels(y, f)], dim=1)).chunk(2, dim=1)  # (B, L) each
        return mean, log_var


class ConvDecoder(nn.Module):
    """``z: (B, latent_dim) [, y: (B,)] -> params: (B, P, C, H, W)`` (see module docstring)."""

    def __init__(self, config: ConvVAEConfig):
        super().__init__()
        self.config = config
        ch, sizes = config.channels, config.sizes
        self.labels = _Labels(config.num_classes, config.label_dim)
        h, w = sizes[-1]
        self.fc = nn.Sequential(nn.Linear(config.latent_dim + self.labels.dim, config.hidden), nn.SiLU(),
                                nn.Linear(config.hidden, ch[-1] * h * w), nn.SiLU())
        self.levels = nn.ModuleList()
        c_prev = ch[-1]
        for i in reversed(range(len(ch))):
            c = ch[i - 1] if i > 0 else ch[0]
            self.levels.append(nn.Sequential(nn.Conv2d(c_prev, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), nn.SiLU()))
            c_prev = c
        self.out = nn.Conv2d(c_prev, config.out_params * config.in_channels, 3, padding=1)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        cfg = self.config
        if z.ndim != 2 or z.shape[1] != cfg.latent_dim:
            raise ValueError(f"ConvDecoder expects z of shape (B, {cfg.latent_dim}), got {tuple(z.shape)}")
        h, w = cfg.sizes[-1]
        f = self.fc(torch.cat([z, self.labels(y, z)], dim=1)).view(z.shape[0], cfg.channels[-1], h, w)
        for level, size in zip(self.levels, reversed(cfg.sizes[:-1])):
            f = level(F.interpolate(f, size=size, mode="nearest"))  # (B, c, *size)
        out = self.out(f)  # (B, P C, H, W)
        return out.view(z.shape[0], cfg.out_params, cfg.in_channels, *cfg.hw)


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    return nn.Sequential(*layers[:-1])  # no activation after the last layer


class MLPEncoder(nn.Module):
    """``x: (B, D) [, y] -> (mean, log_var)``, each ``(B, latent_dim)``: D [+ label] -> hidden... -> 2 latent_dim."""

    def __init__(self, config: MLPVAEConfig):
        super().__init__()
        self.config = config
        self.labels = _Labels(config.num_classes, config.label_dim)
        self.net = _mlp([config.dim + self.labels.dim, *config.hidden, 2 * config.latent_dim])

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if x.ndim != 2 or x.shape[1] != self.config.dim:
            raise ValueError(f"MLPEncoder expects x of shape (B, {self.config.dim}), got {tuple(x.shape)}")
        mean, log_var = self.net(torch.cat([x, self.labels(y, x)], dim=1)).chunk(2, dim=1)
        return mean, log_var


class MLPDecoder(nn.Module):
    """``z: (B, latent_dim) [, y] -> params: (B, P, D)``: latent [+ label] -> reversed hidden... -> P D."""

    def __init__(self, config: MLPVAEConfig):
        super().__init__()
        self.config = config
        self.labels = _Labels(config.num_classes, config.label_dim)
        self.net = _mlp([config.latent_dim + self.labels.dim, *reversed(config.hidden), config.out_params * config.dim])

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        if z.ndim != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"MLPDecoder expects z of shape (B, {self.config.latent_dim}), got {tuple(z.shape)}")
        return self.net(torch.cat([z, self.labels(y, z)], dim=1)).view(z.shape[0], self.config.out_params, self.config.dim)


def build_vae_nets(config: ConvVAEConfig | MLPVAEConfig) -> tuple[nn.Module, nn.Module]:
    """``(encoder, decoder)`` for a :class:`ConvVAEConfig` (images) or :class:`MLPVAEConfig` (flat data)."""
    if isinstance(config, ConvVAEConfig):
        return ConvEncoder(config), ConvDecoder(config)
    if isinstance(config, MLPVAEConfig):
        return MLPEncoder(config), MLPDecoder(config)
    raise ValueError(f"build_vae_nets: expected a ConvVAEConfig or MLPVAEConfig, got {type(config).__name__}")
