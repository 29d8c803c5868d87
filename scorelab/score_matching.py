"""Score-matching objectives for any score function ``score_fn(x) -> (B, *shape)`` (seed 000 §2-3).

Fitting ``s_theta ~ grad_x log p`` by the Fisher divergence

    J_Fisher(theta) = E_p[ 0.5 ||s_theta(x) - grad log p(x)||^2 ]

needs the unknown ``grad log p``. Integrating the cross term by parts (seed 000 Appendix A;
Hyvärinen 2005) gives the explicit objective, equal to ``J_Fisher`` up to the constant
``C_p = 0.5 E_p ||grad log p||^2``:

    J_ESM(theta) = E_p[ 0.5 ||s_theta(x)||^2 + tr(grad_x s_theta(x)) ] = J_Fisher(theta) - C_p.

The trace is the expensive part; the losses here differ in how they get it:

- :func:`explicit_score_matching`: exactly (one autograd pass per dimension) or by Hutchinson's
  estimator ``tr(J) = E_v[v^T J v]`` for probes with ``E[v v^T] = I``;
- :func:`sliced_score_matching`: Song et al. 2020, random projections of both terms;
- :func:`denoising_score_matching`: Vincent 2011, no trace at all, but it fits the score of the
  data convolved with ``N(0, sigma^2 I)``.

Every loss returns per-example values of shape (B,); the caller reduces them. ``score_fn`` may be
a network, an energy model's score (:func:`scorelab.nets.energy.energy_score`) or a
noise-conditional net with its noise level bound, ``lambda x: net(x, t)``. It must treat the
examples of a batch independently (no batch normalisation): the per-dimension derivatives are
taken of the batch sum. Gradients flow to the parameters of ``score_fn`` (the traces are built
with ``create_graph=True`` whenever gradients are enabled), so every loss can be trained.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .random import Generator, rand, randn

__all__ = [
    "EXACT_TRACE_MAX_DIM",
    "ESTIMATORS",
    "PROBES",
    "exact_trace",
    "hutchinson_trace",
    "explicit_score_matching",
    "sliced_score_matching",
    "denoising_score_matching",
]

EXACT_TRACE_MAX_DIM = 64  # above this many dimensions the exact trace (D backward passes) is refused
ESTIMATORS = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")

ScoreFn = Callable[[Tensor], Tensor]


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


def _check_probe(probe: str) -> None:
    if probe not in PROBES:
        raise ValueError(f"probe {probe!r} is unknown: expected one of {', '.join(PROBES)}")


def _score(score_fn: ScoreFn, x: Tensor) -> Tensor:
    """``score_fn(x)`` with its shape checked against ``x: (B, *shape)``."""
    s = score_fn(x)
    if not isinstance(s, Tensor) or s.shape != x.shape:
        got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
        raise ValueError(f"score_fn must return a tensor of the shape of x {tuple(x.shape)}, got {got}")
    return s


def _leaf(x: Tensor) -> Tensor:
    """``x`` as a tensor that requires grad (a detached copy unless it already does)."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def _probe(shape, probe: str, generator: Generator, dtype, device) -> Tensor:
    """One probe ``v`` of ``shape`` with ``E[v v^T] = I``: Rademacher (+-1) or standard Gaussian."""
    if probe == "gaussian":
        return randn(shape, generator=generator, dtype=dtype, device=device)
    return torch.where(rand(shape, generator=generator, dtype=dtype, device=device) < 0.5, -1.0, 1.0).to(dtype)


