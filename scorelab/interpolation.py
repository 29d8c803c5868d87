"""Interpolation between two start noises, mapped to data by a deterministic sampler (seed 001).

A deterministic sampler (the probability-flow ODE, DDIM with eta = 0) is a fixed map from the
noise at ``t_max`` to data, so a path between two noises ``z_0, z_1`` traces a path between two
samples. Two ways to go between the noises:

* linear, ``z(s) = (1 - s) z_0 + s z_1``: for independent ``z_0, z_1 ~ N(0, I)`` in ``D``
  dimensions the midpoint has norm about ``sqrt(D / 2)`` instead of ``sqrt(D)``, i.e. it leaves
  the shell where the prior's mass lies, and the sampler sees an atypical, low-energy input
  (washed-out, blurry midpoints);
* spherical (Shoemake 1985; White 2016), with ``theta`` the angle between ``z_0`` and ``z_1``:

      z(s) = sin((1 - s) theta) / sin(theta) z_0 + sin(s theta) / sin(theta) z_1,

  which keeps the norm when ``|z_0| = |z_1|`` and stays on the typical shell.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MODES", "lerp", "slerp", "interpolate_noise"]

MODES = ("linear", "spherical")
# the samplers that map a start noise to one sample are scorelab.samplers.DETERMINISTIC


def _weights(s, z: Tensor) -> Tensor:
    s = torch.as_tensor(s, dtype=torch.float64)
    if s.ndim != 1:
        raise ValueError(f"s must be a 1-D tensor of interpolation weights, got shape {tuple(s.shape)}")
    return s


def lerp(z0: Tensor, z1: Tensor, s) -> Tensor:
    """``(1 - s) z0 + s z1`` for each weight in ``s: (n,)``; ``z0, z1``: same shape S -> (n, *S)."""
    s = _weights(s, z0).to(z0.dtype).reshape(-1, *([1] * z0.ndim))
    return (1 - s) * z0[None] + s * z1[None]


def slerp(z0: Tensor, z1: Tensor, s, eps: float = 1e-7) -> Tensor:
    """Spherical interpolation for each weight in ``s: (n,)`` -> (n, *S); the angle is taken
    between the flattened vectors, computed in float64. Nearly parallel vectors fall back to lerp."""
    s = _weights(s, z0)
    a, b = z0.reshape(-1).double(), z1.reshape(-1).double()
    cos = (a @ b) / (a.norm() * b.norm()).clamp_min(1e-300)
    theta = torch.arccos(cos.clamp(-1, 1))
    if float(torch.sin(theta)) < eps:
        return lerp(z0, z1, s)
    w0 = torch.sin((1 - s) * theta) / torch.sin(theta)
    w1 = torch.sin(s * theta) / torch.sin(theta)
    out = w0[:, None] * a[None] + w1[:, None] * b[None]
    return out.reshape(len(s), *z0.shape).to(z0.dtype)


def interpolate_noise(z0: Tensor, z1: Tensor, n: int, mode: str = "spherical") -> Tensor:
    """``n >= 2`` noises from ``z0`` to ``z1`` (both ends included), ``mode`` linear or spherical."""
    if mode not in MODES:
        raise ValueError(f"interpolation mode must be one of {', '.join(MODES)}, got {mode!r}")
    if n < 2:
        raise ValueError(f"need n >= 2 interpolation points, got {n}")
    if z0.shape != z1.shape:
        raise ValueError(f"the two noises differ in shape: {tuple(z0.shape)} vs {tuple(z1.shape)}")
    s = torch.linspace(0, 1, n, dtype=torch.float64)
    return (lerp if mode == "linear" else slerp)(z0, z1, s)
