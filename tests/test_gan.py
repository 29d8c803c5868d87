"""GANs (seed 001): the game's losses and optimum, the vanishing gradient, R1, AdaIN and the nets."""

import math

import pytest
import torch

from scorelab import gan
from scorelab.data.mixture import GaussianMixture, eight_gaussians_mixture
from scorelab.nets.gan import (
    DCGANDiscriminator,
    DCGANDiscriminatorConfig,
    DCGANGenerator,
    DCGANGeneratorConfig,
    MLPDiscriminator,
    MLPDiscriminatorConfig,
    MLPGenerator,
    StyleGANGenerator,
    StyleGANGeneratorConfig,
    adain,
    build_discriminator,
    build_generator,
    mix_styles,
    random_crossover,
)
from scorelab.random import generators_for_seeds

pytestmark = pytest.mark.usefixtures("one_thread")

F = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------
# The optimal discriminator and the value of the game (Goodfellow et al. 2014, Prop. 1, Thm. 1)
# --------------------------------------------------------------------------------------
MU_G, S_G = 1.5, 0.7  # p_data = N(0, 1), p_G = N(MU_G, S_G^2): G(z) = MU_G + S_G z


def _one_d_problem():
    p = GaussianMixture([1.0], [[0.0]], [1.0])
    q = GaussianMixture([1.0], [[MU_G]], [S_G])
    G = torch.nn.Linear(1, 1).double()  # a fixed generator whose p_G is known
    with torch.no_grad():
        G.weight.fill_(S_G)
        G.bias.fill_(MU_G)
    return p, q, G


def _features(x):  # (N, 1) -> (N, 3): (1, x, x^2)
    return torch.cat([torch.ones_like(x), x, x**2], 1)


class QuadraticLogitD(torch.nn.Module):
    """D(x) = sigmoid(theta . (1, x, x^2)): contains D* exactly, since log p_data - log p_G of two
    Gaussians is quadratic in x."""

    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(3, dtype=F))

    def forward(self, x):
        return _features(x) @ self.theta  # (B,)


