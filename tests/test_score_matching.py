"""Score-matching losses, energy models and the score_matching family against analytic answers.

Gaussian data ``N(mu, Sigma)`` has score ``-P (x - mu)``, ``P = Sigma^-1``; every statistic below
is compared with its closed form, within a few Monte Carlo standard errors (stated at each test).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scorelab.data.mixture import GaussianMixture
from scorelab.families import FAMILIES, make_family
from scorelab.nets.energy import EnergyNet, ScoreNet, energy_score
from scorelab.score_matching import (
    denoising_score_matching,
    exact_trace,
    explicit_score_matching,
    hutchinson_trace,
    sliced_score_matching,
)
from scorelab.train.config import ConfigError

F = torch.float64
MU = torch.tensor([0.5, -1.0], dtype=F)
SIGMA = torch.tensor([[1.0, 0.6], [0.6, 2.0]], dtype=F)
P = torch.linalg.inv(SIGMA)  # precision
A0 = torch.tensor([[-0.7, 0.2], [0.1, -0.4]], dtype=F)  # a fixed (non-symmetric) linear score s = A0 x + b0
B0 = torch.tensor([0.3, 0.1], dtype=F)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def gauss(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MU + torch.randn(n, 2, generator=g, dtype=F) @ torch.linalg.cholesky(SIGMA).T


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def nonlinear_score(x: torch.Tensor) -> torch.Tensor:
    """A fixed smooth nonlinear map R^2 -> R^2 with a non-symmetric Jacobian."""
    W = torch.tensor([[0.8, -0.5], [0.3, 1.1], [-0.9, 0.4]], dtype=x.dtype)
    V = torch.tensor([[1.0, -0.6, 0.5], [0.2, 0.7, -1.3]], dtype=x.dtype)
    return torch.tanh(x @ W.T + 0.1) @ V.T - 0.3 * x


def mean_se(v: torch.Tensor) -> tuple[float, float]:
    return v.mean().item(), v.std().item() / math.sqrt(v.numel())


class LinearScore(nn.Module):
    """s(x) = A x + b, started at A = -I, b = 0."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(-torch.eye(2, dtype=F))
        self.b = nn.Parameter(torch.zeros(2, dtype=F))

    def forward(self, x, sigma=None):
        return x @ self.A.T + self.b


class QuadraticEnergy(nn.Module):
    """f(x) = 0.5 x^T W x - c^T x with W = (M + M^T) / 2: score -W x + c."""

    def __init__(self, M=None, c=None):
        super().__init__()
        self.M = nn.Parameter(torch.eye(2, dtype=F) if M is None else M.clone())
        self.c = nn.Parameter(torch.zeros(2, dtype=F) if c is None else c.clone())

    def forward(self, x):
        W = 0.5 * (self.M + self.M.T)
        return 0.5 * ((x @ W) * x).sum(1) - x @ self.c


def lbfgs(module: nn.Module, objective) -> None:
    """Minimise ``objective()`` (a deterministic scalar) over ``module``'s parameters."""
    opt = torch.optim.LBFGS(module.parameters(), lr=1, max_iter=200, tolerance_grad=1e-11, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)


