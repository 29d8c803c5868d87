"""Ground truth (Gaussian mixture) and the losses checked against it."""

import math

import pytest
import torch

from scorelab.data.mixture import GaussianMixture, eight_gaussians_mixture, random_mixture
from scorelab.losses import LogitNormal, LogNormal, Uniform, diffusion_loss, make_time_sampler, weighting
from scorelab.paths import EDM, DDPMDiscrete, RectifiedFlow, VE, VPLinear, make_path
from scorelab.targets import Denoiser, KINDS

F = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------
# Mixture
# --------------------------------------------------------------------------------------
def test_density_integrates_to_one_and_score_is_its_gradient():
    m = random_mixture(2, 3, seed=1)
    # quadrature on a grid covering the mass
    g = torch.linspace(-8, 8, 401, dtype=F)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    mass = m.log_prob(pts).exp().sum() * (g[1] - g[0]) ** 2
    torch.testing.assert_close(mass, torch.tensor(1.0, dtype=F), rtol=1e-6, atol=0)
    x = m.sample(7, gen()).requires_grad_(True)
    (grad,) = torch.autograd.grad(m.log_prob(x).sum(), x)
    torch.testing.assert_close(m.score(x.detach()), grad)


@pytest.mark.parametrize("name", ["vp", "ve", "rf", "edm", "ddpm"])
def test_noised_marginal_score_and_tweedie(name):
    """Exact score = autograd of the exact noised log-density; E[x0|x_t] = (x_t + sigma^2 score)/alpha."""
    path = make_path(name)
    m = random_mixture(3, 4, seed=2)
    t = path.t_min + 0.37 * (path.t_max - path.t_min)
    c = path.coefficients(torch.tensor(t, dtype=F))
    x = (c.alpha * m.sample(6, gen(1)) + c.sigma * torch.randn(6, 3, generator=gen(2), dtype=F)).requires_grad_(True)
    (grad,) = torch.autograd.grad(m.marginal_log_prob(x, c.alpha, c.sigma).sum(), x)
    den = m.denoiser(path)
    p = den.predict(x.detach(), t)
    torch.testing.assert_close(p.score, grad)
    torch.testing.assert_close(p.x0, (x.detach() + c.sigma**2 * grad) / c.alpha)
    # and the noised marginal is the mixture with scaled means and inflated covariances
    torch.testing.assert_close(m.noised(c.alpha, c.sigma).log_prob(x.detach()), m.marginal_log_prob(x.detach(), c.alpha, c.sigma))


def test_noised_marginal_matches_forward_samples():
    """Moments of alpha x0 + sigma eps drawn forward match the closed-form marginal (4 s.e.)."""
    path = VPLinear()
    m = random_mixture(2, 3, seed=3)
    c = path.coefficients(torch.tensor(0.4, dtype=F))
    n = 40000
    xt = c.alpha * m.sample(n, gen(4)) + c.sigma * torch.randn(n, 2, generator=gen(5), dtype=F)
    mt = m.noised(c.alpha, c.sigma)
    cov = mt.covariance()
    se = (cov.diagonal() / n).sqrt()
    assert ((xt.mean(0) - mt.mean()).abs() < 4 * se).all()
    emp = torch.cov(xt.T)
    se_cov = (cov.diagonal()[:, None] * cov.diagonal()[None, :] * 2 / n).sqrt()
    assert ((emp - cov).abs() < 5 * se_cov).all()


def test_dsm_target_averaged_over_data_is_the_marginal_score():
    """Seed 000 §3.5 / Appendix B: E[grad log q(x_t | x_0) | x_t] = grad log p_t(x_t).

    For fixed x_t, average -(x_t - alpha x0)/sigma^2 over data x0 weighted by q(x_t | x0)
    (self-normalised importance sampling over many data draws); compare with the exact score.
    """
    m = eight_gaussians_mixture()
    path = VE(0.01, 50.0)
    sigma = 0.8
    x0 = m.sample(400000, gen(6))
    xt = torch.tensor([[1.0, 0.3], [-0.5, -1.7], [0.0, 0.0]], dtype=F)
    logw = -0.5 * ((xt[:, None, :] - x0[None]) ** 2).sum(-1) / sigma**2  # (3, N)
    w = torch.softmax(logw, dim=1)
    target = -(xt[:, None, :] - x0[None]) / sigma**2  # (3, N, 2)
    est = (w[..., None] * target).sum(1)
    ess = 1 / (w**2).sum(1)  # effective sample size per point
    spread = ((w[..., None] * (target - est[:, None]) ** 2).sum(1)).sqrt()
    exact = m.marginal_score(xt, torch.ones(3, dtype=F), torch.full((3,), sigma, dtype=F))
    assert (ess > 1000).all()
    assert ((est - exact).abs() < 5 * spread / ess.sqrt()[:, None]).all()
    # the same for the path's own parametrisation: E[eps | x_t] from the mixture posterior
    t = path.t_from_log_snr(torch.tensor(-2 * math.log(sigma)))
    torch.testing.assert_close(m.denoiser(path)(xt, t, kind="score"), exact)


def test_conditional_mixture_and_labels():
    m = eight_gaussians_mixture()
    x, k = m.sample(1000, gen(7), return_component=True)
    assert ((x - m.means[k]).norm(dim=1) < 0.8).all()
    c3 = m.conditional(3)
    assert c3.K == 1 and torch.equal(c3.means[0], m.means[3])
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([1.0, -1.0], torch.zeros(2, 2), torch.ones(2))


