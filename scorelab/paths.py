"""Forward processes ``x_t = alpha(t) x_0 + sigma(t) eps``, eps ~ N(0, I).

Every diffusion-style model in scorelab is one of these paths seen through a choice of what
the network predicts (``targets.py``). A path knows only its two scalar functions of time and
what follows from them:

* derivatives ``d_alpha``, ``d_sigma`` (autograd-free, in closed form);
* log-SNR ``lambda(t) = 2 log(alpha / sigma)`` and, where it exists, its inverse;
* the SDE ``dx = f(t) x dt + g(t) dw`` with ``f = alpha'/alpha`` and
  ``g^2 = (sigma^2)' - 2 f sigma^2``;
* the prior ``N(0, sigma(t_max)^2 I)`` (for VP-like paths sigma(t_max) ~ 1);
* ``t_clean``: a time with ``sigma = 0, alpha = 1`` that samplers step to last
  (a step onto it returns the denoised estimate).

Times are in the path's own units: ``[0, 1]`` for continuous paths, integer timesteps
``0 .. T-1`` for discrete DDPM, and ``t = sigma`` for EDM. Time grids (``time_grid``) run from
``t_max`` down to ``t_clean``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "Coefficients",
    "Path",
    "VPLinear",
    "VPCosine",
    "SubVP",
    "DDPMDiscrete",
    "VE",
    "RectifiedFlow",
    "EDM",
    "PATHS",
    "make_path",
    "time_grid",
    "GRIDS",
    "broadcast_to",
]


def broadcast_to(c: Tensor, x: Tensor) -> Tensor:
    """Reshape per-example coefficients ``c: (B,)`` (or a scalar) to broadcast over ``x: (B, ...)``."""
    c = torch.as_tensor(c, dtype=x.dtype, device=x.device)
    if c.ndim == 0:
        return c
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


@dataclass(frozen=True)
class Coefficients:
    """Path coefficients at times ``t``: each field has the shape of ``t``."""

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor

    def to(self, x: Tensor) -> "Coefficients":
        """The same coefficients reshaped to broadcast against ``x: (B, ...)``."""
        return Coefficients(*(broadcast_to(v, x) for v in (self.alpha, self.sigma, self.d_alpha, self.d_sigma)))

    @property
    def log_snr(self) -> Tensor:
        return 2 * (torch.log(self.alpha) - torch.log(self.sigma))

    @property
    def d_log_snr(self) -> Tensor:
        """``lambda'(t) = 2 (alpha'/alpha - sigma'/sigma)``."""
        return 2 * (self.d_alpha / self.alpha - self.d_sigma / self.sigma)

    def corrupt(self, x0: Tensor, eps: Tensor) -> Tensor:
        """THE forward corruption ``x_t = alpha x_0 + sigma eps`` (coefficients broadcast against ``x0: (B, ...)``)."""
        return broadcast_to(self.alpha, x0) * x0 + broadcast_to(self.sigma, x0) * eps