def precision_tolerance(n: int, k: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """k standard errors of the sample precision (entries: sqrt((P_ii P_jj + P_ij^2) / n)) and of
    ``P_hat x_bar`` (through x_bar: sqrt(P_ii / n); through P_hat: sum_j se(P_ij) |mu_j|)."""
    se_P = ((P.diag()[:, None] * P.diag()[None] + P**2) / n).sqrt()
    se_b = (P.diag() / n).sqrt() + se_P @ MU.abs()
    return k * se_P, k * se_b


# --- expectations --------------------------------------------------------------------------
def test_esm_expectation_equals_fisher_minus_constant_gaussian():
    """E[0.5||s||^2 + tr(grad s)] = J_Fisher - 0.5 tr(P) for s = A0 x + b0 (seed 000 Appendix A)."""
    def quad_mean(M, c):  # E||M x + c||^2 for x ~ N(MU, SIGMA)
        return torch.trace(M @ SIGMA @ M.T) + (M @ MU + c).pow(2).sum()

    esm = 0.5 * quad_mean(A0, B0) + torch.trace(A0)
    fisher = 0.5 * quad_mean(A0 + P, B0 - P @ MU)  # s - grad log p = (A0 + P) x + b0 - P mu
    C = 0.5 * torch.trace(P)  # 0.5 E||grad log p||^2 = 0.5 tr(P Sigma P) = 0.5 tr(P)
    torch.testing.assert_close(esm, fisher - C, rtol=0, atol=1e-12)

    x = gauss(20000, 0)
    lin = lambda z: z @ A0.T + B0
    _, tr = exact_trace(lin, x)
    torch.testing.assert_close(tr, torch.full_like(tr, torch.trace(A0).item()), rtol=0, atol=1e-12)
    m, se = mean_se(explicit_score_matching(lin, x))
    assert abs(m - esm.item()) < 4 * se, (m, esm.item(), se)


def test_esm_expectation_equals_fisher_minus_constant_mixture():
    """Mixture data, nonlinear s: per sample, ESM - (0.5||s - g||^2 - 0.5||g||^2) = tr(grad s) + s.g has
    mean 0 (integration by parts); and E[ESM] = J_Fisher - C_p with C_p by MC on other samples."""
    gm = GaussianMixture([0.3, 0.7], [[-1.0, 0.0], [1.5, 0.5]], [0.5, 0.8])
    x = gm.sample(40000, gen(1))
    g = gm.score(x)
    s = nonlinear_score(x)
    esm = explicit_score_matching(nonlinear_score, x).detach()
    fisher_minus_c = 0.5 * (s - g).pow(2).sum(1) - 0.5 * g.pow(2).sum(1)
    m, se = mean_se(esm - fisher_minus_c)
    assert abs(m) < 4 * se, (m, se)
    # unpaired: constant C_p = 0.5 E||g||^2 from independent samples
    x2 = gm.sample(40000, gen(2))
    g2 = gm.score(x2)
    Cp, se_c = mean_se(0.5 * g2.pow(2).sum(1))
    mf, se_f = mean_se(0.5 * (nonlinear_score(x2) - g2).pow(2).sum(1))
    me, se_e = mean_se(esm)
    # the Fisher and C_p means share samples (x2): bound their difference's s.e. by the sum
    assert abs(me - (mf - Cp)) < 4 * (se_e + se_f + se_c), (me, mf, Cp)


def test_trace_estimators_are_unbiased():
    """Hutchinson (both probes) and both SSM forms average to the exact trace / exact ESM at each
    point; 4000 independent probes per point, 5 standard errors."""
    pts = torch.tensor([[0.0, 0.0], [1.0, -0.5], [-1.2, 0.8]], dtype=F)
    M = 4000
    x = pts.repeat_interleave(M, 0)  # (3M, 2), one probe per row
    s_ex, tr_ex = exact_trace(nonlinear_score, pts)
    esm_ex = 0.5 * s_ex.pow(2).sum(1) + tr_ex  # (3,)
    with torch.no_grad():
        for probe, seed in (("rademacher", 3), ("gaussian", 4)):
            _, tr = hutchinson_trace(nonlinear_score, x, 1, probe, gen(seed))
            for i, t in enumerate(tr.view(3, M)):
                m, se = mean_se(t)
                assert abs(m - tr_ex[i].item()) < 5 * se + 1e-12, (probe, i, m, tr_ex[i].item(), se)
            est = explicit_score_matching(nonlinear_score, x, "hutchinson", probe=probe, generator=gen(seed))
            torch.testing.assert_close(est, 0.5 * nonlinear_score(x).pow(2).sum(1) + tr)  # same probes
        for vr, seed in ((False, 5), (True, 6)):
            l = sliced_score_matching(nonlinear_score, x, variance_reduced=vr, generator=gen(seed))
            for i, t in enumerate(l.view(3, M)):
                m, se = mean_se(t)
                assert abs(m - esm_ex[i].item()) < 5 * se, (vr, i, m, esm_ex[i].item(), se)
        # n_probes = 2 is the mean of two single-probe estimates drawn in turn from the same stream
        g = gen(7)
        singles = [hutchinson_trace(nonlinear_score, pts, 1, "gaussian", g)[1] for _ in range(2)]
        two = hutchinson_trace(nonlinear_score, pts, 2, "gaussian", gen(7))[1]
        torch.testing.assert_close(two, 0.5 * (singles[0] + singles[1]))
        assert not torch.allclose(singles[0], singles[1])


# --- minimisers over a linear score family --------------------------------------------------
N_FIT = 20000


@pytest.fixture(scope="module")
def data():
    x = gauss(N_FIT, 10)
    xbar = x.mean(0)
    S = (x - xbar).T @ (x - xbar) / N_FIT  # biased sample covariance: the exact ESM optimum is -S^-1
    return x, xbar, S


def test_esm_exact_minimiser_is_sample_precision(data):
    x, xbar, S = data
    lin = LinearScore()
    lbfgs(lin, lambda: explicit_score_matching(lin, x).mean())
    Ps = torch.linalg.inv(S)
    # the ESM objective is quadratic: its minimiser is exactly -S^-1, S^-1 x_bar
    torch.testing.assert_close(lin.A.detach(), -Ps, rtol=0, atol=1e-6)
    torch.testing.assert_close(lin.b.detach(), Ps @ xbar, rtol=0, atol=1e-6)
    tP, tb = precision_tolerance(N_FIT)
    assert ((lin.A.detach() + P).abs() < tP).all(), (lin.A, -P, tP)
    assert ((lin.b.detach() - P @ MU).abs() < tb).all(), (lin.b, P @ MU, tb)


# Monte Carlo s.d. of the fitted entries of (A, b) over 20 seeds of the data and probes / noise at
# this file's settings (N_FIT = 20000, 2 probes; dsm: sigma = 0.4, 4 draws), largest entry:
# esm_hutchinson 0.014, ssm 0.019, ssm_vr 0.016, dsm 0.017 (means within 0.003 of the target: no bias).
# Tolerance: 5 s.d.
STOCH_TOL = {"esm_hutchinson": 0.07, "ssm": 0.095, "ssm_vr": 0.08, "dsm": 0.085}


@pytest.mark.parametrize("kind", ["esm_hutchinson", "ssm", "ssm_vr"])
def test_stochastic_trace_minimisers_recover_precision(data, kind):
    x, _, _ = data
    lin = LinearScore()

    def objective():  # the same probes at every evaluation: a deterministic quadratic objective
        g = gen(11)
        if kind == "esm_hutchinson":
            return explicit_score_matching(lin, x, "hutchinson", n_probes=2, generator=g).mean()
        return sliced_score_matching(lin, x, n_projections=2, variance_reduced=kind == "ssm_vr", generator=g).mean()

    lbfgs(lin, objective)
    tol = STOCH_TOL[kind]
    assert ((lin.A.detach() + P).abs() < tol).all(), (kind, lin.A, -P)
    assert ((lin.b.detach() - P @ MU).abs() < tol).all(), (kind, lin.b, P @ MU)



def test_dsm_minimiser_is_noised_gaussian_score(data):
    """DSM's optimum for N(mu, Sigma) data is the score of N(mu, Sigma + sigma^2 I), not of the data."""
    x, _, _ = data
    sigma = 0.4
    xr = x.repeat(4, 1)  # 4 noise draws per example
    lin = LinearScore()
    lbfgs(lin, lambda: denoising_score_matching(lin, xr, sigma, generator=gen(12)).mean())
    Pn = torch.linalg.inv(SIGMA + sigma**2 * torch.eye(2, dtype=F))
    tol = STOCH_TOL["dsm"]
    assert ((lin.A.detach() + Pn).abs() < tol).all(), (lin.A, -Pn)
    assert ((lin.b.detach() - Pn @ MU).abs() < tol).all(), (lin.b, Pn @ MU)
    # the sigma^2 correction matters here: the clean precision lies outside the tolerance (~12 s.d. off)
    assert (lin.A.detach() + P).abs().max() > tol



def test_dsm_tensor_sigma_and_value():
    """Per-example sigma (B,); the value is 0.5||s(x + sigma z) + z / sigma||^2 with the generator's z."""
    x = gauss(5, 13)
    sig = torch.tensor([0.1, 0.2, 0.5, 1.0, 2.0], dtype=F)
    seen = {}

    def s(xt, sg):
        seen["xt"], seen["sigma"] = xt, sg
        return -xt

    l = denoising_score_matching(s, x, sig, generator=gen(14))
    z = torch.randn(5, 2, generator=gen(14), dtype=F)
    torch.testing.assert_close(seen["sigma"], sig)
    torch.testing.assert_close(seen["xt"], x + sig[:, None] * z)
    torch.testing.assert_close(l, 0.5 * (-(x + sig[:, None] * z) + z / sig[:, None]).pow(2).sum(1))


# --- energy models and Langevin ---------------------------------------------------------------
def test_energy_score_matches_finite_differences():
    torch.manual_seed(0)
    for act in ("silu", "softplus"):
        f = EnergyNet(dim=3, width=16, depth=2, activation=act).double()
        x = torch.randn(4, 3, dtype=F)
        s = f.score(x)
        h = 1e-6
        fd = torch.stack([(f(x + h * e) - f(x - h * e)) / (2 * h) for e in torch.eye(3, dtype=F)], 1)
        torch.testing.assert_close(s, -fd, rtol=0, atol=1e-8)
        with torch.no_grad():  # sampling mode: still the score, detached
            s2 = energy_score(f, x)
        assert not s2.requires_grad
        torch.testing.assert_close(s2, s.detach())
    # a trainable trace: ESM of an EnergyNet backpropagates to its weights
    f = EnergyNet(dim=2, width=8, depth=2).double()
    explicit_score_matching(f.score, x[:, :2]).mean().backward()
    *inner, last_bias = f.parameters()  # an additive constant in f changes neither p nor the score
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in inner)
    assert last_bias.grad is None or last_bias.grad.abs().max() < 1e-12


