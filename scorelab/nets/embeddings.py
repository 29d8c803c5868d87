"""Time and label embeddings shared by every denoising network.

A denoising net is called as ``net(x, tau, y=None)`` with ``tau: (B,)`` an order-one time input
that the caller computes: :class:`~scorelab.targets.Denoiser` passes ``path.c_noise(t)`` (the
path's time in ``[0, 1]``, DDPM's ``t / T``, EDM's ``ln(sigma) / 4``; EDM keeps this map in its
preconditioning, and so do we), so no network knows which path it serves. The net embeds
``tau`` with a fixed frequency map, then a learned two-layer MLP.

Frequency maps (both give ``dim`` features):

* sinusoidal (Vaswani et al. 2017; DDPM, Ho et al. 2020):
  ``[cos(s tau f_k), sin(s tau f_k)]``, ``f_k = max_period^(-k/half)``, ``k < half = dim/2``,
  with ``s = SINUSOIDAL_SCALE = 1000`` so that ``tau in [0, 1]`` covers the familiar DDPM range
  of step indices 0..1000 (the highest frequency resolves single steps).
* Gaussian Fourier features (Tancik et al. 2020; Song et al. 2021):
  ``[sin(2 pi tau w_k), cos(2 pi tau w_k)]``, ``w_k ~ N(0, scale^2)`` fixed at construction
  (a buffer, saved in the state dict), ``scale = 16`` as in Song et al.

Frequencies are always evaluated in at least float32 (``sin`` of large arguments in bfloat16 is
meaningless), outside any autocast region. Precision is the caller's: nets hold no precision
switch; the trainer and the samplers run them under ``torch.autocast`` when ``train.precision``
resolves to bf16 (see :mod:`scorelab.train.precision`).

Labels: :class:`LabelEmbedding` holds ``num_classes + 1`` rows; row ``num_classes`` is the learned
*null* label used for unconditional prediction in classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "SINUSOIDAL_SCALE",
    "TIME_EMBEDDINGS",
    "sinusoidal_embedding",
    "SinusoidalEmbedding",
    "GaussianFourierEmbedding",
    "TimeEmbedding",
    "LabelEmbedding",
    "NetConfigBase",
]

SINUSOIDAL_SCALE = 1000.0  # tau in [0, 1] -> positions 0..1000 for the sinusoidal map
TIME_EMBEDDINGS = ("sinusoidal", "fourier")


def _freq_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def sinusoidal_embedding(pos: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer/DDPM sinusoidal features of positions ``pos: (B,)`` -> ``(B, dim)``.

    ``[cos(pos f_0..f_{h-1}), sin(pos f_0..f_{h-1})]`` with ``f_k = max_period^(-k/h)``,
    ``h = dim // 2``; a zero column is appended when ``dim`` is odd.
    """
    half = dim // 2
    dt = _freq_dtype(pos)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dt, device=pos.device) / half)
    args = pos.to(dt)[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class SinusoidalEmbedding(nn.Module):
    """Fixed sinusoidal features of ``tau: (B,)`` at positions ``SINUSOIDAL_SCALE * tau`` -> (B, dim)."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        self.dim = dim  # number of output features
        self.max_period = max_period  # longest period of the sinusoids (Vaswani et al.: 10000)

    def forward(self, tau: Tensor) -> Tensor:
        with torch.autocast(tau.device.type, enabled=False):
            return sinusoidal_embedding(SINUSOIDAL_SCALE * tau, self.dim, self.max_period)


class GaussianFourierEmbedding(nn.Module):
    """Random Fourier features ``[sin(2 pi tau w), cos(2 pi tau w)]``, ``w ~ N(0, scale^2)`` fixed.

    Song et al. 2021 (score SDE, NCSN++): ``tau: (B,)`` -> ``(B, dim)``, ``dim`` even.
    """

    def __init__(self, dim: int, scale: float = 16.0, seed: int = 0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"GaussianFourierEmbedding: dim must be even, got {dim}")
        self.dim = dim  # number of output features (two per frequency)
        self.scale = scale  # standard deviation of the frequencies (Song et al.: 16)
        g = torch.Generator().manual_seed(seed)  # the frequencies do not consume the global stream
        self.register_buffer("w", torch.randn(dim // 2, generator=g) * scale)

    def forward(self, tau: Tensor) -> Tensor:
        with torch.autocast(tau.device.type, enabled=False):
            dt = _freq_dtype(tau)
            args = 2 * math.pi * tau.to(dt)[:, None] * self.w.to(dt)[None]  # (B, dim/2)
            return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class TimeEmbedding(nn.Module):
    """``tau: (B,)`` (order one, see the module docstring) -> ``(B, out_dim)``: frequency features, Linear-SiLU-Linear."""

    def __init__(self, out_dim: int, freq_dim: int = 128, kind: str = "sinusoidal", fourier_scale: float = 16.0):
        super().__init__()
        if kind not in TIME_EMBEDDINGS:
            raise ValueError(f"time_embedding must be one of {TIME_EMBEDDINGS}, got {kind!r}")
        self.freq = SinusoidalEmbedding(freq_dim) if kind == "sinusoidal" else GaussianFourierEmbedding(freq_dim, fourier_scale)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, tau: Tensor) -> Tensor:
        if tau.ndim != 1:
            raise ValueError(f"t must have shape (B,), got {tuple(tau.shape)}")
        feats = self.freq(tau.to(_freq_dtype(tau)))  # (B, freq_dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))  # (B, out_dim)


class LabelEmbedding(nn.Module):
    """Class labels ``y: (B,)`` in ``0..num_classes`` -> ``(B, dim)``; row ``num_classes`` is the null label.

    ``y=None`` means "no label": every example gets the null row (classifier-free guidance's
    unconditional branch). Label dropout for training lives with the trainer, not here.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LabelEmbedding: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes  # number of real classes
        self.null_index = num_classes  # index of the learned null label
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, y: Tensor | None, batch: int, device=None) -> Tensor:
        if y is None:
            y = torch.full((batch,), self.null_index, dtype=torch.long, device=device or self.table.weight.device)
        if y.shape != (batch,):
            raise ValueError(f"y must have shape ({batch},), got {tuple(y.shape)}")
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        if batch and (int(y.min()) < 0 or int(y.max()) > self.null_index):
            raise ValueError(f"labels must lie in 0..{self.null_index} ({self.null_index} = null), got {y.min()}..{y.max()}")
        return self.table(y.long())


