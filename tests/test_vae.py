"""VAE maths (scorelab.vae) and networks (scorelab.nets.vae) against known answers.

Ground truth: closed forms for Gaussians, and the linear-Gaussian VAE (probabilistic PCA,
x = W z + b + s noise), whose log p(x), posterior and importance-weight moments are all Gaussian
integrals. Monte Carlo comparisons use 4 standard errors (each SE is estimated from the same samples
or derived in the comment next to it); exact identities are compared at float64 precision.
"""

import math

import pytest
import torch

from scorelab.interpolation import lerp, slerp
from scorelab.nets.vae import ConvVAEConfig, MLPVAEConfig, build_vae_nets
from scorelab.quantize import discretized_gaussian_log_prob, nats_to_bits_per_dim, to_model
from scorelab.random import generators_for_seeds
from scorelab.vae import (
    BernoulliDecoder,
    DiagonalGaussian,
    DiscretizedGaussianDecoder,
    GaussianDecoder,
    active_units,
    binarize,
    elbo_terms,
    generate,
    interpolate_latents,
    iwae_bound,
    kl_standard_normal,
    latent_traversal,
    make_decoder,
    reparameterize,
    sample_prior,
    standard_normal_log_prob,
)

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------
# Posterior, KL, reparameterization
# --------------------------------------------------------------------------------------
def test_kl_closed_form_matches_monte_carlo():
    g = _gen(0)
    mean = torch.randn(4, 3, generator=g, dtype=F64)
    log_var = torch.randn(4, 3, generator=g, dtype=F64)
    q = DiagonalGaussian(mean, log_var)
    z = q.rsample(g, n=200_000)  # (N, B, L)
    terms = q.log_prob(z) - standard_normal_log_prob(z)  # (N, B): log q - log p, mean = KL
    mc, se = terms.mean(0), terms.std(0) / math.sqrt(z.shape[0])
    kl = kl_standard_normal(mean, log_var)
    assert kl.shape == (4,)
    assert torch.all((mc - kl).abs() < 4 * se), (mc, kl, se)
    torch.testing.assert_close(q.log_prob(z[:3]), torch.distributions.Normal(mean, log_var.mul(0.5).exp()).log_prob(z[:3]).sum(-1))
    assert float(kl_standard_normal(torch.zeros(2, 5), torch.zeros(2, 5)).abs().max()) == 0.0


def test_reparameterization_gradient_of_quadratic():
    """f(z) = sum_j a_j z_j^2 + c_j z_j: E_q f = sum a (mu^2 + sigma^2) + c mu, so
    d/dmu = 2 a mu + c and d/dlog_var = a sigma^2. The pathwise estimate is averaged over N draws;
    its SE comes from the per-draw gradients (one row of the expanded parameters per draw)."""
    g = _gen(1)
    L, N = 3, 100_000
    mu0, lv0 = torch.randn(L, generator=g, dtype=F64), torch.randn(L, generator=g, dtype=F64)
    a, c = torch.rand(L, generator=g, dtype=F64) + 0.5, torch.randn(L, generator=g, dtype=F64)
    mu = mu0.expand(N, L).clone().requires_grad_(True)
    lv = lv0.expand(N, L).clone().requires_grad_(True)
    z = reparameterize(mu, lv, generator=g)  # (N, L): one draw per row
    (a * z.square() + c * z).sum().backward()
    for grad, exact in ((mu.grad, 2 * a * mu0 + c), (lv.grad, a * lv0.exp())):
        est, se = grad.mean(0), grad.std(0) / math.sqrt(N)
        assert torch.all((est - exact).abs() < 4 * se), (est, exact, se)