def test_batch_independent_sampling_with_generator_list():
    from scorelab.random import generators_for_seeds

    m = eight_gaussians_mixture()
    a = m.sample(4, generators_for_seeds([10, 11, 12, 13]))
    b = m.sample(1, generators_for_seeds([12]))
    torch.testing.assert_close(a[2:3], b)


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------
def _net(kind_out):
    w = torch.randn(2, 2, generator=gen(9), dtype=F)
    return lambda x, t, **_: torch.tanh(x @ w) + t[:, None] * 0.1


def test_rectified_flow_and_ddpm_losses_are_configurations_of_one_function():
    x0 = torch.randn(16, 2, generator=gen(10), dtype=F)
    eps = torch.randn(16, 2, generator=gen(11), dtype=F)
    # seed 001: | v(x_t, t) - (eps - x0) |^2 with x_t = (1-t) x0 + t eps
    net = _net("velocity")
    t = torch.rand(16, generator=gen(12), dtype=F)
    rf = diffusion_loss(Denoiser(net, RectifiedFlow(), "velocity"), x0, target="velocity", t=t, eps=eps)
    xt = (1 - t[:, None]) * x0 + t[:, None] * eps
    torch.testing.assert_close(rf, ((net(xt, t) - (eps - x0)) ** 2).mean(1))
    # seed 002: | eps(x_t, k) - eps |^2 with x_t = sqrt(ab_k) x0 + sqrt(1 - ab_k) eps
    p = DDPMDiscrete()
    k = torch.randint(0, 1000, (16,), generator=gen(13)).to(F)
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F), 0)[k.long()]
    dd = diffusion_loss(Denoiser(net, p, "eps"), x0, target="eps", t=k, eps=eps)
    xt = ab.sqrt()[:, None] * x0 + (1 - ab).sqrt()[:, None] * eps
    torch.testing.assert_close(dd, ((net(xt, p.c_noise(k)) - eps) ** 2).mean(1))  # the net sees k / T


@pytest.mark.parametrize("name", ["vp", "rf", "edm", "ve"])
def test_weightings_defined_on_x0_do_not_depend_on_the_target(name):
    """min-SNR / SNR / EDM weights move between targets: same loss whichever target is regressed."""
    path = make_path(name)
    net = _net("eps")
    den = Denoiser(net, path, "x0")
    x0 = torch.randn(8, 2, generator=gen(14), dtype=F)
    eps = torch.randn(8, 2, generator=gen(15), dtype=F)
    t = path.t_min + (path.t_max - path.t_min) * torch.linspace(0.1, 0.9, 8, dtype=F)
    for w in ["snr", "min_snr", "edm"]:
        ref = diffusion_loss(den, x0, target="x0", weighting_name=w, t=t, eps=eps)
        for kind in KINDS:
            other = diffusion_loss(den, x0, target=kind, weighting_name=w, t=t, eps=eps)
            torch.testing.assert_close(other, ref, rtol=1e-9, atol=1e-12)


def test_weighting_values():
    p = VPLinear()
    c = p.coefficients(torch.tensor([0.05, 0.5, 0.9], dtype=F))
    snr = (c.alpha / c.sigma) ** 2
    torch.testing.assert_close(weighting("min_snr", c, "eps", snr_cap=5.0), snr.clamp(max=5) / snr)
    torch.testing.assert_close(weighting("min_snr", c, "v", snr_cap=5.0), snr.clamp(max=5) / (snr + 1))
    torch.testing.assert_close(weighting("sigma2", c, "score"), c.sigma**2)
    ce = EDM().coefficients(torch.tensor([0.1, 1.0, 10.0], dtype=F))
    s = ce.sigma
    torch.testing.assert_close(weighting("edm", ce, "x0"), (s**2 + 0.25) / (s * 0.5) ** 2)
    with pytest.raises(ValueError, match="unknown weighting 'foo'"):
        weighting("foo", c, "eps")


def test_exact_denoiser_minimises_the_loss():
    """The exact posterior mean is the optimum: any perturbation raises the expected loss."""
    m = random_mixture(2, 3, seed=4)
    path = VPLinear()
    exact = m.denoiser(path)
    x0 = m.sample(20000, gen(16))
    eps = torch.randn(x0.shape, generator=gen(17), dtype=F)
    t = Uniform()(20000, path, gen(18))
    base = diffusion_loss(exact, x0, target="eps", t=t, eps=eps).mean()

    class Shifted:
        def __init__(self, d):
            self.path, self.d = path, d

        def __call__(self, x, t, kind="eps", **cond):
            return exact(x, t, kind=kind) + self.d

    for d in (0.05, -0.05):
        assert diffusion_loss(Shifted(d), x0, target="eps", t=t, eps=eps).mean() > base + 0.5 * d**2 * 0.9


def test_time_samplers():
    n = 20000
    rf = RectifiedFlow()
    t = LogitNormal(0.5, 0.8)(n, rf, gen(19))
    z = torch.logit(t)
    assert abs(float(z.mean()) - 0.5) < 4 * 0.8 / math.sqrt(n)
    assert abs(float(z.std()) - 0.8) < 4 * 0.8 / math.sqrt(2 * n)
    s = LogNormal()(n, EDM(), gen(20))
    ln = s.log()
    assert abs(float(ln.mean()) + 1.2) < 0.05 and abs(float(ln.std()) - 1.2) < 0.05
    k = Uniform()(n, DDPMDiscrete(T=10), gen(21))
    assert set(k.long().tolist()) == set(range(10))
    counts = torch.bincount(k.long(), minlength=10).to(F)
    assert (counts - n / 10).abs().max() < 5 * math.sqrt(n * 0.1 * 0.9)
    with pytest.raises(ValueError, match="unknown time sampler"):
        make_time_sampler("beta")
