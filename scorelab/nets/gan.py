"""Generator and discriminator networks of the GAN family (networks only; the game is :mod:`scorelab.gan`).

Interfaces::

    generator      G(z: (B, z_dim), y: (B,) | None = None) -> x
                   images (B, C, H, W) in [-1, 1] (tanh output: the range of scorelab.quantize.to_model)
                   or points (B, D), unbounded (MLP, for 2-D toys)
                   G.z_dim, G.sample_z(n, generator), G.generate(n, generator, y)
    discriminator  D(x, y: (B,) | None = None) -> logits (B,);  D(x) = sigmoid(logit) = P(x is real)

``y`` are class labels ``0..num_classes - 1`` of a conditional net (``num_classes > 0``);
``y = None`` selects the learned null row of :class:`~scorelab.nets.embeddings.LabelEmbedding`.
Generators concatenate a label embedding to the latent; discriminators are projection
discriminators (Miyato & Koyama 2018): ``logit = psi(phi(x)) + <embed(y), phi(x)>``.

**Normalisation, batches and DDP.** DCGAN (Radford et al. 2016) put BatchNorm in both nets; these
nets do not. In training mode BatchNorm makes ``G(z_i)`` depend on the other latents of its batch
(and in eval mode on running averages), so a seed would not give the same image whatever the batch
size, and its running buffers drift apart on the ranks of DistributedDataParallel unless they are
synchronised or broadcast. In the discriminator, a batch of only-real or only-fake examples lets
BatchNorm leak the batch's realness, and it breaks per-example gradient penalties (Gulrajani et
al. 2017 advise against it with a gradient penalty). Instead:

* generators use GroupNorm (Wu & He 2018: per example and channel group, no buffers);
  ``norm="layer"`` is GroupNorm with one group (LayerNorm over ``C, H, W``);
* discriminators use no normalisation by default, with spectral normalisation (Miyato et al.
  2018) on every layer optional. Its power-iteration vectors are buffers, but they are updated
  from the weights alone, never from data, so ranks holding identical weights keep identical
  vectors (and DDP broadcasts buffers from rank 0 anyway). In training mode every forward runs one
  power iteration, so two calls see slightly different normalised weights (eval mode: none);
* the StyleGAN generator's truncation centre ``w_avg`` is not a buffer: :meth:`StyleGANGenerator.w_average`
  computes it on demand from a fixed seed, identical on every rank and never stale.

So every net treats examples independently, ``net(x)[i] == net(x[i:i+1])``, which
:func:`scorelab.gan.discriminator_terms` uses to score real and fake in one forward and
``tests/test_gan.py`` checks.

Nets and their defaults for 28x28x1 (parameters; multiply-accumulates of one forward, per image)::

    DCGANGenerator      z 100 -> linear -> 128x7x7 -> ConvT -> 64x14x14 -> ConvT -> 1x28x28   0.77M   7.3M
    DCGANDiscriminator  1x28x28 -> conv -> 64x14x14 -> conv -> 128x7x7 -> linear (SN)         0.14M   6.6M
    StyleGANGenerator   mapping 4 x 128; const 128x7x7; 7 -> 14 -> 28; 6 AdaIN layers        0.47M   51M
    MLPGenerator / MLPDiscriminator   3 hidden layers of 128 (2-D toys)                    34k     34k

One training step (D step with R1 + G step, batch 64, one thread of the 2-core dev machine, a
rough single reading): 0.1-0.17 s with the DCGAN generator, 0.4-0.6 s with the StyleGAN one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from ..random import Generator, rand, randn
from .embeddings import LabelEmbedding, NetConfigBase, _check

__all__ = [
    "NORMS",
    "ACTIVATIONS",
    "DCGANGeneratorConfig",
    "DCGANGenerator",
    "DCGANDiscriminatorConfig",
    "DCGANDiscriminator",
    "StyleGANGeneratorConfig",
    "StyleGANGenerator",
    "MappingNetwork",
    "EqualLinear",
    "EqualConv2d",
    "adain",
    "AdaIN",
    "NoiseInjection",
    "mix_styles",
    "random_crossover",
    "truncate",
    "MLPGeneratorConfig",
    "MLPGenerator",
    "MLPDiscriminatorConfig",
    "MLPDiscriminator",
    "GENERATORS",
    "DISCRIMINATORS",
    "build_generator",
    "build_discriminator",
]

NORMS = ("group", "layer", "none")
ACTIVATIONS = ("leaky_relu", "relu", "silu", "tanh")
LEAKY_SLOPE = 0.2  # negative slope of every LeakyReLU here (DCGAN, StyleGAN)


# --------------------------------------------------------------------------------------
# Config plumbing shared by the GAN nets
# --------------------------------------------------------------------------------------
@dataclass
class _GANNetConfig:
    """Fields and dict round trips shared by the GAN net configs (the nets take no time input)."""

    num_classes: int = 0  # number of class labels (0: unconditional); row num_classes is the null label

    # the same YAML round trip as every denoising-net config (unknown keys are an error)
    from_dict = classmethod(NetConfigBase.from_dict.__func__)
    to_dict = NetConfigBase.to_dict

    def __post_init__(self):
        for f in fields(self):  # YAML lists -> tuples
            if isinstance(getattr(self, f.name), list):
                setattr(self, f.name, tuple(getattr(self, f.name)))
        _check(self, "num_classes", isinstance(self.num_classes, int) and self.num_classes >= 0, "must be a non-negative integer")

    def _positive(self, *names: str) -> None:
        for name in names:
            v = getattr(self, name)
            _check(self, name, isinstance(v, int) and not isinstance(v, bool) and v >= 1, "must be a positive integer")

    def _channels(self, name: str = "channels") -> None:
        c = getattr(self, name)
        _check(self, name, isinstance(c, tuple) and len(c) >= 1 and all(isinstance(v, int) and v >= 1 for v in c),
               "must be a non-empty tuple of positive integers")

    def _image_size(self, levels: int) -> None:
        s = self.image_size
        if isinstance(s, int):
            self.image_size = s = (s, s)
        _check(self, "image_size", isinstance(s, tuple) and len(s) == 2 and all(isinstance(v, int) and v >= 1 for v in s),
               "must be an int or a pair (H, W) of positive integers")
        f = 2**levels
        _check(self, "image_size", s[0] % f == 0 and s[1] % f == 0,
               f"must have H and W divisible by 2^{levels} = {f} (one factor 2 per resolution change of 'channels')")

    def _norm(self) -> None:
        _check(self, "norm", self.norm in NORMS, f"must be one of {NORMS}")
        if self.norm == "group":
            for c in self.channels:
                _check(self, "groups", isinstance(self.groups, int) and self.groups >= 1 and c % min(self.groups, c) == 0,
                       f"must be a positive integer dividing every channel count {self.channels}")


def _norm_layer(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(groups, channels), channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


def _activation(name: str) -> nn.Module:
    return {"leaky_relu": lambda: nn.LeakyReLU(LEAKY_SLOPE), "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}[name]()


def _dcgan_init(module: nn.Module, std: float) -> None:
    """DCGAN's initialisation: conv / linear weights ~ N(0, std^2), biases 0 (std = 0: keep PyTorch's)."""
    if std <= 0:
        return
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _check_latent(z: Tensor, z_dim: int) -> None:
    if z.ndim != 2 or z.shape[1] != z_dim:
        raise ValueError(f"z must have shape (B, {z_dim}), got {tuple(z.shape)}")


class _Generator(nn.Module):
    """Latent sampling shared by the generators: ``z ~ N(0, I)`` of shape ``(n, z_dim)``."""

    z_dim: int

    def sample_z(self, n: int, generator: Generator = None, device=None) -> Tensor:
        """``n`` latents ``(n, z_dim)`` from ``generator`` (one, or one per example: batch-independent draws)."""
        dev = device if device is not None else next(self.parameters()).device
        return randn((n, self.z_dim), generator=generator, device=dev)

    def generate(self, n: int, generator: Generator = None, y: Tensor | None = None, **kwargs) -> Tensor:
        """``G(sample_z(n, generator), y, **kwargs)``: ``n`` samples from one random stream."""
        return self(self.sample_z(n, generator), y, **kwargs)


class _Projection(nn.Module):
    """``logit = linear(phi) + <embed(y), phi>`` for features ``phi: (B, F)`` (Miyato & Koyama 2018)."""

    def __init__(self, features: int, num_classes: int, spectral: bool, init_std: float = 0.0):
        super().__init__()
        lin = nn.Linear(features, 1)
        _dcgan_init(lin, init_std)
        self.linear = _spectral_norm(lin) if spectral else lin
        self.embed = LabelEmbedding(num_classes, features) if num_classes else None

    def forward(self, phi: Tensor, y: Tensor | None) -> Tensor:
        out = self.linear(phi)[:, 0]  # (B,)
        if self.embed is not None:
            out = out + (self.embed(y, phi.shape[0], phi.device).to(phi.dtype) * phi).sum(1)
        return out


# --------------------------------------------------------------------------------------
# DCGAN (Radford et al. 2016)
# --------------------------------------------------------------------------------------
@dataclass
class DCGANGeneratorConfig(_GANNetConfig):
    """Config of :class:`DCGANGenerator` (Radford et al. 2016, "all-convolutional", no pooling)."""

    z_dim: int = 100  # latent dimension of z ~ N(0, I) (DCGAN: 100)
    out_channels: int = 1  # image channels C
    image_size: tuple = (28, 28)  # (H, W) (or an int for square images); divisible by 2^len(channels)
    channels: tuple = (128, 64)  # channels at the start resolution (H, W) / 2^n and after each but the last ConvT (n = len)
    norm: str = "group"  # "group" (GroupNorm), "layer" (one group), "none"; never BatchNorm (module docstring)
    groups: int = 8  # GroupNorm groups (capped at the channel count; must divide every entry of channels)
    label_dim: int = 32  # width of the label embedding concatenated to z (num_classes > 0)
    init_std: float = 0.02  # weights ~ N(0, init_std^2) as in DCGAN (0: PyTorch's default init)

    def __post_init__(self):
        super().__post_init__()
        self._positive("z_dim", "out_channels", "label_dim")
        self._channels()
        self._image_size(len(self.channels))
        self._norm()
        _check(self, "init_std", self.init_std >= 0, "must be >= 0")


class DCGANGenerator(_Generator):
    """``G(z: (B, z_dim), y=None) -> (B, C, H, W)`` in [-1, 1].

    ``h = ReLU(norm(reshape(Linear([z, embed(y)]))))`` at ``(c_0, H/2^n, W/2^n)``; then ``n``
    transposed convolutions 4x4 / stride 2 (each doubles H and W), ``ReLU(norm(.))`` after all but
    the last, which maps ``c_{n-1}`` to ``C`` channels; ``tanh``. Any ``H, W`` divisible by ``2^n``
    (28x28 with n = 2; 32x32 or 64x64 with n up to 5 or 6).
    """

    def __init__(self, cfg: DCGANGeneratorConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg if cfg is not None else DCGANGeneratorConfig(**overrides)
        self.cfg = cfg
        self.z_dim = cfg.z_dim
        c, n = cfg.channels, len(cfg.channels)
        self.start = (c[0], cfg.image_size[0] >> n, cfg.image_size[1] >> n)  # (c_0, h_0, w_0)
        self.label_embed = LabelEmbedding(cfg.num_classes, cfg.label_dim) if cfg.num_classes else None
        in_dim = cfg.z_dim + (cfg.label_dim if cfg.num_classes else 0)
        self.project = nn.Linear(in_dim, math.prod(self.start))
        self.norm0 = _norm_layer(cfg.norm, c[0], cfg.groups)
        layers: list[nn.Module] = []
        for i in range(n):
            last = i == n - 1
            cout = cfg.out_channels if last else c[i + 1]
            layers.append(nn.ConvTranspose2d(c[i], cout, 4, stride=2, padding=1))
            if not last:
                layers += [_norm_layer(cfg.norm, cout, cfg.groups), nn.ReLU()]
        self.up = nn.Sequential(*layers)
        _dcgan_init(self, cfg.init_std)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        _check_latent(z, self.z_dim)
        B = z.shape[0]
        if self.label_embed is not None:
            z = torch.cat([z, self.label_embed(y, B, z.device).to(z.dtype)], 1)
        h = self.project(z).view(B, *self.start)  # (B, c_0, h_0, w_0)
        h = F.relu(self.norm0(h))
        return torch.tanh(self.up(h))  # (B, C, H, W)


@dataclass
class DCGANDiscriminatorConfig(_GANNetConfig):
    """Config of :class:`DCGANDiscriminator` (Radford et al. 2016; projection: Miyato & Koyama 2018)."""

    in_channels: int = 1  # image channels C
    image_size: tuple = (28, 28)  # (H, W) (or an int); divisible by 2^len(channels)
    channels: tuple = (64, 128)  # channels after each 4x4 stride-2 convolution, fine to coarse
    norm: str = "none"  # normalisation after every conv but the first: "none", "group", "layer"
    groups: int = 8  # GroupNorm groups when norm = "group"
    spectral_norm: bool = True  # spectral normalisation of every conv and the head (Miyato et al. 2018)
    init_std: float = 0.02  # weights ~ N(0, init_std^2) as in DCGAN (0: PyTorch's default init)

    def __post_init__(self):
        super().__post_init__()
        self._positive("in_channels")
        self._channels()
        self._image_size(len(self.channels))
        self._norm()
        _check(self, "init_std", self.init_std >= 0, "must be >= 0")


class DCGANDiscriminator(nn.Module):
    """``D(x: (B, C, H, W), y=None) -> logits (B,)``.

    ``n = len(channels)`` convolutions 4x4 / stride 2 (each halves H and W), LeakyReLU(0.2) after
    each and ``norm`` after all but the first; the features ``phi`` (flattened
    ``c_{n-1} x H/2^n x W/2^n``) go to a linear head (plus the label projection when conditional).
    Any ``H, W`` divisible by ``2^n``.
    """

    def __init__(self, cfg: DCGANDiscriminatorConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg if cfg is not None else DCGANDiscriminatorConfig(**overrides)
        self.cfg = cfg
        c, n = cfg.channels, len(cfg.channels)
        layers: list[nn.Module] = []
        for i in range(n):
            cin = cfg.in_channels if i == 0 else c[i - 1]
            conv = nn.Conv2d(cin, c[i], 4, stride=2, padding=1)
            _dcgan_init(conv, cfg.init_std)
            layers.append(_spectral_norm(conv) if cfg.spectral_norm else conv)
            if i > 0:
                layers.append(_norm_layer(cfg.norm, c[i], cfg.groups))
            layers.append(nn.LeakyReLU(LEAKY_SLOPE))
        self.features = nn.Sequential(*layers)
        feat = c[-1] * (cfg.image_size[0] >> n) * (cfg.image_size[1] >> n)
        self.head = _Projection(feat, cfg.num_classes, cfg.spectral_norm, cfg.init_std)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        C, (H, W) = self.cfg.in_channels, self.cfg.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (C, H, W):
            raise ValueError(f"x must have shape (B, {C}, {H}, {W}), got {tuple(x.shape)}")
        phi = self.features(x).flatten(1)  # (B, F)
        return self.head(phi, y)  # (B,)


# --------------------------------------------------------------------------------------
# StyleGAN (Karras et al. 2019) pieces
# --------------------------------------------------------------------------------------
class EqualLinear(nn.Module):
    """Linear layer with the equalised learning rate of Karras et al. (2018, 2019).

    ``y = x (W g)^T + b lr_mul`` with ``W ~ N(0, 1 / lr_mul^2)`` stored and ``g = lr_mul / sqrt(in_dim)``
    applied at run time, so every layer's stored weights have the same scale and Adam's step is the
    same relative change everywhere; ``lr_mul`` (0.01 in StyleGAN's mapping net) slows a layer down.
    ``bias_init`` (a number or an ``(out_dim,)`` tensor) is the *effective* initial bias.
    ``activation="lrelu"`` applies ``sqrt(2) LeakyReLU_0.2`` (the gain keeps the second moment).
    """

    def __init__(self, in_dim: int, out_dim: int, bias_init=0.0, lr_mul: float = 1.0, activation: str | None = None):
        super().__init__()
        if activation not in (None, "lrelu"):
            raise ValueError(f"EqualLinear: activation must be None or 'lrelu', got {activation!r}")
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.as_tensor(bias_init, dtype=torch.float32).expand(out_dim).clone() / lr_mul)
        self.weight_gain = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight * self.weight_gain, self.bias * self.lr_mul)
        return F.leaky_relu(y, LEAKY_SLOPE) * math.sqrt(2) if self.activation == "lrelu" else y


class EqualConv2d(nn.Module):
    """``k x k`` convolution (padding ``k // 2``, no bias) with the equalised learning rate: weights
    ``N(0, 1)`` stored, scaled by ``1 / sqrt(in_channels k^2)`` at run time (Karras et al. 2018)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.gain = 1.0 / math.sqrt(in_channels * kernel * kernel)
        self.padding = kernel // 2

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.gain, padding=self.padding)


def adain(x: Tensor, scale: Tensor, bias: Tensor, eps: float = 1e-8) -> Tensor:
    """Adaptive instance normalisation (Huang & Belongie 2017; StyleGAN, the seed's formula).

    ``AdaIN(x, w)_{b,i} = w_s[b, i] (x_{b,i} - mu(x_{b,i})) / sigma(x_{b,i}) + w_b[b, i]`` for
    ``x: (B, C, H, W)``, ``scale = w_s`` and ``bias = w_b`` of shape ``(B, C)``; ``mu`` and ``sigma``
    are the mean and the (population) standard deviation of channel ``i`` of example ``b`` over
    the spatial dimensions, ``sigma = sqrt(var + eps)``. With ``eps = 0`` each output channel has
    exactly mean ``w_b`` and standard deviation ``|w_s|``; ``eps > 0`` shrinks the standard deviation
    by the factor ``sqrt(var / (var + eps)) >= 1 - eps / (2 var)``.
    """
    if x.ndim != 4 or scale.shape != x.shape[:2] or bias.shape != x.shape[:2]:
        raise ValueError(f"adain: x (B, C, H, W) with scale and bias (B, C); got {tuple(x.shape)}, {tuple(scale.shape)}, {tuple(bias.shape)}")
    xc = x - x.mean((2, 3), keepdim=True)  # (B, C, H, W), centred per example and channel
    var = xc.square().mean((2, 3), keepdim=True)  # two-pass variance: ~1.4x faster forward + backward than x.var on CPU
    return torch.addcmul(bias[:, :, None, None], xc, torch.rsqrt(var + eps) * scale[:, :, None, None])


class AdaIN(nn.Module):
    """:func:`adain` with the style ``(w_s, w_b) = A(w)``, ``A`` a learned affine map ``w_dim -> 2C``
    initialised to ``w_s = 1``, ``w_b = 0`` (StyleGAN's "A" boxes)."""

    def __init__(self, channels: int, w_dim: int, eps: float = 1e-8):
        super().__init__()
        self.affine = EqualLinear(w_dim, 2 * channels, bias_init=torch.cat([torch.ones(channels), torch.zeros(channels)]))
        self.eps = eps  # added to the variance before the square root

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        scale, bias = self.affine(w).chunk(2, dim=1)  # (B, C) each
        return adain(x, scale, bias, self.eps)


class NoiseInjection(nn.Module):
    """``x + s_c n`` with ``n: (B, 1, H, W)`` standard normal, shared by the channels, and a learned
    per-channel strength ``s: (C,)`` initialised to 0 (StyleGAN's "B" boxes)."""

    def __init__(self, channels: int):
        super().__init__()
        self.strength = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, noise: Tensor | None) -> Tensor:
        if noise is None:
            return x
        if noise.shape != (x.shape[0], 1, *x.shape[2:]):
            raise ValueError(f"noise must have shape {(x.shape[0], 1, *x.shape[2:])}, got {tuple(noise.shape)}")
        return x + self.strength.view(1, -1, 1, 1) * noise