def test_reparameterize_batch_independent_and_shapes():
    mean, log_var = torch.randn(5, 4), torch.randn(5, 4)
    z5 = reparameterize(mean, log_var, generator_list(range(5)), n=3)
    z2 = reparameterize(mean[:2], log_var[:2], generator_list(range(2)), n=3)
    assert z5.shape == (3, 5, 4)
    torch.testing.assert_close(z5[:, :2], z2, rtol=0, atol=0)
    assert reparameterize(mean, log_var, _gen(0)).shape == (5, 4)
    with pytest.raises(ValueError, match="shape"):
        reparameterize(mean, log_var[:, :2])


def generator_list(seeds):
    return generators_for_seeds(list(seeds))


# --------------------------------------------------------------------------------------
# Decoders: normalized, and equal to torch.distributions
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("variance", ["fixed", "global", "pixel", "output"])
def test_gaussian_decoder_matches_torch_distributions(variance):
    g = _gen(2)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    dec = GaussianDecoder(variance, std=0.3, shape=(2, 4, 4)).double()
    params = torch.randn(3, dec.num_params, 2, 4, 4, generator=g, dtype=F64)
    with torch.no_grad():
        for p in dec.parameters():  # learned scales away from their initial value
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=F64))
    std = torch.exp(dec.log_scale(params)).expand_as(x)
    if variance == "output":
        torch.testing.assert_close(std, 0.3 * params[:, 1].exp())
    ref = torch.distributions.Normal(params[:, 0], std).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(dec.log_prob(x, params), ref, rtol=1e-12, atol=1e-12)
    if variance in ("global", "pixel"):
        dec.log_prob(x, params).sum().backward()
        assert dec.log_std.grad is not None and bool(dec.log_std.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="params must have shape"):
        dec.log_prob(x, params[:, :, :1])


def test_gaussian_decoder_sample_moments():
    dec = GaussianDecoder("output", std=0.5)
    params = torch.empty(200_000, 2, 1, dtype=F64)  # (N, P=2, D=1): mu = 0.3, log s - log std = -0.7
    params[:, 0], params[:, 1] = 0.3, -0.7
    x = dec.sample(params, _gen(3))
    s = 0.5 * math.exp(-0.7)
    # mean: SE s / sqrt(N); variance: SE s^2 sqrt(2 / N) (Gaussian fourth moment)
    assert abs(float(x.mean()) - 0.3) < 4 * s / math.sqrt(len(x))
    assert abs(float(x.var()) - s**2) < 4 * s**2 * math.sqrt(2 / len(x))


def test_bernoulli_decoder_normalized_and_matches_torch():
    g = _gen(4)
    logits = 3 * torch.randn(6, 1, 5, generator=g, dtype=F64)
    x = 2 * (torch.rand(6, 5, generator=g, dtype=F64) < 0.5).to(F64) - 1
    dec = BernoulliDecoder()
    ref = torch.distributions.Bernoulli(logits=logits[:, 0]).log_prob((x + 1) / 2).sum(1)
    torch.testing.assert_close(dec.log_prob(x, logits), ref)
    one = logits[:, :, :1]  # D = 1: the two values' probabilities sum to 1
    total = dec.log_prob(-torch.ones(6, 1, dtype=F64), one).exp() + dec.log_prob(torch.ones(6, 1, dtype=F64), one).exp()
    torch.testing.assert_close(total, torch.ones(6, dtype=F64))
    with pytest.raises(ValueError, match="binary"):
        dec.log_prob(torch.zeros(6, 5, dtype=F64), logits)
    b = binarize(torch.full((100_000,), 0.5, dtype=F64), _gen(5))  # P(+1) = 0.75, SE sqrt(p(1-p)/N)
    assert set(b.unique().tolist()) <= {-1.0, 1.0}
    assert abs(float((b > 0).double().mean()) - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 1e5)