# --------------------------------------------------------------------------------------
# Config fields shared by every denoising net
# --------------------------------------------------------------------------------------
@dataclass
class NetConfigBase:
    """Time/label fields every denoising-net config has, plus dict round trips.

    Subclasses add their own fields and call ``super().__post_init__()``.
    """

    num_classes: int = 0  # number of class labels (0: unconditional); row num_classes is the null label
    time_embedding: str = "sinusoidal"  # frequency map of tau: "sinusoidal" (DDPM) or "fourier" (Song et al.)
    fourier_scale: float = 16.0  # std of the Gaussian Fourier frequencies (Song et al.: 16)

    def __post_init__(self):
        _check(self, "num_classes", self.num_classes >= 0, "must be >= 0")
        _check(self, "time_embedding", self.time_embedding in TIME_EMBEDDINGS, f"must be one of {TIME_EMBEDDINGS}")
        _check(self, "fourier_scale", self.fourier_scale > 0, "must be positive")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Build from a plain dict (e.g. parsed YAML); lists become tuples; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        for gone, why in REMOVED_FIELDS.items():
            if gone in d:
                raise ValueError(f"{cls.__name__}: field {gone!r} was removed: {why}")
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; expected some of {', '.join(sorted(names))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_dict(self) -> dict:
        """Plain-Python dict (tuples as lists) that :meth:`from_dict` reads back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


REMOVED_FIELDS = {
    "bf16": "precision is one switch for the whole run, train.precision: auto | fp32 | bf16 (auto measures which is faster here)",
    "time_input": "the net's time input is the path's c_noise (scorelab.paths.Path.c_noise), applied by the Denoiser",
    "time_scale": "the net's time input is the path's c_noise (scorelab.paths.Path.c_noise), applied by the Denoiser",
}


def _check(cfg, name: str, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"{type(cfg).__name__}.{name} {what}, got {getattr(cfg, name)!r}")
