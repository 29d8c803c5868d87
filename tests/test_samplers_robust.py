"""Samplers: robustness, bookkeeping and the fast paths, against direct implementations and exact answers.

* every sampler gives the results of a direct float64 implementation of its formulas (written
  here with one ``denoiser.predict`` per evaluation at a fresh time tensor, explicit ``x0``/``eps``
  and plain tensor arithmetic) to 1e-12, for network denoisers of every prediction kind and
  preconditioning and for the exact mixture denoiser: the speed work (registered times, lazy
  conversions, one fused linear combination per update, cached grids) changes no result;
* the error against the exact flow map is non-increasing in NFE for every deterministic sampler x
  grid x path that is not warned about, and the SW2 error of the stochastic ones within Monte Carlo
  noise; the combinations known to be wrong are warned about by ``sample()``;
* no grid repeats a time and the NFE a sampler reports (``count_nfe``) is the NFE it spends;
* ``sample()`` runs without autograd unless asked (classifier guidance still takes its gradient);
* the default sampler of every path kind is what ``default_sampler`` says and ``sample()`` uses it;
* UniPC and EDM's Heun converge at their orders on the closed-form flow of one Gaussian;
* the fast isotropic / diagonal mixture denoiser equals the general eigenbasis one to 1e-10;
* a DDPM path built from a table (betas or alphas_cumprod) equals DDPMDiscrete's own.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from scorelab import samplers as S
from scorelab.data.mixture import GaussianMixture, eight_gaussians_mixture, random_mixture
from scorelab.guidance import ClassifierGuidance, bayes_classifier
from scorelab.metrics import sliced_wasserstein
from scorelab.paths import GRIDS, PATHS, DDPMDiscrete, make_path, time_grid
from scorelab.random import randn_like
from scorelab.targets import Denoiser

F = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------
# Direct implementations of every sampler (the formulas of scorelab/samplers.py, written plainly)
# --------------------------------------------------------------------------------------
def _pred(den, x, t, cond=None):
    """One evaluation at a fresh (unregistered) time tensor: the denoiser's ordinary path."""
    return den.predict(x, torch.full((x.shape[0],), float(t), dtype=F), **(cond or {}))


def _coef(path, ts):
    c = path.coefficients(torch.as_tensor(ts, dtype=F))
    return c.alpha.tolist(), c.sigma.tolist(), c.d_alpha.tolist(), c.d_sigma.tolist()


def _hl(a, s):
    return math.inf if s == 0 else (-math.inf if a == 0 else math.log(a) - math.log(s))


def _cap(hl, i, lof):
    """The step-size rule of samplers._order_cap: first order over a step longer than pi / 2 in half log-SNR."""
    h = hl[i + 1] - hl[i]
    return 1 if (lof and math.isfinite(h) and h > math.pi / 2) else 3


def ref_ancestral(den, x, ts, generator=None):
    a, s, _, _ = _coef(den.path, ts)
    for i in range(len(ts) - 1):
        if s[i] == 0:
            continue
        p = _pred(den, x, ts[i])
        if s[i + 1] == 0:
            x = p.x0
            continue
        a_ts = a[i] / a[i + 1]
        s2 = max(s[i] ** 2 - a_ts**2 * s[i + 1] ** 2, 0.0)
        mean = (a_ts * s[i + 1] ** 2 / s[i] ** 2) * x + (a[i + 1] * s2 / s[i] ** 2) * p.x0
        x = mean + math.sqrt(s2 * s[i + 1] ** 2 / s[i] ** 2) * randn_like(x, generator)
    return x


def ref_ddim(den, x, ts, generator=None, eta=0.0):
    a, s, _, _ = _coef(den.path, ts)
    for i in range(len(ts) - 1):
        if s[i] == 0:
            continue
        p = _pred(den, x, ts[i])
        if s[i + 1] == 0:
            x = p.x0
            continue
        s2 = max(s[i] ** 2 - (a[i] / a[i + 1]) ** 2 * s[i + 1] ** 2, 0.0)
        c = eta * s[i + 1] * math.sqrt(s2) / s[i]
        x = a[i + 1] * p.x0 + math.sqrt(max(s[i + 1] ** 2 - c**2, 0.0)) * p.eps
        if c > 0:
            x = x + c * randn_like(x, generator)
    return x


def ref_euler(den, x, ts, generator=None):
    a, s, da, ds = _coef(den.path, ts)
    for i in range(len(ts) - 1):
        if s[i] == 0:
            continue
        p = _pred(den, x, ts[i])
        x = p.x0 if s[i + 1] == 0 else x + (ts[i + 1] - ts[i]) * (da[i] * p.x0 + ds[i] * p.eps)
    return x