def test_discretized_gaussian_decoder_sums_to_one_over_256_values():
    g = _gen(6)
    dec = DiscretizedGaussianDecoder(std=0.1)
    # one (mean, log-scale) per row, including a narrow, a wide and an off-range Gaussian
    mean = torch.cat([torch.randn(5, generator=g, dtype=F64), torch.tensor([0.0, 1.5, -3.0], dtype=F64)])
    lsc = torch.cat([torch.randn(5, generator=g, dtype=F64), torch.tensor([-4.0, 2.0, 0.0], dtype=F64)])
    n = len(mean)
    k = torch.arange(256, dtype=torch.uint8).repeat(n)  # every value for every row
    params = torch.stack([mean, lsc], 1).repeat_interleave(256, 0)[:, :, None]  # (256 n, 2, D=1)
    lp = dec.log_prob(k[:, None], params).view(n, 256)
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(n, dtype=F64), rtol=1e-12, atol=1e-12)
    # the same numbers as the project's one decoder, from uint8 or model-space input
    ref = discretized_gaussian_log_prob(k, params[:, 0, 0], dec.log_scale(params)[:, 0].exp())
    torch.testing.assert_close(lp.flatten(), ref, rtol=0, atol=0)
    torch.testing.assert_close(dec.log_prob(to_model(k[:, None], F64), params), lp.flatten(), rtol=0, atol=0)
    assert dec.discrete and not GaussianDecoder().discrete
    s = dec.sample(params[:512], _gen(7))  # samples are grid values
    torch.testing.assert_close(s, to_model(((s + 1) * 127.5).round().to(torch.uint8), F64))


def test_discretized_decoder_scale_is_softly_capped():
    """s = 0.1 exp(l) for small l, increasing, never above max_std, so a wild early training step stays
    finite (at s ~ 1e14 every bin's probability rounds to 0 in float64) and keeps a gradient."""
    dec = DiscretizedGaussianDecoder(std=0.1, max_std=10.0)
    raw = torch.tensor([-3.0, 0.0, 1.0, 30.0, 1000.0], dtype=F64)
    params = torch.stack([torch.zeros(5, dtype=F64), raw], 1)[:, :, None].requires_grad_(True)  # (5, 2, 1)
    s = dec.log_scale(params)[:, 0].exp().detach()
    # log s = log 10 - softplus(log 10 - log 0.1 - l) = l + log 0.1 - log(1 + e^(l - log 100)): rel. 5e-4 at l = -3
    assert float(s[0]) == pytest.approx(0.1 * math.exp(-3), rel=1e-3)
    assert bool((s[1:4] > s[:3]).all()) and bool((s <= 10.0 * (1 + 1e-12)).all()) and float(s[-1]) == pytest.approx(10.0)
    lp = dec.log_prob(torch.zeros(5, 1, dtype=torch.uint8), params)
    assert torch.isfinite(lp).all()
    lp.sum().backward()
    assert float(params.grad[3, 1, 0]) != 0.0


def test_make_decoder_registry():
    assert isinstance(make_decoder("bernoulli"), BernoulliDecoder)
    assert make_decoder("gaussian", variance="output").num_params == 2
    with pytest.raises(ValueError, match="unknown decoder"):
        make_decoder("laplace")
    with pytest.raises(ValueError, match="variance"):
        GaussianDecoder("diagonal")
    with pytest.raises(ValueError, match="shape"):
        GaussianDecoder("pixel")


# --------------------------------------------------------------------------------------
# Linear-Gaussian VAE (probabilistic PCA): ELBO and IWAE against the exact log p(x)
# --------------------------------------------------------------------------------------
class PPCA:
    """x = W z + b + s e, z, e ~ N(0, I): p(x) = N(b, W W^T + s^2 I); the posterior is
    N(M^-1 W^T (x - b), s^2 M^-1) with M = W^T W + s^2 I (Tipping & Bishop 1999)."""

    def __init__(self, W, b, s):
        self.W, self.b, self.s = W, b, s
        D, L = W.shape
        self.C = W @ W.T + s**2 * torch.eye(D, dtype=F64)
        M = W.T @ W + s**2 * torch.eye(L, dtype=F64)
        self.Minv = torch.linalg.inv(M)
        self.post_cov = s**2 * self.Minv  # (L, L)
        self.decoder = GaussianDecoder("fixed", std=s)

    def log_p(self, x):
        return torch.distributions.MultivariateNormal(self.b, self.C).log_prob(x)

    def post_mean(self, x):
        return (x - self.b) @ self.W @ self.Minv.T

    def decode(self, z):
        return (z @ self.W.T + self.b)[:, None]  # (B, P=1, D)

    def sample(self, n, g):
        return torch.randn(n, len(self.b), generator=g, dtype=F64) @ torch.linalg.cholesky(self.C).T + self.b


