"""VDM: learned log-SNR schedule, its path, the continuous-time ELBO and the VDM family.

Analytic references (seed 002 §2.2-2.3, Kingma et al. 2021):

* for data ``N(0, s^2 I_D)`` and the exact ``x0_hat = E[x | z_t]``, ``E|x - x0_hat|^2 =
  D s^2 / (1 + s^2 SNR)``, so ``L_inf = 1/2 int -SNR' D s^2/(1 + s^2 SNR) dt =
  D/2 log((1 + s^2 SNR_max) / (1 + s^2 SNR_min))`` whatever the schedule between its end points;
* Tweedie: ``E[x_0 | x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha``.

Monte Carlo tolerances are 4-5 standard errors of the estimate they check.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scorelab.data.mixture import GaussianMixture, random_mixture
from scorelab.paths import VE, RectifiedFlow, VPLinear
from scorelab.random import generators_for_seeds
from scorelab.targets import Denoiser
from scorelab.quantize import discretized_gaussian_log_prob
from scorelab.vdm import LearnedLogSNR, LearnedVPPath, continuous_elbo_terms

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _schedule(gamma_min=-13.3, gamma_max=5.0, hidden=64, seed=None, scale=1.0) -> LearnedLogSNR:
    """A float64 schedule; with ``seed`` its shape parameters are re-drawn (scale: how wild)."""
    s = LearnedLogSNR(gamma_min, gamma_max, hidden).double()
    if seed is not None:
        g = _gen(seed)
        with torch.no_grad():
            for p in (s.w1_raw, s.b1, s.w2_raw, s.b2, s.w3_raw):
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=F64))
    return s


class _TinyNet(nn.Module):
    """``net(x, t)`` for 2-D points: an MLP on (x, t)."""

    def __init__(self, dim=2, width=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.f = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x, t):
        return self.f(torch.cat([x, t[:, None].to(x.dtype)], 1))


# --------------------------------------------------------------------------------------
# Schedule and path
# --------------------------------------------------------------------------------------
def test_schedule_stays_monotone_through_training_from_a_bad_init():
    torch.manual_seed(0)
    sched = _schedule(2.0, 2.5, hidden=32, seed=1, scale=3.0)  # nearly flat range, wild shape
    net = _TinyNet(width=16).double()
    den = Denoiser(net, LearnedVPPath(sched), "eps")
    data = GaussianMixture([1.0, 1.0], [[-1.0, 0.0], [1.0, 0.5]], [0.3, 0.2])
    opt = torch.optim.Adam([*net.parameters(), *sched.parameters()], lr=3e-2)
    g = _gen(0)
    t = torch.linspace(0, 1, 4001, dtype=F64)
    for step in range(200):
        x = data.sample(32, g)
        loss = continuous_elbo_terms(den, x, g, low_discrepancy=True, target="eps")["total"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 49:
            with torch.no_grad():
                gam, dgam = sched.gamma_and_derivative(t)
                assert (gam.diff() > 0).all() and (dgam > 0).all()
                assert sched.gamma_1 > sched.gamma_0
                torch.testing.assert_close(gam[[0, -1]], torch.stack([sched.gamma_0, sched.gamma_1]))
    assert float(sched.gamma_0.detach()) < 1.0  # training moved the end point toward high SNR


def test_learned_path_coefficients_derivatives_and_inverse():
    sched = _schedule(-10.0, 6.0, seed=3)
    path = LearnedVPPath(sched)
    t = torch.linspace(0.01, 0.99, 37, dtype=F64)
    with torch.no_grad():
        c = path.coefficients(t)
        torch.testing.assert_close(c.alpha**2 + c.sigma**2, torch.ones_like(t), rtol=0, atol=1e-12)
        h = 1e-6
        cp, cm = path.coefficients(t + h), path.coefficients(t - h)
        torch.testing.assert_close(c.d_alpha, (cp.alpha - cm.alpha) / (2 * h), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(c.d_sigma, (cp.sigma - cm.sigma) / (2 * h), rtol=1e-6, atol=1e-7)
        gam, dgam = sched.gamma_and_derivative(t)
        torch.testing.assert_close(dgam, (sched(t + h) - sched(t - h)) / (2 * h), rtol=1e-6, atol=1e-6)
        lam = path.log_snr(t)
        torch.testing.assert_close(lam, -gam)
        torch.testing.assert_close(lam, 2 * torch.log(c.alpha / c.sigma), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(path.t_from_log_snr(lam), t, rtol=0, atol=1e-9)
        clean = path.coefficients(torch.tensor([path.t_clean], dtype=F64))
        assert float(clean.sigma) == 0 and float(clean.alpha) == 1
    # coefficients carry gradients to every schedule parameter
    c = path.coefficients(t)
    (c.alpha.sum() + c.d_sigma.sum()).backward()
    for name, p in sched.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_learned_path_works_with_every_sampler():
    from scorelab.samplers import SAMPLERS, sample

    data = GaussianMixture([1.0], [[0.5, -0.5]], [0.4])
    den = data.denoiser(LearnedVPPath(_schedule(-8.0, 5.0, seed=2)))
    opts = {"annealed_langevin": {"n_steps_each": 5}}
    with torch.no_grad():
        for name in SAMPLERS:
            for grid in ("uniform", "logsnr"):
                x = sample(den, (256, 2), 8, sampler=name, grid=grid, generator=_gen(0), dtype=F64, **opts.get(name, {}))
                assert torch.isfinite(x).all(), (name, grid)
        # an accurate solver reproduces the data's moments
        x = sample(den, (4000, 2), 30, sampler="dpmpp_2m", grid="logsnr", generator=_gen(1), dtype=F64)
    se = 0.4 / math.sqrt(4000)
    assert (x.mean(0) - data.means[0]).abs().max() < 5 * se + 0.01


# --------------------------------------------------------------------------------------
# The continuous-time ELBO
# --------------------------------------------------------------------------------------
def _analytic_diffusion(path, s: float, D: int, t_min: float, t_max: float) -> float:
    lam = path.log_snr(torch.tensor([t_min, t_max], dtype=F64)).detach()
    snr_max, snr_min = lam.exp().tolist()
    return 0.5 * D * math.log((1 + s**2 * snr_max) / (1 + s**2 * snr_min))


def test_diffusion_loss_depends_only_on_the_end_points_and_is_analytic():
    s, D, n = 0.7, 2, 20000
    data = GaussianMixture([1.0], [[0.0, 0.0]], [s])
    x = data.sample(n, _gen(0))
    # (path, t_min, t_max): two learned shapes with equal end points, then fixed paths of every kind
    paths = [(LearnedVPPath(_schedule(-8.0, 4.0, seed=11)), 0.0, 1.0),
             (LearnedVPPath(_schedule(-8.0, 4.0, seed=12, scale=2.0)), 0.0, 1.0),
             (VPLinear(), 1e-3, 1.0), (RectifiedFlow(), 0.01, 0.99), (VE(), 0.0, 1.0)]
    means, ses = [], []
    with torch.no_grad():
        for i, (path, lo, hi) in enumerate(paths):
            d = continuous_elbo_terms(data.denoiser(path), x, _gen(10 + i), t_min=lo, t_max=hi)["diffusion"]
            m, se = float(d.mean()), float(d.std()) / math.sqrt(n)
            ref = _analytic_diffusion(path, s, D, lo, hi)
            assert abs(m - ref) < 4 * se, (path, m, ref, se)
            assert se < 0.05 * ref  # the check has teeth
            means.append(m)
            ses.append(se)
    # the two learned shapes have equal end points, hence equal expected loss
    assert abs(means[0] - means[1]) < 4 * math.hypot(ses[0], ses[1])
    # ... but not equal per-example values: the shape changes the estimator, not its mean
    assert ses[0] != ses[1]


def test_log_snr_time_sampling_is_the_same_integral_with_less_variance():
    """lambda-uniform times estimate the same diffusion term; on rectified flow near t = 0, where
    -SNR'(t) ~ 2 / t^3, their standard error is several times smaller than that of t-uniform times."""
    s, D, n = 0.7, 2, 20000
    data = GaussianMixture([1.0], [[0.0, 0.0]], [s])
    x = data.sample(n, _gen(0))
    path, lo, hi = RectifiedFlow(), 1e-3, 1 - 1e-3
    ref = _analytic_diffusion(path, s, D, lo, hi)
    with torch.no_grad():
        res = {ts: continuous_elbo_terms(data.denoiser(path), x, _gen(5), t_min=lo, t_max=hi, time_sampling=ts)["diffusion"]
               for ts in ("t", "log_snr")}
    se = {k: float(v.std()) / math.sqrt(n) for k, v in res.items()}
    assert abs(float(res["log_snr"].mean()) - ref) < 4 * se["log_snr"] and se["log_snr"] < 0.02 * ref
    assert se["log_snr"] * 3 < se["t"], se  # measured 0.16 vs 0.70 (variance 19x lower)
    with pytest.raises(ValueError, match="time_sampling"):
        continuous_elbo_terms(data.denoiser(path), x[:2], _gen(0), t_min=lo, time_sampling="sigma")