class Path:
    """Base class: subclasses give ``alpha``, ``sigma`` and their derivatives in closed form."""

    name: str = "path"
    t_min: float  # smallest time a time grid visits before the final clean step
    t_max: float  # the prior's time
    t_clean: float  # sigma(t_clean) == 0, alpha(t_clean) == 1
    discrete: bool = False  # integer timesteps (DDPM); training samples integers

    # --- to be provided ---------------------------------------------------------------
    def alpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """Inverse of ``log_snr``; subclasses with a closed form override it."""
        return self._invert_monotone(lam)

    # --- derived ----------------------------------------------------------------------
    def _t(self, t) -> Tensor:
        if not torch.is_tensor(t):
            t = torch.tensor(t, dtype=torch.float64)
        elif not t.is_floating_point():
            t = t.to(torch.float64)
        return t

    def coefficients(self, t) -> Coefficients:
        t = self._t(t)
        return Coefficients(self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t))

    def log_snr(self, t) -> Tensor:
        """``lambda(t) = 2 log(alpha(t) / sigma(t))``, decreasing in t."""
        t = self._t(t)
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def d_log_snr(self, t) -> Tensor:
        """``lambda'(t) = 2 (alpha'/alpha - sigma'/sigma)`` (< 0: the log-SNR decreases in t)."""
        return self.coefficients(t).d_log_snr

    def c_noise(self, t) -> Tensor:
        """The network's time input: an order-one function of ``t`` (EDM's ``c_noise``).

        The identity for paths whose time already lies in ``[0, 1]``; :class:`DDPMDiscrete` gives
        ``t / T`` and :class:`EDM` ``ln(sigma) / 4``. :class:`~scorelab.targets.Denoiser` applies
        it, so networks never know which path they serve.
        """
        return self._t(t)

    def drift(self, t) -> Tensor:
        """SDE drift coefficient ``f(t) = alpha'(t) / alpha(t)``."""
        t = self._t(t)
        return self.d_alpha(t) / self.alpha(t)

    def g2(self, t) -> Tensor:
        """Squared SDE diffusion ``g(t)^2 = d(sigma^2)/dt - 2 f(t) sigma^2``."""
        t = self._t(t)
        s = self.sigma(t)
        return 2 * s * self.d_sigma(t) - 2 * self.drift(t) * s**2

    @property
    def prior_std(self) -> float:
        """Standard deviation of the prior ``N(0, prior_std^2 I)`` sampled at ``t_max``."""
        return float(self.sigma(torch.tensor(self.t_max, dtype=torch.float64)))

    def prior_sample(self, shape, generator=None, dtype=torch.float32, device=None) -> Tensor:
        from .random import randn

        return self.prior_std * randn(shape, generator=generator, dtype=dtype, device=device)

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """Log-density of the prior, summed over all non-batch dims: ``(B,)``."""
        s = self.prior_std
        d = x[0].numel()
        return -0.5 * x.flatten(1).pow(2).sum(1) / s**2 - d * (math.log(s) + 0.5 * math.log(2 * math.pi))

    def sample_xt(self, x0: Tensor, t, eps: Tensor) -> Tensor:
        """``x_t = alpha(t) x_0 + sigma(t) eps`` with ``t: (B,)`` and ``x0, eps: (B, ...)``."""
        return self.coefficients(t).corrupt(x0, eps)

    def _invert_monotone(self, lam: Tensor, iters: int = 80) -> Tensor:
        """Bisection for ``t`` with ``log_snr(t) = lam`` on ``[t_min, t_max]`` (log-SNR decreases)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        lo = torch.full_like(lam, self.t_min)
        hi = torch.full_like(lam, self.t_max)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            go_right = self.log_snr(mid) > lam
            lo = torch.where(go_right, mid, lo)
            hi = torch.where(go_right, hi, mid)
        return 0.5 * (lo + hi)

    def __repr__(self) -> str:
        fields = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


# --------------------------------------------------------------------------------------
# Variance-preserving paths
# --------------------------------------------------------------------------------------
class VPLinear(Path):
    """VP SDE with linear ``beta(t) = beta_min + t (beta_max - beta_min)`` on ``t in [0, 1]``.

    ``alpha(t) = exp(-B(t)/2)`` with ``B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2``;
    ``sigma = sqrt(1 - alpha^2)``; f = -beta/2, g^2 = beta (Song et al. 2021).
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        self.beta_min = beta_min  # beta(0)
        self.beta_max = beta_max  # beta(1)
        self.t_min, self.t_max, self.t_clean = t_min, t_max, 0.0

    def _B(self, t):
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def alpha(self, t):
        return torch.exp(-0.5 * self._B(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(-self._B(t)))

    def d_alpha(self, t):
        return -0.5 * self.beta(t) * self.alpha(t)

    def d_sigma(self, t):
        # d/dt sqrt(1 - e^{-B}) = beta e^{-B} / (2 sigma)
        return 0.5 * self.beta(t) * torch.exp(-self._B(t)) / self.sigma(t)

    def t_from_log_snr(self, lam):
        # alpha^2/sigma^2 = e^lam  =>  B = log(1 + e^{-lam}) = softplus(-lam); solve the quadratic in t
        lam = torch.as_tensor(lam, dtype=torch.float64)
        B = torch.nn.functional.softplus(-lam)
        a = 0.5 * (self.beta_max - self.beta_min)
        b = self.beta_min
        return 2 * B / (b + torch.sqrt(b * b + 4 * a * B))


class VPCosine(Path):
    """VP path with the cosine schedule (Nichol & Dhariwal 2021), continuous in ``t in [0, 1]``.

    ``alpha(t)^2 = cos^2(pi/2 (t + s)/(1 + s)) / cos^2(pi/2 s/(1 + s))``, ``sigma = sqrt(1 - alpha^2)``.
    ``t_max`` stays below 1 where alpha vanishes (0.9946 as in DPM-Solver's reference code).
    """

    name = "cosine"

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946):
        self.s = s  # offset that keeps beta small near t = 0
        self.t_min, self.t_max, self.t_clean = t_min, t_max, 0.0

    def _phase(self, t):
        return 0.5 * math.pi * (t + self.s) / (1 + self.s)

    def alpha(self, t):
        return torch.cos(self._phase(t)) / math.cos(0.5 * math.pi * self.s / (1 + self.s))

    def sigma(self, t):
        return torch.sqrt((1 - self.alpha(t) ** 2).clamp_min(0))

    def d_alpha(self, t):
        return -torch.sin(self._phase(t)) * (0.5 * math.pi / (1 + self.s)) / math.cos(0.5 * math.pi * self.s / (1 + self.s))

    def d_sigma(self, t):
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def t_from_log_snr(self, lam):
        lam = torch.as_tensor(lam, dtype=torch.float64)
        a = torch.sqrt(torch.sigmoid(lam))  # alpha = sqrt(snr / (1 + snr))
        c0 = math.cos(0.5 * math.pi * self.s / (1 + self.s))
        return torch.arccos((a * c0).clamp(-1, 1)) * (1 + self.s) * 2 / math.pi - self.s


