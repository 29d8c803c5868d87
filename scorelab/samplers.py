"""Samplers: pure functions ``fn(denoiser, x, ts, *, generator, callback, cond, **opts) -> x``.

Every sampler integrates the reverse of the forward process ``x_t = alpha(t) x_0 + sigma(t) eps``
of ``denoiser.path`` over a decreasing time grid ``ts`` (from :func:`scorelab.paths.time_grid`),
asking the denoiser only for its estimates ``x0_hat = E[x_0 | x_t]`` and
``eps_hat = E[eps | x_t]`` (``score = -eps_hat / sigma``). No sampler knows how the model was
trained (Crowson's k-diffusion shape: ``sample_heun(model, x, sigmas)``).

Conventions shared by all samplers
----------------------------------
* ``denoiser``: anything with ``.path`` and ``.predict(x, t, **cond) -> Prediction``;
  ``t`` is passed as a float64 tensor of shape (B,).
* ``x``: the start sample (B, ...), usually ``path.prior_sample``; the sampler integrates in
  ``x``'s dtype (float64 for low-dimensional data).
* ``ts``: 1-D float64 times, decreasing; ``ts[0]`` is usually ``t_max`` and the last entry
  ``t_clean`` (sigma = 0, alpha = 1). A step whose target time has sigma == 0 returns the
  denoised estimate ``x0_hat`` of the current point (one NFE). A step that starts at sigma == 0
  (already clean) is skipped at no cost.
* ``generator``: ``None``, a ``torch.Generator`` or a list of generators (one per example, which
  makes the result of example i independent of the batch); all noise comes from
  :func:`scorelab.random.randn_like`.
* ``callback``: called after each step with ``dict(i=i, t=t_i, t_next=t_{i+1}, x=x, x0=x0_hat)``
  (``x`` after the step, ``x0`` the prediction made at ``t_i``).
* ``cond``: dict of extra keyword arguments forwarded to ``denoiser.predict`` (e.g. labels ``y``).

Notation for one step ``t -> s`` (s < t): ``alpha_t, sigma_t, alpha_s, sigma_s``;
``alpha_ts = alpha_t / alpha_s`` and ``sigma2_ts = sigma_t^2 - alpha_ts^2 sigma_s^2`` (the
forward transition ``q(x_t | x_s) = N(alpha_ts x_s, sigma2_ts I)``);
``lambda = log(alpha / sigma)`` (half the log-SNR) and ``h = lambda_s - lambda_t > 0``.

NFE (denoiser evaluations) per grid step: see :func:`nfe_per_step`.

Rectified flow has an infinite log-SNR at both ends of ``[0, 1]``, so its ``logsnr`` and
``karras`` grids are not finite; use ``uniform`` or ``shift`` there (:func:`sample` says so).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .paths import time_grid
from .random import Generator, randn_like
from .targets import Prediction, as_time_batch

__all__ = [
    "sample_ancestral",
    "sample_ddim",
    "sample_euler",
    "sample_heun",
    "sample_dpmpp_2m",
    "sample_dpmpp_3m",
    "sample_euler_maruyama",
    "sample_pc",
    "langevin",
    "sample_annealed_langevin",
    "SAMPLERS",
    "nfe_per_step",
    "sample",
]

Callback = Callable[[dict], None] | None


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------
class _Grid:
    """The grid ``ts`` with the path's coefficients at each entry as Python floats (float64)."""

    def __init__(self, denoiser, ts):
        ts = torch.as_tensor(ts, dtype=torch.float64).detach().cpu()
        if ts.ndim != 1 or ts.numel() < 1:
            raise ValueError(f"ts must be a non-empty 1-D tensor of times, got shape {tuple(ts.shape)}")
        c = denoiser.path.coefficients(ts)
        self.ts = ts
        self.t = ts.tolist()
        self.alpha = c.alpha.tolist()
        self.sigma = c.sigma.tolist()
        self.d_alpha = c.d_alpha.tolist()
        self.d_sigma = c.d_sigma.tolist()

    def __len__(self) -> int:
        return len(self.t)

    def steps(self):
        """Indices ``i`` of the steps ``ts[i] -> ts[i+1]`` that do anything (start at sigma > 0)."""
        for i in range(len(self.t) - 1):
            if self.sigma[i] > 0 and self.t[i + 1] != self.t[i]:
                yield i

    def order_cap(self, i: int, lower_order_final: bool) -> int:
        """Highest multistep order for step ``i`` under ``lower_order_final`` (diffusers' rule).

        On short grids (< 15 steps) the last steps before the end are large in log-SNR and a
        multistep extrapolation with a small step ratio amplifies error; the step that lands on
        the last noisy time is then first order and the one before at most second order.
        """
        if not lower_order_final:
            return 3
        noisy_end = len(self.t) - 1 - (1 if self.sigma[-1] == 0 else 0)  # index of the last noisy time
        if noisy_end >= 15:
            return 3
        return max(1, noisy_end - i)

    def lam(self, i: int) -> float:
        """``lambda_i = log(alpha_i / sigma_i)``: +inf at a clean time, -inf where alpha = 0."""
        a, s = self.alpha[i], self.sigma[i]
        if s == 0:
            return math.inf
        if a == 0:
            return -math.inf
        return math.log(a) - math.log(s)