@pytest.mark.parametrize("kind", ["eps", "x0", "v", "velocity"])
def test_x0_eps_score_forms_agree(kind):
    path = LearnedVPPath(_schedule(-9.0, 5.0, seed=5))
    den = Denoiser(_TinyNet(seed=1).double(), path, kind)  # an imperfect network of any kind
    x = random_mixture(2, 3, seed=0).sample(64, _gen(0))
    with torch.no_grad():
        vals = {p: continuous_elbo_terms(den, x, generators_for_seeds(range(64)), n_t=3, target=p)
                for p in ("x0", "eps", "score")}
    for p in ("eps", "score"):
        for key in ("diffusion", "total"):
            torch.testing.assert_close(vals[p][key], vals["x0"][key], rtol=1e-8, atol=1e-10)


def test_negative_elbo_bounds_the_true_nll():
    mix = random_mixture(2, 3, seed=1)
    n = 4000
    x = mix.sample(n, _gen(0))
    path = LearnedVPPath(_schedule(seed=4))  # VDM's end points -13.3 .. 5
    with torch.no_grad():
        terms = continuous_elbo_terms(mix.denoiser(path), x, _gen(1), n_t=8)
        gap = terms["total"] - (-mix.log_prob(x))  # -ELBO(x) - (-log p(x)) >= 0 on average
    m, se = float(gap.mean()), float(gap.std()) / math.sqrt(n)
    assert terms["units"] == "nats"
    assert m > -4 * se, (m, se)
    assert m < 0.05 + 4 * se  # and tight with the exact denoiser and a wide SNR range


