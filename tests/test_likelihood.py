"""Likelihoods: probability-flow ODE, dequantized bits/dim and the discrete DDPM ELBO.

Ground truth comes from Gaussian mixtures (exact denoisers, exact densities) and from closed
forms for one Gaussian. Tolerances: ODE solves to rtol = atol = 1e-5 are compared at 1e-3;
Monte Carlo quantities at 4 standard errors (plus the stated accuracy requirement).
"""

import math

import pytest
import torch

from scorelab.data.mixture import GaussianMixture, eight_gaussians_mixture, random_mixture
from scorelab.likelihood import (
    bits_per_dim,
    ddpm_elbo_terms,
    ddpm_posterior,
    default_t_start,
    dequantize,
    pf_ode_bits_per_dim,
    pf_ode_log_likelihood,
)
from scorelab.paths import EDM, DDPMDiscrete, RectifiedFlow, VPLinear
from scorelab.quantize import discretized_gaussian_log_prob, to_uint8


def discretized_gaussian_log_likelihood(x, mean, log_std):
    """The decoder of scorelab.quantize seen from model-space ``x`` on the grid, summed over dims: (B,)."""
    return discretized_gaussian_log_prob(to_uint8(x), mean, log_std.exp()).flatten(1).sum(1)

pytest.importorskip("torchdiffeq")

F = torch.float64
REL = 0.005  # required accuracy: 0.5% of a nat per dimension, |log p_ode - log p| <= REL * D


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------
# Probability-flow ODE
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [RectifiedFlow(), VPLinear(t_min=1e-5), EDM(sigma_min=1e-3)], ids=["rf", "vp", "edm"])
def test_pf_ode_exact_trace_eight_gaussians(path):
    mix = eight_gaussians_mixture()
    x = mix.sample(6, _gen(0))
    lp, stats = pf_ode_log_likelihood(mix.denoiser(path), x, trace="exact")
    assert lp.shape == (6,) and lp.dtype == F and stats["nfe"] > 0
    # the ODE gives the density of p_{t_start}; that of the data differs by sigma(t_start) ~ 1e-3
    c = path.coefficients(torch.tensor(default_t_start(path), dtype=F))
    torch.testing.assert_close(lp, mix.marginal_log_prob(x, c.alpha, c.sigma), atol=1e-3, rtol=0)
    assert (lp - mix.log_prob(x)).abs().max() <= REL * 2


def test_pf_ode_on_ddpm_path_in_log_snr():
    """On the discrete DDPM path the velocity in t jumps at every integer; in s = -lambda it is
    smooth. Both variables give log p_{t_min} of the exact model; log-SNR with far fewer evaluations."""
    mix = eight_gaussians_mixture()
    path = DDPMDiscrete(T=100, beta_end=0.2)  # alphabar_T ~ 5e-5: the N(0, I) prior is exact enough
    x = mix.sample(4, _gen(5))
    c = path.coefficients(torch.tensor(path.t_min, dtype=F))
    truth = mix.marginal_log_prob(x, c.alpha, c.sigma)
    lp_s, st_s = pf_ode_log_likelihood(mix.denoiser(path), x, trace="exact", time_variable="log_snr")
    lp_t, st_t = pf_ode_log_likelihood(mix.denoiser(path), x, trace="exact", time_variable="t")
    # measured: log-SNR 3e-4 nats in ~120 evaluations, t 5e-3 in ~760
    torch.testing.assert_close(lp_s, truth, atol=1e-3, rtol=0)
    torch.testing.assert_close(lp_t, truth, atol=2e-2, rtol=0)
    assert st_s["nfe"] * 3 < st_t["nfe"], (st_s["nfe"], st_t["nfe"])


def test_pf_ode_exact_trace_random_mixture_16d():
    mix = random_mixture(16, 4, seed=1)
    x = mix.sample(4, _gen(1))
    lp, _ = pf_ode_log_likelihood(mix.denoiser(RectifiedFlow()), x, trace="exact")
    # rectified flow: t_start = t_clean and the prior N(0, I) is exactly p_1, so log p is exact
    assert (lp - mix.log_prob(x)).abs().max() <= 1e-2 <= REL * 16


