"""Diffusion distillation: progressive distillation, consistency distillation and consistency training.

Seed 001 ("Diffusion Distillation"): sampling costs 30-50 network evaluations; distillation trains a
student that needs a few, and classifier-free guidance can be baked into it. Everything here is
written for any path ``x_t = alpha x_0 + sigma eps`` through the core's conversions, in the
VE-equivalent coordinates ``x~ = x_t / alpha`` and noise level ``s = sigma / alpha`` where that
helps (the probability-flow ODE is then ``dx~/ds = eps_hat`` on every path).

Progressive distillation (Salimans & Ho 2022, Algorithm 2)
----------------------------------------------------------
A student with ``N`` steps learns to match two deterministic DDIM steps of its teacher with one
step. For student times ``t > s`` with the teacher's midpoint ``t'`` (on the nested grid of
:func:`nested_times`: ``u = i/N, (i - 1/2)/N, (i - 1)/N``) the teacher goes ``z_t -> z_t' -> z_s``;
the one DDIM step ``z_s = alpha_s x + (sigma_s / sigma_t)(z_t - alpha_t x)`` lands on ``z_s``
exactly for the target (:func:`pd_x0_target`)

    x~ = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t),

regressed in x-space with the truncated-SNR weight ``max(alpha_t^2 / sigma_t^2, 1)`` or the
``1 + SNR`` weight (the v-loss on VP paths) (:func:`pd_loss`). Rounds halve ``N``; each round's
student becomes the next round's teacher. Grids are nested, so a student is asked only at the
times it was trained at.

Consistency models (Song et al. 2023; Song & Dhariwal 2023)
-----------------------------------------------------------
A consistency function maps any point of a probability-flow trajectory to its origin,
``f(x_t, t) = x~_{t_eps}``, with the boundary condition ``f(x, t_eps) = x~`` built in by the skip
scalings (:class:`ConsistencyFunction`: ``c_skip(s_min) = 1``, ``c_out(s_min) = 0``). On the grid
``t_1 = t_eps < ... < t_N`` (Karras et al. spacing in ``s``, :func:`consistency_grid`):

* distillation (CD): ``d(f_theta(x_{n+1}, t_{n+1}), f_theta-(x^_n, t_n))`` with ``x^_n`` one teacher
  ODE step (Heun or DDIM, :func:`ode_step`) from ``x_{n+1} = alpha x + sigma z``, and
  ``theta-`` an EMA of ``theta`` (:func:`consistency_loss` with a teacher);
* training (CT, iCT): no teacher, ``x_n`` and ``x_{n+1}`` share the noise ``z``; the improved
  schedule doubles ``N`` over training (:func:`ict_discretization`), draws ``n`` from a discretised
  log-normal (:func:`ict_index_probabilities`), weights by ``1 / (s_{n+1} - s_n)`` and uses
  ``theta- = theta`` (no EMA on the target);
* ``d``: the pseudo-Huber distance ``sqrt(|a - b|^2 + c^2) - c`` with ``c = 0.00054 sqrt(dim)``
  (:func:`pseudo_huber`; LPIPS weights cannot be had here);
* sampling: one step ``f(x_T, T)``, or multistep (Song et al. Algorithm 1,
  :func:`consistency_sample`): re-noise the estimate to a smaller time and apply ``f`` again.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .paths import Coefficients, Path
from .random import Generator, rand, randn_like
from .targets import Denoiser, Prediction, as_time_batch

__all__ = [
    "NESTED_GRIDS",
    "SOLVERS",
    "PD_WEIGHTINGS",
    "DISTANCES",
    "CM_WEIGHTINGS",
    "noise_level",
    "nested_times",
    "nested_grid",
    "ddim_step",
    "ode_step",
    "pd_x0_target",
    "pd_target",
    "pd_weight",
    "pd_loss",
    "boundary",
    "ConsistencyFunction",
    "consistency_grid",
    "pseudo_huber",
    "default_huber_c",
    "ict_discretization",
    "ict_index_probabilities",
    "consistency_loss",
    "multistep_indices",
    "consistency_sample",
]

NESTED_GRIDS = ("uniform", "logsnr", "karras")
SOLVERS = ("heun", "ddim")
PD_WEIGHTINGS = ("truncated_snr", "snr_plus_one")
DISTANCES = ("pseudo_huber", "l2")
CM_WEIGHTINGS = ("uniform", "ict")

# Where a path's noise level s = sigma / alpha is 0 or infinite at an end (rectified flow), grids in
# s use EDM's range [0.002, 80] instead (the same clamp as the log-SNR grids of scorelab.paths).
S_RANGE = (0.002, 80.0)


def _f64(t) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def noise_level(path: Path, t) -> Tensor:
    """``s(t) = sigma(t) / alpha(t)`` (the VE-equivalent noise level; ``inf`` where alpha = 0), float64."""
    c = path.coefficients(_f64(t))
    return c.sigma / c.alpha


def _time_of_noise(path: Path, s: Tensor) -> Tensor:
    """The time with ``sigma / alpha = s`` (``s > 0``): ``path.t_from_log_snr(-2 log s)``."""
    return path.t_from_log_snr(-2 * torch.log(_f64(s)))


def _s_range(path: Path) -> tuple[float, float]:
    """``(s(t_min), s(t_max))`` clamped to :data:`S_RANGE` where not positive and finite."""
    lo, hi = (float(v) for v in noise_level(path, [path.t_min, path.t_max]))
    lo = lo if lo > 0 and math.isfinite(lo) else S_RANGE[0]
    hi = hi if hi > 0 and math.isfinite(hi) else S_RANGE[1]
    return lo, hi


# --------------------------------------------------------------------------------------
# Nested time grids (progressive distillation)
# --------------------------------------------------------------------------------------
def nested_times(path: Path, u, kind: str = "uniform", rho: float = 7.0) -> Tensor:
    """Times ``t(u)`` for ``u in [0, 1]``: ``t(1) = t_max``, ``t(0) = t_clean``, increasing in ``u``.

    Because the map is fixed, the ``N``-step grid ``t(i / N)`` is contained in the ``2N``-step one:
    a progressive-distillation student is only ever asked at times its round trained it at.
    For ``u > 0``, ``kind``:

    * ``uniform``: ``t = t_min + u (t_max - t_min)`` (Salimans & Ho: ``t = i / N``);
    * ``logsnr``: uniform in log-SNR between its values at ``t_min`` and ``t_max``;
    * ``karras``: ``s = (s_min^(1/rho) + u (s_max^(1/rho) - s_min^(1/rho)))^rho`` in ``s = sigma/alpha``
      (Karras et al. 2022, eq. 5).

    Log-SNR and ``s`` ends that are infinite (rectified flow) are clamped to ``s in [0.002, 80]``;
    ``u = 1`` is ``t_max`` exactly. Returns float64 times of the shape of ``u``.
    """
    if kind not in NESTED_GRIDS:
        raise ValueError(f"unknown nested grid {kind!r}: expected one of {', '.join(NESTED_GRIDS)}")
    u = _f64(u)
    if bool(((u < 0) | (u > 1)).any()):
        raise ValueError("nested_times: u must lie in [0, 1]")
    if kind == "uniform":
        t = path.t_min + u * (path.t_max - path.t_min)
    else:
        s_lo, s_hi = _s_range(path)
        if kind == "logsnr":
            lam = -2 * math.log(s_lo) + u * (2 * math.log(s_lo) - 2 * math.log(s_hi))
            t = path.t_from_log_snr(lam)
        else:
            r = 1.0 / rho
            s = (s_lo**r + u * (s_hi**r - s_lo**r)) ** rho
            t = _time_of_noise(path, s)
    t = torch.where(u == 1, torch.full_like(t, path.t_max), t)
    return torch.where(u == 0, torch.full_like(t, path.t_clean), t)


def nested_grid(path: Path, steps: int, kind: str = "uniform", rho: float = 7.0) -> Tensor:
    """The ``steps``-step sampling grid ``t(i / steps)``, ``i = steps .. 0``: (steps + 1,) float64,
    strictly decreasing from ``t_max`` to ``t_clean`` (see :func:`nested_times`)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ts = nested_times(path, torch.arange(steps, -1, -1, dtype=torch.float64) / steps, kind, rho)
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"nested grid {kind!r} with {steps} steps on {path!r} is not strictly decreasing: {ts.tolist()}")
    return ts