def _predict(denoiser, x: Tensor, t: float, cond: dict | None) -> Prediction:
    """One denoiser evaluation at the scalar time ``t`` for the whole batch."""
    return denoiser.predict(x, as_time_batch(torch.tensor(t, dtype=torch.float64), x), **(cond or {}))


def _report(callback: Callback, i: int, g: _Grid, x: Tensor, x0: Tensor) -> None:
    if callback is not None:
        callback(dict(i=i, t=g.t[i], t_next=g.t[i + 1], x=x, x0=x0))


def _velocity(pred: Prediction, d_alpha: float, d_sigma: float) -> Tensor:
    """Probability-flow ODE velocity ``dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat`` (B, ...)."""
    return d_alpha * pred.x0 + d_sigma * pred.eps


# --------------------------------------------------------------------------------------
# Ancestral sampling and DDIM
# --------------------------------------------------------------------------------------
def sample_ancestral(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
                     cond: dict | None = None) -> Tensor:
    """Ancestral sampling: draw ``x_s ~ q(x_s | x_t, x_0 = x0_hat)`` at every step (1 NFE per step).

    DDPM (Ho et al. 2020) written for any path in the form of Kingma et al. 2021 (VDM, eq. 32-33):
    with ``alpha_ts = alpha_t / alpha_s`` and ``sigma2_ts = sigma_t^2 - alpha_ts^2 sigma_s^2``,

        mean = alpha_ts sigma_s^2 / sigma_t^2 * x_t + alpha_s sigma2_ts / sigma_t^2 * x0_hat
        var  = sigma2_ts sigma_s^2 / sigma_t^2
        x_s  = mean + sqrt(var) z,   z ~ N(0, I)

    On the VE path this is the SMLD/NCSN ancestral sampler (alpha = 1, sigma2_ts = sigma_t^2 -
    sigma_s^2). A step onto a clean time (sigma_s = 0) returns ``x0_hat``.
    Shapes: ``x`` (B, ...), ``ts`` (N+1,); returns (B, ...).
    """
    g = _Grid(denoiser, ts)
    for i in g.steps():
        pred = _predict(denoiser, x, g.t[i], cond)
        a_t, s_t, a_s, s_s = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        if s_s == 0:
            x = pred.x0
        else:
            a_ts = a_t / a_s
            s2_ts = max(s_t**2 - a_ts**2 * s_s**2, 0.0)
            mean = (a_ts * s_s**2 / s_t**2) * x + (a_s * s2_ts / s_t**2) * pred.x0
            std = math.sqrt(s2_ts * s_s**2 / s_t**2)
            x = mean + std * randn_like(x, generator)
        _report(callback, i, g, x, pred.x0)
    return x