def test_quadratic_energy_trained_by_esm_recovers_precision(data):
    """f = 0.5 x^T W x - c^T x through energy_score (double backward): minimiser W = S^-1, c = S^-1 x_bar."""
    x, xbar, S = data
    q = QuadraticEnergy()
    lbfgs(q, lambda: explicit_score_matching(lambda z: energy_score(q, z), x).mean())
    W = 0.5 * (q.M + q.M.T).detach()
    Ps = torch.linalg.inv(S)
    torch.testing.assert_close(W, Ps, rtol=0, atol=1e-6)
    torch.testing.assert_close(q.c.detach(), Ps @ xbar, rtol=0, atol=1e-6)
    tP, tb = precision_tolerance(N_FIT)
    assert ((W - P).abs() < tP).all() and ((q.c.detach() - P @ MU).abs() < tb).all()


def test_langevin_on_known_energy_reproduces_gaussian_moments():
    """The family's Langevin sampler on f = 0.5 (x - mu)^T P (x - mu): unadjusted Langevin with step eps
    is stationary at N(mu, C_eps), C_eps = U diag(1 / (l (1 - eps l / 4))) U^T (P = U diag(l) U^T), which
    tends to Sigma as eps -> 0. 4000 chains x 600 steps (start bias ~e^-13); 5 standard errors."""
    fam = make_family({"family": "score_matching", "model": "energy"}, (2,))
    q = QuadraticEnergy(P, P @ MU)
    eps, n = 0.1, 4000
    x = fam.sample({"net": q}, n, seed=0, steps=600, step_size=eps, init_std=1.0)
    l, U = torch.linalg.eigh(P)
    C = U @ torch.diag(1 / (l * (1 - eps * l / 4))) @ U.T
    x = x.to(F)
    m = x.mean(0)
    assert ((m - MU).abs() < 5 * (C.diag() / n).sqrt()).all(), (m, MU)
    Ch = torch.cov(x.T)
    se = ((C.diag()[:, None] * C.diag()[None] + C**2) / n).sqrt()
    assert ((Ch - C).abs() < 5 * se).all(), (Ch, C, se)