class SubVP(VPLinear):
    """sub-VP SDE (Song et al. 2021): alpha as in VP, ``sigma(t) = 1 - alpha(t)^2``."""

    name = "subvp"

    def sigma(self, t):
        return -torch.expm1(-self._B(t))

    def d_sigma(self, t):
        return self.beta(t) * torch.exp(-self._B(t))

    def t_from_log_snr(self, lam):
        return self._invert_monotone(lam)


class DDPMDiscrete(Path):
    """DDPM (Ho et al. 2020) with a beta table of ``T`` steps; integer timesteps ``0 .. T-1``.

    ``alphabar_k = prod_{j<=k} (1 - beta_j)``, ``alpha = sqrt(alphabar)``, ``sigma = sqrt(1 - alphabar)``.
    Between integers ``log alphabar`` is interpolated linearly, which makes the path exactly a
    VP SDE with piecewise-constant ``beta(t) = -log(1 - beta_k)``; continuous samplers can run on it.
    ``t = -1`` is the clean time (``alphabar = 1``).

    The table is built from ``schedule`` (with ``T``, ``beta_start``, ``beta_end``), or given:
    ``betas`` (T,) in (0, 1), or ``alphas_cumprod`` (T,) strictly decreasing in (0, 1] (e.g. another
    library's float32 table, to compare samplers on exactly its path); ``T`` is then its length.
    """

    name = "ddpm"
    discrete = True

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, schedule: str = "linear",
                 betas=None, alphas_cumprod=None):
        if betas is not None and alphas_cumprod is not None:
            raise ValueError("DDPMDiscrete: give betas or alphas_cumprod, not both")
        self.beta_start, self.beta_end = beta_start, beta_end  # linear table end points
        self.schedule = schedule  # "linear" | "cosine" | "scaled_linear"; "table" when betas / alphas_cumprod are given
        if alphas_cumprod is not None:
            ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().clone()
            if ab.ndim != 1 or ab.numel() < 2 or not bool(torch.isfinite(ab).all()):
                raise ValueError(f"alphas_cumprod must be a finite 1-D table of at least 2 entries, got shape {tuple(ab.shape)}")
            if not (bool((ab > 0).all()) and bool((ab <= 1).all()) and bool((ab[1:] < ab[:-1]).all())):
                raise ValueError("alphas_cumprod must lie in (0, 1] and decrease strictly")
            logab = torch.log(ab)
            betas = -torch.expm1(torch.diff(logab, prepend=torch.zeros(1, dtype=torch.float64)))
            self.schedule, T = "table", ab.numel()
        elif betas is not None:
            betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
            if betas.ndim != 1 or betas.numel() < 2 or not (bool((betas > 0).all()) and bool((betas < 1).all())):
                raise ValueError("betas must be a 1-D table of at least 2 entries in (0, 1)")
            logab = torch.cumsum(torch.log1p(-betas), 0)
            self.schedule, T = "table", betas.numel()
        elif schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        elif schedule == "cosine":
            c = VPCosine(t_max=1.0)
            k = torch.arange(T + 1, dtype=torch.float64) / T
            ab = c.alpha(k) ** 2
            betas = (1 - ab[1:] / ab[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"unknown DDPM schedule {schedule!r}: expected linear, scaled_linear or cosine")
        if self.schedule != "table":
            logab = torch.cumsum(torch.log1p(-betas), 0)
        self.T = T  # number of diffusion steps
        self.betas = betas
        # log alphabar at t = -1, 0, ..., T-1
        self._logab = torch.cat([torch.zeros(1, dtype=torch.float64), logab])
        self.t_min, self.t_max, self.t_clean = 0.0, float(T - 1), -1.0

    def __repr__(self) -> str:
        if self.schedule == "table":
            ab = self.alphas_cumprod()
            return f"DDPMDiscrete(T={self.T}, schedule='table', alphas_cumprod=[{float(ab[0]):.6g} .. {float(ab[-1]):.6g}])"
        return f"DDPMDiscrete(T={self.T}, beta_start={self.beta_start}, beta_end={self.beta_end}, schedule={self.schedule!r})"

    def c_noise(self, t) -> Tensor:
        """``t / T``: step indices ``0 .. T-1`` as ``[0, 1)`` whatever ``T`` (clean ``t = -1`` gives ``-1/T``)."""
        return self._t(t) / self.T

    def alphas_cumprod(self) -> Tensor:
        """``alphabar_k`` for ``k = 0 .. T-1``: shape (T,)."""
        return self._logab[1:].exp()

    def _interp(self, t):
        """log alphabar at t and its slope, piecewise linear on the grid t = -1, 0, ..., T-1."""
        logab = self._logab.to(device=t.device, dtype=t.dtype)
        u = (t + 1).clamp(0, self.T)
        i = u.floor().long().clamp(max=self.T - 1)
        frac = u - i
        slope = logab[i + 1] - logab[i]
        return logab[i] + frac * slope, slope

    def alpha(self, t):
        return torch.exp(0.5 * self._interp(t)[0])

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(self._interp(t)[0]))

    def d_alpha(self, t):
        la, slope = self._interp(t)
        return 0.5 * slope * torch.exp(0.5 * la)

    def d_sigma(self, t):
        la, slope = self._interp(t)
        return -0.5 * slope * torch.exp(la) / torch.sqrt(-torch.expm1(la))

    def t_from_log_snr(self, lam):
        # piecewise-linear log alphabar => invert by interpolation on the table
        lam = torch.as_tensor(lam, dtype=torch.float64)
        la = -torch.nn.functional.softplus(-lam)  # log alphabar = log sigmoid(lam)
        grid = self._logab.flip(0)  # increasing
        ts = torch.arange(self.T - 1, -2, -1, dtype=torch.float64)  # matching times
        idx = torch.searchsorted(grid, la.clamp(grid[0], grid[-1]).contiguous()).clamp(1, self.T)
        g0, g1 = grid[idx - 1], grid[idx]
        w = (la.clamp(grid[0], grid[-1]) - g0) / (g1 - g0)
        return ts[idx - 1] + w * (ts[idx] - ts[idx - 1])


