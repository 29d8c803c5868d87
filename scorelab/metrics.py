"""Sample-quality metrics.

``sliced_wasserstein`` compares two point clouds in any dimension (used with the analytic
mixtures); FID / KID / precision-recall use the features of the domain classifier shipped in
``scorelab/assets`` (see ``scorelab.nets.classifier``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .random import Generator, randn

__all__ = ["sliced_wasserstein"]


def sliced_wasserstein(x: Tensor, y: Tensor, n_proj: int = 256, generator: Generator = None) -> Tensor:
    """Sliced Wasserstein-2 distance between point clouds ``x: (N, D)`` and ``y: (M, D)``.

    ``SW2 = sqrt(E_theta W2^2(theta^T x, theta^T y))`` over ``n_proj`` random unit directions;
    each 1-D W2 compares quantiles (sorted projections, interpolated when ``N != M``).
    """
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    y = y.reshape(y.shape[0], -1).to(torch.float64)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    theta = randn((x.shape[1], n_proj), generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta, dim=0)
    py, _ = torch.sort(y @ theta, dim=0)
    if px.shape[0] != py.shape[0]:
        q = (torch.arange(px.shape[0], dtype=torch.float64) + 0.5) / px.shape[0]
        py = _quantiles(py, q)
    return ((px - py) ** 2).mean().sqrt()


def _quantiles(sorted_vals: Tensor, q: Tensor) -> Tensor:
    """Linear interpolation of sorted columns ``(M, P)`` at probabilities ``q: (N,)``."""
    M = sorted_vals.shape[0]
    pos = (q * M - 0.5).clamp(0, M - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=M - 1)
    w = (pos - lo)[:, None]
    return sorted_vals[lo] * (1 - w) + sorted_vals[hi] * w
