"""Likelihoods of diffusion models: the probability-flow ODE and the discrete DDPM ELBO.

Probability-flow ODE (Song et al. 2021, app. D; Chen et al. 2018, FFJORD)
-----------------------------------------------------------------------
Along ``dx/dt = v(x, t) = alpha'(t) x0_hat + sigma'(t) eps_hat`` the log-density obeys
``d log p_t(x_t) / dt = -div v(x_t, t)``, so with ``x_T`` the ODE solution started at ``x``:

    log p_{t_start}(x) = log p_T(x_T) + int_{t_start}^{T} div v(x_t, t) dt

``x`` and the running divergence integral are solved jointly (torchdiffeq, adaptive). The
divergence is exact (one backward pass per dimension; low D) or Hutchinson's estimate
``z^T (dv/dx) z`` with probes ``z`` (Rademacher or Gaussian) drawn once and held fixed over the
solve, which is unbiased for the integral. Every example gets its own divergence: the
denoiser must treat batch elements independently (no batch norm).

Images: dequantization and bits per dimension
---------------------------------------------
For uint8 data ``k in {0..255}^D`` and uniform noise ``u ~ U[0, 1)^D`` the model sees
``y = 2 (k + u) / 256 - 1`` in ``[-1, 1)``, and (Theis et al. 2016; Ho et al. 2019)

    log P(k) >= E_u[log p_model(y)] + D log(2 / 256),
    bits/dim  = -(log p_model(y) + D log(2/256)) / (D ln 2)   (one draw of u: unbiased for the bound).

Note that ``y`` places ``k`` at the left edge of a bin of width ``2/256``, not at
``quantize.to_model``'s ``k / 127.5 - 1`` (bins of width ``2/255`` centred on the data);
the two differ by less than one bin (at most ``2/256``).

Discrete DDPM ELBO (seed 002 §2.1; Ho et al. 2020, eq. 5)
--------------------------------------------------------
``-log p(x_0) <= L_T + sum_{t=2}^{T} L_{t-1} + L_0`` with

* prior matching   ``L_T = KL(q(x_T | x_0) || N(0, I))``,
* denoising matching ``L_{t-1} = E_q KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))``,
* reconstruction   ``L_0 = -E_q log p_theta(x_0 | x_1)`` (discretized Gaussian decoder).

Index convention. The seed counts ``t = 1 .. T`` with ``x_0`` clean. :class:`~scorelab.paths.DDPMDiscrete`
uses 0-based step indices ``k = 0 .. T-1`` with ``alphabar_k = prod_{j<=k} (1 - beta_j)`` and
``k = -1`` clean. So the seed's ``x_t`` is the path's ``x`` at ``k = t - 1``: ``L_T`` uses
``k = T-1``, the denoising terms ``t = 2..T`` are ``k = 1 .. T-1`` (from ``k`` to ``k - 1``), and
the decoder ``p(x_0 | x_1)`` reads the path at ``k = 0``. :func:`ddpm_posterior` takes the path's
``k``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .estimators import probes
from .paths import DDPMDiscrete, Path
from .quantize import bits_per_dim, dequantize, discretized_gaussian_log_prob, nats_to_bits_per_dim, to_model
from .random import Generator, rand, randn

__all__ = [
    "pf_ode_log_likelihood",
    "default_t_start",
    "dequantize",
    "bits_per_dim",
    "pf_ode_bits_per_dim",
    "ddpm_posterior",
    "ddpm_elbo_terms",
]

# --------------------------------------------------------------------------------------
# Probability-flow ODE
# --------------------------------------------------------------------------------------
def default_t_start(path: Path) -> float:
    """Where the likelihood ODE starts by default: ``path.t_min``.

    At ``t_clean`` (sigma = 0) the ODE is singular for most paths: VP/sub-VP/cosine have
    ``sigma'(0) = inf``, VE's clean time is ``-inf``, DDPM's ``t = -1`` and EDM's ``sigma = 0`` make
    ``x0``/``eps`` conversions divide by zero. Rectified flow is regular at ``t = 0`` and its
    ``t_min`` is ``t_clean``. The result is then the log-density of ``p_{t_min}``, the data
    convolved with ``N(0, sigma(t_min)^2)`` (as in Song et al. 2021, who start at 1e-5).
    """
    return float(path.t_min)


def pf_ode_log_likelihood(
    denoiser,
    x: Tensor,
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    trace: str = "exact",
    n_probes: int = 1,
    probe: str = "rademacher",
    generator: Generator = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    options: dict | None = None,
    cond: dict | None = None,
    time_variable: str = "auto",
) -> tuple[Tensor, dict]:
    """Log-density ``log p_{t_start}(x)`` of the model's probability-flow ODE.

    Args:
        denoiser: a :class:`~scorelab.targets.Denoiser` or ``ExactDenoiser`` (``.path`` and
            ``.predict(x, t, **cond)``); the ODE velocity is ``alpha' x0_hat + sigma' eps_hat``.
        x: (B, ...) points; the solve runs in ``x.dtype`` (float64 recommended for tests).
        t_start: where the data lives; default :func:`default_t_start` (``path.t_min``).
        t_end: where the prior ``path.prior_log_prob`` is evaluated; default ``path.t_max``.
        trace: ``"exact"`` (D backward passes per evaluation) or ``"hutchinson"``.
        n_probes: Hutchinson probes per example, averaged at every evaluation.
        probe: ``"rademacher"`` or ``"gaussian"`` probe entries.
        generator: randomness for the probes (None, a Generator, or one per example).
        rtol, atol, method: passed to ``torchdiffeq.odeint``.
        options: ``torchdiffeq.odeint`` solver options. On a discrete DDPM path the velocity
            jumps at every integer (piecewise-constant ``beta``); the adaptive solver steps over
            the kinks at some cost in accuracy (about 5e-3 nats on the 2-D tests). Passing
            ``{"jump_t": integers}`` restarts at each kink: more accurate, but for ``T = 1000``
            about 20x the evaluations.
        cond: keyword arguments for the denoiser (e.g. ``{"y": labels}``).
        time_variable: the solver's independent variable: ``"t"`` (the path's time) or
            ``"log_snr"`` (``s = -lambda(t)``, the ODE ``dx/ds = v / (-lambda'(t))``). On a discrete
            DDPM path ``alpha'`` and ``sigma'`` jump at every integer but ``dx/ds`` does not
            (``d alpha / d lambda`` is smooth for every variance-preserving path), so the adaptive
            solver needs far fewer steps there. ``"auto"``: ``log_snr`` on DDPM, ``t`` elsewhere
            (rectified flow's log-SNR is infinite at ``t = 0``).

    Returns:
        ``(log_prob, stats)``: log_prob (B,) in nats; stats has ``nfe`` (velocity evaluations),
        ``prior_log_prob`` (B,), ``delta_log_p`` (B,) = the divergence integral, ``x_T`` (B, ...).
    """
    try:
        from torchdiffeq import odeint
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("pf_ode_log_likelihood needs torchdiffeq: pip install 'scorelab[likelihood]'") from e
    if trace not in ("exact", "hutchinson"):
        raise ValueError(f"unknown trace {trace!r}: expected 'exact' or 'hutchinson'")
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    if time_variable not in ("auto", "t", "log_snr"):
        raise ValueError(f"time_variable must be 'auto', 't' or 'log_snr', got {time_variable!r}")
    path = denoiser.path
    if time_variable == "auto":
        time_variable = "log_snr" if isinstance(path, DDPMDiscrete) else "t"
    t0 = default_t_start(path) if t_start is None else float(t_start)
    t1 = float(path.t_max) if t_end is None else float(t_end)
    if not (math.isfinite(t0) and math.isfinite(t1)) or t0 >= t1:
        raise ValueError(f"need finite t_start < t_end, got t_start={t0}, t_end={t1}")
    cond = cond or {}
    x = x.detach()
    B = x.shape[0]
    D = x[0].numel()
    z = probes(x.shape, probe, n_probes, generator, x.dtype, x.device) if trace == "hutchinson" else None
    nfe = [0]

    def velocity(t: Tensor, xt: Tensor) -> Tensor:
        if time_variable == "log_snr":  # the solver's t is s = -lambda; dx/ds = v(t(s)) / (-lambda'(t(s)))
            tt = path.t_from_log_snr(-t.to(torch.float64).reshape(1)).to(xt.device)
            c64 = path.coefficients(tt)
            ds_dt = -c64.d_log_snr
            pred = denoiser.predict(xt, tt.expand(xt.shape[0]), **cond)
            c = pred.coefficients
            return (c.d_alpha * pred.x0 + c.d_sigma * pred.eps) / float(ds_dt)
        pred = denoiser.predict(xt, t.to(torch.float64), **cond)
        c = pred.coefficients
        return c.d_alpha * pred.x0 + c.d_sigma * pred.eps

    def rhs(t: Tensor, state):
        xt = state[0]
        nfe[0] += 1
        with torch.enable_grad():
            xt = xt.detach().requires_grad_(True)
            v = velocity(t, xt)  # (B, ...)
            if trace == "exact":
                vf = v.reshape(B, D)
                div = torch.zeros(B, dtype=x.dtype, device=x.device)
                for i in range(D):
                    (g,) = torch.autograd.grad(vf[:, i].sum(), xt, retain_graph=i < D - 1)
                    div = div + g.reshape(B, D)[:, i]
            else:
                div = torch.zeros(B, dtype=x.dtype, device=x.device)
                for j in range(n_probes):
                    (g,) = torch.autograd.grad(v, xt, grad_outputs=z[j], retain_graph=j < n_probes - 1)
                    div = div + (g * z[j]).reshape(B, D).sum(1)
                div = div / n_probes
        return v.detach(), div.detach()

    if time_variable == "log_snr":
        lam = path.log_snr(torch.tensor([t0, t1], dtype=torch.float64))
        if not torch.isfinite(lam).all():
            raise ValueError(f"time_variable='log_snr' needs a finite log-SNR at t_start and t_end, got {lam.tolist()}")
        ts = (-lam).to(x.dtype).to(x.device)
    else:
        ts = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
    state0 = (x, torch.zeros(B, dtype=x.dtype, device=x.device))
    xs, deltas = odeint(rhs, state0, ts, rtol=rtol, atol=atol, method=method, options=options)
    x_T, delta = xs[-1], deltas[-1]
    prior = path.prior_log_prob(x_T).to(x.dtype)
    return prior + delta, {"nfe": nfe[0], "prior_log_prob": prior, "delta_log_p": delta, "x_T": x_T}


# --------------------------------------------------------------------------------------
# Dequantized images (dequantize and bits_per_dim live in scorelab.quantize)
# --------------------------------------------------------------------------------------
def pf_ode_bits_per_dim(denoiser, x_uint8: Tensor, generator: Generator = None, trace: str = "hutchinson",
                        dtype: torch.dtype = torch.float64, **kwargs) -> tuple[Tensor, dict]:
    """Bits/dim of uint8 images ``x_uint8: (B, C, H, W)`` under the probability-flow ODE.

    One uniform dequantization draw (first from ``generator``), then
    :func:`pf_ode_log_likelihood` on ``y`` (probes drawn next from the same generator) and
    :func:`bits_per_dim`. ``kwargs`` go to :func:`pf_ode_log_likelihood`. Returns ``(bpd (B,), stats)``
    with ``stats["log_prob_y"]`` added.
    """
    y = dequantize(x_uint8, generator, dtype)
    log_p, stats = pf_ode_log_likelihood(denoiser, y, trace=trace, generator=generator, **kwargs)
    stats["log_prob_y"] = log_p
    return bits_per_dim(log_p, y[0].numel()), stats


# --------------------------------------------------------------------------------------
# Discrete DDPM ELBO
# --------------------------------------------------------------------------------------
def _log_abar(path: DDPMDiscrete, k: Tensor) -> Tensor:
    """log alphabar at integer step indices ``k`` in ``-1 .. T-1`` (``k = -1``: 0)."""
    return path._logab.to(k.device)[k + 1]


def ddpm_posterior(path: DDPMDiscrete, x0: Tensor, x_t: Tensor, t) -> tuple[Tensor, Tensor]:
    """``q(x_{k-1} | x_k, x_0) = N(mean, var I)`` on a DDPM path with 0-based step ``k = t``.

    With ``beta_k``, ``alpha_k = 1 - beta_k`` and ``abar`` from ``path.alphas_cumprod()``
    (``abar_{-1} = 1``), for ``k in 0 .. T-1`` (seed 002 §2.1 with its 1-based ``t = k + 1``):

        mean = sqrt(abar_{k-1}) beta_k / (1 - abar_k) x_0 + sqrt(alpha_k) (1 - abar_{k-1}) / (1 - abar_k) x_k
        var  = (1 - abar_{k-1}) / (1 - abar_k) beta_k

    ``k = 0`` gives ``mean = x_0, var = 0``. Shapes: x0, x_t (B, ...); t an int or (B,) integers;
    returns mean (B, ...) and var broadcastable against it, in ``x_t.dtype``.
    """
    if not isinstance(path, DDPMDiscrete):
        raise ValueError(f"ddpm_posterior needs a DDPMDiscrete path, got {type(path).__name__}")
    k = torch.as_tensor(t, device=x_t.device)
    if k.is_floating_point():
        if (k != k.round()).any():
            raise ValueError("t must hold integer step indices")
        k = k.round()
    k = k.long()
    if k.ndim == 0:
        k = k.expand(x_t.shape[0])
    if (k < 0).any() or (k > path.T - 1).any():
        raise ValueError(f"t must lie in 0 .. {path.T - 1}")
    la_t, la_s = _log_abar(path, k), _log_abar(path, k - 1)  # float64
    beta = path.betas.to(k.device)[k]
    one_m_t = -torch.expm1(la_t)
    one_m_s = -torch.expm1(la_s)
    c0 = torch.exp(0.5 * la_s) * beta / one_m_t
    ct = torch.sqrt(1 - beta) * one_m_s / one_m_t
    var = one_m_s / one_m_t * beta
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    r = lambda v: v.to(x_t.dtype).reshape(shape)  # noqa: E731
    return r(c0) * x0 + r(ct) * x_t, r(var)


def _gaussian_kl(m1: Tensor, v1: Tensor, m2: Tensor, v2: Tensor) -> Tensor:
    """``KL(N(m1, v1 I) || N(m2, v2 I))`` summed over non-batch dims: (B,)."""
    kl = 0.5 * (torch.log(v2) - torch.log(v1) + v1 / v2 + (m1 - m2) ** 2 / v2 - 1)
    return kl.expand_as(m1).flatten(1).sum(1)


def ddpm_elbo_terms(
    denoiser,
    x: Tensor,
    generator: Generator = None,
    n_t: int | None = 16,
    variance: str = "posterior",
    dtype: torch.dtype = torch.float64,
    cond: dict | None = None,
) -> dict[str, Tensor]:
    """The three terms of the DDPM ELBO (seed 002 §2.1), per example, in bits per dimension.

    Args:
        denoiser: a Denoiser/ExactDenoiser on a :class:`~scorelab.paths.DDPMDiscrete` path;
            ``p_theta(x_{k-1} | x_k) = N(posterior mean with x0_hat(x_k, k), var)``.
        x: (B, ...) uint8 images (model space ``quantize.to_model``, discretized Gaussian
            decoder; the total bounds ``-log2 P(x)`` per dim) or floating data already in model
            space (continuous Gaussian decoder density; the total bounds ``-log2 p(x)`` per dim).
        generator: randomness for the timesteps and the noise ``x_k = alpha_k x_0 + sigma_k eps``.
        n_t: timesteps sampled per example, uniform in the path's ``1 .. T-1`` (seed ``t = 2..T``),
            for the unbiased estimate ``(T-1) * mean_j KL_j`` of the denoising sum; ``None`` sums
            all ``T-1`` terms (one noise draw each).
        variance: reverse variance ``"posterior"`` (``beta_tilde_k``; the decoder at ``k = 0``
            then uses ``beta_tilde_1`` as Ho et al.'s clipped log-variance) or ``"beta"`` (``beta_k``).
        dtype: working precision.
        cond: keyword arguments for the denoiser.

    Returns:
        dict of (B,) tensors in bits/dim: ``prior`` (``KL(q(x_T|x_0) || N(0, I))``, the prior of
        Ho et al., not ``path.prior_std``), ``diffusion`` (the denoising-matching sum),
        ``diffusion_se`` (its standard error over the ``n_t`` draws; only when ``n_t >= 2``),
        ``reconstruction`` (``-log p(x_0 | x_1)``), ``total`` (their sum).
    """
    path = denoiser.path
    if not isinstance(path, DDPMDiscrete):
        raise ValueError(f"ddpm_elbo_terms needs a denoiser on a DDPMDiscrete path, got {type(path).__name__}")
    if variance not in ("posterior", "beta"):
        raise ValueError(f"unknown variance {variance!r}: expected 'posterior' or 'beta'")
    if n_t is not None and n_t < 1:
        raise ValueError(f"n_t must be >= 1 or None, got {n_t}")
    if path.T < 2:
        raise ValueError("the DDPM ELBO needs T >= 2")
    cond = cond or {}
    discrete = x.dtype == torch.uint8
    x0 = to_model(x, dtype) if discrete else x.to(dtype)
    B, D, T = x0.shape[0], x0[0].numel(), path.T
    dev = x0.device
    to_bpd = lambda nats: nats_to_bits_per_dim(nats, D)  # noqa: E731
    betas = path.betas.to(device=dev, dtype=dtype)

    def reverse_kl(k: Tensor, x0_: Tensor, eps: Tensor) -> Tensor:
        """KL(q(x_{k-1}|x_k,x_0) || p_theta(x_{k-1}|x_k)) at x_k = alpha_k x_0 + sigma_k eps: (n,)."""
        xk = path.sample_xt(x0_, k.to(dtype), eps).to(dtype)
        mq, vq = ddpm_posterior(path, x0_, xk, k)
        pred = denoiser.predict(xk, k.to(torch.float64), **{n: _rep(v, x0_.shape[0]) for n, v in cond.items()})
        mp, _ = ddpm_posterior(path, pred.x0.to(dtype), xk, k)
        vp = vq if variance == "posterior" else betas[k].reshape(vq.shape)
        return _gaussian_kl(mq, vq, mp, vp)

    # prior matching: KL(N(sqrt(abar) x0, (1 - abar) I) || N(0, I)) = 0.5 sum(abar x0^2 - abar - log(1 - abar))
    ab_T = path._logab[-1].exp().to(dtype)
    prior = 0.5 * (ab_T * x0.pow(2) - ab_T - torch.log1p(-ab_T)).flatten(1).sum(1)

    out: dict[str, Tensor] = {"prior": to_bpd(prior)}
    if n_t is None:
        diff = torch.zeros(B, dtype=dtype, device=dev)
        eps_all = randn((B, T - 1) + tuple(x0.shape[1:]), generator=generator, dtype=dtype, device=dev)
        for k in range(1, T):
            kk = torch.full((B,), k, dtype=torch.long, device=dev)
            diff = diff + reverse_kl(kk, x0, eps_all[:, k - 1])
        out["diffusion"] = to_bpd(diff)
    else:
        u = rand((B, n_t), generator=generator, dtype=torch.float64, device=dev)
        ks = (1 + (u * (T - 1)).floor().long()).clamp(1, T - 1)  # (B, n_t) uniform in 1..T-1
        eps = randn((B, n_t) + tuple(x0.shape[1:]), generator=generator, dtype=dtype, device=dev)
        x0r = x0.unsqueeze(1).expand(B, n_t, *x0.shape[1:]).reshape(B * n_t, *x0.shape[1:])
        kl = reverse_kl(ks.reshape(-1), x0r, eps.reshape(B * n_t, *x0.shape[1:])).reshape(B, n_t)
        out["diffusion"] = to_bpd((T - 1) * kl.mean(1))
        if n_t >= 2:
            out["diffusion_se"] = to_bpd((T - 1) * kl.std(1) / math.sqrt(n_t))

    # reconstruction: -log p(x_0 | x_1) read at the path's k = 0; decoder mean = x0_hat
    k0 = torch.zeros(B, dtype=torch.long, device=dev)
    eps0 = randn(tuple(x0.shape), generator=generator, dtype=dtype, device=dev)
    x1 = path.sample_xt(x0, k0.to(dtype), eps0).to(dtype)
    pred = denoiser.predict(x1, k0.to(torch.float64), **cond)
    mean = pred.x0.to(dtype)
    if variance == "beta":
        var0 = betas[0]
    else:  # beta_tilde_1 (beta_tilde_0 = 0 would be a point mass)
        var0 = (-torch.expm1(path._logab[1])) / (-torch.expm1(path._logab[2])) * path.betas[1]
        var0 = var0.to(dtype)
    if discrete:
        rec = -discretized_gaussian_log_prob(x, mean, var0.sqrt()).flatten(1).sum(1)
    else:
        rec = 0.5 * (((x0 - mean) ** 2) / var0 + torch.log(2 * math.pi * var0 * torch.ones_like(mean))).flatten(1).sum(1)
    out["reconstruction"] = to_bpd(rec)
    out["total"] = out["prior"] + out["diffusion"] + out["reconstruction"]
    return out


def _rep(v, n: int):
    """Repeat a per-example conditioning tensor (B, ...) to ``n`` rows (B * n_t), else leave it."""
    if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] != n and n % v.shape[0] == 0:
        return v.repeat_interleave(n // v.shape[0], 0)
    return v