def ref_heun(den, x, ts, generator=None):
    a, s, da, ds = _coef(den.path, ts)
    for i in range(len(ts) - 1):
        if s[i] == 0:
            continue
        p = _pred(den, x, ts[i])
        if s[i + 1] == 0:
            x = p.x0
            continue
        dt = ts[i + 1] - ts[i]
        d = da[i] * p.x0 + ds[i] * p.eps
        p2 = _pred(den, x + dt * d, ts[i + 1])
        x = x + dt * 0.5 * (d + da[i + 1] * p2.x0 + ds[i + 1] * p2.eps)
    return x


def ref_heun_edm(den, x, ts, generator=None):
    a, s, _, _ = _coef(den.path, ts)
    for i in range(len(ts) - 1):
        if s[i] == 0:
            continue
        p = _pred(den, x, ts[i])
        if s[i + 1] == 0:
            x = p.x0
        elif a[i] == 0:
            x1 = (s[i + 1] / s[i]) * x + a[i + 1] * p.x0
            p2 = _pred(den, x1, ts[i + 1])
            x = (s[i + 1] / s[i]) * x + a[i + 1] * 0.5 * (p.x0 + p2.x0)
        else:
            y, d_rho = x / a[i], s[i + 1] / a[i + 1] - s[i] / a[i]
            p2 = _pred(den, a[i + 1] * (y + d_rho * p.eps), ts[i + 1])
            x = a[i + 1] * (y + d_rho * 0.5 * (p.eps + p2.eps))
    return x


def ref_dpmpp_2m(den, x, ts, generator=None, lower_order_final=True):
    a, s, _, _ = _coef(den.path, ts)
    hl = [_hl(ai, si) for ai, si in zip(a, s)]
    x0_prev, h_prev = None, math.nan
    for i in range(len(ts) - 1):
        if s[i] == 0:
            continue
        p = _pred(den, x, ts[i])
        if s[i + 1] == 0:
            x = p.x0
        else:
            h = hl[i + 1] - hl[i]
            D = p.x0
            if x0_prev is not None and math.isfinite(h_prev) and math.isfinite(h) and _cap(hl, i, lower_order_final) >= 2:
                r = h_prev / h
                D = (1 + 0.5 / r) * p.x0 - (0.5 / r) * x0_prev
            x = (s[i + 1] / s[i]) * x - a[i + 1] * math.expm1(-h) * D
            h_prev = h
        x0_prev = p.x0
    return x


def ref_dpmpp_3m(den, x, ts, generator=None, lower_order_final=True):
    a, s, _, _ = _coef(den.path, ts)
    hl = [_hl(ai, si) for ai, si in zip(a, s)]
    hist = []
    for i in range(len(ts) - 1):
        if s[i] == 0:
            continue
        p = _pred(den, x, ts[i])
        l0 = hl[i]
        if not math.isfinite(l0):
            hist = []
        if s[i + 1] == 0:
            x = p.x0
        else:
            h = hl[i + 1] - l0
            m0, phi1 = p.x0, math.expm1(-h)
            x = (s[i + 1] / s[i]) * x - a[i + 1] * phi1 * m0
            cap = _cap(hl, i, lower_order_final)
            if hist and math.isfinite(h) and cap >= 2:
                phi2 = phi1 / h + 1
                m1, l1 = hist[-1]
                r0 = (l0 - l1) / h
                D1_0 = (m0 - m1) / r0
                if len(hist) >= 2 and cap >= 3:
                    m2, l2 = hist[-2]
                    r1 = (l1 - l2) / h
                    D1_1 = (m1 - m2) / r1
                    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
                    D2 = (D1_0 - D1_1) / (r0 + r1)
                    x = x + a[i + 1] * phi2 * D1 - 2 * a[i + 1] * (phi2 / h - 0.5) * D2
                else:
                    x = x + a[i + 1] * phi2 * D1_0
        if math.isfinite(l0):
            hist = (hist + [(p.x0, l0)])[-2:]
    return x


