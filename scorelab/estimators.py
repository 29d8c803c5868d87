"""Trace estimators and their probes: one place for both the score-matching losses and the
probability-flow ODE likelihood.

For a vector field ``f: R^D -> R^D`` at ``x: (B, *shape)`` (each example independent) with Jacobian
``J = grad_x f``:

* :func:`exact_trace`: ``tr J`` exactly, one backward pass per dimension (refused above
  :data:`EXACT_TRACE_MAX_DIM`);
* :func:`hutchinson_trace`: ``mean_k v_k^T J v_k`` with probes ``E[v v^T] = I`` (Hutchinson 1989),
  unbiased, one vector-Jacobian product per probe;
* :func:`probes` / :func:`draw_probe`: ``n`` probes per example, Rademacher (+-1) or standard Gaussian, drawn one probe
  at a time from the generator, so ``n = 2`` is the first two draws of ``n = 1`` calls in turn.

The graph is kept (``create_graph``) whenever gradients are enabled, so a trace can be trained
through (explicit score matching).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .random import Generator, rand, randn

__all__ = ["EXACT_TRACE_MAX_DIM", "PROBES", "draw_probe", "probes", "exact_trace", "vjp_probes", "hutchinson_trace", "check_probe"]

EXACT_TRACE_MAX_DIM = 64  # above this many dimensions the exact trace (D backward passes) is refused
PROBES = ("rademacher", "gaussian")

Field = Callable[[Tensor], Tensor]


# --- checks and helpers ------------------------------------------------------------------
def _check_x(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim < 2 or not x.is_floating_point():
        desc = f"shape {tuple(x.shape)} dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor of shape (B, *shape), got {desc}")
    if x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"x must have at least one example and one dimension, got shape {tuple(x.shape)}")


def _check_count(name: str, n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")


def check_probe(probe: str) -> None:
    if probe not in PROBES:
        raise ValueError(f"probe {probe!r} is unknown: expected one of {', '.join(PROBES)}")


def _score(score_fn: Field, x: Tensor) -> Tensor:
    """``score_fn(x)`` with its shape checked against ``x: (B, *shape)``."""
    s = score_fn(x)
    if not isinstance(s, Tensor) or s.shape != x.shape:
        got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
        raise ValueError(f"score_fn must return a tensor of the shape of x {tuple(x.shape)}, got {got}")
    return s


def _leaf(x: Tensor) -> Tensor:
    """``x`` as a tensor that requires grad (a detached copy unless it already does)."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def draw_probe(shape, kind: str, generator: Generator, dtype, device) -> Tensor:
    """One probe ``v`` of ``shape`` with ``E[v v^T] = I``: Rademacher (+-1) or standard Gaussian."""
    check_probe(kind)
    if kind == "gaussian":
        return randn(shape, generator=generator, dtype=dtype, device=device)
    return torch.where(rand(shape, generator=generator, dtype=dtype, device=device) < 0.5, -1.0, 1.0).to(dtype)


def _sq(v: Tensor) -> Tensor:
    """Per-example squared norm: (B, ...) -> (B,)."""
    return v.pow(2).flatten(1).sum(1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-example inner product: (B, ...) x (B, ...) -> (B,)."""
    return (a * b).flatten(1).sum(1)


# --- traces ------------------------------------------------------------------------------
def exact_trace(score_fn: Field, x: Tensor, max_dim: int = EXACT_TRACE_MAX_DIM) -> tuple[Tensor, Tensor]:
    """``(s, tr(grad_x s))`` at ``x: (B, *shape)``: s (B, *shape), the trace (B,).

    One backward pass per dimension ``d``: ``d s_d / d x_d`` is read off the gradient of
    ``sum_b s_d(x_b)``. Refused (ValueError) above ``max_dim`` dimensions. The graph is kept
    (``create_graph``) when gradients are enabled, so the trace can be trained through.
    """
    _check_x(x)
    D = x[0].numel()
    if D > max_dim:
        raise ValueError(f"the exact trace needs {D} backward passes (more than max_dim={max_dim}): "
                         f"use estimator='hutchinson' or sliced_score_matching for x of shape {tuple(x.shape)}")
    train = torch.is_grad_enabled()
    with torch.enable_grad():
        xg = _leaf(x)
        s = _score(score_fn, xg)
        sf = s.flatten(1)  # (B, D)
        diag = []
        for d in range(D):
            (g,) = torch.autograd.grad(sf[:, d].sum(), xg, create_graph=train, retain_graph=True)
            diag.append(g.flatten(1)[:, d])  # (B,)
        tr = torch.stack(diag, 1).sum(1)  # (B,)
    return (s, tr) if train else (s.detach(), tr.detach())


def vjp_probes(score_fn: Field, x: Tensor, n: int, probe: str, generator: Generator):
    """``(s, [(v_k, J^T v_k)])`` for ``n`` probes, ``J = grad_x s``; all (B, *shape)."""
    train = torch.is_grad_enabled()
    with torch.enable_grad():
        xg = _leaf(x)
        s = _score(score_fn, xg)
        out = []
        for _ in range(n):
            v = draw_probe(x.shape, probe, generator, x.dtype, x.device)
            (jv,) = torch.autograd.grad(_dot(s, v).sum(), xg, create_graph=train, retain_graph=True)
            out.append((v, jv))
    if not train:
        s, out = s.detach(), [(v, jv.detach()) for v, jv in out]
    return s, out


def hutchinson_trace(score_fn: Field, x: Tensor, n_probes: int = 1, probe: str = "rademacher",
                     generator: Generator = None) -> tuple[Tensor, Tensor]:
    """``(s, mean_k v_k^T (grad_x s) v_k)`` at ``x: (B, *shape)``: an unbiased estimate of the trace (B,).

    ``E[v v^T] = I`` makes ``E[v^T J v] = tr(J)`` (Hutchinson 1989). Per probe the variance is
    ``2 (||S||_F^2 - sum_i S_ii^2)`` for Rademacher and ``2 ||S||_F^2`` for Gaussian probes, with
    ``S = (J + J^T) / 2``.
    One backward pass per probe (``v^T J v`` from the vector-Jacobian product ``J^T v``).
    """
    _check_x(x)
    _check_count("n_probes", n_probes)
    check_probe(probe)
    s, pairs = vjp_probes(score_fn, x, n_probes, probe, generator)
    return s, torch.stack([_dot(v, jv) for v, jv in pairs]).mean(0)




def probes(shape, kind: str, n: int, generator: Generator, dtype, device) -> Tensor:
    """``n`` probes per example: (n, B, ...), drawn one probe (B, ...) at a time (see the module docstring)."""
    return torch.stack([draw_probe(tuple(shape), kind, generator, dtype, device) for _ in range(n)])