def _log_moment(m, pm, pS, qm, qv):
    """log E_q[(p/q)^m] = log ∫ p^m q^(1-m) dz for p = N(pm, pS) (full), q = N(qm, diag qv), per row.

    The integrand is exp(-z^T A z / 2 + b^T z + c) times normalizers, A = m P_p + (1-m) P_q (needs A > 0)."""
    L = pS.shape[0]
    Pp = torch.linalg.inv(pS)
    out = []
    for i in range(pm.shape[0]):
        Pq = torch.diag(1 / qv[i])
        A = m * Pp + (1 - m) * Pq
        b = m * Pp @ pm[i] + (1 - m) * Pq @ qm[i]
        c = -0.5 * (m * pm[i] @ Pp @ pm[i] + (1 - m) * qm[i] @ Pq @ qm[i])
        lognorm = -0.5 * m * torch.logdet(2 * math.pi * pS) - 0.5 * (1 - m) * torch.logdet(2 * math.pi * torch.diag(qv[i]))
        out.append(c + 0.5 * b @ torch.linalg.solve(A, b) + 0.5 * L * math.log(2 * math.pi) - 0.5 * torch.logdet(A) + lognorm)
    return torch.stack(out)


def test_exact_posterior_gives_log_p_exactly():
    """With orthogonal columns of W the posterior covariance s^2 M^-1 is diagonal, so the encoder can be
    exact; then every log weight log p(x|z) + log p(z) - log q(z|x) equals log p(x) for every z."""
    g = _gen(10)
    D, L = 5, 3
    Q, _ = torch.linalg.qr(torch.randn(D, L, generator=g, dtype=F64))
    model = PPCA(Q * torch.tensor([2.0, 1.0, 0.5], dtype=F64), torch.randn(D, generator=g, dtype=F64), 0.4)
    assert torch.allclose(model.post_cov, torch.diag(torch.diag(model.post_cov)), atol=1e-14)
    x = model.sample(6, g)
    encode = lambda x: (model.post_mean(x), torch.diag(model.post_cov).log().expand(x.shape[0], L))
    logp = model.log_p(x)
    t = elbo_terms(x, encode, model.decode, model.decoder, analytic_kl=False, generator=g)
    torch.testing.assert_close(t.elbo, logp, rtol=0, atol=1e-10)
    for k in (1, 7, 100):
        r = iwae_bound(x, encode, model.decode, model.decoder, k, generator=g, chunk_size=30)
        torch.testing.assert_close(r.bound, logp, rtol=0, atol=1e-10)
        torch.testing.assert_close(r.ess, torch.full_like(logp, float(k)), rtol=1e-10, atol=0)
    # analytic KL + Monte Carlo reconstruction: log p(x) in expectation (SE from the draws)
    R = 20_000
    xr = x.repeat(R, 1)
    t = elbo_terms(xr, encode, model.decode, model.decoder, generator=g)
    d = (t.elbo - logp.repeat(R)).view(R, -1)
    assert torch.all(d.mean(0).abs() < 4 * d.std(0) / math.sqrt(R))