def _unipc_rhos(h, rks, order, variant, corrector):
    """UniPC's weights as diffusers' UniPCMultistepScheduler computes them (torch.linalg.solve)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    B_h = hh if (variant == "bh1" and math.isfinite(h)) else math.expm1(hh)
    h_phi_k, fact, R, b = h_phi_1 / hh - 1 if math.isfinite(h) else 0.0, 1, [], []
    rk = torch.tensor(rks, dtype=F)
    for k in range(1, order + 1):
        R.append(rk ** (k - 1))
        b.append(h_phi_k * fact / B_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R, b = torch.stack(R), torch.tensor(b, dtype=F)
    if corrector:
        rhos = torch.tensor([0.5], dtype=F) if order == 1 else torch.linalg.solve(R, b)
    else:
        rhos = torch.tensor([0.5], dtype=F) if order == 2 else (torch.linalg.solve(R[:-1, :-1], b[:-1]) if order > 2 else None)
    return h_phi_1, B_h, rhos


def _unipc_step(x, m0, ms, l0, ls, l_t, a_t, s_t, s_0, order, variant, m_t=None):
    h = l_t - l0
    rks = [(lk - l0) / h for lk in ls] + [1.0]
    h_phi_1, B_h, rhos = _unipc_rhos(h, rks, order, variant, m_t is not None)
    D1s = [(mk - m0) / rk for mk, rk in zip(ms, rks)]
    out = (s_t / s_0) * x - a_t * h_phi_1 * m0
    res = 0.0
    if D1s:
        res = sum(float(r) * d for r, d in zip(rhos, D1s))
    if m_t is not None:
        res = res + float(rhos[-1]) * (m_t - m0)
    return out - a_t * B_h * res


def ref_unipc(den, x, ts, generator=None, order=2, variant="bh2", corrector=True, lower_order_final=True):
    a, s, _, _ = _coef(den.path, ts)
    hl = [_hl(ai, si) for ai, si in zip(a, s)]
    hist, last = [], None
    for i in range(len(ts) - 1):
        if s[i] == 0:
            continue
        p = _pred(den, x, ts[i])
        l0 = hl[i]
        if corrector and last is not None and s[i + 1] != 0:
            xb, j, q, anc = last
            x = _unipc_step(xb, anc[0][0], [m for m, _ in anc[1:]], anc[0][1], [lk for _, lk in anc[1:]], hl[j + 1],
                            a[j + 1], s[j + 1], s[j], q, variant, m_t=p.x0)
        if not math.isfinite(l0):
            hist = []
        if s[i + 1] == 0:
            x, last = p.x0, None
        else:
            q = 1 if not math.isfinite(l0) else min(order, len(hist) + 1, _cap(hl, i, lower_order_final))
            anc = [(p.x0, l0)] + list(reversed(hist))[: q - 1]
            last = (x, i, q, anc)
            x = _unipc_step(x, anc[0][0], [m for m, _ in anc[1:]], l0, [lk for _, lk in anc[1:]], hl[i + 1],
                            a[i + 1], s[i + 1], s[i], q, variant)
        if math.isfinite(l0):
            hist = (hist + [(p.x0, l0)])[-2:]
    return x


def ref_euler_maruyama(den, x, ts, generator=None):
    a, s, _, _ = _coef(den.path, ts)
    for i in range(len(ts) - 1):
        if s[i] == 0:
            continue
        p = _pred(den, x, ts[i])
        if s[i + 1] == 0:
            x = p.x0
            continue
        tt = torch.tensor(ts[i], dtype=F)
        f, g2 = float(den.path.drift(tt)), float(den.path.g2(tt))
        dt = ts[i + 1] - ts[i]
        x = x + (f * x - g2 * p.score) * dt + math.sqrt(g2 * -dt) * randn_like(x, generator)
    return x


def ref_pc(den, x, ts, generator=None, n_corrector=1, snr=0.16, norm="batch"):
    a, s, _, _ = _coef(den.path, ts)
    for i in range(len(ts) - 1):
        if s[i] == 0:
            continue
        p = _pred(den, x, ts[i])
        if s[i + 1] == 0:
            x = p.x0
            continue
        tt = torch.tensor(ts[i], dtype=F)
        f, g2 = float(den.path.drift(tt)), float(den.path.g2(tt))
        dt = ts[i + 1] - ts[i]
        x = x + (f * x - g2 * p.score) * dt + math.sqrt(g2 * -dt) * randn_like(x, generator)
        for _ in range(n_corrector):
            score = _pred(den, x, ts[i + 1]).score
            z = randn_like(x, generator)
            zn, sn = z.flatten(1).norm(dim=1)[:, None], score.flatten(1).norm(dim=1)[:, None]
            if norm == "batch":
                zn, sn = zn.mean(), sn.mean()
            step = 2 * (snr * zn / sn) ** 2
            x = x + step * score + torch.sqrt(2 * step) * z
    return x


def ref_annealed_langevin(den, x, ts, generator=None, eps=None, n_steps_each=3, final_denoise=True):
    a, s, _, _ = _coef(den.path, ts)
    levels = [i for i in range(len(ts)) if s[i] > 0]
    eps = 0.2 * s[levels[0]] ** 2 if eps is None else eps
    for i in levels:
        a_i = eps * s[i] ** 2 / s[levels[0]] ** 2
        for _ in range(n_steps_each):
            x = x + (0.5 * a_i) * _pred(den, x, ts[i]).score + math.sqrt(a_i) * randn_like(x, generator)
    return _pred(den, x, ts[levels[-1]]).x0 if final_denoise else x


REFERENCES = {
    "ancestral": (ref_ancestral, {}),
    "ddim": (ref_ddim, {}),
    "ddim_eta": (ref_ddim, {"eta": 0.7}),
    "euler": (ref_euler, {}),
    "heun": (ref_heun, {}),
    "heun_edm": (ref_heun_edm, {}),
    "dpmpp_2m": (ref_dpmpp_2m, {}),
    "dpmpp_2m_nolof": (ref_dpmpp_2m, {"lower_order_final": False}),
    "dpmpp_3m": (ref_dpmpp_3m, {}),
    "unipc": (ref_unipc, {}),
    "unipc_bh1_3": (ref_unipc, {"order": 3, "variant": "bh1"}),
    "unipc_3_nocorr": (ref_unipc, {"order": 3, "corrector": False}),
    "euler_maruyama": (ref_euler_maruyama, {}),
    "pc": (ref_pc, {}),
    "pc_example": (ref_pc, {"norm": "example", "n_corrector": 2}),
    "annealed_langevin": (ref_annealed_langevin, {"n_steps_each": 3}),
}


class TinyNet(torch.nn.Module):
    """A random 2-layer MLP ``net(x, tau)`` (float64): an untrained network of any kind."""

    def __init__(self, dim: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = torch.nn.Linear(dim + 1, 32).double()
        self.l2 = torch.nn.Linear(32, dim).double()

    def forward(self, x, tau):
        return self.l2(torch.tanh(self.l1(torch.cat([x, tau[:, None]], 1))))


# (path, kind, precond): network denoisers of every kind and preconditioning on the paths' kinds
NET_CASES = [("vp", "eps", "none"), ("ddpm", "v", "input"), ("rf", "velocity", "none"), ("edm", "x0", "edm"),
             ("ve", "score", "none"), ("cosine", "x0", "none")]


@pytest.mark.parametrize("label", list(REFERENCES))
def test_samplers_equal_direct_implementations(label):
    """Every sampler equals its direct float64 implementation to 1e-12, for network denoisers (each kind and
    preconditioning) and the exact mixture denoiser; twice in a row (the second run reuses the cached grid)."""
    ref_fn, opts = REFERENCES[label]
    name = label if label in S.SAMPLERS else label.split("_")[0] if label.split("_")[0] in S.SAMPLERS else label.rsplit("_", 1)[0]
    name = {"ddim_eta": "ddim", "dpmpp_2m_nolof": "dpmpp_2m", "unipc_bh1_3": "unipc", "unipc_3_nocorr": "unipc",
            "pc_example": "pc"}.get(label, name)
    gm = random_mixture(3, 4, seed=2)
    dens = [(pn, Denoiser(TinyNet(3, 5), make_path(pn), kind, precond=precond)) for pn, kind, precond in NET_CASES]
    dens += [(pn, gm.denoiser(make_path(pn))) for pn in ("vp", "rf")]
    stochastic = name in ("ancestral", "euler_maruyama", "pc", "annealed_langevin")
    for k, (pn, den) in enumerate(dens):
        path = den.path
        if stochastic and pn == "rf":
            continue  # the reverse SDE is singular at alpha = 0 (both raise)
        grid = ("logsnr_x0", "uniform")[k % 2]
        ts = time_grid(path, 7, grid)
        x = path.prior_sample((8, 3), generator=gen(1), dtype=F)
        want = ref_fn(den, x.clone(), ts.tolist(), generator=gen(2), **opts)
        for _ in range(2 if k == 0 else 1):  # the second run reuses the cached grid and time inputs
            got = S.SAMPLERS[name](den, x.clone(), ts, generator=gen(2), **opts)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{label} on {pn} ({grid}, {den!r:.40})")


FAST = {"ddim": "ddim", "ddim_eta": "ddim", "dpmpp_2m": "dpmpp_2m", "dpmpp_2m_nolof": "dpmpp_2m", "unipc": "unipc",
        "unipc_bh1_3": "unipc", "unipc_3_nocorr": "unipc"}


@pytest.mark.parametrize("label", list(FAST))
def test_fast_paths_equal_direct_implementations_and_the_general_loop(label, monkeypatch):
    """Without autograd (as ``sample()`` runs them) DDIM, DPM-Solver++(2M) and UniPC on a Denoiser take their
    fast paths on the raw network outputs (``samplers._ddim_fast``, ``samplers._multistep``): the direct float64
    implementations to 1e-12 for every kind and preconditioning, with or without a callback (which sees what the
    general loop shows it and changes no result); in float32 the general loop's results, exactly for DDIM (the
    same operations) and to float rounding for the multistep matrix product (the same sum in another order)."""
    ref_fn, opts = REFERENCES[label]
    name = FAST[label]
    taken = []
    for fn in ("_ddim_fast", "_multistep"):
        orig = getattr(S, fn)
        monkeypatch.setattr(S, fn, lambda *a, orig=orig, **k: taken.append(r := orig(*a, **k)) or r)
    for k, (pn, kind, precond) in enumerate(NET_CASES):
        net = TinyNet(3, 5)
        path = make_path(pn)
        ts = time_grid(path, 7, ("logsnr_x0", "uniform")[k % 2])
        for dtype in (F, torch.float32):
            den = Denoiser(net.to(dtype), path, kind, precond=precond)
            x = path.prior_sample((8, 3), generator=gen(1), dtype=dtype)
            seen_fast, seen_general = [], []
            with torch.no_grad():
                taken.clear()
                fast = S.SAMPLERS[name](den, x.clone(), ts, generator=gen(2), **opts)
                assert taken and taken[-1] is not None, f"{label} on {pn}: the fast path was not taken"
                fast_cb = S.SAMPLERS[name](den, x.clone(), ts, generator=gen(2), callback=seen_fast.append, **opts)
            general = S.SAMPLERS[name](den, x.clone(), ts, generator=gen(2), callback=seen_general.append, **opts).detach()
            assert torch.equal(fast_cb, fast), f"{label} on {pn}: a callback changed the result"
            assert len(seen_fast) == len(seen_general) == len(ts) - 1
            msg = f"{label} on {pn} ({kind}, {precond}, {dtype})"
            if dtype == F:
                want = ref_fn(den, x.clone(), ts.tolist(), generator=gen(2), **opts)
                torch.testing.assert_close(fast, want, rtol=1e-12, atol=1e-12, msg=msg)
            tol = dict(rtol=0, atol=0) if name == "ddim" else dict(rtol=1e-5, atol=1e-5 * float(general.abs().max()))
            torch.testing.assert_close(fast, general, **tol, msg=msg)
            for a, b in zip(seen_fast, seen_general):
                assert a["i"] == b["i"] and a["t"] == b["t"] and a["t_next"] == b["t_next"]
                for v in ("x", "x0"):
                    tol = dict(rtol=0, atol=0) if name == "ddim" else dict(rtol=1e-5, atol=1e-5 * float(b[v].detach().abs().max()))
                    torch.testing.assert_close(a[v], b[v].detach(), **tol, msg=f"{msg}: callback {v} at step {a['i']}")


def test_unipc1_without_corrector_is_ddim():
    """UniP-1 is the first-order exponential integrator, i.e. DDIM (eta = 0), to rounding."""
    gm = random_mixture(3, 4, seed=6)
    for pn in ("ddpm", "rf", "edm"):
        path = make_path(pn)
        ts = time_grid(path, 12, "logsnr_x0")
        x = path.prior_sample((32, 3), generator=gen(3), dtype=F)
        u1 = S.sample_unipc(gm.denoiser(path), x, ts, order=1, corrector=False)
        torch.testing.assert_close(u1, S.sample_ddim(gm.denoiser(path), x, ts), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------
# Convergence order on one Gaussian (the probability-flow ODE is affine in closed form)
# --------------------------------------------------------------------------------------
MU, S0 = torch.tensor([[0.5, -1.0]], dtype=F), 0.3
ONE = GaussianMixture([1.0], MU, [S0])


def _flow(path, x, t0, t1):
    c0, c1 = path.coefficients(torch.tensor(t0, dtype=F)), path.coefficients(torch.tensor(t1, dtype=F))
    v0, v1 = c0.alpha**2 * S0**2 + c0.sigma**2, c1.alpha**2 * S0**2 + c1.sigma**2
    return c1.alpha * MU + torch.sqrt(v1 / v0) * (x - c0.alpha * MU)


@pytest.mark.parametrize("path_name,t0,t1", [("vp", 1.0, 0.02), ("rf", 0.98, 0.05), ("edm", 80.0, 0.05)])
def test_unipc_and_heun_edm_orders(path_name, t0, t1):
    """Measured orders on 16-128 log-SNR steps: UniPC-p with its corrector p + 1 (UniC raises the order by one,
    Zhao et al. 2023), without it p; EDM's Heun 2. Bounds are +-0.5 around the order (the slope of a 4-point
    log-log fit; pre-asymptotic curvature moves it by < 0.3 here)."""
    path = make_path(path_name)
    x = ONE.noised(*[float(v) for v in (path.coefficients(torch.tensor(t0, dtype=F)).alpha,
                                        path.coefficients(torch.tensor(t0, dtype=F)).sigma)]).sample(64, gen(0))
    exact = _flow(path, x, t0, t1)
    steps = [16, 32, 64, 128]
    lam = lambda n: torch.linspace(float(path.log_snr(t0)), float(path.log_snr(t1)), n + 1, dtype=F)  # noqa: E731

    def grid(n):
        ts = path.t_from_log_snr(lam(n))
        ts[0], ts[-1] = t0, t1
        return ts

    cases = [("heun_edm", {}, 2), ("unipc", dict(order=1), 2), ("unipc", dict(order=2), 3),
             ("unipc", dict(order=2, variant="bh1"), 3), ("unipc", dict(order=1, corrector=False), 1)]
    logn = torch.log(torch.tensor(steps, dtype=F))
    for name, opts, order in cases:
        errs = [float((S.SAMPLERS[name](ONE.denoiser(path), x, grid(n), **opts) - exact).pow(2).mean().sqrt()) for n in steps]
        loge = torch.log(torch.tensor(errs, dtype=F))
        slope = float(-((logn - logn.mean()) * (loge - loge.mean())).sum() / ((logn - logn.mean()) ** 2).sum())
        assert order - 0.5 <= slope <= order + 0.5, f"{name} {opts} on {path_name}: order {slope:.2f}, expected {order} ({errs})"


# --------------------------------------------------------------------------------------
# Monotone error in NFE, warned combinations
# --------------------------------------------------------------------------------------
ODE = ["ddim", "euler", "heun", "heun_edm", "dpmpp_2m", "dpmpp_3m", "unipc"]
MONO_PATHS = ["ddpm", "vp", "cosine", "subvp", "rf", "ve", "edm"]
NFES = [5, 10, 20, 40]
# Tolerance: a rise of the RMS flow-map error by 2e-3 (data of scale 2) is far below the Monte Carlo
# resolution of every benchmark mixture (SW2 floor standard deviations 0.005 - 0.016 at N = 5000 - 10000).
MONO_TOL = 2e-3


@pytest.mark.parametrize("path_name", MONO_PATHS)
def test_error_is_non_increasing_in_nfe_unless_warned(path_name):
    """Every deterministic sampler x grid on this path, from the same start noise: the RMS distance to the
    exact flow map (a 1000-step reference) does not grow from NFE 5 to 10, 20, 40, or sample() warns about
    the combination."""
    gm = eight_gaussians_mixture()
    path = make_path(path_name)
    z = path.prior_sample((96, 2), generator=gen(0), dtype=F)
    ref = S.sample_unipc(gm.denoiser(path), z, time_grid(path, 1000, "logsnr_x0"))
    failures = []
    for name in ODE:
        for grid in GRIDS:
            errs = [float((S.SAMPLERS[name](gm.denoiser(path), z, time_grid(path, S.steps_for_nfe(name, n), grid))
                           - ref).pow(2).sum(1).mean().sqrt()) for n in NFES]
            monotone = all(b <= a + MONO_TOL for a, b in zip(errs, errs[1:]))
            warned = S.check_combination(path, name, grid) is not None
            if not monotone and not warned:
                failures.append(f"{name}/{grid}: {[f'{e:.3g}' for e in errs]}")
            if warned:
                with pytest.warns(UserWarning, match=name if grid != "shift" else "shift"):
                    S.sample(gm.denoiser(path), z, 3, sampler=name, grid=grid)
    assert not failures, f"error not monotone in NFE on {path_name}: {failures}"


@pytest.mark.parametrize("name", ["ancestral", "euler_maruyama", "pc"])
def test_stochastic_samplers_improve_with_nfe(name):
    """SW2 to a true set of the same size falls (within 3 Monte Carlo standard deviations of the floor) from
    NFE 10 to 20 to 40 on every path with a finite reverse SDE. Floor: SW2 of 8 pairs of independent true sets."""
    gm = eight_gaussians_mixture()
    n = 1000
    floor = torch.tensor([float(sliced_wasserstein(gm.sample(n, gen(50 + 2 * r)), gm.sample(n, gen(51 + 2 * r)), 64,
                                                   generator=gen(9))) for r in range(8)])
    tol = 3 * float(floor.std())
    y = gm.sample(n, gen(7))
    for pn in ("ddpm", "vp", "ve", "edm"):
        path = make_path(pn)
        sw = []
        for nfe in (10, 20, 40):
            x = S.sample(gm.denoiser(path), (n, 2), S.steps_for_nfe(name, nfe), sampler=name, generator=gen(3), dtype=F)
            sw.append(float(sliced_wasserstein(x, y, 64, generator=gen(9))))
        assert all(b <= a + tol for a, b in zip(sw, sw[1:])), f"{name} on {pn}: SW2 {sw} (tolerance {tol:.4f})"


def test_shift_grid_warns_off_rectified_flow_and_never_repeats():
    gm = eight_gaussians_mixture()
    with pytest.warns(UserWarning, match="shift"):
        S.sample(gm.denoiser(make_path("ddpm")), (4, 2), 10, sampler="ddim", grid="shift", dtype=F)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S.sample(gm.denoiser(make_path("rf")), (4, 2), 10, sampler="ddim", grid="shift", dtype=F)
    for steps in (10, 20, 50):  # the issue's case: 2 / 3 / 6 copies of t_max on DDPM before
        ts = time_grid(make_path("ddpm"), steps, "shift")
        assert ts.unique().numel() == steps + 1


# --------------------------------------------------------------------------------------
# Bookkeeping: grids, NFE, autograd, defaults
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("path_name", list(PATHS))
def test_grids_never_repeat_a_time_and_nfe_is_what_is_spent(path_name):
    path = make_path(path_name)
    for kind in GRIDS:
        for steps in (1, 2, 3, 7, 31, 200):
            ts = time_grid(path, steps, kind)
            assert ts.shape == (steps + 1,) and bool((ts[1:] < ts[:-1]).all()), (kind, steps, ts)
            assert float(path.sigma(ts[-1:])[0]) == 0  # ends clean
    with pytest.raises(ValueError, match="strictly decreasing"):
        S.sample_ddim(eight_gaussians_mixture().denoiser(path), torch.zeros(2, 2, dtype=F),
                      torch.tensor([path.t_max, path.t_max, path.t_clean], dtype=F))
    gm = eight_gaussians_mixture()
    sde_path = make_path("rf", t_max=0.99) if path_name == "rf" else path  # the reverse SDE is singular at alpha = 0
    for name in S.SAMPLERS:
        opts = {"n_steps_each": 2} if name == "annealed_langevin" else {}
        p = sde_path if name in ("ancestral", "euler_maruyama", "pc", "annealed_langevin") else path
        for grid, steps in (("logsnr_x0", 2), ("uniform", 7), ("karras", 5)):
            den = gm.denoiser(p)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                S.sample(den, (3, 2), steps, sampler=name, grid=grid, generator=gen(1), dtype=F, **opts)
            assert den.nfe == S.count_nfe(name, steps, **opts), (name, grid, steps, den.nfe)
            assert S.steps_for_nfe(name, S.count_nfe(name, steps, **opts), **opts) == steps


def test_sample_runs_without_autograd_unless_asked_and_guidance_keeps_its_gradient():
    net = TinyNet(2, 3)
    den = Denoiser(net, make_path("vp"), "eps")
    out = S.sample(den, (8, 2), 6, generator=gen(0), dtype=F)
    assert not out.requires_grad and out.grad_fn is None
    out = S.sample(den, (8, 2), 6, generator=gen(0), dtype=F, enable_grad=True)
    assert out.requires_grad
    out.sum().backward()
    assert net.l1.weight.grad is not None
    # classifier guidance differentiates inside sample(): with the Bayes classifier at gamma = 1 it gives
    # the exact conditional samples from the same noise (the unconditional mixture's denoiser + gradient)
    gm = eight_gaussians_mixture()
    path = make_path("vp")
    y = torch.arange(16) % 8
    guided = S.sample(ClassifierGuidance(gm.denoiser(path), bayes_classifier(gm, path), 1.0), (16, 2), 12,
                      generator=gen(4), dtype=F, cond={"y": y})
    exact = S.sample(gm.denoiser(path), (16, 2), 12, generator=gen(4), dtype=F, cond={"y": y})
    assert not guided.requires_grad
    torch.testing.assert_close(guided, exact, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path_name", list(PATHS))
def test_sample_uses_the_default_sampler(path_name):
    path = make_path(path_name)
    d = S.default_sampler(path)
    assert set(d) == {"sampler", "grid", "grid_opts", "options"} and d["sampler"] in S.SAMPLERS and d["grid"] in GRIDS
    assert S.check_combination(path, d["sampler"], d["grid"], **d["options"]) is None
    gm = eight_gaussians_mixture()
    a = S.sample(gm.denoiser(path), (8, 2), 7, generator=gen(2), dtype=F)
    ts = time_grid(path, 7, d["grid"], **d["grid_opts"])
    b = S.SAMPLERS[d["sampler"]](gm.denoiser(path), path.prior_sample((8, 2), generator=gen(2), dtype=F), ts, **d["options"])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# The fast mixture denoiser and the DDPM table
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["isotropic", "diagonal"])
def test_fast_isotropic_and_diagonal_mixture_equals_the_eigenbasis_one(structure):
    g = gen(0)
    K, D = 5, 7
    m = torch.randn(K, D, generator=g, dtype=F)
    std = 0.1 + torch.rand(K, generator=g, dtype=F) if structure == "isotropic" else 0.1 + torch.rand(K, D, generator=g, dtype=F)
    w = 0.1 + torch.rand(K, generator=g, dtype=F)
    fast = GaussianMixture(w, m, std, labels=torch.arange(K) % 2)
    assert fast.structure == structure
    full = GaussianMixture(w, m, torch.diag_embed((std[:, None].expand(K, D) if std.ndim == 1 else std) ** 2),
                           labels=torch.arange(K) % 2)
    x = 2 * torch.randn(40, D, generator=g, dtype=F)
    per_example = torch.rand(40, generator=g, dtype=F)  # one time per example: the (B, K, D) route
    for a, s in [(1.0, 0.0), (0.7, 0.714), (0.0, 1.0), (0.01, 0.99995), (1.0, 30.0), (None, None)]:
        A, Sg = (per_example, (1 - per_example**2).sqrt()) if a is None else (torch.full((40,), a, dtype=F), torch.full((40,), s, dtype=F))
        for fn in ("posterior", "marginal_log_prob", "class_log_posterior", "marginal_score"):
            if fn == "marginal_score" and s == 0:
                continue
            u, v = getattr(fast, fn)(x, A, Sg), getattr(full, fn)(x, A, Sg)
            for p, q in zip(u if isinstance(u, tuple) else (u,), v if isinstance(v, tuple) else (v,)):
                torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10, msg=f"{fn} at alpha={a}")
    torch.testing.assert_close(fast.log_prob(x), full.log_prob(x), rtol=1e-10, atol=1e-10)
    den_f, den_g = fast.denoiser(make_path("vp")), full.denoiser(make_path("vp"))
    torch.testing.assert_close(S.sample(den_f, x, 8, dtype=F), S.sample(den_g, x, 8, dtype=F), rtol=1e-10, atol=1e-10)


def test_ddpm_path_from_a_table_equals_its_own_table():
    own = DDPMDiscrete(T=1000)
    t = torch.linspace(0, 999, 3997, dtype=F)
    for kw in (dict(alphas_cumprod=own.alphas_cumprod()), dict(betas=own.betas)):
        p = DDPMDiscrete(**kw)
        assert p.T == 1000 and p.schedule == "table"
        a, b = own.coefficients(t), p.coefficients(t)
        for u, v in zip((a.alpha, a.sigma, a.d_alpha, a.d_sigma), (b.alpha, b.sigma, b.d_alpha, b.d_sigma)):
            torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(p.alphas_cumprod(), own.alphas_cumprod(), rtol=1e-14, atol=0)
        torch.testing.assert_close(p.t_from_log_snr(p.log_snr(t)), t, rtol=0, atol=1e-8)
    # another library's float32 table is taken as given (its alphabar exactly, in float64)
    ab32 = own.alphas_cumprod().float()
    p = DDPMDiscrete(alphas_cumprod=ab32)
    torch.testing.assert_close(p.alphas_cumprod(), ab32.double(), rtol=1e-14, atol=0)
    assert make_path("ddpm", alphas_cumprod=ab32).T == 1000
    for bad in (dict(alphas_cumprod=[0.9, 0.95]), dict(alphas_cumprod=[1.2, 0.5]), dict(betas=[0.1, 1.0]),
                dict(betas=[0.1], alphas_cumprod=[0.9])):
        with pytest.raises(ValueError):
            DDPMDiscrete(**bad)


def test_full_covariance_mixture_at_one_time_equals_the_per_example_route():
    """The shared-time route for full covariances (one (B, D) x (D, K D) product) equals the per-example
    eigenbasis route (taken for inputs that require a gradient) to 1e-10."""
    gm = random_mixture(6, 4, seed=3)
    x = 2 * torch.randn(30, 6, generator=gen(1), dtype=F)
    for a in (1.0, 0.6, 0.0, 0.01):
        A, Sg = torch.full((30,), a, dtype=F), torch.full((30,), math.sqrt(1 - a * a) + (a == 1.0) * 0.3, dtype=F)
        fast = gm.posterior(x, A, Sg)
        slow = gm.posterior(x.clone().requires_grad_(True), A, Sg)
        for p, q in zip(fast, slow):
            torch.testing.assert_close(p, q.detach(), rtol=1e-10, atol=1e-10)
