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

from .estimators import EXACT_TRACE_MAX_DIM, PROBES, _check_count, _check_x, _dot, _sq, check_probe, exact_trace, hutchinson_trace, vjp_probes
from .random import Generator, randn

ScoreFn = Callable[[Tensor], Tensor]

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

ESTIMATORS = ("exact", "hutchinson")


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
    check_probe(probe)
    if not isinstance(variance_reduced, bool):
        raise ValueError(f"variance_reduced must be a bool, got {variance_reduced!r}")
    s, pairs = vjp_probes(score_fn, x, n_projections, probe, generator)
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