def test_trained_discriminator_is_the_optimal_one():
    """With G fixed, maximising the game's value over D (the seed's D step, run to convergence)
    gives D*(x) = p_data / (p_data + p_G) pointwise.

    Tolerance. D is trained on n samples of each side, so theta_hat is an M-estimator: theta_hat -
    theta* ~ N(0, C), C = H^-1 S H^-1 / n with H = E_p[s(1-s) f f^T] + E_q[s(1-s) f f^T] (minus the
    Hessian of the objective) and S = Cov_p[(1-s) f] + Cov_q[s f] (covariance of its per-pair
    gradient), s = D*(x), f = (1, x, x^2); both are computed at theta* by quadrature. Pointwise,
    D_hat(x) - D*(x) ~ s(1-s) f(x)^T (theta_hat - theta*) (delta method), standard error
    SE(x) = s(1-s) sqrt(f^T C f). By Cauchy-Schwarz sup_x |z(x)| <= ||theta_hat - theta*||_{C^-1},
    a chi_3 variable: P(> 5) = 1.5e-5. So we assert |D_hat - D*| <= 5 SE(x) on a grid, the
    Mahalanobis distance < 5, and that the tolerance is small (max 5 SE < 0.1, D in [0, 1])."""
    p, q, G = _one_d_problem()
    n = 20000
    g = gen(0)
    x = p.sample(n, g)  # (n, 1) real
    with torch.no_grad():
        xg = G(torch.randn(n, 1, generator=g, dtype=F))  # (n, 1) generated
    D = QuadraticLogitD()
    opt = torch.optim.LBFGS(D.parameters(), lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = gan.discriminator_terms(D, x, xg, "minimax").loss.mean()  # = -V(D, G) on the samples
        loss.backward()
        return loss

    opt.step(closure)
    closure()
    assert D.theta.grad.abs().max() < 1e-6  # converged

    # theta* from l* = log N(x; 0, 1) - log N(x; mu, s^2) = c + b x + a x^2
    a, b, c = 0.5 * (1 / S_G**2 - 1), -MU_G / S_G**2, MU_G**2 / (2 * S_G**2) + math.log(S_G)
    theta_star = torch.tensor([c, b, a], dtype=F)
    pts, w = gan.quadrature_grid(-12, 12, 4001)
    P, Q, f = p.log_prob(pts).exp(), q.log_prob(pts).exp(), _features(pts)
    s = torch.sigmoid(f @ theta_star)
    torch.testing.assert_close(s, gan.optimal_discriminator(p.log_prob(pts), q.log_prob(pts)))  # same D*

    def cov(dens, v):
        m = (w * dens) @ v
        return torch.einsum("n,ni,nj->ij", w * dens, v, v) - m[:, None] * m[None]

    H = torch.einsum("n,ni,nj->ij", w * (P + Q) * s * (1 - s), f, f)
    S = cov(P, (1 - s)[:, None] * f) + cov(Q, s[:, None] * f)
    Hi = torch.linalg.inv(H)
    C = Hi @ S @ Hi / n
    delta = D.theta.detach() - theta_star
    mahalanobis = float(delta @ torch.linalg.solve(C, delta)) ** 0.5

    xs = torch.linspace(-3, 4, 141, dtype=F)[:, None]
    d_star = gan.optimal_discriminator(p.log_prob(xs), q.log_prob(xs))
    with torch.no_grad():
        d_hat = torch.sigmoid(D(xs))
    se = d_star * (1 - d_star) * torch.einsum("ni,ij,nj->n", _features(xs), C, _features(xs)).sqrt()
    err = (d_hat - d_star).abs()
    print(f"max |D_hat - D*| = {err.max():.4f}, max z = {(err / se).max():.2f}, Mahalanobis = {mahalanobis:.2f}, max SE = {se.max():.4f}")
    assert mahalanobis < 5
    assert (err <= 5 * se).all()
    assert 5 * se.max() < 0.1

    # the trained D maximises the empirical value, so it beats D* on its own training samples
    with torch.no_grad():
        v_hat = gan.game_value(D(x), D(xg)).mean()
    v_star = gan.game_value(gan.optimal_logit(p.log_prob(x), q.log_prob(x)), gan.optimal_logit(p.log_prob(xg), q.log_prob(xg))).mean()
    assert v_hat >= v_star - 1e-12


def test_value_at_optimum_is_minus_log4_plus_2jsd_1d():
    """Quadrature: V(D*, G) computed directly equals -log 4 + 2 JSD (two independent integrals);
    Monte Carlo: the mean of log D*(x) + log(1 - D*(G(z))) over n independent pairs equals it within
    4 standard errors (SE = std of the per-pair values / sqrt(n); the quadrature error is ~1e-15)."""
    p, q, G = _one_d_problem()
    og = gan.optimal_game(p.log_prob, q.log_prob, -12, 12, 4001)
    assert abs(og.mass_data - 1) < 1e-12 and abs(og.mass_g - 1) < 1e-12
    assert abs(og.value - og.bound) < 1e-12
    assert -math.log(4) < og.value < 0 and 0 < og.jsd < math.log(2)
    n = 40000
    g = gen(1)
    x = p.sample(n, g)
    with torch.no_grad():
        xg = G(torch.randn(n, 1, generator=g, dtype=F))
    v = gan.game_value(gan.optimal_logit(p.log_prob(x), q.log_prob(x)), gan.optimal_logit(p.log_prob(xg), q.log_prob(xg)))
    se = float(v.std()) / n**0.5
    print(f"V(D*, G): quadrature -log 4 + 2 JSD = {og.bound:.5f}, Monte Carlo {float(v.mean()):.5f} +- {se:.5f}")
    assert abs(float(v.mean()) - og.bound) < 4 * se
    # the extremes of Theorem 1: p_G = p_data gives -log 4; disjoint supports give JSD = log 2, V = 0
    same = gan.optimal_game(p.log_prob, p.log_prob, -12, 12, 2001)
    assert abs(same.value + math.log(4)) < 1e-12 and abs(same.jsd) < 1e-12
    far = GaussianMixture([1.0], [[60.0]], [1.0])
    apart = gan.optimal_game(p.log_prob, far.log_prob, -20, 80, 20001)
    assert abs(apart.jsd - math.log(2)) < 1e-9 and abs(apart.value) < 1e-9


def test_value_at_optimum_2d_mixture():
    """The same identity and Monte Carlo check in 2-D: eight Gaussians vs a broad Gaussian generator."""
    p = eight_gaussians_mixture(std=0.25)
    q = GaussianMixture([1.0], [[0.0, 0.0]], [1.5])
    og = gan.optimal_game(p.log_prob, q.log_prob, -10, 10, 401, dim=2)
    assert abs(og.mass_data - 1) < 1e-9 and abs(og.mass_g - 1) < 1e-9
    assert abs(og.value - og.bound) < 1e-9
    n = 20000
    x, xg = p.sample(n, gen(2)), q.sample(n, gen(3))
    v = gan.game_value(gan.optimal_logit(p.log_prob(x), q.log_prob(x)), gan.optimal_logit(p.log_prob(xg), q.log_prob(xg)))
    se = float(v.std()) / n**0.5
    assert abs(float(v.mean()) - og.bound) < 4 * se


# --------------------------------------------------------------------------------------
# The vanishing gradient of the minimax generator loss (the seed's "问题")
# --------------------------------------------------------------------------------------
def test_minimax_generator_gradient_vanishes_when_d_wins():
    """At initialisation, after 100 D steps D rejects the fakes (D(G(z)) ~ 1e-3); the generator's
    gradient under the minimax loss log(1 - D(G(z))) is then orders of magnitude smaller than under
    the non-saturating -log D(G(z)). Exactly, per example, it is the non-saturating gradient scaled
    by D / (1 - D) = exp(logit) (checked in float64)."""
    torch.manual_seed(0)
    mix = eight_gaussians_mixture()
    G, D = MLPGenerator().double(), MLPDiscriminator().double()
    opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    g = gen(1)
    for _ in range(100):
        with torch.no_grad():
            fake = G(G.sample_z(256, g).double())
        d = gan.discriminator_terms(D, mix.sample(256, g), fake)
        opt.zero_grad()
        d.loss.mean().backward()
        opt.step()
    lf = D(G(G.sample_z(1024, g).double()))  # (B,) logits of fresh fakes
    d_fake = float(torch.sigmoid(lf.detach()).mean())
    mm = float(gan.gradient_norm(gan.generator_loss(lf, "minimax").mean(), G.parameters()))
    ns = float(gan.gradient_norm(gan.generator_loss(lf, "non_saturating").mean(), G.parameters()))
    print(f"D(G(z)) = {d_fake:.2e}; |grad_G| minimax {mm:.3e}, non-saturating {ns:.3e}, ratio {mm / ns:.2e}")
    assert d_fake < 1e-2
    assert mm / ns < 1e-2
    # the exact chain rule: d/dl log(1 - sigmoid(l)) = exp(l) * d/dl [-log sigmoid(l)]
    params = list(G.parameters())
    g_mm = torch.autograd.grad(gan.generator_loss(lf, "minimax").mean(), params, retain_graph=True)
    weighted = (lf.detach().exp() * gan.generator_loss(lf, "non_saturating")).mean()
    g_w = torch.autograd.grad(weighted, params)
    for a, b in zip(g_mm, g_w):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------------------
# Loss forms and R1
# --------------------------------------------------------------------------------------
LR = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0], dtype=F)
LF = torch.tensor([1.5, -3.0, 0.0, 0.25, -1.0], dtype=F)