def test_pf_ode_batch_independent():
    """An example's log-likelihood does not depend on the rest of the batch."""
    mix = eight_gaussians_mixture()
    x = mix.sample(4, _gen(2))
    den = mix.denoiser(RectifiedFlow())
    lp_all, _ = pf_ode_log_likelihood(den, x, rtol=1e-7, atol=1e-7)
    lp_one, _ = pf_ode_log_likelihood(den, x[:1], rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(lp_all[:1], lp_one, atol=1e-5, rtol=0)


def test_pf_ode_hutchinson_random_mixture_16d():
    """Hutchinson estimates (Rademacher probes, fixed over each solve) are unbiased per point, and
    their average over all draws meets the 0.5%-per-dim requirement: |mean error| <= REL * D, with a
    standard error small enough (4 s.e. <= REL * D) that this is a real check."""
    mix = random_mixture(16, 4, seed=1, full_cov=False)
    P, R, D = 4, 512, 16
    x = mix.sample(P, _gen(3))
    lp, _ = pf_ode_log_likelihood(mix.denoiser(VPLinear(t_min=1e-5)), x.repeat(R, 1), trace="hutchinson",
                                  n_probes=4, generator=_gen(4))
    err = lp.reshape(R, P) - mix.log_prob(x)  # (R, P)
    se = err.std(0) / math.sqrt(R)
    assert (err.mean(0).abs() <= 4 * se + 1e-3).all(), (err.mean(0), se)
    pooled_se = se.pow(2).sum().sqrt() / P
    assert err.mean().abs() <= REL * D and 4 * pooled_se <= 1.2 * REL * D, (err.mean(), pooled_se)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_pf_ode_hutchinson_eight_gaussians(probe):
    mix = eight_gaussians_mixture()
    P, R = 3, 200
    x = mix.sample(P, _gen(5))
    path = RectifiedFlow()
    lp, _ = pf_ode_log_likelihood(mix.denoiser(path), x.repeat(R, 1), trace="hutchinson", probe=probe,
                                  generator=_gen(6))
    lp = lp.reshape(R, P)
    err = lp.mean(0) - mix.log_prob(x)
    se = lp.std(0) / math.sqrt(R)
    assert (err.abs() <= 4 * se + 1e-3).all(), (err, se)
    assert se.max() > 0  # the estimator is random: the check above is not vacuous


def test_pf_ode_gaussian_closed_form_solution():
    """One Gaussian N(m, diag(l)): the PF-ODE maps x to alpha m + sqrt(v_T / v_0) (x - alpha_0 m),
    ``v_t = alpha_t^2 l + sigma_t^2``, and the divergence integral is ``sum 0.5 log(v_T / v_0)``."""
    m = torch.tensor([[0.5, -1.0, 0.2]], dtype=F)
    std = torch.tensor([[0.3, 1.0, 2.0]], dtype=F)
    mix = GaussianMixture([1.0], m, std)
    path = VPLinear(t_min=1e-3)
    x = mix.sample(5, _gen(7))
    lp, st = pf_ode_log_likelihood(mix.denoiser(path), x, rtol=1e-8, atol=1e-8)
    c0 = path.coefficients(torch.tensor(path.t_min, dtype=F))
    c1 = path.coefficients(torch.tensor(path.t_max, dtype=F))
    l = std**2
    v0, v1 = c0.alpha**2 * l + c0.sigma**2, c1.alpha**2 * l + c1.sigma**2
    x_T = c1.alpha * m + (v1 / v0).sqrt() * (x - c0.alpha * m)
    torch.testing.assert_close(st["x_T"], x_T, atol=1e-6, rtol=0)
    torch.testing.assert_close(st["delta_log_p"], (0.5 * torch.log(v1 / v0)).sum(1).expand(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(lp, path.prior_log_prob(x_T) + st["delta_log_p"], atol=1e-5, rtol=0)


def test_pf_ode_rejects_bad_arguments():
    den = eight_gaussians_mixture().denoiser(RectifiedFlow())
    x = torch.zeros(2, 2, dtype=F)
    with pytest.raises(ValueError, match="trace"):
        pf_ode_log_likelihood(den, x, trace="skilling")
    with pytest.raises(ValueError, match="t_start"):
        pf_ode_log_likelihood(den, x, t_start=1.0, t_end=0.5)
    with pytest.raises(ValueError, match="probe"):
        pf_ode_log_likelihood(den, x, trace="hutchinson", probe="sobol")


# --------------------------------------------------------------------------------------
# Dequantization and bits per dimension
# --------------------------------------------------------------------------------------
def test_bits_per_dim_uniform_model_is_8():
    D = 12
    assert bits_per_dim(torch.tensor([-D * math.log(2.0)], dtype=F), D).item() == pytest.approx(8.0, abs=1e-12)


def test_dequantize_range():
    k = torch.tensor([[0, 255, 128]], dtype=torch.uint8).repeat(1000, 1)
    y = dequantize(k, _gen(8))
    lo = 2 * k.to(F) / 256 - 1
    assert ((y >= lo) & (y < lo + 2 / 256)).all()
    with pytest.raises(ValueError, match="uint8"):
        dequantize(k.to(F))


def test_pf_ode_bits_per_dim_gaussian_by_hand():
    """Exact Gaussian model on (1, 2, 2) images: ODE bpd = the hand-computed dequantized bpd,
    and its average over u bounds (and nearly equals) the exact discrete bpd."""
    mean, std = 0.1, 0.4
    D = 4
    mix = GaussianMixture([1.0], torch.full((1, D), mean, dtype=F), [std])
    k = torch.tensor([[[[3, 100], [128, 250]]], [[[140, 120], [90, 160]]]], dtype=torch.uint8)
    bpd, st = pf_ode_bits_per_dim(mix.denoiser(RectifiedFlow()), k, _gen(9), trace="exact", rtol=1e-8, atol=1e-8)
    y = dequantize(k, _gen(9))  # the same first draw
    log_py = (-0.5 * ((y - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    by_hand = -(log_py + D * math.log(2 / 256)) / (D * math.log(2))
    torch.testing.assert_close(bpd, by_hand, atol=1e-6, rtol=0)
    # E_u[bpd] >= -log2 P(k) / D, P(k) = prod of Gaussian mass over [2k/256 - 1, 2(k+1)/256 - 1)
    n = 4000
    yy = dequantize(k.repeat(n, 1, 1, 1), _gen(10))
    lpy = (-0.5 * ((yy - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    b = bits_per_dim(lpy, D).reshape(n, 2)
    Phi = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # noqa: E731
    lo, hi = 2 * k.to(F) / 256 - 1, 2 * (k.to(F) + 1) / 256 - 1
    exact = -torch.log(Phi((hi - mean) / std) - Phi((lo - mean) / std)).flatten(1).sum(1) / (D * math.log(2))
    se = b.std(0) / math.sqrt(n)
    assert (b.mean(0) >= exact - 4 * se).all()
    assert (b.mean(0) - exact).abs().max() < 1e-3  # Jensen gap of a smooth density over tiny bins


# --------------------------------------------------------------------------------------
# DDPM: posterior, ELBO
# --------------------------------------------------------------------------------------
def test_ddpm_posterior_matches_joint_gaussian_and_regression():
    path = DDPMDiscrete(T=100, beta_end=0.1)
    ab = torch.cat([torch.ones(1, dtype=F), path.alphas_cumprod()])  # abar at k = -1 .. T-1
    for k in (0, 1, 37, 99):
        x0 = torch.tensor([[0.7]], dtype=F)
        xk = torch.tensor([[-0.3]], dtype=F)
        mean, var = ddpm_posterior(path, x0, xk, k)
        # independently: (x_{k-1}, x_k) | x0 is Gaussian with x_k = sqrt(1 - beta_k) x_{k-1} + sqrt(beta_k) e
        a_s, a_t, beta = ab[k], ab[k + 1], path.betas[k]
        var_s, var_t = 1 - a_s, 1 - a_t
        cov = torch.sqrt(1 - beta) * var_s
        m_cond = a_s.sqrt() * x0 + cov / var_t * (xk - a_t.sqrt() * x0)
        v_cond = var_s - cov**2 / var_t
        torch.testing.assert_close(mean, m_cond, atol=1e-12, rtol=0)
        torch.testing.assert_close(var.reshape(()), v_cond, atol=1e-12, rtol=0)
    # empirically: sample x_{k-1} then x_k, regress x_{k-1} on x_k at fixed x0
    k, n, x0 = 20, 200_000, 0.7
    g = _gen(11)
    xs = ab[k].sqrt() * x0 + (1 - ab[k]).sqrt() * torch.randn(n, generator=g, dtype=F)
    xt = (1 - path.betas[k]).sqrt() * xs + path.betas[k].sqrt() * torch.randn(n, generator=g, dtype=F)
    slope = ((xt - xt.mean()) * (xs - xs.mean())).mean() / xt.var()
    resid = xs - xs.mean() - slope * (xt - xt.mean())
    # closed form: mean = c0 x0 + ct x_t  =>  slope ct, intercept c0 x0; residual variance = var
    m0, var = ddpm_posterior(path, torch.full((1, 1), x0, dtype=F), torch.zeros(1, 1, dtype=F), k)
    m1, _ = ddpm_posterior(path, torch.full((1, 1), x0, dtype=F), torch.ones(1, 1, dtype=F), k)
    ct = (m1 - m0).item()
    se_slope = (resid.var() / (n * xt.var())).sqrt()
    assert abs(slope - ct) < 4 * se_slope
    se_icpt = (resid.var() * (1 / n + xt.mean() ** 2 / (n * xt.var()))).sqrt()
    assert abs((xs.mean() - slope * xt.mean()) - m0.item()) < 4 * se_icpt
    assert abs(resid.var() / var.item() - 1) < 4 * math.sqrt(2 / n)
    with pytest.raises(ValueError, match="t must"):
        ddpm_posterior(path, x0 * torch.ones(1, 1), torch.zeros(1, 1), 100)


def _expected_terms(mix_mean, s, path, x0, variance):
    """Closed-form E_eps of each ELBO term (nats, summed over dims) for data N(m, s^2 I) and
    the exact denoiser x0_hat = m + alpha s^2 / v (x_k - alpha m), v = alpha^2 s^2 + sigma^2."""
    T = path.T
    ab = torch.cat([torch.ones(1, dtype=F), path.alphas_cumprod()])
    D = x0.shape[1]
    d = x0 - mix_mean  # (B, D)

    def mse(k):  # E_eps |x0 - x0_hat|^2 per example at step k
        a, sg2 = ab[k + 1].sqrt(), 1 - ab[k + 1]
        g = a * s**2 / (a**2 * s**2 + sg2)
        return ((1 - g * a) ** 2 * d**2).sum(1) + D * g**2 * sg2

    diff = torch.zeros(x0.shape[0], dtype=F)
    for k in range(1, T):
        beta = path.betas[k]
        c0 = ab[k].sqrt() * beta / (1 - ab[k + 1])
        vq = (1 - ab[k]) / (1 - ab[k + 1]) * beta
        vp = vq if variance == "posterior" else beta
        diff += 0.5 * (D * (torch.log(vp / vq) + vq / vp - 1) + c0**2 * mse(k) / vp)
    var0 = path.betas[0] if variance == "beta" else (1 - ab[1]) / (1 - ab[2]) * path.betas[1]
    rec = 0.5 * (mse(0) / var0 + D * torch.log(2 * math.pi * var0))
    aT = ab[-1]
    prior = 0.5 * (aT * x0.pow(2) - aT - torch.log1p(-aT)).sum(1)
    return {"prior": prior, "diffusion": diff, "reconstruction": rec}


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ddpm_elbo_terms_match_closed_form(variance):
    m, s, D = torch.tensor([0.1, -0.2], dtype=F), 0.3, 2
    mix = GaussianMixture([1.0], m[None], [s])
    path = DDPMDiscrete(T=60, beta_end=0.3)
    P, R = 3, 400
    x0 = mix.sample(P, _gen(12))
    want = _expected_terms(m, s, path, x0, variance)
    got = ddpm_elbo_terms(mix.denoiser(path), x0.repeat(R, 1), _gen(13), n_t=None, variance=variance)
    got_s = ddpm_elbo_terms(mix.denoiser(path), x0.repeat(R, 1), _gen(14), n_t=8, variance=variance)
    to_bits = D * math.log(2)
    torch.testing.assert_close(got["prior"][:P], want["prior"] / to_bits, atol=1e-12, rtol=0)
    for name, out in (("diffusion", got), ("reconstruction", got), ("diffusion", got_s)):
        v = out[name].reshape(R, P)
        se = v.std(0) / math.sqrt(R)
        err = v.mean(0) - want[name] / to_bits
        assert (err.abs() <= 4 * se).all(), (name, err, se)
    # the reported standard error is that of the timestep-sampling estimate: compare with the spread
    spread = got_s["diffusion"].reshape(R, P).std(0)
    ratio = got_s["diffusion_se"].reshape(R, P).pow(2).mean(0).sqrt() / spread
    assert ((ratio > 0.5) & (ratio < 2.0)).all()
    torch.testing.assert_close(got["total"], got["prior"] + got["diffusion"] + got["reconstruction"])


def test_ddpm_elbo_bounds_true_nll_and_prior_vanishes():
    """For the exact model of Gaussian data the negative ELBO bounds -log p(x_0) on average;
    the prior term is ~alphabar_T, so it vanishes for a schedule whose alphabar_T -> 0."""
    m, s, D = torch.tensor([0.1, -0.2], dtype=F), 0.3, 2
    mix = GaussianMixture([1.0], m[None], [s])
    x0 = mix.sample(2000, _gen(15))
    nll = -mix.log_prob(x0) / (D * math.log(2))
    priors = {}
    for beta_end in (0.3, 0.02):
        path = DDPMDiscrete(T=60, beta_end=beta_end)
        for variance in ("posterior", "beta"):
            out = ddpm_elbo_terms(mix.denoiser(path), x0, _gen(16), n_t=None, variance=variance)
            gap = out["total"] - nll
            assert gap.mean() >= -4 * gap.std() / math.sqrt(len(gap)), (beta_end, variance, gap.mean())
        priors[beta_end] = out["prior"].mean().item()
        ab_T = path.alphas_cumprod()[-1].item()
        assert priors[beta_end] <= ab_T * (1 + (x0**2).mean().item()) / math.log(2)
    assert priors[0.3] < 1e-5 < 0.05 < priors[0.02]


def test_ddpm_elbo_uint8_discretized_decoder():
    """uint8 input: discretized decoder probabilities; the total bounds the discrete entropy of
    the quantized Gaussian on average, and every term is finite."""
    m, s = 0.05, 0.5
    mix = GaussianMixture([1.0], torch.full((1, 4), m, dtype=F), [s])
    path = DDPMDiscrete(T=60, beta_end=0.3)
    g = _gen(17)
    k = ((mix.sample(1000, g) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).reshape(1000, 1, 2, 2)
    out = ddpm_elbo_terms(mix.denoiser(path), k, g, n_t=4, variance="beta")
    assert all(torch.isfinite(v).all() for v in out.values())
    assert (out["reconstruction"] >= 0).all()  # -log of a probability
    # the quantized data's entropy per dim: P(k) = Gaussian mass over bin k, edge bins open
    grid = torch.arange(256, dtype=F) / 127.5 - 1
    lp = discretized_gaussian_log_likelihood(grid[:, None], torch.full((256, 1), m, dtype=F),
                                             torch.full((256, 1), math.log(s), dtype=F))
    H = -(lp.exp() * lp).sum() / math.log(2)
    gap = out["total"] - H
    assert gap.mean() >= -4 * gap.std() / math.sqrt(len(gap))


def test_discretized_gaussian_sums_to_one():
    grid = torch.arange(256, dtype=F) / 127.5 - 1
    for mean, std in ((0.0, 0.3), (0.99, 0.01), (-1.5, 0.2), (0.3, 1e-3)):
        lp = discretized_gaussian_log_likelihood(grid[:, None], torch.full((256, 1), mean, dtype=F),
                                                 torch.full((256, 1), math.log(std), dtype=F))
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_ddpm_elbo_rejects_other_paths():
    den = eight_gaussians_mixture().denoiser(VPLinear())
    with pytest.raises(ValueError, match="DDPMDiscrete"):
        ddpm_elbo_terms(den, torch.zeros(2, 2, dtype=F))