# --------------------------------------------------------------------------------------
# Variance-exploding and flow paths
# --------------------------------------------------------------------------------------
class VE(Path):
    """VE SDE / NCSN (Song & Ermon 2019): ``alpha = 1``, ``sigma(t) = sigma_min (sigma_max/sigma_min)^t``.

    ``t in [0, 1]`` spans the geometric sequence of noise levels; ``t_clean = -inf`` gives sigma = 0.
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        self.sigma_min = sigma_min  # smallest noise level (seed 000 §3.5: sigma_1)
        self.sigma_max = sigma_max  # largest noise level, about the data's largest pairwise distance
        self.t_min, self.t_max, self.t_clean = 0.0, 1.0, -math.inf

    @property
    def _log_ratio(self):
        return math.log(self.sigma_max / self.sigma_min)

    def alpha(self, t):
        return torch.ones_like(t)

    def sigma(self, t):
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def d_alpha(self, t):
        return torch.zeros_like(t)

    def d_sigma(self, t):
        return self.sigma(t) * self._log_ratio

    def t_from_log_snr(self, lam):
        lam = torch.as_tensor(lam, dtype=torch.float64)
        return (-0.5 * lam - math.log(self.sigma_min)) / self._log_ratio

    def sigmas(self, L: int) -> Tensor:
        """The NCSN geometric sequence of ``L`` noise levels, largest first: (L,) float64."""
        return torch.exp(torch.linspace(math.log(self.sigma_max), math.log(self.sigma_min), L, dtype=torch.float64))


class RectifiedFlow(Path):
    """Rectified flow / flow matching (Liu et al. 2022; seed 001): ``alpha = 1 - t``, ``sigma = t``.

    The velocity ``dx/dt = eps - x_0`` is constant along each straight path.
    """

    name = "rf"

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0):
        self.t_min, self.t_max, self.t_clean = t_min, t_max, 0.0

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t.clone() if torch.is_tensor(t) else t

    def d_alpha(self, t):
        return -torch.ones_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)

    def t_from_log_snr(self, lam):
        return torch.sigmoid(-0.5 * torch.as_tensor(lam, dtype=torch.float64))


class EDM(Path):
    """EDM (Karras et al. 2022): ``alpha = 1``, ``sigma = t``; time is the noise level itself."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max  # range of noise levels sampled
        self.sigma_data = sigma_data  # expected standard deviation of the training data
        self.t_min, self.t_max, self.t_clean = sigma_min, sigma_max, 0.0

    def alpha(self, t):
        return torch.ones_like(t)

    def sigma(self, t):
        return t.clone()

    def d_alpha(self, t):
        return torch.zeros_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)

    def t_from_log_snr(self, lam):
        return torch.exp(-0.5 * torch.as_tensor(lam, dtype=torch.float64))

    def c_noise(self, t) -> Tensor:
        """``ln(sigma) / 4`` (Karras et al. 2022, Table 1), with ``sigma`` floored at 1e-8 so that 0 stays finite."""
        return 0.25 * torch.log(self._t(t).clamp_min(1e-8))


