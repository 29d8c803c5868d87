"""Time and label embeddings shared by every denoising network.

A denoising net is called as ``net(x, t, y=None)`` with ``t: (B,)`` in the path's *own* units:
``[0, 1]`` for the continuous paths, step indices ``0..T-1`` for discrete DDPM, noise levels
``sigma in [0.002, 80]`` for EDM. The network first maps ``t`` to an order-one number ``tau``

    linear:  tau = time_scale * t
    log:     tau = time_scale * ln(max(t, LOG_TIME_FLOOR))

and embeds ``tau`` with a fixed frequency map, then a learned two-layer MLP. Recommended settings
(see :func:`time_options`):

============================== ========== ============ =====================================
path (units of ``t``)          time_input time_scale   tau range
============================== ========== ============ =====================================
vp, cosine, subvp, ve, rf      linear     1            [0, 1]
ddpm (integer steps 0..T-1)    linear     1/T          [0, 1)
edm (sigma)                    log        1/4          [-1.55, 1.10]  (EDM's c_noise)
============================== ========== ============ =====================================

Frequency maps (both give ``dim`` features):

* sinusoidal (Vaswani et al. 2017; DDPM, Ho et al. 2020):
  ``[cos(s tau f_k), sin(s tau f_k)]``, ``f_k = max_period^(-k/half)``, ``k < half = dim/2``,
  with ``s = SINUSOIDAL_SCALE = 1000`` so that ``tau in [0, 1]`` covers the familiar DDPM range
  of step indices 0..1000 (the highest frequency resolves single steps).
* Gaussian Fourier features (Tancik et al. 2020; Song et al. 2021):
  ``[sin(2 pi tau w_k), cos(2 pi tau w_k)]``, ``w_k ~ N(0, scale^2)`` fixed at construction
  (a buffer, saved in the state dict), ``scale = 16`` as in Song et al.

Frequencies are always evaluated in at least float32 (``sin`` of large arguments in bfloat16 is
meaningless), outside any autocast region.

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
    "LOG_TIME_FLOOR",
    "SINUSOIDAL_SCALE",
    "TIME_EMBEDDINGS",
    "TIME_INPUTS",
    "time_options",
    "time_to_tau",
    "sinusoidal_embedding",
    "SinusoidalEmbedding",
    "GaussianFourierEmbedding",
    "TimeEmbedding",
    "LabelEmbedding",
    "NetConfigBase",
]

LOG_TIME_FLOOR = 1e-8  # t is clamped to this before the log (sigma = 0 stays finite)
SINUSOIDAL_SCALE = 1000.0  # tau in [0, 1] -> positions 0..1000 for the sinusoidal map
TIME_EMBEDDINGS = ("sinusoidal", "fourier")
TIME_INPUTS = ("linear", "log")


def time_options(path: str, T: int = 1000) -> dict:
    """Recommended ``time_input`` and ``time_scale`` for a path registry name (see module table).

    ``T`` is the number of steps of the discrete ``ddpm`` path. Returns a dict to merge into a
    net config, e.g. ``UNetConfig(**time_options("edm"))``.
    """
    unit = {"time_input": "linear", "time_scale": 1.0}
    table = {
        "vp": unit,
        "cosine": unit,
        "subvp": unit,
        "ve": unit,
        "rf": unit,
        "ddpm": {"time_input": "linear", "time_scale": 1.0 / T},
        "edm": {"time_input": "log", "time_scale": 0.25},
    }
    if path not in table:
        raise ValueError(f"time_options: unknown path {path!r}: expected one of {', '.join(table)}")
    return dict(table[path])


def _freq_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def time_to_tau(t: Tensor, time_input: str = "linear", time_scale: float = 1.0) -> Tensor:
    """``tau`` (B,) from ``t`` (B,): ``time_scale * t`` or ``time_scale * ln(max(t, LOG_TIME_FLOOR))``."""
    t = t.to(_freq_dtype(t))
    if time_input == "linear":
        return time_scale * t
    if time_input == "log":
        return time_scale * torch.log(t.clamp_min(LOG_TIME_FLOOR))
    raise ValueError(f"time_input must be one of {TIME_INPUTS}, got {time_input!r}")


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
    """``t: (B,)`` in path units -> ``(B, out_dim)``: tau map, frequency features, Linear-SiLU-Linear."""

    def __init__(
        self,
        out_dim: int,
        freq_dim: int = 128,
        kind: str = "sinusoidal",
        time_input: str = "linear",
        time_scale: float = 1.0,
        fourier_scale: float = 16.0,
    ):
        super().__init__()
        if kind not in TIME_EMBEDDINGS:
            raise ValueError(f"time_embedding must be one of {TIME_EMBEDDINGS}, got {kind!r}")
        if time_input not in TIME_INPUTS:
            raise ValueError(f"time_input must be one of {TIME_INPUTS}, got {time_input!r}")
        self.time_input = time_input  # "linear": tau = scale t; "log": tau = scale ln t
        self.time_scale = time_scale  # maps the path's t to an order-one tau
        self.freq = SinusoidalEmbedding(freq_dim) if kind == "sinusoidal" else GaussianFourierEmbedding(freq_dim, fourier_scale)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        if t.ndim != 1:
            raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
        feats = self.freq(time_to_tau(t, self.time_input, self.time_scale))  # (B, freq_dim)
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
    time_input: str = "linear"  # "linear": tau = time_scale t; "log": tau = time_scale ln t (EDM c_noise)
    time_scale: float = 1.0  # brings the path's t to an order-one tau (see time_options)
    fourier_scale: float = 16.0  # std of the Gaussian Fourier frequencies (Song et al.: 16)

    def __post_init__(self):
        _check(self, "num_classes", self.num_classes >= 0, "must be >= 0")
        _check(self, "time_embedding", self.time_embedding in TIME_EMBEDDINGS, f"must be one of {TIME_EMBEDDINGS}")
        _check(self, "time_input", self.time_input in TIME_INPUTS, f"must be one of {TIME_INPUTS}")
        _check(self, "time_scale", math.isfinite(self.time_scale) and self.time_scale > 0, "must be a positive number")
        _check(self, "fourier_scale", self.fourier_scale > 0, "must be positive")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Build from a plain dict (e.g. parsed YAML); lists become tuples; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; expected some of {', '.join(sorted(names))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_dict(self) -> dict:
        """Plain-Python dict (tuples as lists) that :meth:`from_dict` reads back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _check(cfg, name: str, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"{type(cfg).__name__}.{name} {what}, got {getattr(cfg, name)!r}")
