"""The autoencoder of latent diffusion and its patch discriminator (networks only; the losses are
in :mod:`scorelab.families.autoencoder`).

:class:`Autoencoder` is the convolutional "AutoencoderKL" of latent diffusion (Rombach et al. 2022,
§3 and App. G; seed 001 "Latent Diffusion Models": "the encoder and decoder are CNNs with
attention"): images ``(C, H, W)`` in ``[-1, 1]`` to a diagonal-Gaussian posterior over latents
``(z_channels, H/f, W/f)`` and back. Layout (``L = len(channel_mult)`` levels,
``c_i = base_channels * channel_mult[i]``, ``f = factor = 2^(L-1)``)::

    encoder  conv3x3 C -> c_0
             level i: num_res_blocks x ResBlock(c_i) [+ Attention on the lowest level, i = L-1],
                      then conv3x3 stride 2 (not on the lowest level)           (c_i, H/2^i, W/2^i)
             middle   ResBlock, Attention, ResBlock                            (c_{L-1}, H/f, W/f)
             GroupNorm, SiLU, conv3x3 -> 2 z_channels: posterior mean and log-variance
    decoder  conv3x3 z_channels -> c_{L-1}; middle ResBlock, Attention, ResBlock
             level i = L-1..0: (num_res_blocks + 1) x ResBlock(c_i) [+ Attention on i = L-1],
                      then nearest upsampling x2 + conv3x3 c_i -> c_{i-1} (not on level 0)
             GroupNorm, SiLU, conv3x3 -> C          <- ``last_layer``: the adaptive GAN weight is measured here

``ResBlock(x) = skip(x) + conv(SiLU(GN(conv(SiLU(GN(x))))))`` (no time input); Attention is the
U-Net's single-head self-attention over the ``(H/f)(W/f)`` positions (:class:`scorelab.nets.unet.Attention`).
The decoder's output is not squashed (as in LDM): reconstructions are clamped to ``[-1, 1]`` only
when they become pictures. The log-variance is clamped to ``[-30, 20]`` (LDM's
``DiagonalGaussianDistribution``). H and W must be divisible by ``f``.

Default (``AutoencoderNetConfig()``, 28x28x1 -> 7x7x4, f = 4): base 16, levels (1, 2, 4), one
block per level (two in the decoder), 0.69M parameters. CPU time per image (one thread of the
2-core AVX-512/AMX dev machine, batch 256): decode 1.27 ms in float32 / 0.62 ms under bfloat16
autocast, encode 0.60 / 0.35 ms. The decoder runs once per latent-diffusion sample, which is why
its full-resolution level is narrow (16 channels): at 32 channels it cost more than one NFE of
the fmnist-rf U-Net.

:class:`PatchDiscriminator` is the PatchGAN of pix2pix (Isola et al. 2017, ``NLayerDiscriminator``)
as LDM uses it: one logit per overlapping patch, ``D(x): (B, 1, h, w)``. ``layers`` 4x4 stride-2
convolutions, one 4x4 stride-1 convolution, a 4x4 stride-1 convolution to one channel. With
``layers = 2`` on 28x28: logits on a 5x5 grid, each seeing a 34x34 window (so nearly the whole
image); ``layers = 1``: 12x12 logits of 16x16 windows. GroupNorm instead of pix2pix's BatchNorm
(batch statistics would make a patch's logit depend on the other images of its batch, see
:mod:`scorelab.nets.gan`), spectral normalisation optional. The DCGAN discriminator of
:mod:`scorelab.nets.gan` gives one logit per image, which is why this one exists.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from .embeddings import _check
from .gan import LEAKY_SLOPE
from .unet import Attention, Downsample, _norm

__all__ = ["AutoencoderNetConfig", "Autoencoder", "PatchDiscriminatorConfig", "PatchDiscriminator", "LOGVAR_RANGE"]

LOGVAR_RANGE = (-30.0, 20.0)  # the posterior log-variance is clamped to this (LDM)


class _Config:
    """Dict round trip shared by the two configs (unknown keys are an error, lists become tuples)."""

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; expected some of {', '.join(sorted(names))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def _positive(self, *names: str) -> None:
        for name in names:
            v = getattr(self, name)
            _check(self, name, isinstance(v, int) and not isinstance(v, bool) and v >= 1, "must be a positive integer")


@dataclass
class AutoencoderNetConfig(_Config):
    """Config of :class:`Autoencoder` (Rombach et al. 2022's AutoencoderKL, small)."""

    in_channels: int = 1  # image channels C (set from the data)
    image_size: tuple = (28, 28)  # (H, W) (set from the data); both divisible by factor
    z_channels: int = 4  # latent channels (LDM's f4 / f8 models: 3 or 4)
    factor: int = 4  # downsampling factor f = 2^(levels - 1): 28x28 -> 7x7 with f = 4
    base_channels: int = 16  # c_0 (the width at full resolution, where the decoder spends most of its time)
    channel_mult: tuple = ()  # c_i = base_channels * channel_mult[i], one per level (() : min(2^i, 4), LDM's (1, 2, 4, 4))
    num_res_blocks: int = 1  # residual blocks per level in the encoder (the decoder has one more per level)
    attention: bool = True  # self-attention on the lowest level and in the middle blocks (the seed's "CNNs with attention")
    groups: int = 8  # GroupNorm groups (capped at the channel count; must divide every c_i)

    def __post_init__(self):
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        self.image_size = tuple(self.image_size)
        self.channel_mult = tuple(self.channel_mult)
        self._positive("in_channels", "z_channels", "factor", "base_channels", "num_res_blocks", "groups")
        _check(self, "factor", self.factor & (self.factor - 1) == 0, "must be a power of 2 (one stride-2 level per factor 2)")
        levels = int(math.log2(self.factor)) + 1
        if not self.channel_mult:
            self.channel_mult = tuple(min(2**i, 4) for i in range(levels))
        _check(self, "channel_mult", len(self.channel_mult) == levels and all(isinstance(m, int) and m >= 1 for m in self.channel_mult),
               f"must hold {levels} positive integers (one per level: log2(factor) + 1 = {levels})")
        _check(self, "image_size", len(self.image_size) == 2 and all(isinstance(s, int) and s >= 1 and s % self.factor == 0
                                                                     for s in self.image_size),
               f"must be (H, W) divisible by factor={self.factor}")
        for c in self.channels:
            _check(self, "groups", c % min(self.groups, c) == 0, f"must divide every level's channel count {self.channels}")

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels c_i of each level."""
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(z_channels, H/f, W/f)``: one latent."""
        return (self.z_channels, self.image_size[0] // self.factor, self.image_size[1] // self.factor)


class ResBlock(nn.Module):
    """``skip(x) + conv2(SiLU(GN(conv1(SiLU(GN(x))))))``: (B, c_in, H, W) -> (B, c_out, H, W)."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def _attention(c: int, groups: int) -> Attention:
    return Attention(c, head_dim=c, groups=groups, zero_init=False)  # one head, as LDM's AttnBlock


class Encoder(nn.Module):
    """``x: (B, C, H, W) -> (B, 2 z_channels, H/f, W/f)`` (mean and log-variance stacked on channels)."""

    def __init__(self, cfg: AutoencoderNetConfig):
        super().__init__()
        ch, g, L = cfg.channels, cfg.groups, len(cfg.channels)
        self.stem = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        c = ch[0]
        for i, ci in enumerate(ch):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(c, ci, g))
                c = ci
                if cfg.attention and i == L - 1:
                    layers.append(_attention(c, g))
            if i < L - 1:
                layers.append(Downsample(c))
        self.down = nn.Sequential(*layers)
        mid = [ResBlock(c, c, g)] + ([_attention(c, g)] if cfg.attention else []) + [ResBlock(c, c, g)]
        self.mid = nn.Sequential(*mid)
        self.head = nn.Sequential(_norm(c, g), nn.SiLU(), nn.Conv2d(c, 2 * cfg.z_channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.mid(self.down(self.stem(x))))


class Upsample(nn.Module):
    """Nearest upsampling x2, then conv3x3 ``c_in -> c_out``: (B, c_in, h, w) -> (B, c_out, 2h, 2w).

    The channel change happens in this convolution (LDM keeps ``c_in`` and changes channels in the
    next block): at full resolution that halves the decoder's largest convolution."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """``z: (B, z_channels, H/f, W/f) -> (B, C, H, W)`` (not squashed)."""

    def __init__(self, cfg: AutoencoderNetConfig):
        super().__init__()
        ch, g, L = cfg.channels, cfg.groups, len(cfg.channels)
        c = ch[-1]
        self.stem = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        mid = [ResBlock(c, c, g)] + ([_attention(c, g)] if cfg.attention else []) + [ResBlock(c, c, g)]
        self.mid = nn.Sequential(*mid)
        self.levels = nn.ModuleList()
        for i in reversed(range(L)):
            blocks: list[nn.Module] = []
            c = ch[i]  # the upsampling into this level already changed the channels
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(c, c, g))
                if cfg.attention and i == L - 1:
                    blocks.append(_attention(c, g))
            self.levels.append(nn.Sequential(*blocks))
        self.up = nn.ModuleList(Upsample(ch[i], ch[i - 1]) for i in reversed(range(1, L)))
        self.head = nn.Sequential(_norm(c, g), nn.SiLU(), nn.Conv2d(c, cfg.in_channels, 3, padding=1))

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.stem(z))
        for i, level in enumerate(self.levels):
            h = level(h)
            if i < len(self.up):
                h = self.up[i](h)
        return self.head(h)