@pytest.fixture(scope="module")
def ppca_iwae():
    """A mean-field encoder that is off: q = N(post_mean + 1.0 sd, diag 2.5 var) with (sd^2, var) the
    posterior's marginal variances; 4 data points, each repeated R = 2000 times, k = 1000 draws."""
    g = _gen(11)
    D, L, R, K = 4, 2, 2000, 1000
    model = PPCA(torch.randn(D, L, generator=g, dtype=F64), torch.randn(D, generator=g, dtype=F64), 0.5)
    x = model.sample(4, g)
    pv = torch.diag(model.post_cov).expand(4, L)
    qm, qv = model.post_mean(x) + 1.0 * pv.sqrt(), 2.5 * pv
    encode = lambda xx: (qm.repeat(xx.shape[0] // 4, 1), qv.log().repeat(xx.shape[0] // 4, 1))
    with torch.no_grad():
        r = iwae_bound(x.repeat(R, 1), encode, model.decode, model.decoder, K, generator=g, chunk_size=50, return_log_weights=True)
    pm = model.post_mean(x)
    chi2 = _log_moment(2, pm, model.post_cov, qm, qv).exp() - 1  # Var(w / p(x)) under q
    mu3 = _log_moment(3, pm, model.post_cov, qm, qv).exp() - 3 * (chi2 + 1) + 2  # E[(w / p(x) - 1)^3]
    # KL(q || p(z|x)) = log p(x) - ELBO, closed form
    q = torch.distributions.MultivariateNormal(qm, torch.diag_embed(qv))
    post = torch.distributions.MultivariateNormal(pm, model.post_cov)
    return dict(model=model, x=x, r=r, R=R, K=K, chi2=chi2, mu3=mu3, kl_post=torch.distributions.kl_divergence(q, post),
                logp=model.log_p(x), encode=encode)


def _bound_from_prefix(log_w, k):
    return torch.logsumexp(log_w[:k], 0) - math.log(k)


def test_iwae_moments_closed_form(ppca_iwae):
    """The closed-form chi^2 is the variance of the normalized weights the bound actually drew."""
    d = ppca_iwae
    wn = torch.exp(d["r"].log_weights - d["logp"].repeat(d["R"]))  # w / p(x): mean 1, variance chi^2
    # SE of a sample variance ~ sqrt((E(w-1)^4 - chi^4) / n); estimated from the same draws
    dev2 = (wn - 1).square().flatten()
    assert abs(float(dev2.mean()) - float(d["chi2"][0])) < 4 * float(dev2.std()) / math.sqrt(dev2.numel())


def test_iwae_below_log_p_rises_with_k_and_converges(ppca_iwae):
    d = ppca_iwae
    lw, R = d["r"].log_weights, d["R"]
    logp = d["logp"].repeat(R)
    N = logp.numel()
    bounds = {k: _bound_from_prefix(lw, k) for k in (1, 10, 100, 1000)}
    torch.testing.assert_close(bounds[1000], d["r"].bound, rtol=0, atol=1e-12)
    chi2, mu3 = float(d["chi2"][0]), float(d["mu3"][0])  # the same for every x here (same offset in sd units)
    for k, b in bounds.items():
        gap = logp - b  # log p(x) - L_k per row: >= 0 in expectation
        se = float(gap.std()) / math.sqrt(N)
        assert float(gap.mean()) > -4 * se, (k, float(gap.mean()), se)
        if k >= 100:
            # log p - E L_k = chi^2 / (2k) + r_k with |r_k| <= (|mu3| / 3 + 3 chi^4 / 4) / k^2 (expansion of
            # E log(1 + e), Var e = chi^2 / k, E e^3 = mu3 / k^2, E e^4 = 3 chi^4 / k^2 + O(k^-3))
            pred, rest = chi2 / (2 * k), (abs(mu3) / 3 + 0.75 * chi2**2) / k**2
            assert abs(float(gap.mean()) - pred) < 4 * se + rest, (k, float(gap.mean()), pred, se)
    # rises with k: paired differences on nested draws; E[L_k2 - L_k1] ~ chi^2 (1/k1 - 1/k2) / 2 > 0
    for k1, k2 in ((1, 10), (10, 100), (100, 1000)):
        diff = bounds[k2] - bounds[k1]
        assert float(diff.mean()) > 3 * float(diff.std()) / math.sqrt(N), (k1, k2)
    # per-example standard error: the delta-method value matches the spread over repeats of one x
    spread = d["r"].bound.view(R, 4).std(0)  # relative SE of a std over R = 2000 repeats ~ 2-5% (heavy tails)
    torch.testing.assert_close(d["r"].stderr.view(R, 4).mean(0), spread, rtol=0.15, atol=0)
    assert torch.all((d["r"].ess >= 1) & (d["r"].ess <= d["K"]))


def test_iwae_k1_is_the_elbo_in_expectation(ppca_iwae):
    d = ppca_iwae
    R = d["R"]
    elbo = (d["logp"] - d["kl_post"]).repeat(R)  # closed-form ELBO = log p(x) - KL(q || p(z|x))
    l1 = d["r"].log_weights[0]  # L_1 = one log weight
    diff = l1 - elbo
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(diff.numel())
    m = d["model"]
    xr = d["x"].repeat(R, 1)
    for analytic in (True, False):
        t = elbo_terms(xr, d["encode"], m.decode, m.decoder, generator=_gen(12), analytic_kl=analytic)
        diff = t.elbo - elbo
        assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(diff.numel())


def test_elbo_beta_changes_only_the_loss():
    model = PPCA(torch.randn(3, 2, generator=_gen(13), dtype=F64), torch.zeros(3, dtype=F64), 0.5)
    x = model.sample(4, _gen(14))
    enc = lambda x: (model.post_mean(x), torch.zeros(x.shape[0], 2, dtype=F64))
    t1 = elbo_terms(x, enc, model.decode, model.decoder, beta=1.0, generator=_gen(0))
    t4 = elbo_terms(x, enc, model.decode, model.decoder, beta=4.0, generator=_gen(0))
    torch.testing.assert_close(t1.elbo, t4.elbo, rtol=0, atol=0)
    torch.testing.assert_close(t1.loss, -t1.elbo)
    torch.testing.assert_close(t4.loss, -t4.reconstruction + 4 * t4.kl)
    with pytest.raises(ValueError, match="beta"):
        elbo_terms(x, enc, model.decode, model.decoder, beta=-1.0)


# --------------------------------------------------------------------------------------
# Latent-space tools
# --------------------------------------------------------------------------------------
def test_active_units():
    g = _gen(15)
    means = torch.randn(5000, 4, generator=g, dtype=F64) * torch.tensor([1.0, 0.3, 0.05, 0.0], dtype=F64)
    au = active_units(means)  # variances 1, 0.09, 0.0025, 0 against the threshold 0.01
    assert au.count == 2 and au.active.tolist() == [True, True, False, False]
    torch.testing.assert_close(au.variance, means.var(0))
    with pytest.raises(ValueError, match="N >= 2"):
        active_units(torch.zeros(1, 4))


def test_latent_traversal_and_interpolation():
    z = torch.tensor([0.5, -1.0, 2.0])
    t = latent_traversal(z, dims=[0, 2], n=5, span=2.0)
    assert t.shape == (2, 5, 3)
    torch.testing.assert_close(t[0, :, 0], torch.linspace(-2, 2, 5))
    torch.testing.assert_close(t[1, :, 2], torch.linspace(-2, 2, 5))
    assert torch.all(t[0, :, 1:] == z[1:]) and torch.all(t[1, :, :2] == z[:2])
    assert latent_traversal(torch.zeros(4, 3), values=[0.0, 1.0]).shape == (4, 3, 2, 3)
    with pytest.raises(ValueError, match="dims"):
        latent_traversal(z, dims=[3])
    z0, z1 = torch.randn(3, generator=_gen(16)), torch.randn(3, generator=_gen(17))
    s = torch.linspace(0, 1, 4, dtype=F64)
    torch.testing.assert_close(interpolate_latents(z0, z1, 4, "linear"), lerp(z0, z1, s))
    torch.testing.assert_close(interpolate_latents(z0, z1, 4), slerp(z0, z1, s))


# --------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------
def test_conv_vae_nets_shapes_size_and_end_to_end_step():
    cfg = ConvVAEConfig()
    enc, dec = build_vae_nets(cfg)
    n_params = sum(p.numel() for m in (enc, dec) for p in m.parameters())
    assert 0.5e6 <= n_params <= 1.5e6, n_params
    x = to_model(torch.randint(0, 256, (3, 1, 28, 28), generator=_gen(18), dtype=torch.uint8))
    lik = DiscretizedGaussianDecoder()
    t = elbo_terms(x, enc, dec, lik, generator=_gen(19))
    assert t.elbo.shape == (3,) and torch.isfinite(t.loss).all()
    t.loss.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())
    with torch.no_grad():
        r = iwae_bound(x, enc, dec, lik, 5, generator=_gen(20))
        img = generate(dec, lik, sample_prior(2, (cfg.latent_dim,), _gen(21)), _gen(22), mode="sample")
    assert r.bound.shape == (3,) and img.shape == (2, 1, 28, 28)
    assert torch.isfinite(nats_to_bits_per_dim(-r.bound, 784)).all()


def test_vae_nets_conditioning_odd_sizes_and_config_errors():
    cfg = ConvVAEConfig(in_channels=3, image_size=(13, 17), channels=(8, 16), hidden=32, latent_dim=4, num_classes=10)
    enc, dec = build_vae_nets(cfg)
    x = torch.randn(2, 3, 13, 17)
    mean, log_var = enc(x, torch.tensor([1, 10]))  # 10 = the null label
    assert mean.shape == (2, 4) and log_var.shape == (2, 4)
    p1, p2 = dec(mean, torch.tensor([0, 0])), dec(mean, torch.tensor([5, 5]))
    assert p1.shape == (2, 2, 3, 13, 17) and not torch.allclose(p1, p2)
    # labels through the maths: y is repeated for the n B latents decoded together
    lik, y = GaussianDecoder("output"), torch.tensor([3, 7])
    t = elbo_terms(x, enc, dec, lik, n_samples=3, generator=generator_list([0, 1]), y=y)
    r = iwae_bound(x, enc, dec, lik, 4, generator=generator_list([0, 1]), chunk_size=3, y=y)
    assert t.elbo.shape == (2,) and r.bound.shape == (2,)
    torch.testing.assert_close(generate(dec, lik, mean, y=y), dec(mean, y)[:, 0])
    t0 = elbo_terms(x[:1], enc, dec, lik, n_samples=3, generator=generator_list([0]), y=y[:1])
    torch.testing.assert_close(t0.elbo, t.elbo[:1])  # per-example generators: batch-independent
    assert ConvVAEConfig.from_dict(cfg.to_dict()) == cfg
    menc, mdec = build_vae_nets(MLPVAEConfig(dim=5, latent_dim=2, out_params=1))
    assert mdec(menc(torch.randn(4, 5))[0]).shape == (4, 1, 5)
    with pytest.raises(ValueError, match="ConvVAEConfig.channels"):
        ConvVAEConfig(channels=(0,))
    with pytest.raises(ValueError, match="ConvVAEConfig.latent_dim"):
        ConvVAEConfig(latent_dim=0)
    with pytest.raises(ValueError, match="unknown field"):
        ConvVAEConfig.from_dict({"latent": 3})
    with pytest.raises(ValueError, match="MLPVAEConfig.hidden"):
        MLPVAEConfig(hidden=())
    with pytest.raises(ValueError, match="unconditional"):
        build_vae_nets(ConvVAEConfig())[0](torch.zeros(1, 1, 28, 28), torch.tensor([0]))
    with pytest.raises(ValueError, match="expects x of shape"):
        enc(torch.randn(2, 1, 13, 17))