def test_losses_equal_their_formulas():
    """Hand-computed logits in float64, compared with the textbook formulas in probabilities."""
    Dr, Df = torch.sigmoid(LR), torch.sigmoid(LF)
    value = torch.log(Dr) + torch.log(1 - Df)
    torch.testing.assert_close(gan.game_value(LR, LF), value)
    for kind in ("minimax", "non_saturating"):  # the seed's D maximises V: its loss is -V
        torch.testing.assert_close(gan.discriminator_loss(LR, LF, kind), -value)
    torch.testing.assert_close(gan.discriminator_loss(LR, LF, "hinge"), torch.clamp(1 - LR, min=0) + torch.clamp(1 + LF, min=0))
    torch.testing.assert_close(gan.generator_loss(LF, "minimax"), torch.log(1 - Df))
    torch.testing.assert_close(gan.generator_loss(LF, "non_saturating"), -torch.log(Df))
    torch.testing.assert_close(gan.generator_loss(LF, "hinge"), -LF)
    # a few by hand: softplus(0) = log 2; the minimax D loss at l_r = l_f = 0 is log 4
    assert gan.discriminator_loss(torch.zeros(1), torch.zeros(1), "minimax").item() == pytest.approx(math.log(4))
    assert gan.discriminator_loss(torch.tensor([0.5]), torch.tensor([-0.5]), "hinge").item() == pytest.approx(1.0)
    # (B, 1) logits are accepted; anything else is an error
    torch.testing.assert_close(gan.generator_loss(LF[:, None], "minimax"), gan.generator_loss(LF, "minimax"))
    with pytest.raises(ValueError, match="kind"):
        gan.generator_loss(LF, "wasserstein")
    with pytest.raises(ValueError, match="same shape"):
        gan.discriminator_loss(LR, LF[:3])
    with pytest.raises(ValueError, match=r"\(B,\)"):
        gan.generator_loss(torch.zeros(2, 3))