def test_discretized_decoder_and_bits_per_dim():
    k = torch.arange(256)
    for mean, std in [(0.3, 0.01), (-1.2, 1e-4), (5.0, 1e-3), (0.0, 3.0), (0.999, 1e-6)]:
        p = discretized_gaussian_log_prob(k, torch.tensor(mean), torch.tensor(std)).exp()
        torch.testing.assert_close(p.sum(), torch.tensor(1.0, dtype=F64), rtol=0, atol=1e-10)
    # uint8 pixels uniform on four values: the exact denoiser of (nearly) point masses at those
    # values gives -ELBO close to -log2 P(k) = 2 bits/dim
    g = _gen(0)
    k = torch.randint(100, 104, (512, 1), generator=g, dtype=torch.uint8)
    values = 2 * torch.arange(100, 104, dtype=F64) / 255 - 1
    mix = GaussianMixture(torch.ones(4), values[:, None], torch.full((4,), 1e-4))
    with torch.no_grad():
        terms = continuous_elbo_terms(mix.denoiser(LearnedVPPath(_schedule(seed=0))), k, g)
    assert terms["units"] == "bits/dim"
    m, se = float(terms["total"].mean()), float(terms["stderr"])
    assert m > 2.0 - 4 * se and abs(m - 2.0) < 4 * se + 0.02, (m, se)


