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
    dens += [(pn, gm.denoiser(make_path(pn))) for pn in ("vp", "rf", "ddpm")]
    stochastic = name in ("ancestral", "euler_maruyama", "pc", "annealed_langevin")
    for pn, den in dens:
        path = den.path
        if stochastic and pn == "rf":
            continue  # the reverse SDE is singular at alpha = 0 (both raise)
        for grid in ("logsnr_x0", "uniform"):
            ts = time_grid(path, 9, grid)
            x = path.prior_sample((16, 3), generator=gen(1), dtype=F)
            want = ref_fn(den, x.clone(), ts.tolist(), generator=gen(2), **opts)
            for _ in range(2):
                got = S.SAMPLERS[name](den, x.clone(), ts, generator=gen(2), **opts)
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{label} on {pn} ({grid}, {den!r:.40})")