# --------------------------------------------------------------------------------------
# Deterministic teacher steps with one time per example
# --------------------------------------------------------------------------------------
def _coef(path: Path, t: Tensor, x: Tensor) -> Coefficients:
    return path.coefficients(t).to(x)


def ddim_step(den, x: Tensor, t, s, cond: dict | None = None, pred: Prediction | None = None) -> Tensor:
    """One deterministic DDIM step ``t -> s`` (eta = 0; Song, Meng & Ermon 2021) per example:

        x_s = alpha_s x0_hat + sigma_s eps_hat      (= Euler on dx~/ds = eps_hat)

    ``t, s``: scalars or (B,) times (each example its own). ``den``: a DenoiserLike. ``pred``: the
    denoiser's answer at ``(x, t)`` if already computed. A step onto a clean time gives ``x0_hat``.
    """
    t, s = as_time_batch(t, x), as_time_batch(s, x)
    pred = den.predict(x, t, **(cond or {})) if pred is None else pred
    cs = _coef(den.path, s, x)
    return cs.alpha * pred.x0 + cs.sigma * pred.eps


def ode_step(den, x: Tensor, t, s, solver: str = "heun", cond: dict | None = None) -> Tensor:
    """One step ``t -> s`` of the probability-flow ODE, per example (``t, s`` scalars or (B,)).

    In ``x~ = x / alpha`` and ``s = sigma / alpha`` the ODE is ``dx~/ds = eps_hat(x, t)`` on every path.
    ``ddim``: Euler in these coordinates (1 NFE). ``heun``: EDM's second-order step (Karras et al.
    2022, Algorithm 1; 2 NFE)::

        x'   = alpha_s x0_hat + sigma_s eps_hat                      (the DDIM / Euler predictor)
        x~_s = x~_t + (s_s - s_t) (eps_hat(x, t) + eps_hat(x', s)) / 2

    Heun needs ``alpha_t > 0`` and ``sigma_s > 0`` (no step onto a clean time: the consistency grid
    ends at ``t_eps``).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r}: expected one of {', '.join(SOLVERS)}")
    t, s = as_time_batch(t, x), as_time_batch(s, x)
    cond = cond or {}
    p1 = den.predict(x, t, **cond)
    x1 = ddim_step(den, x, t, s, pred=p1)
    if solver == "ddim":
        return x1
    p2 = den.predict(x1, s, **cond)
    ct, cs = _coef(den.path, t, x), _coef(den.path, s, x)
    # x_s = alpha_s (x~_t + (s_s - s_t)(e1 + e2)/2) = x1 + alpha_s (s_s - s_t)(e2 - e1)/2
    h = cs.sigma - cs.alpha * ct.sigma / ct.alpha  # alpha_s (s_s - s_t)
    return x1 + 0.5 * h * (p2.eps - p1.eps)


# --------------------------------------------------------------------------------------
# Progressive distillation
# --------------------------------------------------------------------------------------
def pd_x0_target(z_t: Tensor, z_s: Tensor, ct: Coefficients, cs: Coefficients) -> Tensor:
    """The x-prediction at ``(z_t, t)`` whose one DDIM step lands on ``z_s`` (Salimans & Ho 2022, eq. 8):

        x~ = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)

    ``ct``, ``cs``: the coefficients at ``t`` and ``s`` broadcast against ``z_t`` (``sigma_t > 0``).
    The denominator is ``alpha_s (1 - SNR_t^(1/2) / SNR_s^(1/2))`` > 0 for ``s < t``.
    """
    r = cs.sigma / ct.sigma
    return (z_s - r * z_t) / (cs.alpha - r * ct.alpha)


@torch.no_grad()
def pd_target(teacher, z_t: Tensor, t, t_mid, s, cond: dict | None = None) -> tuple[Tensor, Tensor]:
    """``(x~, z_s)``: two DDIM teacher steps ``t -> t_mid -> s`` and the student's x-target.

    ``teacher``: a DenoiserLike (e.g. a :class:`~scorelab.guidance.ClassifierFreeGuidance` around
    the teacher: guidance is then distilled into the student). Times scalars or (B,).
    """
    t, t_mid, s = (as_time_batch(v, z_t) for v in (t, t_mid, s))
    z_mid = ddim_step(teacher, z_t, t, t_mid, cond)
    z_s = ddim_step(teacher, z_mid, t_mid, s, cond)
    path = teacher.path
    return pd_x0_target(z_t, z_s, _coef(path, t, z_t), _coef(path, s, z_t)), z_s


def pd_weight(c: Coefficients, weighting: str = "truncated_snr") -> Tensor:
    """Weight of the x-space error (Salimans & Ho 2022, §4): ``truncated_snr``: ``max(SNR, 1)``;
    ``snr_plus_one``: ``1 + SNR`` (on a VP path the v-loss ``|v - v_hat|^2``). ``SNR = alpha^2 / sigma^2``."""
    if weighting not in PD_WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}: expected one of {', '.join(PD_WEIGHTINGS)}")
    snr = (c.alpha / c.sigma) ** 2
    return snr.clamp(min=1.0) if weighting == "truncated_snr" else 1 + snr


def pd_loss(student, teacher, x0: Tensor, steps: int, generator: Generator = None, *, grid: str = "uniform",
            rho: float = 7.0, weighting: str = "truncated_snr", cond: dict | None = None,
            times: Tensor | None = None) -> Tensor:
    """Per-example progressive-distillation loss of an ``steps``-step ``student``: (B,).

    For each example ``i ~ U{1..steps}`` picks ``t = t(i/N)``, ``t' = t((i - 1/2)/N)``,
    ``s = t((i-1)/N)`` on the nested grid, draws ``eps``, corrupts ``z_t = alpha_t x0 + sigma_t eps``,
    and returns ``w(t) mean |x_hat_student(z_t, t) - x~|^2`` with ``x~`` from :func:`pd_target`.
    ``times``: the (2N + 1,) nested times ``t(j / 2N)``, ``j = 0..2N`` (made here when None).
    ``student``, ``teacher``: DenoiserLikes on the same path; ``cond`` goes to both.
    """
    path = student.path
    B = x0.shape[0]
    if times is None:
        times = nested_times(path, torch.arange(2 * steps + 1, dtype=torch.float64) / (2 * steps), grid, rho)
    gdev = x0.device
    i = (rand((B,), generator=generator, dtype=torch.float64) * steps).floor().clamp(max=steps - 1).long() + 1  # 1..N
    times = times.to(gdev)
    t, t_mid, s = times[2 * i], times[2 * i - 1], times[2 * i - 2]
    eps = randn_like(x0, generator)
    ct = _coef(path, t, x0)
    z_t = ct.corrupt(x0, eps)
    x_tilde, _ = pd_target(teacher, z_t, t, t_mid, s, cond)
    x_hat = student.predict(z_t, t, **(cond or {})).x0
    w = pd_weight(path.coefficients(t), weighting).to(x0.dtype)
    return w * (x_hat - x_tilde).pow(2).flatten(1).mean(1)


# --------------------------------------------------------------------------------------
# Consistency models
# --------------------------------------------------------------------------------------
def boundary(path: Path, sigma_min: float) -> tuple[float, float]:
    """``(t_eps, s_min)``: the consistency boundary at noise level ``s = sigma/alpha = sigma_min``.

    ``sigma_min`` is raised to ``s(t_min)`` when the path starts above it (a VE path with its own
    ``sigma_min``, a VP path at ``t_min = 1e-3``): a teacher is never asked below its range. The
    returned ``s_min`` is the float64 value with ``sigma(t_eps) - s_min alpha(t_eps) == 0`` exactly
    when one exists next to ``sigma / alpha`` (so ``c_out(t_eps) = 0`` exactly on every path).
    """
    s_lo = float(noise_level(path, path.t_min))
    target = max(float(sigma_min), s_lo if s_lo > 0 and math.isfinite(s_lo) else 0.0)
    if not target > 0:
        raise ValueError(f"sigma_min must be > 0, got {sigma_min}")
    t_eps = float(path.t_min) if target == s_lo else float(_time_of_noise(path, torch.tensor(target, dtype=torch.float64)))
    c = path.coefficients(torch.tensor(t_eps, dtype=torch.float64))
    a, sg = c.alpha, c.sigma
    s_min = sg / a
    for _ in range(4):  # s/alpha rounded: its neighbours may make s_min * alpha == sigma exactly
        if sg - s_min * a == 0:
            break
        s_min = torch.nextafter(s_min, torch.tensor(math.inf if s_min * a < sg else -math.inf, dtype=torch.float64))
    else:
        s_min = sg / a
    return t_eps, float(s_min)


class ConsistencyFunction:
    """``f(x_t, t)``: the consistency parameterization around any denoiser (Song et al. 2023, eq. 5).

    With EDM's scalings ``c_skip, c_out`` at boundary ``s_min`` and ``c_skip0, c_out0`` at 0
    (:meth:`scorelab.targets.Denoiser.scalings`, in ``x~ = x / alpha``), and ``D`` the inner
    denoiser's x0 estimate::

        f(x, t) = c_skip x~ + c_out F,    F = (D - c_skip0 x~) / c_out0      (the F that D implies)
                = (c_skip - r c_skip0) x~ + r D,      r = c_out / c_out0 = 1 - s_min alpha / sigma

    For an EDM-preconditioned inner denoiser (``D = c_skip0 x~ + c_out0 F``) this is exactly Song et
    al.'s ``c_skip x + c_out F`` (then built directly as a core :class:`~scorelab.targets.Denoiser`
    with ``sigma_min``); for any other (a velocity-predicting teacher copied into a student) ``f``
    starts as ``D`` away from the boundary. At ``t_eps`` (``s = s_min``): ``r = 0``, ``c_skip = 1``,
    so ``f(x, t_eps) = x~`` whatever the network outputs. Answers like a denoiser:
    :meth:`predict` -> :class:`~scorelab.targets.Prediction` with ``x0 = f``.

    Args:
        inner: a :class:`~scorelab.targets.Denoiser` (the student network seen through its path).
        sigma_min: the boundary noise level ``s_min`` (see :func:`boundary`).
        sigma_data: EDM's data std of the scalings (the inner denoiser's own when preconditioned).
    """

    def __init__(self, inner: Denoiser, sigma_min: float, sigma_data: float = 0.5):
        if not sigma_min > 0:
            raise ValueError(f"sigma_min must be > 0, got {sigma_min}")
        self.inner = inner  # the student denoiser D
        self.path = inner.path
        self.sigma_min = float(sigma_min)  # boundary s_min: f(x, t_eps) = x / alpha
        self.sigma_data = float(inner.sigma_data if inner.precond != "none" else sigma_data)
        self.direct = inner.precond == "edm"  # D already is c_skip0 x~ + c_out0 F: use F with the boundary scalings
        kw = dict(net_dtype=inner.net_dtype, precond="edm", sigma_data=self.sigma_data, autocast=inner.autocast)
        self._edm = Denoiser(inner.net, self.path, "x0", sigma_min=self.sigma_min, **kw)  # scalings at s_min (and f itself when direct)
        self._edm0 = Denoiser(inner.net, self.path, "x0", sigma_min=0.0, **kw)

    @property
    def net(self):
        return self.inner.net

    def predict(self, x: Tensor, t, **cond) -> Prediction:
        t = as_time_batch(t, x)
        c = self.path.coefficients(t).to(x)
        if self.direct:
            x0 = self._edm.raw(x, t, **cond)
        else:
            _, cs, co = self._edm.scalings(c)
            _, cs0, co0 = self._edm0.scalings(c)
            r = co / co0
            x0 = (cs - r * cs0) * x + r * self.inner.predict(x, t, **cond).x0
        return Prediction(x, c, x0, (x - c.alpha * x0) / c.sigma)

    def __call__(self, x: Tensor, t, kind: str = "x0", **cond) -> Tensor:
        return self.predict(x, t, **cond).get(kind)


def consistency_grid(path: Path, n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """``t_1 = t_eps < ... < t_N``: (n,) float64 times, Karras-spaced in ``s = sigma / alpha``
    (Song et al. 2023: ``s_i = (s_min^(1/rho) + (i-1)/(N-1) (s_max^(1/rho) - s_min^(1/rho)))^rho``).

    ``s_min`` comes from :func:`boundary` (so ``t_1 = t_eps`` exactly), ``s_max`` is lowered to
    ``s(t_max)`` (and clamped to 80 where that is infinite: rectified flow at ``t = 1``)."""
    if n < 2:
        raise ValueError(f"the consistency grid needs n >= 2 points, got {n}")
    t_eps, s_min = boundary(path, sigma_min)
    s_hi = min(float(sigma_max), _s_range(path)[1])
    if not s_hi > s_min:
        raise ValueError(f"sigma_max {sigma_max} must exceed the boundary noise level {s_min:.4g}")
    r = 1.0 / rho
    s = (s_min**r + torch.arange(n, dtype=torch.float64) / (n - 1) * (s_hi**r - s_min**r)) ** rho
    t = _time_of_noise(path, s)
    t[0] = t_eps
    if s_hi == float(noise_level(path, path.t_max)):
        t[-1] = path.t_max
    if not bool((t[1:] > t[:-1]).all()):
        raise ValueError(f"consistency grid of {n} points on {path!r} is not strictly increasing")
    return t


def default_huber_c(dim: int) -> float:
    """iCT's pseudo-Huber constant ``c = 0.00054 sqrt(dim)`` (Song & Dhariwal 2023, §3.3; data in [-1, 1])."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """``sqrt(|a - b|^2 + c^2) - c`` per example over all non-batch dims: (B,). ``c = 0``: ``|a - b|``."""
    sq = (a - b).pow(2).flatten(1).sum(1)
    return torch.sqrt(sq + c * c) - c