class Autoencoder(nn.Module):
    """Encoder + decoder with a diagonal-Gaussian posterior (see the module docstring).

    ``encode(x) -> (mean, log_var)``, each ``(B, z_channels, H/f, W/f)``; ``decode(z) -> (B, C, H, W)``;
    ``forward(x, noise) -> (x^, mean, log_var)`` (one call for training, so wrappers such as
    DistributedDataParallel see the whole graph); ``last_layer`` is the weight of the decoder's
    output convolution.
    """

    def __init__(self, cfg: AutoencoderNetConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg if cfg is not None else AutoencoderNetConfig(**overrides)
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.cfg.latent_shape

    @property
    def last_layer(self) -> Tensor:
        """The decoder's last weight ``(C, c_0, 3, 3)``, where LDM compares the loss gradients."""
        return self.decoder.head[-1].weight

    def _check(self, x: Tensor) -> None:
        C, (H, W) = self.cfg.in_channels, self.cfg.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (C, H, W):
            raise ValueError(f"the autoencoder expects images (B, {C}, {H}, {W}), got {tuple(x.shape)}")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior ``q(z | x) = N(mean, diag exp(log_var))`` of images ``x: (B, C, H, W)``."""
        self._check(x)
        mean, log_var = self.encoder(x).chunk(2, dim=1)  # (B, z, H/f, W/f) each
        return mean, log_var.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` (model space, not clamped) from latents ``z: (B, z_channels, H/f, W/f)``."""
        if z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"the decoder expects latents (B, {', '.join(map(str, self.latent_shape))}), got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(x^, mean, log_var)``: the reconstruction of ``x`` from ``z = mean + exp(log_var / 2) * noise``
        (``noise: (B, *latent_shape)``, standard normal, drawn by the caller; None: ``z = mean``).
        ``z`` is formed in float32 whatever the autocast precision of the convolutions."""
        mean, log_var = self.encode(x)
        z = mean.float() if noise is None else mean.float() + torch.exp(0.5 * log_var.float()) * noise.float()
        return self.decode(z), mean, log_var


@dataclass
class PatchDiscriminatorConfig(_Config):
    """Config of :class:`PatchDiscriminator` (pix2pix's PatchGAN, Isola et al. 2017; as in LDM)."""

    in_channels: int = 1  # image channels C (set from the data)
    channels: int = 64  # width of the first convolution (pix2pix ndf = 64); doubled per layer up to 8x
    layers: int = 2  # stride-2 convolutions (pix2pix n_layers = 3 for 256x256; 2 suits 28x28)
    norm: str = "group"  # "group" (GroupNorm) or "none" after every conv but the first and the last
    groups: int = 8  # GroupNorm groups
    spectral_norm: bool = False  # spectral normalisation of every convolution (Miyato et al. 2018)
    init_std: float = 0.02  # conv weights ~ N(0, init_std^2), biases 0 (pix2pix / LDM weights_init)

    def __post_init__(self):
        self._positive("in_channels", "channels", "layers", "groups")
        _check(self, "norm", self.norm in ("group", "none"), "must be 'group' or 'none'")
        _check(self, "init_std", self.init_std >= 0, "must be >= 0")


class PatchDiscriminator(nn.Module):
    """``D(x: (B, C, H, W)) -> logits (B, 1, h, w)``, one per overlapping patch (see the module docstring)."""

    def __init__(self, cfg: PatchDiscriminatorConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg if cfg is not None else PatchDiscriminatorConfig(**overrides)
        self.cfg = cfg

        def conv(cin, cout, stride):
            m = nn.Conv2d(cin, cout, 4, stride=stride, padding=1)
            if cfg.init_std > 0:
                nn.init.normal_(m.weight, 0.0, cfg.init_std)
                nn.init.zeros_(m.bias)
            return _spectral_norm(m) if cfg.spectral_norm else m

        def norm(c):
            return nn.GroupNorm(min(cfg.groups, c), c) if cfg.norm == "group" else nn.Identity()

        c = cfg.channels
        layers: list[nn.Module] = [conv(cfg.in_channels, c, 2), nn.LeakyReLU(LEAKY_SLOPE)]
        for n in range(1, cfg.layers + 1):
            cout = cfg.channels * min(2**n, 8)
            layers += [conv(c, cout, 2 if n < cfg.layers else 1), norm(cout), nn.LeakyReLU(LEAKY_SLOPE)]
            c = cout
        layers.append(conv(c, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"the discriminator expects images (B, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        return self.net(x)  # (B, 1, h, w)