def mix_styles(w1: Tensor, w2: Tensor, crossover, num_ws: int) -> Tensor:
    """Style mixing (StyleGAN §3.1): per-layer styles ``(B, num_ws, w_dim)`` taking ``w1`` on layers
    ``< crossover`` and ``w2`` on layers ``>= crossover``.

    ``w1``, ``w2``: ``(B, w_dim)`` or already per layer ``(B, num_ws, w_dim)``; ``crossover``: an int
    or a ``(B,)`` tensor in ``0..num_ws`` (``num_ws``: all ``w1``, no mixing; ``0``: all ``w2``).
    """
    w1 = _per_layer(w1, num_ws)
    w2 = _per_layer(w2, num_ws)
    c = torch.as_tensor(crossover, device=w1.device)
    if c.ndim == 0:
        c = c.expand(w1.shape[0])
    if c.shape != (w1.shape[0],) or int(c.min()) < 0 or int(c.max()) > num_ws:
        raise ValueError(f"crossover must be an int or a ({w1.shape[0]},) tensor in 0..{num_ws}, got {crossover!r}")
    layer = torch.arange(num_ws, device=w1.device)
    return torch.where((layer[None, :] < c[:, None])[:, :, None], w1, w2)


def random_crossover(batch: int, num_ws: int, prob: float = 0.9, generator: Generator = None, device=None) -> Tensor:
    """Crossover layers ``(B,)`` for mixing regularisation (StyleGAN: mix with probability 0.9).

    With probability ``prob`` an example mixes at a layer drawn uniformly from ``1..num_ws - 1``;
    otherwise its crossover is ``num_ws`` (no mixing). Draws come from ``generator`` (one per example
    with a list of generators).
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"style-mixing prob must lie in [0, 1], got {prob}")
    if num_ws < 2:
        return torch.full((batch,), num_ws, dtype=torch.long, device=device)
    u = rand((batch, 2), generator=generator, device=device)  # (B, 2): mix or not, and where
    layer = 1 + (u[:, 1] * (num_ws - 1)).long().clamp(max=num_ws - 2)
    return torch.where(u[:, 0] < prob, layer, torch.full_like(layer, num_ws))


def truncate(ws: Tensor, w_avg: Tensor, psi: float, cutoff: int | None = None) -> Tensor:
    """Truncation trick (StyleGAN §B): ``w' = w_avg + psi (w - w_avg)`` on layers ``< cutoff`` (all when None).

    ``ws: (B, num_ws, w_dim)``, ``w_avg: (w_dim,)`` or ``(B, w_dim)``. ``psi = 1`` is the identity,
    ``psi = 0`` maps every latent to the average image.
    """
    avg = w_avg if w_avg.ndim == 2 else w_avg[None]
    out = torch.lerp(avg[:, None, :].to(ws.dtype), ws, psi)
    if cutoff is None or cutoff >= ws.shape[1]:
        return out
    keep = torch.arange(ws.shape[1], device=ws.device)[None, :, None] < cutoff
    return torch.where(keep, out, ws)


def _per_layer(w: Tensor, num_ws: int) -> Tensor:
    if w.ndim == 2:
        return w[:, None, :].expand(w.shape[0], num_ws, w.shape[1])
    if w.ndim == 3 and w.shape[1] == num_ws:
        return w
    raise ValueError(f"w must have shape (B, w_dim) or (B, {num_ws}, w_dim), got {tuple(w.shape)}")


@dataclass
class StyleGANGeneratorConfig(_GANNetConfig):
    """Config of :class:`StyleGANGenerator` (Karras et al. 2019, "A Style-Based Generator Architecture")."""

    z_dim: int = 128  # latent dimension of z ~ N(0, I) (StyleGAN: 512)
    w_dim: int = 128  # dimension of the intermediate latent w (StyleGAN: 512)
    mapping_layers: int = 4  # depth of the mapping MLP z -> w (StyleGAN: 8)
    mapping_lr_mul: float = 0.01  # learning-rate multiplier of the mapping MLP (StyleGAN: 0.01)
    out_channels: int = 1  # image channels C
    image_size: tuple = (28, 28)  # (H, W) (or an int); divisible by 2^(len(channels) - 1)
    channels: tuple = (128, 64, 32)  # channels at the constant's resolution and after each 2x upsampling
    noise: bool = True  # per-layer noise injection with learned per-channel strengths
    label_dim: int = 0  # width of the label embedding concatenated to the normalised z (0: w_dim)
    adain_eps: float = 1e-8  # added to the variance in AdaIN
    w_avg_samples: int = 4096  # latents averaged by w_average() for the truncation centre

    def __post_init__(self):
        super().__post_init__()
        self._positive("z_dim", "w_dim", "mapping_layers", "out_channels", "w_avg_samples")
        _check(self, "label_dim", isinstance(self.label_dim, int) and self.label_dim >= 0, "must be a non-negative integer (0: w_dim)")
        _check(self, "mapping_lr_mul", 0 < self.mapping_lr_mul <= 1, "must lie in (0, 1]")
        _check(self, "adain_eps", 0 <= self.adain_eps < 1, "must lie in [0, 1)")
        self._channels()
        self._image_size(len(self.channels) - 1)

    @property
    def num_ws(self) -> int:
        """Number of per-layer styles: two AdaIN layers per resolution."""
        return 2 * len(self.channels)


class MappingNetwork(nn.Module):
    """``w = MLP(normalize(z) [, normalize(embed(y))])``: (B, z_dim) -> (B, w_dim) (StyleGAN's f).

    ``normalize(v) = v / sqrt(mean(v^2) + 1e-8)`` (pixel norm); ``mapping_layers`` equalised-LR
    layers with ``sqrt(2) LeakyReLU_0.2`` and learning-rate multiplier ``mapping_lr_mul``; the label
    embedding is StyleGAN2-ADA's conditioning.
    """

    def __init__(self, cfg: StyleGANGeneratorConfig):
        super().__init__()
        label_dim = cfg.label_dim or cfg.w_dim
        self.embed = LabelEmbedding(cfg.num_classes, label_dim) if cfg.num_classes else None
        dims = [cfg.z_dim + (label_dim if cfg.num_classes else 0)] + [cfg.w_dim] * cfg.mapping_layers
        self.layers = nn.Sequential(*(EqualLinear(a, b, lr_mul=cfg.mapping_lr_mul, activation="lrelu") for a, b in zip(dims[:-1], dims[1:])))

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        h = _normalize(z)
        if self.embed is not None:
            h = torch.cat([h, _normalize(self.embed(y, z.shape[0], z.device).to(z.dtype))], 1)
        return self.layers(h)  # (B, w_dim)


def _normalize(v: Tensor) -> Tensor:
    return v * torch.rsqrt(v.pow(2).mean(1, keepdim=True) + 1e-8)


class _StyleLayer(nn.Module):
    """``[upsample 2x ->] [conv3x3 ->] + noise -> + bias -> LeakyReLU -> AdaIN(., w)`` (StyleGAN)."""

    def __init__(self, cin: int, cout: int, w_dim: int, conv: bool, up: bool, noise: bool, eps: float):
        super().__init__()
        self.up = up
        self.conv = EqualConv2d(cin, cout, 3) if conv else None
        self.noise = NoiseInjection(cout) if noise else None
        self.bias = nn.Parameter(torch.zeros(cout))
        self.adain = AdaIN(cout, w_dim, eps)

    def forward(self, x: Tensor, w: Tensor, noise: Tensor | None) -> Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        if self.conv is not None:
            x = self.conv(x)
        if self.noise is not None:
            x = self.noise(x, noise)
        x = F.leaky_relu(x + self.bias.view(1, -1, 1, 1), LEAKY_SLOPE)
        return self.adain(x, w)


NOISE_MODES = ("random", "none")


class StyleGANGenerator(_Generator):
    """``G(z: (B, z_dim), y=None, ...) -> (B, C, H, W)`` in [-1, 1]: mapping network, then synthesis.

    Synthesis (``n = len(channels)`` resolutions, ``(h_0, w_0) = (H, W) / 2^(n-1)``)::

        x = learned constant (c_0, h_0, w_0)           (the same for every example)
        level 0:  [noise, bias, act, AdaIN(w_0)], conv3x3 [noise, bias, act, AdaIN(w_1)]
        level i:  bilinear 2x, conv3x3 c_{i-1} -> c_i [.. AdaIN(w_2i)], conv3x3 [.. AdaIN(w_2i+1)]
        out = tanh(conv1x1(x) + b)                     (tanh: the library's [-1, 1] image range;
                                                        StyleGAN's output layer is linear)

    ``num_ws = 2 n`` styles, one per AdaIN layer. :meth:`mapping` and :meth:`synthesis` are exposed so
    that latents can be interpolated, mixed and truncated in ``w`` space.
    """

    def __init__(self, cfg: StyleGANGeneratorConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg if cfg is not None else StyleGANGeneratorConfig(**overrides)
        self.cfg = cfg
        self.z_dim = cfg.z_dim
        self.num_ws = cfg.num_ws
        c, n = cfg.channels, len(cfg.channels)
        h0, w0 = cfg.image_size[0] >> (n - 1), cfg.image_size[1] >> (n - 1)
        self.mapping_net = MappingNetwork(cfg)
        self.const = nn.Parameter(torch.randn(c[0], h0, w0))
        layers = []
        for i in range(n):
            cin = c[0] if i == 0 else c[i - 1]
            layers.append(_StyleLayer(cin, c[i], cfg.w_dim, conv=i > 0, up=i > 0, noise=cfg.noise, eps=cfg.adain_eps))
            layers.append(_StyleLayer(c[i], c[i], cfg.w_dim, conv=True, up=False, noise=cfg.noise, eps=cfg.adain_eps))
        self.layers = nn.ModuleList(layers)
        self.to_image = EqualConv2d(c[-1], cfg.out_channels, 1)
        self.to_image_bias = nn.Parameter(torch.zeros(cfg.out_channels))
        self.resolutions = [(h0 << (i // 2), w0 << (i // 2)) for i in range(self.num_ws)]  # (H_l, W_l) of layer l

    def mapping(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """``w = f(z, y)``: (B, z_dim) -> (B, w_dim)."""
        _check_latent(z, self.z_dim)
        return self.mapping_net(z, y)

    def noise_inputs(self, batch: int, generator: Generator = None, device=None, dtype=torch.float32) -> list[Tensor]:
        """Fresh per-layer noise ``[(B, 1, H_l, W_l) for each layer l]`` from ``generator``, in layer order."""
        return [randn((batch, 1, h, w), generator=generator, dtype=dtype, device=device) for h, w in self.resolutions]

    def synthesis(self, ws: Tensor, noise_mode: str = "random", generator: Generator = None, noise: Sequence[Tensor] | None = None) -> Tensor:
        """Image (B, C, H, W) from styles ``ws``: ``(B, w_dim)`` (one w for every layer) or ``(B, num_ws, w_dim)``.

        Noise: ``noise`` (a list from :meth:`noise_inputs`) if given; else ``noise_mode="random"``
        draws it from ``generator`` (a seed then fixes the image; one generator per example keeps
        examples batch-independent) and ``"none"`` switches it off.
        """
        ws = _per_layer(ws, self.num_ws)
        B = ws.shape[0]
        if noise is None:
            if noise_mode not in NOISE_MODES:
                raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
            if noise_mode == "random" and self.cfg.noise:
                noise = self.noise_inputs(B, generator, ws.device, ws.dtype)
        if noise is not None and len(noise) != self.num_ws:
            raise ValueError(f"noise must hold {self.num_ws} tensors (one per layer), got {len(noise)}")
        x = self.const.to(ws.dtype)[None].expand(B, -1, -1, -1)
        for i, layer in enumerate(self.layers):
            x = layer(x, ws[:, i], None if noise is None else noise[i])
        return torch.tanh(self.to_image(x) + self.to_image_bias.view(1, -1, 1, 1))

    @torch.no_grad()
    def w_average(self, y: int | None = None, n: int | None = None, seed: int = 0) -> Tensor:
        """The truncation centre ``E_z[f(z, y)]`` (w_dim,), estimated from ``n`` latents (default
        ``cfg.w_avg_samples``) drawn from ``seed``: the same on every rank and for the current weights
        (StyleGAN tracks it as a running average of training latents instead). ``y``: one class label
        of a conditional generator (None: the null label)."""
        n = n or self.cfg.w_avg_samples
        dev = self.const.device
        z = torch.randn(n, self.z_dim, generator=torch.Generator().manual_seed(seed)).to(dev)
        labels = None if y is None else torch.full((n,), int(y), dtype=torch.long, device=dev)
        return self.mapping(z, labels).mean(0)

    def forward(
        self,
        z: Tensor,
        y: Tensor | None = None,
        *,
        z2: Tensor | None = None,
        crossover=None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        w_avg: Tensor | None = None,
        noise_mode: str = "random",
        generator: Generator = None,
    ) -> Tensor:
        """Image (B, C, H, W) in [-1, 1] from ``z: (B, z_dim)``.

        ``z2`` and ``crossover`` (int or (B,), see :func:`mix_styles`): style mixing, layers
        ``< crossover`` from ``z``, the rest from ``z2`` (same labels). ``truncation_psi < 1``:
        :func:`truncate` towards ``w_avg`` (default :meth:`w_average`, per class when ``y`` is given)
        on layers ``< truncation_cutoff``. ``noise_mode``, ``generator``: see :meth:`synthesis`.
        """
        ws = _per_layer(self.mapping(z, y), self.num_ws)
        if z2 is not None:
            if crossover is None:
                raise ValueError("style mixing: give crossover (int or (B,) tensor in 0..num_ws) with z2")
            ws = mix_styles(ws, self.mapping(z2, y), crossover, self.num_ws)
        if truncation_psi != 1.0:
            if w_avg is None:
                w_avg = self._w_avg_for(y, z.shape[0])
            ws = truncate(ws, w_avg, truncation_psi, truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, generator=generator)

    def generate(self, n: int, generator: Generator = None, y: Tensor | None = None, **kwargs) -> Tensor:
        """``G(sample_z(n, generator), y, generator=generator, **kwargs)``: latents, then the noise of
        every layer, from the same stream(s); one generator per example keeps images batch-independent."""
        return self(self.sample_z(n, generator), y, generator=generator, **kwargs)

    def _w_avg_for(self, y: Tensor | None, batch: int) -> Tensor:
        if y is None or not self.cfg.num_classes:
            return self.w_average()
        labels = y.tolist()
        table = {c: self.w_average(c) for c in sorted(set(labels))}
        return torch.stack([table[c] for c in labels])  # (B, w_dim)


# --------------------------------------------------------------------------------------
# MLPs for 2-D toys
# --------------------------------------------------------------------------------------
@dataclass
class MLPGeneratorConfig(_GANNetConfig):
    """Config of :class:`MLPGenerator` (the 2-D toy generator of GAN mode-collapse studies)."""

    z_dim: int = 8  # latent dimension of z ~ N(0, I)
    dim: int = 2  # data dimension D
    width: int = 128  # hidden width
    depth: int = 3  # number of hidden layers
    activation: str = "leaky_relu"  # one of ACTIVATIONS
    label_dim: int = 16  # width of the label embedding concatenated to z (num_classes > 0)

    def __post_init__(self):
        super().__post_init__()
        self._positive("z_dim", "dim", "width", "depth", "label_dim")
        _check(self, "activation", self.activation in ACTIVATIONS, f"must be one of {ACTIVATIONS}")


def _mlp(in_dim: int, width: int, depth: int, activation: str, spectral: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(in_dim if i == 0 else width, width)
        layers += [_spectral_norm(lin) if spectral else lin, _activation(activation)]
    return nn.Sequential(*layers)


class MLPGenerator(_Generator):
    """``G(z: (B, z_dim), y=None) -> (B, D)``: ``depth`` hidden layers, linear (unbounded) output."""

    def __init__(self, cfg: MLPGeneratorConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg if cfg is not None else MLPGeneratorConfig(**overrides)
        self.cfg = cfg
        self.z_dim = cfg.z_dim
        self.label_embed = LabelEmbedding(cfg.num_classes, cfg.label_dim) if cfg.num_classes else None
        self.body = _mlp(cfg.z_dim + (cfg.label_dim if cfg.num_classes else 0), cfg.width, cfg.depth, cfg.activation)
        self.out = nn.Linear(cfg.width, cfg.dim)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        _check_latent(z, self.z_dim)
        if self.label_embed is not None:
            z = torch.cat([z, self.label_embed(y, z.shape[0], z.device).to(z.dtype)], 1)
        return self.out(self.body(z))  # (B, D)


@dataclass
class MLPDiscriminatorConfig(_GANNetConfig):
    """Config of :class:`MLPDiscriminator` (projection conditioning: Miyato & Koyama 2018)."""

    dim: int = 2  # data dimension D
    width: int = 128  # hidden width
    depth: int = 3  # number of hidden layers
    activation: str = "leaky_relu"  # one of ACTIVATIONS
    spectral_norm: bool = False  # spectral normalisation of every layer (Miyato et al. 2018)

    def __post_init__(self):
        super().__post_init__()
        self._positive("dim", "width", "depth")
        _check(self, "activation", self.activation in ACTIVATIONS, f"must be one of {ACTIVATIONS}")


class MLPDiscriminator(nn.Module):
    """``D(x: (B, D), y=None) -> logits (B,)``: ``phi = MLP(x)`` (B, width), then the projection head."""

    def __init__(self, cfg: MLPDiscriminatorConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg if cfg is not None else MLPDiscriminatorConfig(**overrides)
        self.cfg = cfg
        self.body = _mlp(cfg.dim, cfg.width, cfg.depth, cfg.activation, cfg.spectral_norm)
        self.head = _Projection(cfg.width, cfg.num_classes, cfg.spectral_norm)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.cfg.dim:
            raise ValueError(f"x must have shape (B, {self.cfg.dim}), got {tuple(x.shape)}")
        return self.head(self.body(x), y)  # (B,)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------
GENERATORS = {
    "dcgan": (DCGANGenerator, DCGANGeneratorConfig),
    "stylegan": (StyleGANGenerator, StyleGANGeneratorConfig),
    "mlp": (MLPGenerator, MLPGeneratorConfig),
}
DISCRIMINATORS = {
    "dcgan": (DCGANDiscriminator, DCGANDiscriminatorConfig),
    "mlp": (MLPDiscriminator, MLPDiscriminatorConfig),
}


def _data_fields(kind: str, name: str, data_shape: tuple, image_key: str) -> dict:
    data_shape = tuple(data_shape)
    if name == "mlp":
        if len(data_shape) != 1:
            raise ValueError(f"{kind} 'mlp' needs flat data (D,), got shape {data_shape}")
        return {"dim": data_shape[0]}
    if len(data_shape) != 3:
        raise ValueError(f"{kind} {name!r} needs images (C, H, W), got shape {data_shape}")
    return {image_key: data_shape[0], "image_size": data_shape[1:]}


def build_generator(name: str, options: dict | None, data_shape: tuple, num_classes: int = 0) -> nn.Module:
    """A generator for data of ``data_shape`` (without batch): the data fixes its output size, then
    ``options`` (config fields) the rest."""
    if name not in GENERATORS:
        raise ValueError(f"unknown generator {name!r}: expected one of {', '.join(GENERATORS)}")
    cls, cfg_cls = GENERATORS[name]
    opts = {**(options or {}), **_data_fields("generator", name, data_shape, "out_channels"), "num_classes": num_classes}
    return cls(cfg_cls.from_dict(opts))


def build_discriminator(name: str, options: dict | None, data_shape: tuple, num_classes: int = 0) -> nn.Module:
    """A discriminator for data of ``data_shape`` (without batch); see :func:`build_generator`."""
    if name not in DISCRIMINATORS:
        raise ValueError(f"unknown discriminator {name!r}: expected one of {', '.join(DISCRIMINATORS)}")
    cls, cfg_cls = DISCRIMINATORS[name]
    opts = {**(options or {}), **_data_fields("discriminator", name, data_shape, "in_channels"), "num_classes": num_classes}
    return cls(cfg_cls.from_dict(opts))