# --------------------------------------------------------------------------------------
# Tweedie
# --------------------------------------------------------------------------------------
def test_tweedie_posterior_mean_exact_and_monte_carlo():
    mix = random_mixture(2, 3, seed=2)
    path = LearnedVPPath(_schedule(seed=6))
    t = torch.full((5,), 0.55, dtype=F64)
    with torch.no_grad():
        c = path.coefficients(t)
    a, s = c.alpha[:, None], c.sigma[:, None]
    xt = a * mix.sample(5, _gen(0)) + s * torch.randn(5, 2, generator=_gen(1), dtype=F64)
    x0_mean, _, _ = mix.posterior(xt, c.alpha, c.sigma)
    tweedie = (xt + s**2 * mix.marginal_score(xt, c.alpha, c.sigma)) / a
    torch.testing.assert_close(tweedie, x0_mean, rtol=1e-10, atol=1e-10)
    # self-normalised importance sampling of E[x0 | x_t] from prior draws
    N = 200_000
    x0 = mix.sample(N, _gen(2))  # (N, 2)
    for i in range(5):
        logw = -0.5 * ((xt[i] - a[i] * x0) ** 2).sum(1) / s[i] ** 2
        w = torch.softmax(logw, 0)
        est = (w[:, None] * x0).sum(0)
        se = torch.sqrt((w[:, None] ** 2 * (x0 - est) ** 2).sum(0))
        assert ((est - x0_mean[i]).abs() < 5 * se + 1e-6).all(), (i, est, x0_mean[i], se)


# --------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------
def test_vdm_family_step_variance_gradient_sample_and_nll():
    from scorelab.families import make_family
    from scorelab.train.trainer import StepContext

    torch.manual_seed(0)
    cfg = {"family": "vdm", "net": "mlp", "net_options": {"width": 32, "depth": 1, "emb_dim": 16, "freq_dim": 8},
           "schedule_hidden": 16, "schedule_variance": True, "sampler": "euler", "sampling_steps": 5, "grid": "uniform"}
    fam = make_family(cfg, (2,))
    mods = fam.modules()
    sched = mods["schedule"]
    shape = [sched.w1_raw, sched.b1, sched.w2_raw, sched.b2, sched.w3_raw]
    x = random_mixture(2, 3, seed=0).sample(64, _gen(0)).float()
    grads = {}

    def optimize(loss, name):
        for p in [q for m in mods.values() for q in m.parameters()]:
            p.grad = None
        loss.backward()
        grads.update({id(p): p.grad.clone() for p in shape})
        return 0.0

    g = _gen(3)
    state = g.get_state()
    out = fam.training_step(mods, {"x": x}, StepContext(0, torch.device("cpu"), g, None, optimize))
    assert math.isfinite(float(out["loss"])) and float(out["gamma_1"]) > float(out["gamma_0"])
    # the shape parameters got the gradient of mean(L_diff^2), not of the ELBO
    g.set_state(state)
    ld = continuous_elbo_terms(fam.denoiser(mods, net_dtype=torch.float32), x, g, low_discrepancy=True, target="eps")["diffusion"]
    want = torch.autograd.grad(ld.pow(2).mean(), shape)
    for p, w in zip(shape, want):
        torch.testing.assert_close(grads[id(p)], w, rtol=1e-5, atol=1e-8)
    y = fam.sample(mods, 10, seed=0)
    assert y.shape == (10, 2) and torch.isfinite(y).all()
    torch.testing.assert_close(fam.sample(mods, 3, seed=0), y[:3])  # per-example seeds
    nll = fam.nll(mods, x[:20], seed=0, batch_size=8)
    assert nll["total"].shape == (20,) and nll["units"] == "nats"
    torch.testing.assert_close(nll["total"], nll["prior"] + nll["reconstruction"] + nll["diffusion"])
    torch.testing.assert_close(fam.nll(mods, x[:20], seed=0, batch_size=20)["total"], nll["total"])  # per-example seeds