def test_losses_stay_finite_for_confident_discriminators():
    """float32 logits of +-1000: the naive log(sigmoid) is -inf; the softplus forms are exact."""
    big = torch.tensor([-1000.0, 1000.0])
    assert torch.isinf(torch.log(torch.sigmoid(big[:1]))).all()  # the failure the softplus form avoids
    torch.testing.assert_close(gan.generator_loss(big, "non_saturating"), torch.tensor([1000.0, 0.0]))
    torch.testing.assert_close(gan.generator_loss(big, "minimax"), torch.tensor([0.0, -1000.0]))
    torch.testing.assert_close(gan.discriminator_loss(big, big.flip(0), "minimax"), torch.tensor([2000.0, 0.0]))
    l = big.clone().requires_grad_(True)
    gan.generator_loss(l, "non_saturating").sum().backward()
    torch.testing.assert_close(l.grad, torch.tensor([-1.0, 0.0]))  # the non-saturating gradient is -(1 - D)


class LinearD(torch.nn.Module):
    """l(x) = a . vec(x) + b on (B, 1, 4, 4) images: grad_x l = a for every x."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(16, generator=gen(4), dtype=F))
        self.b = torch.nn.Parameter(torch.tensor(0.3, dtype=F))

    def forward(self, x):
        return x.flatten(1) @ self.a + self.b


def test_r1_equals_the_analytic_gradient_norm():
    gamma = 2.5
    D = LinearD()
    x = torch.randn(5, 1, 4, 4, generator=gen(5), dtype=F).requires_grad_(True)
    r1 = gan.r1_penalty(D(x), x, gamma)
    torch.testing.assert_close(r1, torch.full((5,), gamma / 2 * float(D.a.detach().pow(2).sum()), dtype=F))
    # differentiable in D's parameters: d/da (gamma/2 ||a||^2) summed over the batch = 5 gamma a
    (ga,) = torch.autograd.grad(r1.sum(), D.a)
    torch.testing.assert_close(ga, 5 * gamma * D.a.detach())
    # quadratic D: l = x^T A x / 2, grad = (A + A^T) x / 2
    A = torch.randn(3, 3, generator=gen(6), dtype=F)
    y = torch.randn(4, 3, generator=gen(7), dtype=F).requires_grad_(True)
    r1q = gan.r1_penalty(0.5 * torch.einsum("bi,ij,bj->b", y, A, y), y, gamma)
    grad = y.detach() @ (0.5 * (A + A.T))  # rows: ((A + A^T)/2 y_b)^T
    torch.testing.assert_close(r1q, gamma / 2 * grad.pow(2).sum(1))
    with pytest.raises(ValueError, match="require grad"):
        gan.r1_penalty(D(x.detach()), x.detach(), gamma)


def test_lazy_r1_and_discriminator_terms():
    """Lazy R1 weighs k every k-th step (average weight 1); discriminator_terms adds r1_scale * R1 to
    the adversarial loss of one joint forward, which equals two separate forwards."""
    k = 4
    scales = [gan.lazy_r1_scale(s, k) for s in range(4 * k)]
    assert scales[0] == k and scales[1:k] == [0.0] * (k - 1) and sum(scales) / len(scales) == 1.0
    assert gan.lazy_r1_scale(7, 1) == 1.0
    lr, betas = gan.lazy_adam_hyperparameters(2e-3, (0.0, 0.99), 16)
    c = 16 / 17
    assert lr == pytest.approx(2e-3 * c) and betas == pytest.approx((0.0, 0.99**c))
    assert gan.lazy_adam_hyperparameters(2e-3, (0.5, 0.9), 1) == (2e-3, (0.5, 0.9))
    with pytest.raises(ValueError, match="interval"):
        gan.lazy_r1_scale(0, 0)

    D = MLPDiscriminator(dim=2, width=16, depth=2).double()
    xr, xf = torch.randn(6, 2, generator=gen(8), dtype=F), torch.randn(6, 2, generator=gen(9), dtype=F)
    t0 = gan.discriminator_terms(D, xr, xf, "hinge", r1_gamma=1.0, r1_scale=gan.lazy_r1_scale(1, k))
    assert t0.r1 is None
    torch.testing.assert_close(t0.real_logits, D(xr).detach())  # the joint forward = separate forwards
    torch.testing.assert_close(t0.fake_logits, D(xf).detach())
    torch.testing.assert_close(t0.loss, gan.discriminator_loss(D(xr), D(xf), "hinge"))
    t1 = gan.discriminator_terms(D, xr, xf, "hinge", r1_gamma=1.0, r1_scale=gan.lazy_r1_scale(0, k))
    x = xr.clone().requires_grad_(True)
    torch.testing.assert_close(t1.r1, gan.r1_penalty(D(x), x, 1.0))
    torch.testing.assert_close(t1.loss, t1.adversarial + k * t1.r1)
    assert set(t1.metrics()) == {"d_loss", "d_real", "d_fake", "value", "r1"}
    gt = gan.generator_terms(D, xf, "non_saturating")
    torch.testing.assert_close(gt.loss, gan.generator_loss(D(xf), "non_saturating"))


# --------------------------------------------------------------------------------------
# AdaIN and the StyleGAN generator
# --------------------------------------------------------------------------------------
def test_adain_output_moments_are_the_style():
    """Per channel and example, mean over H, W = w_b and (population) std = |w_s|: exactly with
    eps = 0 (float64 rounding), and within the stated factor sqrt(var / (var + eps)) otherwise."""
    x = 3 * torch.randn(4, 5, 6, 7, generator=gen(10), dtype=F) + 2
    scale, bias = torch.randn(4, 5, generator=gen(11), dtype=F), torch.randn(4, 5, generator=gen(12), dtype=F)
    out = adain(x, scale, bias, eps=0.0)
    torch.testing.assert_close(out.mean((2, 3)), bias, rtol=0, atol=1e-13)
    torch.testing.assert_close(out.std((2, 3), unbiased=False), scale.abs(), rtol=1e-13, atol=0)
    eps = 1e-2
    var = x.var((2, 3), unbiased=False)
    out = adain(x, scale, bias, eps=eps)
    torch.testing.assert_close(out.std((2, 3), unbiased=False), scale.abs() * (var / (var + eps)).sqrt(), rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="adain"):
        adain(x, scale[:, :3], bias)


def _stylegan(**kw):
    G = StyleGANGenerator(StyleGANGeneratorConfig(**kw))
    with torch.no_grad():  # the noise strengths start at 0; make the noise visible
        for layer in G.layers:
            layer.noise.strength.fill_(0.5)
    return G.eval()


def test_stylegan_mapping_synthesis_noise_and_seeds():
    G = _stylegan()
    z = G.sample_z(3, gen(13))
    x = G(z, generator=gen(14))
    assert x.shape == (3, 1, 28, 28) and x.abs().max() <= 1
    torch.testing.assert_close(G(z, generator=gen(14)), x, rtol=0, atol=0)  # same noise seed, same image
    assert (G(z, generator=gen(15)) - x).abs().max() > 1e-3  # the noise matters
    torch.testing.assert_close(G.synthesis(G.mapping(z), generator=gen(14)), x, rtol=0, atol=0)  # f then g
    # one seed per example: the image does not depend on the batch it is drawn in
    a = G.generate(4, generators_for_seeds(range(100, 104)))
    b = G.generate(2, generators_for_seeds(range(100, 102)))
    torch.testing.assert_close(a[:2], b, rtol=1e-5, atol=1e-6)
    noise = G.noise_inputs(3, gen(16))
    assert [tuple(n.shape[2:]) for n in noise] == [(7, 7), (7, 7), (14, 14), (14, 14), (28, 28), (28, 28)]
    torch.testing.assert_close(G.synthesis(G.mapping(z), noise=noise), G.synthesis(G.mapping(z), noise=noise))
    assert G.synthesis(G.mapping(z), noise_mode="none").shape == (3, 1, 28, 28)


def test_style_mixing_and_truncation():
    G = _stylegan()
    z1, z2 = G.sample_z(3, gen(17)), G.sample_z(3, gen(18))
    L = G.num_ws
    plain1, plain2 = G(z1, noise_mode="none"), G(z2, noise_mode="none")
    torch.testing.assert_close(G(z1, z2=z2, crossover=L, noise_mode="none"), plain1, rtol=0, atol=0)  # after the last layer: all z1
    torch.testing.assert_close(G(z1, z2=z2, crossover=0, noise_mode="none"), plain2, rtol=0, atol=0)  # at 0: all z2
    mixed = G(z1, z2=z2, crossover=3, noise_mode="none")
    assert (mixed - plain1).abs().max() > 1e-4 and (mixed - plain2).abs().max() > 1e-4
    w1, w2 = G.mapping(z1), G.mapping(z2)
    ws = mix_styles(w1, w2, torch.tensor([0, 3, L]), L)  # per-example crossovers
    torch.testing.assert_close(ws[0], w2[0].expand(L, -1))
    torch.testing.assert_close(ws[1, :3], w1[1].expand(3, -1))
    torch.testing.assert_close(ws[1, 3:], w2[1].expand(L - 3, -1))
    torch.testing.assert_close(ws[2], w1[2].expand(L, -1))
    c = random_crossover(1000, L, prob=0.9, generator=gen(19))
    assert c.min() >= 1 and c.max() <= L and 0.85 < float((c < L).double().mean()) < 0.95  # 4 binomial SE
    # truncation: psi = 1 is the identity, psi = 0 gives the average image for every z
    torch.testing.assert_close(G(z1, truncation_psi=1.0, noise_mode="none"), plain1, rtol=0, atol=0)
    avg = G(z1, truncation_psi=0.0, noise_mode="none")
    torch.testing.assert_close(avg, avg[:1].expand_as(avg))
    w_avg = G.w_average()
    torch.testing.assert_close(w_avg, G.w_average())  # on demand, deterministic (identical on every rank)
    torch.testing.assert_close(G.synthesis(w_avg.expand(3, -1), noise_mode="none"), avg)
    # interpolation in w: the end points are the two images
    t = torch.tensor([0.0, 1.0], dtype=torch.float32)[:, None]
    ends = G.synthesis(torch.lerp(w1[:1].expand(2, -1), w2[:1].expand(2, -1), t), noise_mode="none")
    torch.testing.assert_close(ends[0], plain1[0])
    torch.testing.assert_close(ends[1], plain2[0])


# --------------------------------------------------------------------------------------
# DCGAN and MLP nets, configs, registry
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 16)])
def test_dcgan_shapes_range_seeds_and_batch_independence(shape):
    C, H, W = shape
    G = build_generator("dcgan", {}, shape)
    D = build_discriminator("dcgan", {}, shape).eval()  # eval: spectral norm's power iteration holds still
    x = G.generate(4, generators_for_seeds(range(4)))
    assert x.shape == (4, C, H, W) and x.abs().max() <= 1
    torch.testing.assert_close(G.generate(4, generators_for_seeds(range(4))), x, rtol=0, atol=0)  # same seeds, same images
    torch.testing.assert_close(G.generate(2, generators_for_seeds(range(2))), x[:2], rtol=1e-5, atol=1e-6)  # batch-independent
    logits = D(x)
    assert logits.shape == (4,)
    torch.testing.assert_close(D(x[1:2]), logits[1:2], rtol=1e-5, atol=1e-6)


def test_default_28x28_nets_are_small():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    n_dcgan, n_style, n_d = count(DCGANGenerator()), count(StyleGANGenerator()), count(DCGANDiscriminator())
    print(f"parameters: DCGAN G {n_dcgan}, StyleGAN G {n_style}, DCGAN D {n_d}")
    assert 0.3e6 < n_dcgan < 2e6 and 0.3e6 < n_style < 2e6 and 0.05e6 < n_d < 2e6


def test_conditional_nets_use_the_labels():
    G = DCGANGenerator(num_classes=10)
    D = DCGANDiscriminator(num_classes=10, spectral_norm=False)
    with torch.no_grad():
        D.head.embed.table.weight.normal_()  # the projection starts near 0; make it visible
    z = G.sample_z(2, gen(20))
    y0, y1 = torch.tensor([0, 0]), torch.tensor([3, 3])
    assert (G(z, y0) - G(z, y1)).abs().max() > 1e-4
    x = G(z, y0)
    assert (D(x, y0) - D(x, y1)).abs().max() > 1e-4
    assert D(x).shape == (2,)  # y = None: the null label
    Dm = MLPDiscriminator(MLPDiscriminatorConfig(num_classes=3))
    assert Dm(torch.randn(5, 2), torch.tensor([0, 1, 2, 0, 1])).shape == (5,)
    Gs = StyleGANGenerator(num_classes=4)
    imgs = Gs(Gs.sample_z(2, gen(21)), torch.tensor([1, 2]), truncation_psi=0.5, noise_mode="none")  # per-class w_avg
    assert imgs.shape == (2, 1, 28, 28)


def test_configs_validate_and_round_trip():
    with pytest.raises(ValueError, match="image_size"):
        DCGANGeneratorConfig(image_size=(30, 28))  # 30 is not divisible by 4
    with pytest.raises(ValueError, match="norm"):
        DCGANGeneratorConfig(norm="batch")
    with pytest.raises(ValueError, match="groups"):
        DCGANGeneratorConfig(groups=5)
    with pytest.raises(ValueError, match="channels"):
        DCGANDiscriminatorConfig(channels=())
    with pytest.raises(ValueError, match="mapping_lr_mul"):
        StyleGANGeneratorConfig(mapping_lr_mul=0.0)
    with pytest.raises(ValueError, match="z_dim"):
        StyleGANGeneratorConfig(z_dim=0)
    with pytest.raises(ValueError, match="unknown field"):
        DCGANGeneratorConfig.from_dict({"zdim": 3})
    cfg = StyleGANGeneratorConfig.from_dict({"channels": [64, 32], "image_size": 16})
    assert cfg.channels == (64, 32) and cfg.image_size == (16, 16) and cfg.num_ws == 4
    assert StyleGANGeneratorConfig.from_dict(cfg.to_dict()) == cfg
    assert StyleGANGenerator(cfg)(torch.randn(2, 128)).shape == (2, 1, 16, 16)
    assert build_generator("mlp", {"width": 32}, (2,)).cfg.dim == 2
    with pytest.raises(ValueError, match="unknown generator"):
        build_generator("biggan", {}, (1, 28, 28))
    with pytest.raises(ValueError, match="flat data"):
        build_discriminator("mlp", {}, (1, 28, 28))
    with pytest.raises(ValueError, match="z must have shape"):
        DCGANGenerator()(torch.randn(2, 3))


# --------------------------------------------------------------------------------------
# Mode coverage
# --------------------------------------------------------------------------------------
def test_mode_coverage_sees_collapse():
    """Exact samples of the eight Gaussians: 8 modes, high-quality share 1 - exp(-9/2) = 0.9889
    within 4 binomial standard errors (the modes are 15 std apart, so overlap is negligible), mode
    KL ~ 0. Samples of three of the modes: 3 covered, KL = log(8/3)."""
    mix = eight_gaussians_mixture()
    n = 8000
    cov = gan.mode_coverage(mix.sample(n, gen(22)), mix)
    p = 1 - math.exp(-4.5)
    assert cov.modes == 8 and cov.expected_high_quality == pytest.approx(p, rel=1e-12)
    assert abs(cov.high_quality - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert cov.kl < 0.01
    collapsed = mix.subset([0, 3, 5]).sample(n, gen(23))
    c3 = gan.mode_coverage(collapsed, mix.means, torch.full((8,), 0.1))  # means/stds form
    assert c3.modes == 3 and c3.counts[[1, 2, 4, 6, 7]].sum() == 0
    assert abs(c3.kl - math.log(8 / 3)) < 0.01
    far = gan.mode_coverage(torch.zeros(10, 2), mix)  # the centre is 20 std from every mode
    assert far.modes == 0 and far.high_quality == 0.0
    assert gan.mode_coverage(collapsed, mix, min_count=n).modes == 0
    with pytest.raises(ValueError, match="samples"):
        gan.mode_coverage(torch.zeros(3, 3), mix)