PATHS: dict[str, Callable[..., Path]] = {
    "vp": VPLinear,
    "cosine": VPCosine,
    "subvp": SubVP,
    "ddpm": DDPMDiscrete,
    "ve": VE,
    "rf": RectifiedFlow,
    "edm": EDM,
}


def make_path(name: str, **kwargs) -> Path:
    """Build a path by registry name (``vp cosine subvp ddpm ve rf edm``) with keyword options."""
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}: expected one of {', '.join(PATHS)}")
    try:
        return PATHS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad option for path {name!r}: {e}") from None


# --------------------------------------------------------------------------------------
# Time grids
# --------------------------------------------------------------------------------------
def _grid_uniform(path: Path, n: int, **_) -> Tensor:
    return torch.linspace(path.t_max, path.t_min, n, dtype=torch.float64)


# Where a path's log-SNR is infinite at an end (rectified flow at t = 0 and 1), log-SNR grids use
# the noise range sigma/alpha in [0.01, 80] instead: EDM's largest noise level and the noisy end of
# the VP (t_min = 1e-3), DDPM (t = 0) and VE (sigma_min = 0.01) defaults (EDM's own 0.002 spent a
# tenth of a 10-step rectified-flow grid below 0.01 and doubled its error on the benchmark
# mixtures); the grid's end points stay t_max and t_min.
_LAMBDA_RANGE = (-2 * math.log(80.0), -2 * math.log(0.01))