def sample_ddim(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
                cond: dict | None = None, eta: float = 0.0) -> Tensor:
    """DDIM (Song, Meng & Ermon 2021, eq. 12 and 16) for any path; 1 NFE per step.

        c   = eta * sigma_s * sqrt(sigma2_ts) / sigma_t
        x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,   z ~ N(0, I)

    ``eta = 0`` is deterministic and equals the first-order exponential integrator of the
    probability-flow ODE (DPM-Solver-1 / DPM-Solver++(1)); ``eta = 1`` gives the ancestral
    sampler's transition (same mean and variance as :func:`sample_ancestral`).
    A step onto a clean time returns ``x0_hat``. Shapes: ``x`` (B, ...), ``ts`` (N+1,).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    g = _Grid(denoiser, ts)
    for i in g.steps():
        pred = _predict(denoiser, x, g.t[i], cond)
        a_t, s_t, a_s, s_s = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        if s_s == 0:
            x = pred.x0
        else:
            s2_ts = max(s_t**2 - (a_t / a_s) ** 2 * s_s**2, 0.0)
            c = eta * s_s * math.sqrt(s2_ts) / s_t
            x = a_s * pred.x0 + math.sqrt(max(s_s**2 - c**2, 0.0)) * pred.eps
            if c > 0:
                x = x + c * randn_like(x, generator)
        _report(callback, i, g, x, pred.x0)
    return x


# --------------------------------------------------------------------------------------
# Probability-flow ODE solvers
# --------------------------------------------------------------------------------------
def sample_euler(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
                 cond: dict | None = None) -> Tensor:
    """Explicit Euler on the probability-flow ODE in the path's own time ``t``; 1 NFE per step.

        dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat   (= f x - 1/2 g^2 score, Song et al. 2021)
        x_s   = x_t + (s - t) dx/dt

    A step onto a clean time returns ``x0_hat``. First order in the step size.
    ``generator`` is unused (deterministic). Shapes: ``x`` (B, ...), ``ts`` (N+1,).
    """
    g = _Grid(denoiser, ts)
    for i in g.steps():
        pred = _predict(denoiser, x, g.t[i], cond)
        if g.sigma[i + 1] == 0:
            x = pred.x0
        else:
            x = x + (g.t[i + 1] - g.t[i]) * _velocity(pred, g.d_alpha[i], g.d_sigma[i])
        _report(callback, i, g, x, pred.x0)
    return x


def sample_heun(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
                cond: dict | None = None) -> Tensor:
    """Heun's method (explicit trapezoid) on the probability-flow ODE in ``t`` (Karras et al. 2022, Alg. 1).

        d   = v(x_t, t),   x'  = x_t + (s - t) d,   d' = v(x', s)
        x_s = x_t + (s - t) (d + d') / 2

    with ``v = alpha' x0_hat + sigma' eps_hat``. 2 NFE per step, except a step onto a clean time
    (1 NFE, returns ``x0_hat``), as in k-diffusion's ``sample_heun``. Second order.
    Shapes: ``x`` (B, ...), ``ts`` (N+1,).
    """
    g = _Grid(denoiser, ts)
    for i in g.steps():
        pred = _predict(denoiser, x, g.t[i], cond)
        if g.sigma[i + 1] == 0:
            x = pred.x0
        else:
            dt = g.t[i + 1] - g.t[i]
            d = _velocity(pred, g.d_alpha[i], g.d_sigma[i])
            x_euler = x + dt * d
            pred2 = _predict(denoiser, x_euler, g.t[i + 1], cond)
            x = x + dt * 0.5 * (d + _velocity(pred2, g.d_alpha[i + 1], g.d_sigma[i + 1]))
        _report(callback, i, g, x, pred.x0)
    return x


def sample_dpmpp_2m(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
                    cond: dict | None = None, lower_order_final: bool = True) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2); 1 NFE per step, second order.

    Exponential integrator of the probability-flow ODE in ``lambda = log(alpha / sigma)`` with
    data (x0) predictions, for any path. With ``h = lambda_s - lambda_t`` and ``r = h_prev / h``:

        D   = (1 + 1/(2r)) x0_hat_i - 1/(2r) x0_hat_{i-1}      (D = x0_hat_i on the first step)
        x_s = (sigma_s / sigma_t) x_t - alpha_s expm1(-h) D

    The first step (no history) and a step onto a clean time (which returns ``x0_hat``) are first
    order. A step from ``alpha = 0`` (``lambda = -inf``, e.g. rectified flow at t = 1) is exact
    first order and is not used as history. With ``lower_order_final`` on a grid of fewer than
    15 steps, the step onto the last noisy time is first order too (as diffusers does): on the
    exact-mixture benchmark this cut the NFE-10 error severalfold. Shapes: ``x`` (B, ...), ``ts`` (N+1,).
    """
    g = _Grid(denoiser, ts)
    x0_prev, h_prev = None, math.nan
    for i in g.steps():
        pred = _predict(denoiser, x, g.t[i], cond)
        if g.sigma[i + 1] == 0:
            x = pred.x0
        else:
            h = g.lam(i + 1) - g.lam(i)
            D = pred.x0
            if x0_prev is not None and math.isfinite(h_prev) and math.isfinite(h) and g.order_cap(i, lower_order_final) >= 2:
                r = h_prev / h
                D = (1 + 0.5 / r) * pred.x0 - (0.5 / r) * x0_prev
            x = (g.sigma[i + 1] / g.sigma[i]) * x - g.alpha[i + 1] * math.expm1(-h) * D
            h_prev = h
        x0_prev = pred.x0
        _report(callback, i, g, x, pred.x0)
    return x


def sample_dpmpp_3m(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
                    cond: dict | None = None, lower_order_final: bool = True) -> Tensor:
    """DPM-Solver++(3M): third-order multistep exponential integrator with x0 predictions; 1 NFE per step.

    (Lu et al. 2022, "DPM-Solver++", §4 / App.; the multistep ``dpmsolver++`` update of diffusers'
    ``DPMSolverMultistepScheduler`` with ``solver_order=3``.) With the current and two previous
    predictions ``m0, m1, m2`` at ``lambda_0 > lambda_1 > lambda_2`` (most recent first),
    ``h = lambda_s - lambda_0``, ``h0 = lambda_0 - lambda_1``, ``h1 = lambda_1 - lambda_2``,
    ``r0 = h0 / h``, ``r1 = h1 / h``:

        D1_0 = (m0 - m1) / r0,   D1_1 = (m1 - m2) / r1
        D1   = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1)          ~ h   d x0 / d lambda
        D2   = (D1_0 - D1_1) / (r0 + r1)                    ~ h^2 d^2 x0 / d lambda^2 / 2
        phi1 = expm1(-h),  phi2 = phi1 / h + 1,  phi3 = phi2 / h - 1/2
        x_s  = (sigma_s / sigma_0) x_t - alpha_s phi1 m0 + alpha_s phi2 D1 - 2 alpha_s phi3 D2

    The last term is the exact integral ``alpha_s int_0^h e^{u-h} u^2/2 du * x0''`` of the
    second-order Taylor term. (diffusers and the DPM-Solver reference code write
    ``- alpha_s phi3 D2``, half of it, which leaves the method second order: on the closed-form
    Gaussian flow of ``tests/test_samplers.py`` with 32-256 log-SNR steps the measured order is
    3.3 with the factor 2 and 2.2 without; with it removed this function matches diffusers'
    scheduler to 1e-6.) Step 1 is first order, step 2 is
    DPM-Solver++(2M); a step onto a clean time returns ``x0_hat``. ``lower_order_final``: on
    grids of fewer than 15 steps the last step onto a noisy time is first order and the one
    before it second order (see :meth:`_Grid.order_cap`). Shapes: ``x`` (B, ...).
    """
    g = _Grid(denoiser, ts)
    hist: list[tuple[Tensor, float]] = []  # (x0_hat, lambda) of previous predictions, most recent last
    for i in g.steps():
        pred = _predict(denoiser, x, g.t[i], cond)
        lam0 = g.lam(i)
        if not math.isfinite(lam0):
            hist = []  # a prediction at alpha = 0 is no Taylor anchor
        if g.sigma[i + 1] == 0:
            x = pred.x0
        else:
            h = g.lam(i + 1) - lam0
            m0 = pred.x0
            phi1 = math.expm1(-h)
            x = (g.sigma[i + 1] / g.sigma[i]) * x - g.alpha[i + 1] * phi1 * m0
            cap = g.order_cap(i, lower_order_final)
            if hist and math.isfinite(h) and cap >= 2:
                phi2 = phi1 / h + 1
                m1, lam1 = hist[-1]
                r0 = (lam0 - lam1) / h
                D1_0 = (m0 - m1) / r0
                if len(hist) >= 2 and cap >= 3:
                    m2, lam2 = hist[-2]
                    r1 = (lam1 - lam2) / h
                    D1_1 = (m1 - m2) / r1
                    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
                    D2 = (D1_0 - D1_1) / (r0 + r1)
                    phi3 = phi2 / h - 0.5
                    x = x + g.alpha[i + 1] * phi2 * D1 - 2 * g.alpha[i + 1] * phi3 * D2
                else:  # second order: x0 linear in lambda through (lam1, m1), (lam0, m0)
                    x = x + g.alpha[i + 1] * phi2 * D1_0
        if math.isfinite(lam0):
            hist = (hist + [(pred.x0, lam0)])[-2:]
        _report(callback, i, g, x, pred.x0)
    return x


# --------------------------------------------------------------------------------------
# Reverse SDE, predictor-corrector and Langevin dynamics
# --------------------------------------------------------------------------------------
def _sde_coefficients(denoiser, t: float) -> tuple[float, float]:
    """``(f(t), g(t)^2)`` of the forward SDE ``dx = f x dt + g dw``; finite or a ValueError."""
    tt = torch.tensor(t, dtype=torch.float64)
    f, g2 = float(denoiser.path.drift(tt)), float(denoiser.path.g2(tt))
    if not (math.isfinite(f) and math.isfinite(g2)):
        raise ValueError(
            f"reverse SDE of path {denoiser.path!r} is singular at t={t} (f={f}, g2={g2}); "
            "start the grid where alpha(t) > 0 (e.g. RectifiedFlow(t_max=0.99))"
        )
    return f, g2


def _em_step(denoiser, x: Tensor, g: _Grid, i: int, pred: Prediction, generator: Generator) -> Tensor:
    """One Euler–Maruyama step of the reverse SDE from ``ts[i]`` to ``ts[i+1]`` (backward in time)."""
    f, g2 = _sde_coefficients(denoiser, g.t[i])
    dt = g.t[i + 1] - g.t[i]  # < 0
    return x + (f * x - g2 * pred.score) * dt + math.sqrt(g2 * -dt) * randn_like(x, generator)


def sample_euler_maruyama(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
                          cond: dict | None = None) -> Tensor:
    """Euler–Maruyama on the reverse SDE (Anderson 1982; Song et al. 2021, eq. 6); 1 NFE per step.

        dx = [f(t) x - g(t)^2 score(x, t)] dt + g(t) dw_bar,   integrated backward in t:
        x_s = x_t - (f x_t - g^2 score) (t - s) + g sqrt(t - s) z,   z ~ N(0, I)

    with ``f = path.drift(t)``, ``g^2 = path.g2(t)`` and ``score = -eps_hat / sigma_t``, all at
    the step's start ``t``. A step onto a clean time returns ``x0_hat``. Weak order 1: it needs
    many more steps than the ODE solvers. Shapes: ``x`` (B, ...), ``ts`` (N+1,).
    """
    g = _Grid(denoiser, ts)
    for i in g.steps():
        pred = _predict(denoiser, x, g.t[i], cond)
        x = pred.x0 if g.sigma[i + 1] == 0 else _em_step(denoiser, x, g, i, pred, generator)
        _report(callback, i, g, x, pred.x0)
    return x


def _norms(v: Tensor) -> Tensor:
    """Per-example Euclidean norms of ``v: (B, ...)``, shaped (B, 1, ..., 1) to broadcast against v."""
    return v.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (v.ndim - 1))


def sample_pc(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
              cond: dict | None = None, n_corrector: int = 1, snr: float = 0.16,
              norm: str = "batch") -> Tensor:
    """Predictor–corrector sampling (Song et al. 2021, Alg. 4 / 5, "PC sampling").

    Predictor: one Euler–Maruyama reverse-SDE step ``t -> s`` (:func:`sample_euler_maruyama`).
    Corrector: ``n_corrector`` Langevin steps at the new time ``s`` targeting ``p_s``:

        eps_step = 2 (snr ||z|| / ||score(x, s)||)^2
        x        = x + eps_step score(x, s) + sqrt(2 eps_step) z,   z ~ N(0, I)

    ``snr`` (the paper's r) default 0.16, the value Song et al. use for VE / NCSN++; it sets the
    step to about ``2 snr^2`` times the local variance, so the same default is reasonable on every
    path (their VP corrector differs only by a factor ``1 - beta_i`` ~ 1).
    ``norm``: how ``||z||`` and ``||score||`` are taken.

    * ``"batch"`` (default): batch means of the per-example norms, as in the score_sde reference
      code (``LangevinCorrector``). Stable in any dimension, but couples the examples of a batch.
    * ``"example"``: per example, as Alg. 4/5 are written; batch-independent. Near a mode the
      ratio ``||z||^2 / ||score||^2`` is F(D, D)-distributed, which has an infinite mean for
      D <= 2 and heavy tails for small D: in 2-D a few examples per step take huge steps and the
      samples are wrong (measured on the 2-D test mixtures with the exact denoiser: modes too
      wide by ~8 standard errors, SW2 3-4x the Monte Carlo floor). Use it only for
      high-dimensional data (images), where the ratio concentrates.
    NFE: ``1 + n_corrector`` per step; the final step onto a clean time costs 1 and returns
    ``x0_hat`` (no corrector). Shapes: ``x`` (B, ...), ``ts`` (N+1,).
    """
    if n_corrector < 0 or snr <= 0:
        raise ValueError(f"need n_corrector >= 0 and snr > 0, got n_corrector={n_corrector}, snr={snr}")
    if norm not in ("example", "batch"):
        raise ValueError(f"norm must be 'example' or 'batch', got {norm!r}")
    g = _Grid(denoiser, ts)
    for i in g.steps():
        pred = _predict(denoiser, x, g.t[i], cond)
        if g.sigma[i + 1] == 0:
            x = pred.x0
        else:
            x = _em_step(denoiser, x, g, i, pred, generator)
            for _ in range(n_corrector):
                score = _predict(denoiser, x, g.t[i + 1], cond).score
                z = randn_like(x, generator)
                z_norm, s_norm = _norms(z), _norms(score)
                if norm == "batch":
                    z_norm, s_norm = z_norm.mean(), s_norm.mean()
                step = 2 * (snr * z_norm / s_norm) ** 2
                x = x + step * score + torch.sqrt(2 * step) * z
        _report(callback, i, g, x, pred.x0)
    return x


def langevin(score_fn: Callable[[Tensor], Tensor], x: Tensor, step_size: float, n_steps: int,
             generator: Generator = None, callback: Callback = None) -> Tensor:
    """Unadjusted Langevin dynamics (seed 000 §3.4; Welling & Teh 2011; Song & Ermon 2019 eq. 4).

        x <- x + (eps / 2) grad log p(x) + sqrt(eps) z,   z ~ N(0, I),   repeated ``n_steps`` times

    ``score_fn(x) -> grad log p(x)`` with the shape of ``x: (B, ...)``; ``step_size`` is eps.
    With a finite number of steps it cannot cross low-density regions between modes, so the
    mode weights it returns are those of its starting points (the "islands" of seed 000 §3.4).
    ``callback(dict(i=i, x=x))`` after each step.
    """
    if step_size <= 0 or n_steps < 0:
        raise ValueError(f"need step_size > 0 and n_steps >= 0, got step_size={step_size}, n_steps={n_steps}")
    for i in range(n_steps):
        x = x + (0.5 * step_size) * score_fn(x) + math.sqrt(step_size) * randn_like(x, generator)
        if callback is not None:
            callback(dict(i=i, x=x))
    return x


def sample_annealed_langevin(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
                             cond: dict | None = None, eps: float | None = None, n_steps_each: int = 100,
                             final_denoise: bool = True) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1; seed 000 §3.6).

    The noise levels are the path's ``sigma_i`` at the grid times (a clean final entry is
    excluded), largest first; ``sigma_L = sigma(ts[0])`` is the largest. For each level, with

        alpha_i = eps * sigma_i^2 / sigma_L^2,

    run ``T = n_steps_each`` Langevin steps on the noised marginal ``p_{t_i}``:

        x <- x + (alpha_i / 2) score(x, t_i) + sqrt(alpha_i) z,   z ~ N(0, I).

    ``eps`` is the step at the largest level; default ``0.2 sigma_L^2``, i.e. ``alpha_i / sigma_i^2
    = 0.2`` at every level, the ratio of Song & Ermon's setting (their eps = 2e-5 over their
    smallest sigma^2 = 1e-4, T = 100, which is also the default ``n_steps_each``). The step is
    tied to sigma_i, so once sigma_i is well below a mode's own width the chain barely moves
    within the mode: mixing there needs many steps per level. With ``final_denoise`` (Jolicoeur-Martineau et al. 2021) the result is
    the denoised estimate ``x0_hat`` at the last level (one more NFE). NFE: ``n_steps_each`` per
    level (+1). ``callback`` after each level with ``i, t, x, x0`` (x0 from that level's last step).
    Shapes: ``x`` (B, ...), ``ts`` (L,) or (L+1,) with a clean end.
    """
    if n_steps_each < 1:
        raise ValueError(f"n_steps_each must be >= 1, got {n_steps_each}")
    g = _Grid(denoiser, ts)
    levels = [i for i in range(len(g)) if g.sigma[i] > 0]
    if not levels:
        raise ValueError("annealed Langevin needs at least one grid time with sigma > 0")
    sigma_L = g.sigma[levels[0]]
    if eps is None:
        eps = 0.2 * sigma_L**2
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    for i in levels:
        a_i = eps * g.sigma[i] ** 2 / sigma_L**2
        for _ in range(n_steps_each):
            pred = _predict(denoiser, x, g.t[i], cond)
            x = x + (0.5 * a_i) * pred.score + math.sqrt(a_i) * randn_like(x, generator)
        if callback is not None:
            callback(dict(i=i, t=g.t[i], x=x, x0=pred.x0))
    if final_denoise:
        x = _predict(denoiser, x, g.t[levels[-1]], cond).x0
    return x


# --------------------------------------------------------------------------------------
# Registry and convenience entry point
# --------------------------------------------------------------------------------------
SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ancestral": sample_ancestral,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "euler_maruyama": sample_euler_maruyama,
    "pc": sample_pc,
    "annealed_langevin": sample_annealed_langevin,
}


def _check_name(name: str) -> None:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: expected one of {', '.join(SAMPLERS)}")


def nfe_per_step(name: str, **opts) -> int:
    """Denoiser evaluations per grid step of sampler ``name`` (with its options ``opts``).

    ``heun``: 2; ``pc``: ``1 + n_corrector``; ``annealed_langevin``: ``n_steps_each`` per level;
    all others 1. The step onto a clean time costs 1 for every sampler (Heun and PC there do a
    single evaluation and return ``x0_hat``); annealed Langevin adds 1 for its final denoising.
    """
    _check_name(name)
    if name == "heun":
        return 2
    if name == "pc":
        return 1 + int(opts.get("n_corrector", 1))
    if name == "annealed_langevin":
        return int(opts.get("n_steps_each", 100))
    return 1


def sample(denoiser, shape_or_x, steps: int, sampler: str = "dpmpp_2m", grid: str = "logsnr",
           generator: Generator = None, *, dtype: torch.dtype = torch.float32, device=None,
           grid_opts: dict | None = None, callback: Callback = None, cond: dict | None = None, **opts) -> Tensor:
    """Sample with a registered sampler on ``time_grid(path, steps, grid)`` (ending at ``t_clean``).

    ``shape_or_x``: a shape (B, ...) — the start is then ``path.prior_sample(shape, generator,
    dtype, device)`` — or a start tensor. ``steps`` counts grid steps, not NFE (see
    :func:`nfe_per_step`). ``grid_opts`` go to ``time_grid`` (e.g. ``rho``, ``shift``), ``opts``
    to the sampler (e.g. ``eta``, ``n_corrector``). Returns (B, ...).
    """
    _check_name(sampler)
    path = denoiser.path
    ts = time_grid(path, steps, grid, **(grid_opts or {}))
    if not torch.isfinite(ts[:-1]).all():
        raise ValueError(
            f"time grid {grid!r} is not finite on path {path!r} (log-SNR infinite at an end?): "
            f"{ts.tolist()}; try grid='uniform' or grid='shift'"
        )
    if torch.is_tensor(shape_or_x):
        x = shape_or_x
    else:
        x = path.prior_sample(tuple(shape_or_x), generator=generator, dtype=dtype, device=device)
    return SAMPLERS[sampler](denoiser, x, ts, generator=generator, callback=callback, cond=cond, **opts)