def ict_discretization(step: int, total_steps: int, s0: int = 10, s1: int = 1280, doubling_steps: int = 0) -> int:
    """Grid size ``N(k) = min(s0 2^floor(k / K'), s1) + 1`` (Song & Dhariwal 2023, eq. 7).

    ``K' = floor(K / (log2(s1 / s0) + 1))`` for ``K = total_steps`` trainer steps, unless
    ``doubling_steps`` gives ``K'`` directly."""
    if s0 < 1 or s1 < s0:
        raise ValueError(f"need 1 <= s0 <= s1, got s0={s0}, s1={s1}")
    kp = doubling_steps or max(1, int(total_steps // (math.log2(s1 / s0) + 1)))
    return int(min(s0 * 2 ** (step // kp), s1)) + 1


def ict_index_probabilities(s: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """``p(n) ∝ erf((ln s_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((ln s_n - P_mean) / (sqrt 2 P_std))``
    for the ``N - 1`` intervals of the grid ``s: (N,)`` ascending (iCT's discretised log-normal): (N-1,)."""
    ls = torch.log(_f64(s))
    e = torch.erf((ls - p_mean) / (math.sqrt(2) * p_std))
    p = (e[1:] - e[:-1]).clamp_min(0)
    if not p.sum() > 0:
        raise ValueError("the log-normal puts no mass on this grid")
    return p / p.sum()


def _draw_index(B: int, n_intervals: int, generator, probs: Tensor | None, device) -> Tensor:
    u = rand((B,), generator=generator, dtype=torch.float64)
    if probs is None:
        return (u * n_intervals).floor().clamp(max=n_intervals - 1).long().to(device)
    cdf = torch.cumsum(probs, 0)
    return torch.searchsorted(cdf, u.to(cdf.device)).clamp(max=n_intervals - 1).to(device)


def consistency_loss(f, x0: Tensor, times: Tensor, generator: Generator = None, *, teacher=None, target=None,
                     solver: str = "heun", distance: str = "pseudo_huber", huber_c: float | None = None,
                     weighting: str = "uniform", probs: Tensor | None = None, cond: dict | None = None) -> Tensor:
    """Per-example consistency loss on the grid ``times: (N,)`` ascending (``times[0] = t_eps``): (B,).

    Each example draws an interval ``n`` (uniformly, or from ``probs`` (N-1,)) and ``z ~ N(0, I)``;
    ``x_{n+1} = alpha_{n+1} x0 + sigma_{n+1} z``. The target point is

    * with a ``teacher`` (distillation): ``x^_n = ode_step(teacher, x_{n+1}, t_{n+1} -> t_n, solver)``;
    * without (consistency training): ``x_n = alpha_n x0 + sigma_n z`` (the same ``z``).

    Loss ``lambda_n d(f(x_{n+1}, t_{n+1}), target(x_n, t_n))`` with the target consistency function
    ``target`` (an EMA copy, or ``f`` itself: iCT) evaluated without gradients; ``lambda_n = 1``
    (``uniform``) or ``1 / (s_{n+1} - s_n)`` (``ict``); ``d`` pseudo-Huber (``c`` = ``huber_c`` or
    :func:`default_huber_c`) or squared ``l2`` (mean over dims).
    """
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}: expected one of {', '.join(DISTANCES)}")
    if weighting not in CM_WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}: expected one of {', '.join(CM_WEIGHTINGS)}")
    path = f.path
    cond = cond or {}
    B = x0.shape[0]
    times = _f64(times).to(x0.device)
    n = _draw_index(B, len(times) - 1, generator, probs, x0.device)
    t_lo, t_hi = times[n], times[n + 1]
    z = randn_like(x0, generator)
    x_hi = _coef(path, t_hi, x0).corrupt(x0, z)
    with torch.no_grad():
        if teacher is not None:
            x_lo = ode_step(teacher, x_hi, t_hi, t_lo, solver, cond)
        else:
            x_lo = _coef(path, t_lo, x0).corrupt(x0, z)
        tgt = (target if target is not None else f).predict(x_lo, t_lo, **cond).x0
    out = f.predict(x_hi, t_hi, **cond).x0
    if distance == "pseudo_huber":
        d = pseudo_huber(out, tgt, default_huber_c(x0[0].numel()) if huber_c is None else huber_c)
    else:
        d = (out - tgt).pow(2).flatten(1).mean(1)
    if weighting == "ict":
        s_all = noise_level(path, times).to(x0.device)
        d = d / (s_all[n + 1] - s_all[n]).to(d.dtype)
    return d


def multistep_indices(n_grid: int, steps: int) -> list[int]:
    """Grid indices (descending, first ``N - 1`` = ``t_max``) of a ``steps``-step consistency sampler on an
    ``N``-point grid: ``round((N - 1)(1 - j / steps))``, ``j = 0 .. steps-1`` (Karras-spaced, never ``t_eps``)."""
    if not 1 <= steps <= n_grid - 1:
        raise ValueError(f"a consistency model on a {n_grid}-point grid samples with 1..{n_grid - 1} steps, got {steps}")
    return [int(round((n_grid - 1) * (1 - j / steps))) for j in range(steps)]


@torch.no_grad()
def consistency_sample(f, x: Tensor, times, generator: Generator = None, cond: dict | None = None,
                       callback: Callable[[dict], None] | None = None) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) on any path.

    ``x``: the start at ``times[0]`` (e.g. ``sigma(t_0) z``); ``times``: decreasing, each > t_eps.
    ``x0 = f(x, t_0)``; for each next ``tau``: ``x_tau = alpha_tau (x0 + sqrt(s_tau^2 - s_min^2) z)``
    (the noise the boundary ``x~_{t_eps}`` lacks) and ``x0 = f(x_tau, tau)``. ``len(times)``
    evaluations. Returns the last ``x0`` (B, ...). ``callback(dict(i, t, x, x0))`` after each.
    """
    cond = cond or {}
    times = [float(v) for v in _f64(times).reshape(-1)]
    s_min = float(getattr(f, "sigma_min", 0.0))
    x0 = None
    for i, tau in enumerate(times):
        if i > 0:
            c = f.path.coefficients(torch.tensor(tau, dtype=torch.float64))
            a, s = float(c.alpha), float(c.sigma / c.alpha)
            x = a * (x0 + math.sqrt(max(s * s - s_min * s_min, 0.0)) * randn_like(x0, generator))
        x0 = f.predict(x, torch.full((x.shape[0],), tau, dtype=torch.float64, device=x.device), **cond).x0
        if callback is not None:
            callback(dict(i=i, t=tau, x=x, x0=x0))
    return x0
