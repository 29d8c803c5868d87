"""Variational diffusion models (Kingma et al. 2021; seed 002 §2.2-2.3): a learned noise schedule
and the continuous-time ELBO of any Gaussian path.

* :class:`LearnedLogSNR` is VDM's monotone ``gamma_eta(t)`` on ``t in [0, 1]``, with
  ``SNR(t) = exp(-gamma(t))``; :class:`LearnedVPPath` is the variance-preserving path it defines,
  ``alpha^2 = sigmoid(-gamma)``, ``sigma^2 = sigmoid(gamma)``, usable by every scorelab sampler.
* :func:`continuous_elbo_terms` bounds ``-log p(x)`` for a denoiser on ANY scorelab path: VDM's
  continuous diffusion loss (eq. 17) holds for every path ``x_t = alpha x + sigma eps`` whose
  SNR ``alpha^2 / sigma^2`` decreases in ``t`` (VP, VE, rectified flow, ...)::

      -ELBO(x) = KL(q(z_{t_max} | x) || prior)                        prior term
               + E_q[-log p(x | z_{t_min})]                           reconstruction
               + 1/2 E_{t ~ U[t_min, t_max], eps}[-SNR'(t) |x - x0_hat(z_t, t)|^2]   diffusion

  The diffusion term has three equal forms (seed 002 §2.3; ``gamma = -log SNR``):
  ``-SNR' |x - x0_hat|^2 = gamma' |eps - eps_hat|^2 = gamma' sigma^2 |grad log q(z_t|x) - s_hat|^2``
  because ``x - x0_hat = (sigma/alpha)(eps_hat - eps)`` and ``s = -eps/sigma``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .paths import Coefficients, Path, broadcast_to
from .quantize import discretized_gaussian_log_prob, to_model
from .random import Generator, batch_rows, rand, rand_whole, randn

__all__ = ["LearnedLogSNR", "LearnedVPPath", "continuous_elbo_terms", "TARGETS"]

TARGETS = ("x0", "eps", "score")


def _inv_softplus(y: float) -> float:
    """``x`` with ``softplus(x) = y`` (y > 0)."""
    return y + math.log(-math.expm1(-y))


class LearnedLogSNR(nn.Module):
    """VDM's learned, monotone ``gamma_eta(t) = -log SNR(t)`` on ``t in [0, 1]`` (Kingma et al. 2021, App. H).

        g(t)     = l1(t) + l3(phi(l2(l1(t)))),   phi(h) = 2 sigmoid(h) - 1
        gamma(t) = gamma_0 + (gamma_1 - gamma_0) (g(t) - g(0)) / (g(1) - g(0))

    ``l1: 1 -> 1``, ``l2: 1 -> hidden``, ``l3: hidden -> 1`` are linear maps whose weights are
    kept positive by a softplus of raw parameters, so ``g`` and ``gamma`` increase strictly in
    ``t`` for every value of the parameters. The end points are ``gamma_0`` (a free scalar) and
    ``gamma_1 = gamma_0 + softplus(raw)``, so ``gamma_1 > gamma_0`` always. ``gamma`` and its
    derivative are in closed form (no autograd needed, so they also work under ``no_grad``) and
    differentiable with respect to every parameter. Computations run in the dtype of ``t``.
    """

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0, hidden: int = 1024):
        super().__init__()
        if not gamma_max > gamma_min:
            raise ValueError(f"gamma_max ({gamma_max}) must be larger than gamma_min ({gamma_min})")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.gamma_0_param = nn.Parameter(torch.tensor(float(gamma_min)))  # gamma(0) = -log SNR_max
        self.range_raw = nn.Parameter(torch.tensor(_inv_softplus(gamma_max - gamma_min)))  # gamma_1 - gamma_0 = softplus(.)
        g = torch.Generator().manual_seed(0)  # fixed init: the shape does not depend on the global seed
        self.w1_raw = nn.Parameter(torch.tensor(_inv_softplus(1.0)))  # l1 weight (softplus)
        self.b1 = nn.Parameter(torch.tensor(0.0))  # l1 bias
        self.w2_raw = nn.Parameter(torch.randn(hidden, generator=g))  # l2 weights (softplus)
        self.b2 = nn.Parameter(torch.randn(hidden, generator=g))  # l2 biases
        self.w3_raw = nn.Parameter(torch.randn(hidden, generator=g) - 3.0)  # l3 weights (softplus), small at init

    @property
    def gamma_0(self) -> Tensor:
        return self.gamma_0_param

    @property
    def gamma_1(self) -> Tensor:
        return self.gamma_0_param + F.softplus(self.range_raw)

    def _g(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``g(t)`` and ``g'(t)`` for flat ``t: (N,)``."""
        dt = t.dtype
        w1, b1 = F.softplus(self.w1_raw).to(dt), self.b1.to(dt)
        w2, b2, w3 = F.softplus(self.w2_raw).to(dt), self.b2.to(dt), F.softplus(self.w3_raw).to(dt)
        h1 = w1 * t + b1  # (N,)
        s = torch.sigmoid(h1[:, None] * w2 + b2)  # (N, H)
        g = h1 + (2 * s - 1) @ w3  # (N,)
        dg = w1 * (1 + (2 * s * (1 - s) * w2) @ w3)  # (N,)
        return g, dg

    def gamma_and_derivative(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(gamma(t), d gamma / dt)``, each of the shape of ``t`` (``t`` in [0, 1])."""
        t = torch.as_tensor(t, dtype=torch.float64) if not torch.is_tensor(t) else t
        if not t.is_floating_point():
            t = t.to(torch.float64)
        flat = t.reshape(-1)
        ends = torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device)
        g, dg = self._g(torch.cat([flat, ends]))
        g0, g1 = g[-2], g[-1]
        g, dg = g[:-2], dg[:-2]
        g0_, span = self.gamma_0.to(t.dtype), (self.gamma_1 - self.gamma_0).to(t.dtype)
        gamma = g0_ + span * (g - g0) / (g1 - g0)
        dgamma = span * dg / (g1 - g0)
        return gamma.reshape(t.shape), dgamma.reshape(t.shape)

    def forward(self, t: Tensor) -> Tensor:
        """``gamma(t)``, the shape of ``t``."""
        return self.gamma_and_derivative(t)[0]

    def derivative(self, t: Tensor) -> Tensor:
        """``d gamma / dt`` (> 0), the shape of ``t``."""
        return self.gamma_and_derivative(t)[1]


class LearnedVPPath(Path):
    """The variance-preserving path of a learned log-SNR: ``alpha^2 = sigmoid(-gamma)``, ``sigma^2 = sigmoid(gamma)``.

    Derivatives: ``alpha' = -alpha sigma^2 gamma' / 2``, ``sigma' = sigma alpha^2 gamma' / 2``;
    ``log_snr = -gamma``. Times ``t in [t_min, t_max] = [0, 1]``; the schedule never reaches
    ``sigma = 0``, so the clean time is ``t_clean = -1`` where ``gamma = -inf`` by definition
    (samplers' last step onto it returns the denoised estimate). The prior is ``N(0, I)`` as in
    VDM (``sigma(1)^2 = sigmoid(gamma_1)`` is close to but below 1; the ELBO's prior term counts
    the mismatch). Coefficients carry gradients to the schedule's parameters when autograd is on.
    """

    name = "learned_vp"

    def __init__(self, schedule: LearnedLogSNR):
        self.schedule = schedule  # the LearnedLogSNR module (its parameters are trained elsewhere)
        self.t_min, self.t_max, self.t_clean = 0.0, 1.0, -1.0

    def _gamma(self, t) -> tuple[Tensor, Tensor]:
        t = self._t(t)
        gamma, dgamma = self.schedule.gamma_and_derivative(t.clamp(0.0, 1.0))
        clean = t < 0
        if bool(clean.any()):
            gamma = torch.where(clean, torch.full_like(gamma, -math.inf), gamma)
            dgamma = torch.where(clean, torch.zeros_like(dgamma), dgamma)
        return gamma, dgamma

    def coefficients(self, t) -> Coefficients:
        gamma, dgamma = self._gamma(t)
        a2, s2 = torch.sigmoid(-gamma), torch.sigmoid(gamma)
        alpha, sigma = a2.sqrt(), s2.sqrt()
        return Coefficients(alpha, sigma, -0.5 * alpha * s2 * dgamma, 0.5 * sigma * a2 * dgamma)

    def alpha(self, t):
        return self.coefficients(t).alpha

    def sigma(self, t):
        return self.coefficients(t).sigma

    def d_alpha(self, t):
        return self.coefficients(t).d_alpha

    def d_sigma(self, t):
        return self.coefficients(t).d_sigma

    def log_snr(self, t) -> Tensor:
        return -self._gamma(t)[0]

    def t_from_log_snr(self, lam) -> Tensor:
        """Bisection on ``[0, 1]`` (no gradient); log-SNRs outside the schedule's range map to the ends."""
        with torch.no_grad():
            return self._invert_monotone(lam)

    @property
    def prior_std(self) -> float:
        return 1.0

    def __repr__(self) -> str:
        with torch.no_grad():
            s = self.schedule
            return f"LearnedVPPath(gamma_0={float(s.gamma_0):.3f}, gamma_1={float(s.gamma_1):.3f})"


# --------------------------------------------------------------------------------------
# The continuous-time ELBO
# --------------------------------------------------------------------------------------
def _flat_sum(v: Tensor) -> Tensor:
    return v.flatten(1).sum(1)


def continuous_elbo_terms(denoiser, x: Tensor, generator: Generator = None, t_min: float | None = None,
                          t_max: float | None = None, n_t: int = 1, low_discrepancy: bool = False,
                          target: str = "x0", cond: dict | None = None, time_sampling: str = "t") -> dict:
    """Per-example terms of the negative continuous-time ELBO of ``denoiser`` (any scorelab path).

    Args:
        denoiser: a :class:`~scorelab.targets.Denoiser`-like object (``.path``, ``.predict``);
            the x0/eps/score estimates come from ``denoiser.predict(z_t, t)``, so any network
            kind (eps, x0, v, score, velocity) works.
        x: (B, ...) data. ``uint8`` means images with values ``k`` mapped to ``2k/255 - 1``: the
            reconstruction term is then the discretized Gaussian ``-log P(k | z_{t_min})`` with mean
            ``z/alpha`` and std ``sigma/alpha`` (:func:`scorelab.quantize.discretized_gaussian_log_prob`) and all
            terms are in **bits per dimension** (a bound on ``-log2 P(k) / D``). Floating data are
            continuous: the decoder is the Gaussian ``N(x; z/alpha, (sigma/alpha)^2 I)`` and the terms
            are in **nats per example** (a bound on ``-log p(x)``, the density summed over dims).
        generator: randomness for times, the diffusion noise and the reconstruction noise
            (a list: one generator per example).
        t_min, t_max: the integration range (default: the path's ``t_min`` and ``t_max``);
            ``sigma(t_min) > 0`` is required (e.g. ``t_min = 1e-3`` for rectified flow).
        n_t: times per example; the diffusion term averages over them.
        low_discrepancy: stratified times ``u_r = (u_0 + r / R) mod 1`` over the ``R = B n_t`` rows
            (VDM's variance reduction; couples the examples of a batch; with a
            :class:`~scorelab.random.ShardedGenerator` the rows and ``u_0`` are the global batch's).
        target: the diffusion term's form (the regression target it is written in), ``x0`` (``-SNR' |x - x0_hat|^2``), ``eps``
            (``gamma' |eps - eps_hat|^2``) or ``score`` (``gamma' sigma^2 |-eps/sigma - s_hat|^2``);
            all equal in value.
        cond: conditioning passed to the denoiser, per example (repeated over ``n_t``).
        time_sampling: ``"t"``: ``t ~ U[t_min, t_max]`` with weight ``-SNR'(t) = SNR gamma'``
            (differentiable in the schedule: VDM's training estimate); ``"log_snr"``: ``lambda ~
            U[lambda(t_max), lambda(t_min)]`` with weight ``SNR`` (the same integral after the change
            of variables ``d SNR = SNR d lambda``). For a fixed path the second has far lower variance
            where ``gamma'`` blows up (rectified flow: ``-SNR' ~ 2 / t^3`` near 0); it is the
            estimate of an evaluation, not of training (the times carry no gradient).

    Returns a dict of (B,) tensors ``prior``, ``reconstruction``, ``diffusion``, ``total`` (their
    sum), the scalar ``stderr`` (standard error of ``total.mean()`` over the batch) and ``units``.
    Coefficients and predictions keep their autograd graph, so ``total.mean()`` can be minimised.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if n_t < 1:
        raise ValueError(f"n_t must be >= 1, got {n_t}")
    path: Path = denoiser.path
    t_lo = path.t_min if t_min is None else float(t_min)
    t_hi = path.t_max if t_max is None else float(t_max)
    if not t_hi > t_lo:
        raise ValueError(f"t_max ({t_hi}) must be larger than t_min ({t_lo})")
    discrete = x.dtype == torch.uint8
    if discrete:
        k = x
        xf = to_model(x)
    else:
        k, xf = None, x
    B, D = x.shape[0], x[0].numel()
    dev = x.device
    ends = path.coefficients(torch.tensor([t_lo, t_hi], dtype=torch.float64, device=dev))
    a0, s0, a1, s1 = ends.alpha[0], ends.sigma[0], ends.alpha[1], ends.sigma[1]
    if not float(s0.detach()) > 0:
        raise ValueError(f"sigma(t_min={t_lo}) must be positive for the ELBO; pass a larger t_min")

    # prior: KL(N(alpha_1 x, sigma_1^2 I) || N(0, sp^2 I)), summed over dims
    sp2 = path.prior_std**2
    x64 = xf.to(torch.float64)
    prior = 0.5 * (_flat_sum(a1**2 * x64**2) / sp2 + D * (s1**2 / sp2 - 1 - torch.log(s1**2 / sp2)))

    # reconstruction: -log p(x | z_{t_min}) with z = alpha_0 x + sigma_0 eps
    e0 = randn(x.shape, generator=generator, dtype=torch.float64, device=dev)
    mean, std = (a0 * x64 + s0 * e0) / a0, s0 / a0
    if discrete:
        recon = -_flat_sum(discretized_gaussian_log_prob(k, mean, std.expand_as(mean)))
    else:
        recon = 0.5 * _flat_sum(e0**2) + D * (torch.log(std) + 0.5 * math.log(2 * math.pi))

    # diffusion: rows r = i * n_t + j (example i, time j)
    if low_discrepancy:  # rows r of the whole batch (under torchrun: of the global batch, whose first draw is u_0)
        first, total = batch_rows(generator, B)
        u0 = rand_whole((B, n_t), generator=generator, dtype=torch.float64, device=dev).reshape(-1)[0]
        R = total * n_t
        r = first * n_t + torch.arange(B * n_t, dtype=torch.float64, device=dev)
        u = torch.remainder(u0 + r / R, 1.0).reshape(B, n_t)
    else:
        u = rand((B, n_t), generator=generator, dtype=torch.float64, device=dev)
    if time_sampling == "log_snr":
        lam_ends = path.log_snr(torch.tensor([t_hi, t_lo], dtype=torch.float64, device=dev)).detach()
        if not torch.isfinite(lam_ends).all():
            raise ValueError(f"time_sampling='log_snr' needs a finite log-SNR at t_min and t_max, got {lam_ends.tolist()}")
        lam_lo, lam_hi = float(lam_ends[0]), float(lam_ends[1])
        t = path.t_from_log_snr((lam_lo + (lam_hi - lam_lo) * u).reshape(-1)).to(dev)  # (R,)
        span = lam_hi - lam_lo
    elif time_sampling == "t":
        t = (t_lo + (t_hi - t_lo) * u).reshape(-1)  # (R,)
        span = t_hi - t_lo
    else:
        raise ValueError(f"time_sampling must be 't' or 'log_snr', got {time_sampling!r}")
    eps = randn((B, n_t, *x.shape[1:]), generator=generator, dtype=xf.dtype, device=dev).flatten(0, 1)
    xr = xf.repeat_interleave(n_t, dim=0)  # (R, ...)
    c = path.coefficients(t)
    z = c.corrupt(xr, eps)
    cond_r = {kk: v.repeat_interleave(n_t, dim=0) for kk, v in (cond or {}).items()}
    pred = denoiser.predict(z, t, **cond_r)
    if time_sampling == "t":
        dgamma = -c.d_log_snr  # gamma' = -(log SNR)' > 0, (R,)
    else:
        dgamma = torch.ones_like(c.alpha)  # d lambda: the density of lambda is uniform, the Jacobian is 1
    if target == "x0":
        w, sq = (c.alpha / c.sigma) ** 2 * dgamma, _flat_sum((xr - pred.x0) ** 2)  # -SNR' = SNR gamma'
    elif target == "eps":
        w, sq = dgamma, _flat_sum((eps - pred.eps) ** 2)
    else:
        target = -eps / broadcast_to(c.sigma, eps)  # grad_z log q(z_t | x)
        w, sq = dgamma * c.sigma**2, _flat_sum((target - pred.score) ** 2)
    diff = (0.5 * span * w * sq.to(w.dtype)).reshape(B, n_t).mean(1)

    scale = 1.0 / (D * math.log(2)) if discrete else 1.0
    terms = {"prior": prior * scale, "reconstruction": recon * scale, "diffusion": diff * scale}
    total = terms["prior"] + terms["reconstruction"] + terms["diffusion"]
    terms["total"] = total
    terms["stderr"] = total.detach().std() / math.sqrt(B) if B > 1 else torch.tensor(math.nan)
    terms["units"] = "bits/dim" if discrete else "nats"
    return terms