def _log_snr_range(path: Path, log_snr_max: float | None = None) -> tuple[float, float]:
    """(log-SNR at t_max, log-SNR at t_min), clamped to a finite range; the upper end at most ``log_snr_max``."""
    lo = float(path.log_snr(torch.tensor(path.t_max, dtype=torch.float64)))
    hi = float(path.log_snr(torch.tensor(path.t_min, dtype=torch.float64)))
    lo = lo if math.isfinite(lo) else max(lo, _LAMBDA_RANGE[0])
    hi = hi if math.isfinite(hi) else min(hi, _LAMBDA_RANGE[1])
    if log_snr_max is not None:
        hi = min(hi, float(log_snr_max))
    return lo, hi


def _grid_karras(path: Path, n: int, rho: float = 7.0, log_snr_max: float | None = None, **_) -> Tensor:
    """Karras et al. 2022 eq. 5 on the VE-equivalent noise ``s = sigma/alpha = exp(-lambda/2)``."""
    lam_lo, lam_hi = _log_snr_range(path, log_snr_max)
    s_max, s_min = math.exp(-0.5 * lam_lo), math.exp(-0.5 * lam_hi)
    r = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (s_max ** (1 / rho) + r * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return _from_log_snr(path, -2 * torch.log(s), end=log_snr_max is None)


def _grid_logsnr(path: Path, n: int, log_snr_max: float | None = None, **_) -> Tensor:
    """Uniform in log-SNR (the DPM-Solver 'logSNR' grid)."""
    lam_lo, lam_hi = _log_snr_range(path, log_snr_max)
    return _from_log_snr(path, torch.linspace(lam_lo, lam_hi, n, dtype=torch.float64), end=log_snr_max is None)


def _grid_logsnr_x0(path: Path, n: int, log_snr_max: float | None = None, **_) -> Tensor:
    """``n`` times uniform in log-SNR that leave the last of ``n`` equal intervals to the final step.

    ``lambda_k = lambda(t_max) + k (lambda(t_min) - lambda(t_max)) / n`` for ``k = 0 .. n-1``: with
    :func:`time_grid`'s clean end, a grid of ``steps`` steps is ``steps`` equal log-SNR intervals
    spanning the path's range, the last one covered by the step onto ``t_clean`` (where a sampler
    returns its ``x0_hat``), as diffusers' DPM-Solver grids end (``final_sigmas_type="zero"``). The
    last noisy time moves toward ``t_min`` as the number of steps grows; with few steps the final
    denoising step starts earlier instead of spending an evaluation near ``t_min``.
    """
    lam_lo, lam_hi = _log_snr_range(path, log_snr_max)
    return _from_log_snr(path, torch.linspace(lam_lo, lam_hi, n + 1, dtype=torch.float64)[:-1], end=False)


def _grid_shift(path: Path, n: int, shift: float = 3.0, **_) -> Tensor:
    """Resolution-dependent shift (Esser et al. 2024, seed 001): uniform times pushed toward noise.

    For rectified flow ``t' = shift t / (1 + (shift - 1) t)``, i.e. the noise-to-signal ratio
    ``sigma/alpha = t/(1-t)`` multiplied by ``shift``. It is meant for rectified flow only (more
    pixels keep more signal at a given noise level). On any other path the same map is applied to
    the normalised time ``u = (t - t_min) / (t_max - t_min)``, a bijection of ``[0, 1]``, so the
    grid never repeats a time (multiplying a VP path's bounded ``sigma/alpha`` by ``shift`` would
    clamp many times to ``t_max``); :func:`scorelab.samplers.sample` warns about that combination.
    """
    if shift <= 0:
        raise ValueError(f"grid shift must be positive, got {shift}")
    if isinstance(path, RectifiedFlow):
        t = _grid_uniform(path, n)
        return shift * t / (1 + (shift - 1) * t)
    u = torch.linspace(1.0, 0.0, n, dtype=torch.float64)
    u = shift * u / (1 + (shift - 1) * u)
    t = path.t_min + u * (path.t_max - path.t_min)
    t[0], t[-1] = path.t_max, path.t_min
    return t


def _from_log_snr(path: Path, lam: Tensor, end: bool = True) -> Tensor:
    t = path.t_from_log_snr(lam)
    # end points exactly, whatever the rounding of the inverse
    t[0] = path.t_max
    if end:
        t[-1] = path.t_min
    return t


GRIDS = {"uniform": _grid_uniform, "karras": _grid_karras, "logsnr": _grid_logsnr, "logsnr_x0": _grid_logsnr_x0,
         "shift": _grid_shift}


def time_grid(path: Path, steps: int, kind: str = "uniform", clean_end: bool = True, **kwargs) -> Tensor:
    """Times for a sampler with ``steps`` network evaluations (first-order samplers).

    Returns ``steps + 1`` float64 times from ``t_max`` down: with ``clean_end`` the first ``steps``
    are spread over ``[t_max, t_min]`` by ``kind`` and the last is ``t_clean`` (sigma = 0, where a
    sampler returns its denoised estimate); without it all ``steps + 1`` lie on ``[t_max, t_min]``.
    When ``t_min`` is itself clean (rectified flow) the grid is simply ``steps + 1`` points on
    ``[t_max, t_min]``, so no step is wasted (unless the grid stops short of it, e.g. ``logsnr``
    with ``log_snr_max``: then a clean point is appended as on other paths).
    ``kind``: ``uniform`` (in t), ``karras`` (``rho=7``), ``logsnr``, ``shift`` (``shift=3``);
    ``karras`` and ``logsnr`` take ``log_snr_max`` (the log-SNR of the last noisy time, if below
    the path's own at ``t_min``). A grid never repeats a time (ValueError otherwise).
    """
    if kind not in GRIDS:
        raise ValueError(f"unknown time grid {kind!r}: expected one of {', '.join(GRIDS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ts = None
    if not clean_end or path.t_min == path.t_clean:
        ts = GRIDS[kind](path, steps + 1, **kwargs)
        if clean_end and float(path.sigma(ts[-1:])[0]) > 0:  # the grid stops short of the clean t_min
            ts = None
    if ts is None:
        if steps == 1:
            ts = torch.tensor([path.t_max], dtype=torch.float64)
        else:
            ts = GRIDS[kind](path, steps, **kwargs)
        ts = torch.cat([ts, torch.tensor([path.t_clean], dtype=torch.float64)])
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"time grid {kind!r} with {steps} steps on {path!r} repeats a time or is not decreasing: "
                         f"{ts.tolist()}")
    return ts