# --- the family ------------------------------------------------------------------------------
class _Ctx:
    def __init__(self):
        self.generator = gen(0)

    def optimize(self, loss, name="main"):
        loss.backward()
        return 0.0


@pytest.mark.parametrize("loss", ["esm_exact", "esm_hutchinson", "ssm", "ssm_vr", "dsm"])
@pytest.mark.parametrize("model", ["energy", "score"])
def test_family_training_step_every_loss(loss, model):
    assert FAMILIES["score_matching"].__name__ == "ScoreMatchingFamily"
    fam = make_family({"family": "score_matching", "model": model, "loss": loss,
                       "net_options": {"width": 8, "depth": 2}}, (2,))
    mods = fam.modules()
    assert isinstance(mods["net"], EnergyNet if model == "energy" else ScoreNet)
    out = fam.training_step(mods, {"x": torch.randn(16, 2)}, _Ctx())
    assert torch.isfinite(out["loss"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mods["net"].parameters())
    x = fam.sample(mods, 5, seed=0, steps=3)
    assert x.shape == (5, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_ebm_moons_preset_builds():
    from pathlib import Path

    import scorelab
    from scorelab.train.config import RunConfig, load_yaml

    d = load_yaml(Path(scorelab.__file__).parent / "configs" / "ebm-moons.yaml")
    cfg = RunConfig.from_dict(d)
    fam = make_family(cfg.model, (2,))
    assert isinstance(fam.net, EnergyNet) and fam.cfg.loss == "ssm_vr" and fam.cfg.sampler == "langevin"


def test_family_config_errors():
    with pytest.raises(ConfigError, match="flat data"):
        make_family({"family": "score_matching"}, (1, 28, 28))
    with pytest.raises(ConfigError, match="model.loss"):
        make_family({"family": "score_matching", "loss": "mle"}, (2,))
    with pytest.raises(ConfigError, match="model.model"):
        make_family({"family": "score_matching", "model": "flow"}, (2,))
    with pytest.raises(ConfigError, match="model.dsm_sigma"):
        make_family({"family": "score_matching", "dsm_sigma": 0.0}, (2,))
    with pytest.raises(ConfigError, match="net_options"):
        make_family({"family": "score_matching", "net_options": {"activation": "relu"}}, (2,))
    fam = make_family({"family": "score_matching"}, (2,))
    with pytest.raises(ConfigError, match="sampler"):
        fam.sample(fam.modules(), 4, sampler="euler")
    with pytest.raises(ConfigError, match="grid"):
        fam.sample(fam.modules(), 4, grid="karras")


# --- bad inputs ----------------------------------------------------------------------------------
def test_bad_arguments():
    x = torch.randn(4, 2, dtype=F)
    lin = lambda z: -z
    with pytest.raises(ValueError, match="estimator"):
        explicit_score_matching(lin, x, estimator="full")
    with pytest.raises(ValueError, match="n_probes"):
        explicit_score_matching(lin, x, estimator="hutchinson", n_probes=0)
    with pytest.raises(ValueError, match="probe"):
        explicit_score_matching(lin, x, estimator="hutchinson", probe="uniform")
    with pytest.raises(ValueError, match="hutchinson"):
        explicit_score_matching(lin, torch.randn(2, 100), estimator="exact")
    explicit_score_matching(lin, torch.randn(2, 100), estimator="hutchinson")  # fine with probes
    with pytest.raises(ValueError, match="n_projections"):
        sliced_score_matching(lin, x, n_projections=0)
    with pytest.raises(ValueError, match="score_fn"):
        explicit_score_matching(lambda z: z[:, :1], x)
    with pytest.raises(ValueError, match="score_fn"):
        sliced_score_matching(lambda z: z.sum(1), x)
    with pytest.raises(ValueError, match="x must"):
        explicit_score_matching(lin, torch.randn(4))
    with pytest.raises(ValueError, match="x must"):
        sliced_score_matching(lin, torch.ones(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="sigma"):
        denoising_score_matching(lambda z, s: -z, x, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        denoising_score_matching(lambda z, s: -z, x, torch.ones(3))
    with pytest.raises(ValueError, match="score_fn_sigma"):
        denoising_score_matching(lambda z, s: s, x, 0.1)
    with pytest.raises(ValueError, match="activation"):
        EnergyNet(dim=2, activation="relu")
    with pytest.raises(ValueError, match="width"):
        EnergyNet(dim=2, width=0)
    with pytest.raises(ValueError, match="EnergyNet expects"):
        EnergyNet(dim=2)(torch.randn(3, 4))
