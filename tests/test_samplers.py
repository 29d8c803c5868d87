"""Samplers against analytic answers: exact Gaussian-mixture denoisers, closed-form ODE flows.

* every sampler, run with the exact denoiser of a 2-D mixture from the exact noised marginal at
  ``t_max``, reproduces the mixture: per-mode weights within binomial noise, per-mode spread
  (mean squared distance to the mode's centre) within its standard error, sliced W2 within the
  Monte Carlo floor (SW2 of true samples of the same size, mean + 4 std over repeated draws);
* on one Gaussian the probability-flow ODE is an affine map known in closed form: the measured
  convergence orders are Euler/DDIM 1, Heun 2, DPM-Solver++(2M) 2, DPM-Solver++(3M) 3;
* DDIM(eta=0) is the first-order exponential integrator; DDIM(eta=1) has the ancestral transition;
  a short Euler–Maruyama step keeps the exact marginal of one Gaussian;
* plain Langevin keeps the wrong mode weights, annealed Langevin recovers them (seed 000 §3.4-3.6);
* noise is batch-independent with one generator per example; ``cond`` reaches the denoiser; NFE
  bookkeeping; a clean target returns x0_hat; registry errors name the sampler.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from scorelab import samplers as S
from scorelab.data.mixture import GaussianMixture, eight_gaussians_mixture, random_mixture
from scorelab.metrics import sliced_wasserstein
from scorelab.paths import VE, make_path, time_grid
from scorelab.random import generators_for_seeds, rand
from scorelab.targets import Prediction, as_time_batch

F = torch.float64
N = 2000  # samples per distribution test (and size of the true sample they are compared with)
N_REF = 50000  # true samples that fix the reference mode fractions
N_PROJ = 128  # sliced-Wasserstein directions
N_FLOOR = 24  # pairs of independent true sample sets used to measure the SW2 floor


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sw2(x, y) -> float:
    return float(sliced_wasserstein(x, y, N_PROJ, generator=gen(7)))


def assign(gm: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """Index of the most responsible clean component of each point of ``x: (n, D)``: (n,)."""
    one = torch.ones(x.shape[0], dtype=F)
    return gm.posterior(x, one, 0 * one)[2].argmax(1)


def mode_fractions(gm: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """Fraction of the points of ``x`` assigned to each component: (K,)."""
    return torch.bincount(assign(gm, x), minlength=gm.K).to(F) / x.shape[0]


def mode_spread(gm: GaussianMixture, x: torch.Tensor):
    """Per component k: mean of ``|x - m_k|^2`` over the points assigned to k and its standard error: (K,), (K,)."""
    k = assign(gm, x)
    q = (x - gm.means[k]).pow(2).sum(1)
    mean, se = torch.full((gm.K,), math.nan, dtype=F), torch.full((gm.K,), math.inf, dtype=F)
    for j in range(gm.K):
        qj = q[k == j]
        if qj.numel() > 10:
            mean[j], se[j] = qj.mean(), qj.std() / math.sqrt(qj.numel())
    return mean, se


MIXTURES = {
    "eight": eight_gaussians_mixture,  # eight equal isotropic modes on a circle
    "random": lambda: random_mixture(2, 4, seed=3),  # unequal weights, full covariances
}


@functools.lru_cache(maxsize=None)
def sw2_tolerance(name: str, n: int = N) -> float:
    """Monte Carlo floor of SW2 between two independent true sets of ``n``: mean + 4 std over draws."""
    gm = MIXTURES[name]()
    floor = torch.tensor([sw2(gm.sample(n, gen(3000 + 2 * r)), gm.sample(n, gen(3001 + 2 * r))) for r in range(N_FLOOR)])
    return float(floor.mean() + 4 * floor.std())


@functools.lru_cache(maxsize=None)
def truth(name: str):
    """(mixture, true sample of size N, reference mode fractions (K,), reference mode spreads and
    their standard errors ((K,), (K,)), SW2 tolerance)."""
    gm = MIXTURES[name]()
    big = gm.sample(N_REF, gen(1001))
    return gm, gm.sample(N, gen(1000)), mode_fractions(gm, big), mode_spread(gm, big), sw2_tolerance(name)


def assert_matches_mixture(name: str, x: torch.Tensor, what: str) -> None:
    gm, ref, p_ref, (q_ref, q_se_ref), tol = truth(name)
    assert torch.isfinite(x).all(), f"{what}: non-finite samples"
    p = mode_fractions(gm, x)
    se = torch.sqrt(p_ref * (1 - p_ref) * (1 / x.shape[0] + 1 / N_REF))
    z = ((p - p_ref) / se).abs().max()
    assert z < 4, f"{what}: mode weights {p.tolist()} vs {p_ref.tolist()} ({z:.1f} standard errors)"
    # width of each mode: mean squared distance to its centre, against the reference within 4 SE
    q, q_se = mode_spread(gm, x)
    z = ((q - q_ref) / torch.sqrt(q_se**2 + q_se_ref**2)).abs().max()
    assert z < 4, f"{what}: mode spreads {q.tolist()} vs {q_ref.tolist()} ({z:.1f} standard errors)"
    d = sw2(x, ref)
    assert d < tol, f"{what}: SW2 {d:.4f} above the Monte Carlo tolerance {tol:.4f}"


def exact_start(gm: GaussianMixture, path, t: float, n: int, seed: int) -> torch.Tensor:
    """``n`` draws of the exact noised marginal at time ``t`` (float64)."""
    c = path.coefficients(torch.tensor(t, dtype=F))
    return gm.noised(float(c.alpha), float(c.sigma)).sample(n, gen(seed))


# --------------------------------------------------------------------------------------
# Every sampler reproduces the mixture
# --------------------------------------------------------------------------------------
# (sampler, mixture, path, grid, steps, sampler options)
CASES = [
    ("ancestral", "eight", "ddpm", "logsnr", 150, {}),
    ("ancestral", "random", "ve", "uniform", 100, {}),
    ("ddim", "eight", "vp", "logsnr", 50, {}),
    ("ddim", "random", "cosine", "logsnr", 100, {}),
    ("euler", "eight", "rf", "uniform", 100, {}),
    ("euler", "random", "vp", "logsnr", 100, {}),
    ("heun", "eight", "edm", "karras", 30, {}),
    ("heun", "random", "rf", "uniform", 30, {}),
    ("dpmpp_2m", "eight", "vp", "logsnr", 30, {}),
    ("dpmpp_2m", "random", "edm", "karras", 30, {}),
    ("dpmpp_3m", "eight", "rf", "uniform", 30, {}),
    ("dpmpp_3m", "random", "ddpm", "logsnr", 30, {}),
    ("euler_maruyama", "eight", "vp", "logsnr", 200, {}),
    ("euler_maruyama", "random", "ve", "uniform", 200, {}),
    ("pc", "eight", "ve", "karras", 60, {}),
    ("pc", "random", "vp", "logsnr", 60, {}),
]


@pytest.mark.parametrize("name,mix,path_name,grid,steps,opts", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_sampler_reproduces_mixture(name, mix, path_name, grid, steps, opts):
    gm = truth(mix)[0]
    path = make_path(path_name)
    ts = time_grid(path, steps, grid)
    x = exact_start(gm, path, float(ts[0]), N, seed=1)
    out = S.SAMPLERS[name](gm.denoiser(path), x, ts, generator=gen(2), **opts)
    assert out.dtype == F and out.shape == x.shape
    assert_matches_mixture(mix, out, f"{name} on {path_name}")


@pytest.mark.parametrize("mix,levels,steps_each,ratio", [("eight", 12, 40, 0.5), ("random", 12, 80, 0.5)])
def test_annealed_langevin_reproduces_mixture(mix, levels, steps_each, ratio):
    """Seed 000 §3.6 on geometric VE levels 10 -> 0.01, alpha_i = eps sigma_i^2 / sigma_L^2."""
    gm = truth(mix)[0]
    path = VE(sigma_min=0.01, sigma_max=10.0)
    ts = time_grid(path, levels, "uniform")  # geometric sigmas, then the clean time (excluded)
    x = exact_start(gm, path, path.t_max, N, seed=1)
    d = gm.denoiser(path)
    out = S.sample_annealed_langevin(d, x, ts, generator=gen(2), eps=ratio * path.sigma_max**2,
                                     n_steps_each=steps_each)
    assert d.nfe == levels * steps_each + 1
    assert_matches_mixture(mix, out, "annealed Langevin")


def test_ddim_eta1_and_ancestral_agree_on_samples():
    """Sample level: DDIM(eta=1) and ancestral sampling from the same start, independent noise."""
    gm = truth("eight")[0]
    path = make_path("ddpm")
    ts = time_grid(path, 50, "uniform")
    x = exact_start(gm, path, float(ts[0]), N, seed=3)
    a = S.sample_ancestral(gm.denoiser(path), x, ts, generator=gen(4))
    b = S.sample_ddim(gm.denoiser(path), x, ts, generator=gen(5), eta=1.0)
    assert sw2(a, b) < sw2_tolerance("eight")


# --------------------------------------------------------------------------------------
# Convergence order on one Gaussian, where the probability-flow ODE is affine
# --------------------------------------------------------------------------------------
MU = torch.tensor([[0.5, -1.0]], dtype=F)
S0 = 0.3
ONE_GAUSSIAN = GaussianMixture([1.0], MU, [S0])


def pf_ode_exact(path, x, t0: float, t1: float):
    """x(t1) = mu(t1) + sqrt(var(t1) / var(t0)) (x(t0) - mu(t0)), var = alpha^2 s^2 + sigma^2, mu = alpha mu."""
    c0, c1 = path.coefficients(torch.tensor(t0, dtype=F)), path.coefficients(torch.tensor(t1, dtype=F))
    v0, v1 = c0.alpha**2 * S0**2 + c0.sigma**2, c1.alpha**2 * S0**2 + c1.sigma**2
    return c1.alpha * MU + torch.sqrt(v1 / v0) * (x - c0.alpha * MU)


def logsnr_grid(path, t0: float, t1: float, n: int):
    """n steps uniform in log-SNR from t0 to t1 (no clean step)."""
    lam = torch.linspace(float(path.log_snr(t0)), float(path.log_snr(t1)), n + 1, dtype=F)
    ts = path.t_from_log_snr(lam)
    ts[0], ts[-1] = t0, t1
    return ts


ORDERS = {"euler": (0.8, 1.3), "ddim": (0.8, 1.3), "heun": (1.7, 2.5), "dpmpp_2m": (1.7, 2.5), "dpmpp_3m": (2.7, 4.0)}
STEPS = [32, 64, 128, 256]


@pytest.mark.parametrize("path_name,t0,t1", [("vp", 1.0, 0.02), ("rf", 0.98, 0.05)])
def test_convergence_order(path_name, t0, t1):
    path = make_path(path_name)
    d = ONE_GAUSSIAN.denoiser(path)
    x = exact_start(ONE_GAUSSIAN, path, t0, 64, seed=0)
    exact = pf_ode_exact(path, x, t0, t1)
    logn = torch.log(torch.tensor(STEPS, dtype=F))
    for name, (lo, hi) in ORDERS.items():
        errs = []
        for n in STEPS:
            out = S.SAMPLERS[name](d, x, logsnr_grid(path, t0, t1, n))
            errs.append(float((out - exact).pow(2).mean().sqrt()))
        loge = torch.log(torch.tensor(errs, dtype=F))
        slope = float(-((logn - logn.mean()) * (loge - loge.mean())).sum() / ((logn - logn.mean()) ** 2).sum())
        assert lo <= slope <= hi, f"{name} on {path_name}: order {slope:.2f} not in [{lo}, {hi}] (errors {errs})"


def test_error_falls_with_nfe():
    """Against a 500-step DPM-Solver++(3M) reference from the same noise, NFE 50 beats NFE 5."""
    gm = truth("eight")[0]
    path = make_path("vp")
    x = exact_start(gm, path, path.t_max, 256, seed=5)
    ref = S.sample_dpmpp_3m(gm.denoiser(path), x, time_grid(path, 500, "logsnr"))
    for name in ("euler", "ddim", "heun", "dpmpp_2m", "dpmpp_3m"):
        err = {}
        for nfe in (5, 50):
            steps = (nfe + 1) // 2 if name == "heun" else nfe  # Heun: 2 NFE per step, 1 on the clean step
            d = gm.denoiser(path)
            out = S.SAMPLERS[name](d, x, time_grid(path, steps, "logsnr"))
            assert nfe - 1 <= d.nfe <= nfe  # Heun: 2 (steps - 1) + 1 is odd
            err[nfe] = float((out - ref).norm(dim=1).mean())
        assert err[50] < err[5] / 3, f"{name}: error {err[50]:.3g} at NFE 50 vs {err[5]:.3g} at NFE 5"


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m"])
def test_lower_order_final_helps_short_ddpm_grids(name):
    """On DDPM with 10 uniform steps, the multistep extrapolation into the last noisy time is
    the dominant error (benchmarks/samplers.py); lower_order_final removes most of it."""
    gm = truth("eight")[0]
    path = make_path("ddpm")
    x = exact_start(gm, path, path.t_max, 256, seed=7)
    ref = S.sample_dpmpp_3m(gm.denoiser(path), x, time_grid(path, 500, "logsnr"))
    ts = time_grid(path, 10, "uniform")
    err = {flag: float((S.SAMPLERS[name](gm.denoiser(path), x, ts, lower_order_final=flag) - ref).norm(dim=1).mean())
           for flag in (True, False)}
    assert err[True] < err[False] / 2, err


# --------------------------------------------------------------------------------------
# One-step identities
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("path_name,t,s", [("vp", 0.7, 0.4), ("rf", 0.6, 0.3), ("ve", 0.8, 0.5), ("edm", 5.0, 2.0), ("ddpm", 600.0, 350.0)])
def test_ddim_eta0_is_exponential_integrator_step(path_name, t, s):
    """x_s = (sigma_s/sigma_t) x_t + sigma_s int_{lambda_t}^{lambda_s} e^lambda x0_hat = (sigma_s/sigma_t) x_t - alpha_s expm1(-h) x0_hat."""
    gm = truth("random")[0]
    path = make_path(path_name)
    x = exact_start(gm, path, t, 64, seed=6)
    c = path.coefficients(torch.tensor([t, s], dtype=F))
    h = math.log(c.alpha[1] / c.sigma[1]) - math.log(c.alpha[0] / c.sigma[0])
    x0 = gm.denoiser(path)(x, t, kind="x0")
    expected = (c.sigma[1] / c.sigma[0]) * x - c.alpha[1] * math.expm1(-h) * x0
    ts = torch.tensor([t, s], dtype=F)
    torch.testing.assert_close(S.sample_ddim(gm.denoiser(path), x, ts), expected)
    torch.testing.assert_close(S.sample_dpmpp_2m(gm.denoiser(path), x, ts), expected)  # first step is DPM-Solver++(1)


class FixedX0:
    """A denoiser whose x0 estimate is a fixed point, whatever x_t (to isolate one transition)."""

    def __init__(self, path, x0):
        self.path, self.x0 = path, x0

    def predict(self, x, t, **_):
        c = self.path.coefficients(as_time_batch(t, x)).to(x)
        x0 = self.x0.expand_as(x)
        return Prediction(x, c, x0, (x - c.alpha * x0) / c.sigma)


@pytest.mark.parametrize("path_name,t,s", [("ddpm", 600.0, 400.0), ("ve", 0.7, 0.5), ("vp", 0.5, 0.45)])
def test_ddim_eta1_has_the_ancestral_transition(path_name, t, s):
    """One step t -> s with x0_hat fixed: both give q(x_s | x_t, x0_hat), checked by Gaussian conditioning.

    x_s = alpha_s x0 + sigma_s e1 and x_t = alpha_ts x_s + sqrt(sigma_t^2 - alpha_ts^2 sigma_s^2) e2, so
    E[x_s | x_t] = alpha_s x0 + Cov(x_s, x_t) / Var(x_t) (x_t - alpha_t x0), Var = sigma_s^2 - Cov^2 / Var(x_t).
    """
    B = 20000
    path = make_path(path_name)
    c = path.coefficients(torch.tensor([t, s], dtype=F))
    a_t, s_t, a_s, s_s = float(c.alpha[0]), float(c.sigma[0]), float(c.alpha[1]), float(c.sigma[1])
    x0 = torch.tensor([[0.7, -0.3]], dtype=F)
    x_t = torch.tensor([[1.1, 0.4]], dtype=F).expand(B, 2)
    cov = (a_t / a_s) * s_s**2
    mean = a_s * x0 + cov / s_t**2 * (x_t[:1] - a_t * x0)
    var = s_s**2 - cov**2 / s_t**2
    d = FixedX0(path, x0)
    ts = torch.tensor([t, s], dtype=F)
    anc = S.sample_ancestral(d, x_t, ts, generator=gen(8))
    ddim = S.sample_ddim(d, x_t, ts, generator=gen(8), eta=1.0)
    torch.testing.assert_close(ddim, anc)  # the same transition with the same noise
    for out in (anc, ddim):
        assert ((out.mean(0) - mean[0]).abs() < 5 * math.sqrt(var / B)).all()
        assert ((out.var(0) / var - 1).abs() < 5 * math.sqrt(2 / B)).all()
    # eta = 0 is the deterministic mean path of a different (implicit) process: no variance at all
    assert S.sample_ddim(d, x_t, ts).var(0).max() < 1e-20


@pytest.mark.parametrize("path_name,t,s", [("vp", 0.9, 0.898), ("ve", 0.5, 0.498), ("ddpm", 500.0, 498.0)])
def test_euler_maruyama_step_keeps_the_marginal(path_name, t, s):
    """From the exact marginal N(alpha_t mu, alpha_t^2 s^2 + sigma_t^2) of one Gaussian, a short reverse-SDE
    step lands on the marginal at s up to O(dt^2): mean and variance within 4 standard errors."""
    B = 200000
    path = make_path(path_name)
    x = exact_start(ONE_GAUSSIAN, path, t, B, seed=3)
    c = path.coefficients(torch.tensor(s, dtype=F))
    mean, var = c.alpha * MU[0], float(c.alpha**2 * S0**2 + c.sigma**2)
    out = S.sample_euler_maruyama(ONE_GAUSSIAN.denoiser(path), x, torch.tensor([t, s], dtype=F), generator=gen(4))
    assert ((out.mean(0) - mean).abs() < 4 * math.sqrt(var / B)).all()
    assert ((out.var(0) / var - 1).abs() < 4 * math.sqrt(2 / B)).all()


# --------------------------------------------------------------------------------------
# Langevin: islands (seed 000 §3.4) and annealing (§3.6)
# --------------------------------------------------------------------------------------
def test_plain_langevin_misses_weights_annealed_langevin_recovers_them():
    gm = GaussianMixture([0.8, 0.2], [[-4.0, 0.0], [4.0, 0.0]], [0.5, 0.5])
    n = 2000
    box = torch.tensor([8.0, 2.0], dtype=F)
    x = (2 * rand((n, 2), generator=gen(9), dtype=F) - 1) * box  # uniform over [-8, 8] x [-2, 2]
    se = math.sqrt(0.8 * 0.2 / n)

    # plain Langevin on the clean score: equilibrates inside each basin, never between them
    out = S.langevin(gm.score, x, step_size=0.05, n_steps=400, generator=gen(10))
    err = abs(float(mode_fractions(gm, out)[0]) - 0.8)
    assert err > 10 * se, f"plain Langevin weight error {err:.3f} is within {err / se:.1f} standard errors"
    # ... even though each sample has relaxed into its mode: on N(m, tau^2 I) the chain
    # x' = (1 - eps / (2 tau^2)) x + sqrt(eps) z is stationary at variance tau^2 / (1 - eps / (4 tau^2))
    q = (out - gm.means[assign(gm, out)]).pow(2).sum(1)
    expected = 2 * 0.25 / (1 - 0.05 / (4 * 0.25))
    assert abs(float(q.mean()) - expected) < 5 * float(q.std()) / math.sqrt(n)

    # annealed Langevin from the same start over geometric VE levels 20 -> 0.05
    path = VE(sigma_min=0.05, sigma_max=20.0)
    out = S.sample_annealed_langevin(gm.denoiser(path), x, time_grid(path, 15, "uniform"), generator=gen(11),
                                     eps=0.3 * path.sigma_max**2, n_steps_each=50)
    err = abs(float(mode_fractions(gm, out)[0]) - 0.8)
    assert err < 4 * se, f"annealed Langevin weight error {err:.3f} is {err / se:.1f} standard errors"


# --------------------------------------------------------------------------------------
# Randomness, bookkeeping, registry
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,opts",
    [("ancestral", {}), ("ddim", {"eta": 1.0}), ("euler_maruyama", {}), ("pc", {"norm": "example"}),
     ("annealed_langevin", {"n_steps_each": 3})],
)
def test_batch_independent_noise(name, opts):
    gm = truth("eight")[0]
    path = make_path("vp")
    ts = time_grid(path, 8, "logsnr")
    x = exact_start(gm, path, path.t_max, 4, seed=12)
    fn = S.SAMPLERS[name]
    out4 = fn(gm.denoiser(path), x, ts, generator=generators_for_seeds([20, 21, 22, 23]), **opts)
    out1 = fn(gm.denoiser(path), x[:1], ts, generator=generators_for_seeds([20]), **opts)
    torch.testing.assert_close(out4[:1], out1)
    assert not torch.allclose(out4[0], out4[1])


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_sample_nfe_and_callback(name):
    """``sample`` draws the prior for a shape; NFE = (steps - 1) * nfe_per_step + 1 (clean step costs 1)."""
    gm = truth("eight")[0]
    path = make_path("vp")
    d = gm.denoiser(path)
    steps, opts = 6, ({"n_steps_each": 2} if name == "annealed_langevin" else {})
    seen = []
    out = S.sample(d, (5, 2), steps, sampler=name, generator=gen(13), dtype=F, callback=seen.append, **opts)
    assert out.shape == (5, 2) and out.dtype == F and torch.isfinite(out).all()
    k = S.nfe_per_step(name, **opts)
    if name == "annealed_langevin":
        assert d.nfe == steps * k + 1 and len(seen) == steps  # `steps` noise levels + final denoising
    else:
        assert d.nfe == (steps - 1) * k + 1 and len(seen) == steps
        assert seen[-1]["i"] == steps - 1 and torch.equal(seen[-1]["x"], out) and torch.equal(seen[-1]["x0"], out)
    assert S.nfe_per_step("heun") == 2 and S.nfe_per_step("pc", n_corrector=3) == 4 and S.nfe_per_step("ddim") == 1


def test_clean_step_returns_denoised_estimate():
    gm = truth("random")[0]
    path = make_path("edm")
    x = exact_start(gm, path, 1.5, 16, seed=14)
    x0 = gm.denoiser(path)(x, 1.5, kind="x0")
    ts = torch.tensor([1.5, path.t_clean], dtype=F)
    for name, fn in S.SAMPLERS.items():
        if name != "annealed_langevin":
            torch.testing.assert_close(fn(gm.denoiser(path), x, ts, generator=gen(0)), x0, msg=name)


def test_cond_is_forwarded_to_the_denoiser():
    """``cond={"y": labels}`` reaches ``predict``: every sample lands in its class's mode."""
    gm = truth("eight")[0]
    y = torch.tensor([3, 3, 5, 0], dtype=torch.long)
    for name in ("dpmpp_2m", "ancestral", "pc"):
        out = S.sample(gm.denoiser(make_path("vp")), (4, 2), 20, sampler=name, generator=gen(15), dtype=F, cond={"y": y})
        assert torch.equal(assign(gm, out), y), name


def test_unknown_sampler_is_named():
    d = truth("eight")[0].denoiser(make_path("vp"))
    with pytest.raises(ValueError, match="no_such_sampler"):
        S.sample(d, (4, 2), 5, sampler="no_such_sampler")
    with pytest.raises(ValueError, match="no_such_sampler"):
        S.nfe_per_step("no_such_sampler")