def _sq(v: Tensor) -> Tensor:
    """Per-example squared norm: (B, ...) -> (B,)."""
    return v.pow(2).flatten(1).sum(1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-example inner product: (B, ...) x (B, ...) -> (B,)."""
    return (a * b).flatten(1).sum(1)


# --- traces ------------------------------------------------------------------------------
def exact_trace(score_fn: ScoreFn, x: Tensor, max_dim: int = EXACT_TRACE_MAX_DIM) -> tuple[Tensor, Tensor]:
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


def _vjp_probes(score_fn: ScoreFn, x: Tensor, n: int, probe: str, generator: Generator):
    """``(s, [(v_k, J^T v_k)])`` for ``n`` probes, ``J = grad_x s``; all (B, *shape)."""
    train = torch.is_grad_enabled()
    with torch.enable_grad():
        xg = _leaf(x)
        s = _score(score_fn, xg)
        out = []
        for _ in range(n):
            v = _probe(x.shape, probe, generator, x.dtype, x.device)
            (jv,) = torch.autograd.grad(_dot(s, v).sum(), xg, create_graph=train, retain_graph=True)
            out.append((v, jv))
    if not train:
        s, out = s.detach(), [(v, jv.detach()) for v, jv in out]
    return s, out


def hutchinson_trace(score_fn: ScoreFn, x: Tensor, n_probes: int = 1, probe: str = "rademacher",
                     generator: Generator = None) -> tuple[Tensor, Tensor]:
    """``(s, mean_k v_k^T (grad_x s) v_k)`` at ``x: (B, *shape)``: an unbiased estimate of the trace (B,).

    ``E[v v^T] = I`` makes ``E[v^T J v] = tr(J)`` (Hutchinson 1989). Per probe the variance is
    ``2 (||S||_F^2 - sum_i S_ii^2)`` for Rademacher and ``2 ||S||_F^2`` for Gaussian probes, with
    ``S = (J + J^T) / 2``.
    One backward pass per probe (``v^T J v`` from the vector-Jacobian product ``J^T v``).
    """
    _check_x(x)
    _check_count("n_probes", n_probes)
    _check_probe(probe)
    s, pairs = _vjp_probes(score_fn, x, n_probes, probe, generator)
    return s, torch.stack([_dot(v, jv) for v, jv in pairs]).mean(0)


# --- the losses --------------------------------------------------------------------------
def explicit_score_matching(score_fn: ScoreFn, x: Tensor, estimator: str = "exact", n_probes: int = 1,
                            probe: str = "rademacher", generator: Generator = None) -> Tensor:
    """Hyvärinen's explicit score matching per example: (B,).

        l(x) = 0.5 ||s(x)||^2 + tr(grad_x s(x)),     E_p[l] = J_Fisher - 0.5 E_p||grad log p||^2

    Args:
        score_fn: ``x: (B, *shape) -> (B, *shape)``, the model score.
        x: (B, *shape) data samples.
        estimator: "exact" (D backward passes, D <= ``EXACT_TRACE_MAX_DIM``) or "hutchinson"
            (``n_probes`` backward passes, unbiased).
        n_probes: number of Hutchinson probes averaged per example.
        probe: Hutchinson probe distribution, "rademacher" or "gaussian".
        generator: randomness of the probes (None, a torch.Generator or one per example).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator {estimator!r} is unknown: expected one of {', '.join(ESTIMATORS)}")
    if estimator == "exact":
        s, tr = exact_trace(score_fn, x)
    else:
        s, tr = hutchinson_trace(score_fn, x, n_probes, probe, generator)
    return 0.5 * _sq(s) + tr


def sliced_score_matching(score_fn: ScoreFn, x: Tensor, n_projections: int = 1, variance_reduced: bool = False,
                          generator: Generator = None, probe: str = "gaussian") -> Tensor:
    """Sliced score matching (Song, Garg, Shi & Ermon 2020) per example: (B,).

        l(x) = mean_k [ v_k^T (grad_x s) v_k + 0.5 (v_k^T s)^2 ]         (SSM)
        l(x) = mean_k [ v_k^T (grad_x s) v_k ] + 0.5 ||s||^2              (SSM-VR)

    Both have expectation ``0.5 ||s||^2 + tr(grad_x s)`` over the projections (``E[v v^T] = I``),
    i.e. the explicit objective; the variance-reduced form integrates the second term analytically
    (which is Hutchinson-estimated explicit score matching). One backward pass per projection.

    Args:
        score_fn: ``x: (B, *shape) -> (B, *shape)``, the model score.
        x: (B, *shape) data samples.
        n_projections: number of random directions ``v_k`` per example.
        variance_reduced: use ``0.5 ||s||^2`` in place of ``0.5 (v^T s)^2`` (SSM-VR; Gaussian v in the paper).
        generator: randomness of the projections.
        probe: distribution of ``v``, "gaussian" (the paper's) or "rademacher".
    """
    _check_x(x)
    _check_count("n_projections", n_projections)
    _check_probe(probe)
    if not isinstance(variance_reduced, bool):
        raise ValueError(f"variance_reduced must be a bool, got {variance_reduced!r}")
    s, pairs = _vjp_probes(score_fn, x, n_projections, probe, generator)
    jac = torch.stack([_dot(v, jv) for v, jv in pairs]).mean(0)  # (B,)
    if variance_reduced:
        return jac + 0.5 * _sq(s)
    return jac + 0.5 * torch.stack([_dot(v, s).pow(2) for v, _ in pairs]).mean(0)


def denoising_score_matching(score_fn_sigma: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigma,
                             generator: Generator = None) -> Tensor:
    """Denoising score matching (Vincent 2011; seed 000 Appendix B) per example: (B,).

        x~ = x + sigma z,  z ~ N(0, I):     l(x) = 0.5 || s(x~, sigma) + z / sigma ||^2

    ``-z / sigma = grad_x~ log N(x~; x, sigma^2 I)``, so ``E[l]`` equals the Fisher divergence to
    the *noised* density ``p_sigma = p * N(0, sigma^2 I)`` up to a constant: the optimum is
    ``grad log p_sigma`` (for ``p = N(mu, Sigma)``: the score of ``N(mu, Sigma + sigma^2 I)``), not
    ``grad log p``. No weighting is applied; multiply by ``sigma^2`` for Song & Ermon's
    ``lambda(sigma) = sigma^2`` (then ``l = 0.5 ||sigma s + z||^2``).

    Args:
        score_fn_sigma: ``(x~: (B, *shape), sigma: (B,)) -> (B, *shape)``, the noise-conditional score.
        x: (B, *shape) clean data.
        sigma: noise level, a positive float or a (B,) tensor of positive levels (one per example).
        generator: randomness of ``z``.
    """
    _check_x(x)
    B = x.shape[0]
    sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sig.ndim == 0:
        sig = sig.expand(B)
    if sig.shape != (B,):
        raise ValueError(f"sigma must be a float or a ({B},) tensor, got shape {tuple(sig.shape)}")
    if not (torch.isfinite(sig).all() and (sig > 0).all()):
        raise ValueError(f"sigma must be finite and > 0, got {sigma!r}")
    sb = sig.reshape(B, *([1] * (x.ndim - 1)))  # (B, 1, ...)
    z = randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    s = score_fn_sigma(x + sb * z, sig)
    if not isinstance(s, Tensor) or s.shape != x.shape:
        got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
        raise ValueError(f"score_fn_sigma must return a tensor of the shape of x {tuple(x.shape)}, got {got}")
    return 0.5 * _sq(s + z / sb)
