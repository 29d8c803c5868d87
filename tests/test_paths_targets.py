"""Paths and the conversion table: closed forms, derivatives, inverses, round trips (float64)."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scorelab.paths import PATHS, DDPMDiscrete, RectifiedFlow, VE, VPLinear, make_path, time_grid
from scorelab.targets import KINDS, Denoiser, convert, from_x0_eps, mse_factor, to_x0_eps

F = torch.float64
PATH_NAMES = list(PATHS)


def _times(path, u):
    """Map u in (0,1) into the interior of the path's domain."""
    return path.t_min + (path.t_max - path.t_min) * torch.as_tensor(u, dtype=F)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_derivatives_match_finite_differences(name):
    path = make_path(name)
    u = torch.linspace(0.05, 0.95, 19, dtype=F)
    t = _times(path, u)
    h = 1e-6 * (path.t_max - path.t_min)
    if path.discrete:  # piecewise linear in log alphabar: stay inside one piece
        t = t.floor() + 0.5
    c = path.coefficients(t)
    fd_a = (path.alpha(t + h) - path.alpha(t - h)) / (2 * h)
    fd_s = (path.sigma(t + h) - path.sigma(t - h)) / (2 * h)
    torch.testing.assert_close(c.d_alpha, fd_a, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(c.d_sigma, fd_s, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_log_snr_inverse_and_monotone(name):
    path = make_path(name)
    t = _times(path, torch.linspace(0.01, 0.99, 41, dtype=F))
    lam = path.log_snr(t)
    assert (lam[1:] < lam[:-1]).all(), "log-SNR must decrease with t"
    torch.testing.assert_close(path.t_from_log_snr(lam), t, rtol=1e-9, atol=1e-9 * path.t_max)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_clean_time_and_sde_coefficients(name):
    path = make_path(name)
    c0 = path.coefficients(torch.tensor([path.t_clean], dtype=F))
    assert float(c0.sigma) == 0.0 and float(c0.alpha) == 1.0
    # g^2 >= 0 and the marginal variance follows the SDE: d(sigma^2)/dt = 2 f sigma^2 + g^2
    t = _times(path, torch.linspace(0.05, 0.95, 11, dtype=F))
    c = path.coefficients(t)
    g2, f = path.g2(t), path.drift(t)
    assert (g2 > 0).all()
    torch.testing.assert_close(2 * c.sigma * c.d_sigma, 2 * f * c.sigma**2 + g2)
    torch.testing.assert_close(f * c.alpha, c.d_alpha)


def test_closed_forms_of_named_paths():
    t = torch.tensor([0.25, 0.5, 0.75], dtype=F)
    rf = RectifiedFlow().coefficients(t)
    torch.testing.assert_close(rf.alpha, 1 - t)
    torch.testing.assert_close(rf.sigma, t)
    ve = VE(0.01, 50.0)
    torch.testing.assert_close(ve.sigma(t), 0.01 * (5000.0**t))
    vp = VPLinear(0.1, 20.0)
    B = 0.1 * t + 0.5 * 19.9 * t**2
    torch.testing.assert_close(vp.alpha(t) ** 2, torch.exp(-B))
    torch.testing.assert_close(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones_like(t))
    torch.testing.assert_close(vp.g2(t), vp.beta(t))  # VP: g^2 = beta, f = -beta/2
    torch.testing.assert_close(vp.drift(t), -0.5 * vp.beta(t))


def test_ddpm_table_matches_product_of_betas():
    p = DDPMDiscrete(T=1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F)
    ab = torch.cumprod(1 - betas, 0)
    k = torch.tensor([0, 1, 10, 500, 999])
    torch.testing.assert_close(p.alpha(k.to(F)) ** 2, ab[k])
    torch.testing.assert_close(p.sigma(k.to(F)) ** 2, 1 - ab[k])
    torch.testing.assert_close(p.alphas_cumprod(), ab)


@pytest.mark.parametrize("name", PATH_NAMES)
@pytest.mark.parametrize("kind", ["uniform", "karras", "logsnr", "shift"])
def test_time_grids(name, kind):
    path = make_path(name)
    ts = time_grid(path, 10, kind)
    assert ts.shape == (11,) and ts.dtype == F
    assert ts[0] == path.t_max and ts[-1] == path.t_clean
    if path.t_min != path.t_clean:  # otherwise (rectified flow) no clean point is appended
        assert ts[-2] == path.t_min
    assert (ts[1:] <= ts[:-1]).all()
    ts2 = time_grid(path, 10, kind, clean_end=False)
    assert ts2.shape == (11,) and ts2[-1] == path.t_min


def test_logsnr_and_karras_grids_are_what_they_say():
    path = VPLinear()
    ts = time_grid(path, 12, "logsnr", clean_end=False)
    lam = path.log_snr(ts)
    d = lam[1:] - lam[:-1]
    torch.testing.assert_close(d, d.mean().expand_as(d), rtol=1e-7, atol=1e-9)
    ts = time_grid(path, 12, "karras", clean_end=False, rho=7.0)
    s = torch.exp(-0.5 * path.log_snr(ts)) ** (1 / 7)
    d = s[1:] - s[:-1]
    torch.testing.assert_close(d, d.mean().expand_as(d), rtol=1e-7, atol=1e-9)


def test_shift_grid_for_rectified_flow():
    ts = time_grid(RectifiedFlow(), 4, "shift", clean_end=False, shift=3.0)
    u = torch.linspace(1, 0, 5, dtype=F)
    torch.testing.assert_close(ts, 3 * u / (1 + 2 * u))


def test_bad_names_raise_value_errors():
    with pytest.raises(ValueError, match="unknown path 'nope'"):
        make_path("nope")
    with pytest.raises(ValueError, match="bad option for path 've'"):
        make_path("ve", beta_max=3)
    with pytest.raises(ValueError, match="unknown time grid"):
        time_grid(RectifiedFlow(), 5, "foo")
    with pytest.raises(ValueError, match="unknown prediction kind"):
        convert(torch.zeros(1, 2), "eps", "noise", torch.zeros(1, 2), RectifiedFlow().coefficients(torch.tensor([0.5])))


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(PATH_NAMES),
    u=st.floats(0.02, 0.98),
    pair=st.sampled_from(list(itertools.permutations(KINDS, 2))),
    seed=st.integers(0, 2**16),
)
def test_every_conversion_round_trips(name, u, pair, seed):
    path = make_path(name)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 3, generator=g, dtype=F)
    eps = torch.randn(4, 3, generator=g, dtype=F)
    t = _times(path, torch.full((4,), u, dtype=F))
    c = path.coefficients(t)
    cx = c.to(x0)
    x_t = cx.alpha * x0 + cx.sigma * eps
    a, b = pair
    va = from_x0_eps(x0, eps, a, cx)
    vb = convert(va, a, b, x_t, c)
    torch.testing.assert_close(vb, from_x0_eps(x0, eps, b, cx), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(convert(vb, b, a, x_t, c), va, rtol=1e-8, atol=1e-8)
    x0r, epsr = to_x0_eps(va, a, x_t, cx)
    torch.testing.assert_close(x0r, x0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(epsr, eps, rtol=1e-8, atol=1e-8)


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(PATH_NAMES), u=st.floats(0.05, 0.95), kind=st.sampled_from(KINDS))
def test_mse_factor_moves_errors_between_targets(name, u, kind):
    """A perturbation d of x0_pred at fixed x_t changes target `kind` by sqrt(mse_factor) |d|."""
    path = make_path(name)
    t = _times(path, torch.tensor([u], dtype=F))
    c = path.coefficients(t)
    cx = c.to(torch.zeros(1, 5, dtype=F))
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(1, 5, generator=g, dtype=F)
    x0 = torch.randn(1, 5, generator=g, dtype=F)
    d = 1e-3 * torch.randn(1, 5, generator=g, dtype=F)

    def target_of(x0_hat):
        eps_hat = (x_t - cx.alpha * x0_hat) / cx.sigma
        return from_x0_eps(x0_hat, eps_hat, kind, cx)

    err = (target_of(x0 + d) - target_of(x0)).pow(2).sum()
    torch.testing.assert_close(err, mse_factor(kind, c)[0] * d.pow(2).sum(), rtol=1e-7, atol=0)


def test_pf_ode_velocity_is_drift_minus_half_g2_score():
    """alpha' x0 + sigma' eps == f x - 1/2 g^2 score, for every path (DESIGN.md's ODE)."""
    for name in PATH_NAMES:
        path = make_path(name)
        t = _times(path, torch.tensor([0.3, 0.6], dtype=F))
        c = path.coefficients(t)
        x0, eps = torch.randn(2, 4, dtype=F), torch.randn(2, 4, dtype=F)
        cx = c.to(x0)
        x = cx.alpha * x0 + cx.sigma * eps
        score = from_x0_eps(x0, eps, "score", cx)
        lhs = from_x0_eps(x0, eps, "velocity", cx)
        rhs = path.drift(t)[:, None] * x - 0.5 * path.g2(t)[:, None] * score
        torch.testing.assert_close(lhs, rhs)


def test_denoiser_answers_every_kind_from_one_network():
    path = VPLinear()
    w = torch.randn(3, 3, dtype=F)
    net = lambda x, t: x @ w + t[:, None]  # noqa: E731  any callable
    den = Denoiser(net, path, kind="v")
    x = torch.randn(5, 3, dtype=F)
    t = torch.full((5,), 0.4, dtype=F)
    c = path.coefficients(t)
    v = net(x, t)
    torch.testing.assert_close(den(x, t, kind="v"), v)
    for kind in KINDS:
        torch.testing.assert_close(den(x, t, kind=kind), convert(v, "v", kind, x, c))
    p = den.predict(x, 0.4)  # scalar t is broadcast
    torch.testing.assert_close(p.x0, convert(v, "v", "x0", x, c))
    assert math.isfinite(float(p.score.sum()))


def test_conversion_table_values():
    """The table of DESIGN.md, written out independently of the implementation."""
    path = RectifiedFlow()
    t = torch.tensor([0.3], dtype=F)
    x0, eps = torch.tensor([[1.0, -2.0]], dtype=F), torch.tensor([[0.5, 0.25]], dtype=F)
    cx = path.coefficients(t).to(x0)
    torch.testing.assert_close(from_x0_eps(x0, eps, "v", cx), 0.7 * eps - 0.3 * x0)
    torch.testing.assert_close(from_x0_eps(x0, eps, "velocity", cx), eps - x0)  # rectified flow
    torch.testing.assert_close(from_x0_eps(x0, eps, "score", cx), -eps / 0.3)
    # score of N(x; alpha x0, sigma^2 I) at x = alpha x0 + sigma eps, by autograd
    x = (0.7 * x0 + 0.3 * eps).requires_grad_(True)
    logp = -0.5 * ((x - 0.7 * x0) ** 2).sum() / 0.3**2
    (g,) = torch.autograd.grad(logp, x)
    torch.testing.assert_close(from_x0_eps(x0, eps, "score", cx), g)


def test_denoiser_input_scaling_feeds_unit_scale_inputs_and_keeps_the_output_kind():
    """EDM's c_in: the net sees x_t / sqrt(alpha^2 s_d^2 + sigma^2); its output keeps its meaning."""
    from scorelab.paths import VE
    from scorelab.targets import Denoiser

    seen = {}

    def net(x, t):
        seen["x"] = x
        return torch.zeros_like(x)  # "eps = 0"

    path = VE(sigma_min=0.01, sigma_max=40.0)
    g = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(4096, 8, generator=g, dtype=torch.float64)  # data std s_d = 0.5
    for t in (0.0, 0.5, 1.0):
        sigma = float(path.sigma(torch.tensor(t, dtype=torch.float64)))
        xt = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        den = Denoiser(net, path, "eps", input_sigma_data=0.5)
        pred = den.predict(xt, t)
        torch.testing.assert_close(seen["x"], xt / math.sqrt(0.25 + sigma**2))
        assert abs(float(seen["x"].std()) - 1) < 0.03  # unit scale at every noise level
        torch.testing.assert_close(pred.x0, xt)  # eps = 0 => x0 = x_t: conversions use the unscaled x_t
    Denoiser(net, path, "eps").predict(xt, 1.0)
    assert float(seen["x"].std()) > 30  # without it the input is ~40x the data
    with pytest.raises(ValueError, match="input_sigma_data"):
        Denoiser(net, path, "eps", input_sigma_data=-1)
