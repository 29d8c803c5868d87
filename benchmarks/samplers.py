"""Sampler accuracy against the exact answer: our samplers and diffusers' schedulers, NFE for NFE, on every path.

Ground truth is a Gaussian mixture, whose denoiser ``E[x_0 | x_t]`` is exact
(``GaussianMixture.denoiser(path)``), so every error in the tables is the sampler's own
discretisation error plus Monte Carlo noise. Everything runs in float64 on CPU from the same
N(0, I) start noise ``z`` (scaled by each path's prior standard deviation).

Paths: ``ddpm`` (``DDPMDiscrete`` built from diffusers' own float32 ``alphas_cumprod`` of the
linear 1e-4 .. 0.02 table, T = 1000, so both integrate exactly the same path), ``vp``
(``VPLinear``: diffusers runs on its table at t = (k + 1) / 1000), ``rf`` (``RectifiedFlow``),
``ve`` (``VE(0.01, 50)``) and ``edm`` (``EDM()``, sigma in [0.002, 80]).

Mixtures: the 2-D eight Gaussians (N = 10000), a 32-D random mixture with full covariances
(``random_mixture(32, 8, seed=0)``, N = 5000) and a 64-D one with isotropic components
(``random_mixture(64, 16, seed=1, full_cov=False)``, N = 5000).

Metrics, each against one fixed set ``Y`` of N fresh true samples:

* ``SW2``: sliced Wasserstein-2 (``scorelab.metrics.sliced_wasserstein``, fixed projections). The
  Monte Carlo floor is the SW2 of R further independent true sets against ``Y``
  (``floor = sqrt(mean SW2^2)``); the error above it is ``excess = sqrt(max(SW2^2 - floor^2, 0))``.
* ``ref``: SW2 between the row's output and the reference output from the same start noise
  (``unipc`` on ``logsnr_x0`` with 1000 steps): the discretisation error itself, paired, far
  below the floor's resolution. When the reference itself lies outside the floor band (in 2-D
  the SW2 to ``Y`` is dominated by the binomial noise of the mode weights of this one draw of
  ``z``, so every deterministic row shares the draw's luck), SW2 to ``Y`` cannot resolve the
  rows and the target is judged on ``ref`` instead; the summary says which.
* ``LL``: ``mean log p(x_gen) - mean log p(Y)`` under the true density, signed (negative: mass
  between modes or too wide; positive: collapsed onto the modes).

Rows:

* ours: ``sampler/grid`` for the ODE samplers ddim, euler, heun, heun_edm, dpmpp_2m, dpmpp_3m,
  unipc on the grids uniform, logsnr, logsnr_x0, karras (and shift on rectified flow), and the
  stochastic ancestral, euler_maruyama (``~``) on logsnr_x0; ``steps_for_nfe`` grid steps (the
  NFE column is the NFE spent: ``count_nfe``, checked against the denoiser's counter). ``!`` marks
  a combination ``check_combination`` warns about. ``default``: ``default_sampler(path)``.
* diffusers (if installed), its schedulers as configured by default for each kind of model, the
  exact model evaluated at the noise level the scheduler integrates at: DDPM / VP (epsilon
  model): DDIM, DPM-Solver++(2M) (diffusers' default), Euler, Heun, UniPC-bh2, and the Karras
  variants; rectified flow (flow model, ``use_flow_sigmas``): DPM-Solver++(2M) (the default),
  UniPC, FlowMatchEuler, FlowMatchHeun; VE / EDM (EDM preconditioning): EDM-DPM-Solver++(2M)
  (the default) and EDM-Euler, with the path's sigma range. Heun calls the model 2n - 1 times.

Each (mixture, path) gets one table (cells ``excess ref LL`` per NFE, and ``mono``: is the error
non-increasing in NFE -- deterministic rows: ``ref`` rises by at most half a floor standard
deviation, and (second flag) |LL vs ref| by at most 2 standard errors of the LL gap to the truth
(the resolution the LL gap is judged at), between consecutive NFEs; stochastic rows, independent
draws: ``SW2`` and |LL| by at most 3 sqrt(2) of their standard deviations), then a summary: the default row against
diffusers' default and against diffusers' best (error ratios at each NFE), the best of ours
against the best of diffusers, the |LL gap| comparison, the rows outside the floor at the
largest NFE, and the non-monotone rows. The last summary collects the target lines of all.

``--report FILE`` prints the tables of a stored run again without running anything.

Usage (2 cores shared: one torch thread)::

    .venv/bin/python benchmarks/samplers.py                 # full run, NFE 5 10 20 50
    .venv/bin/python benchmarks/samplers.py --quick         # small N, NFE 5 10, three paths
    .venv/bin/python benchmarks/samplers.py --only 2d --paths ddpm rf --nfe 10 20

Writes JSON with the machine record (``benchmarks/results/samplers.json``, ``common.write_json``).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, write_json  # noqa: E402
from scorelab.data.mixture import GaussianMixture, eight_gaussians_mixture, random_mixture  # noqa: E402
from scorelab.metrics import sliced_wasserstein  # noqa: E402
from scorelab.paths import EDM, VE, DDPMDiscrete, RectifiedFlow, VPLinear, time_grid  # noqa: E402
from scorelab.random import randn  # noqa: E402
from scorelab.samplers import (SAMPLERS, check_combination, count_nfe, default_sampler,  # noqa: E402
                               steps_for_nfe)

SAMPLERS_FILE = Path(__file__).resolve().parents[1] / "scorelab" / "samplers.py"  # hashed into the JSON
F64 = torch.float64

ODE_SAMPLERS = ["ddim", "euler", "heun", "heun_edm", "dpmpp_2m", "dpmpp_3m", "unipc"]
SDE_SAMPLERS = ["ancestral", "euler_maruyama"]
GRIDS = ["uniform", "logsnr", "logsnr_x0", "karras"]
REFERENCE = ("unipc", "logsnr_x0")  # sampler, grid of the many-step reference row

DDPM_CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                   prediction_type="epsilon")
# label -> (class name, config overrides); the first entry of each kind is diffusers' default
DIFFUSERS = {
    "vp": {
        "DPM++2M": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
        "DPM++2M/karras": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2,
                                                               use_karras_sigmas=True)),
        "DDIM": ("DDIMScheduler", dict(clip_sample=False)),
        "Euler": ("EulerDiscreteScheduler", dict()),
        "Euler/karras": ("EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
        "Heun": ("HeunDiscreteScheduler", dict()),
        "UniPC": ("UniPCMultistepScheduler", dict(solver_type="bh2")),
        "UniPC/karras": ("UniPCMultistepScheduler", dict(solver_type="bh2", use_karras_sigmas=True)),
    },
    "rf": {
        "DPM++2M/flow": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2,
                                                             use_flow_sigmas=True, prediction_type="flow_prediction",
                                                             flow_shift=1.0)),
        "UniPC/flow": ("UniPCMultistepScheduler", dict(solver_type="bh2", use_flow_sigmas=True,
                                                       prediction_type="flow_prediction", flow_shift=1.0)),
        "FlowMatchEuler": ("FlowMatchEulerDiscreteScheduler", dict()),
        "FlowMatchHeun": ("FlowMatchHeunDiscreteScheduler", dict()),
    },
    "ve": {
        "EDM-DPM++2M": ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
        "EDM-Euler": ("EDMEulerScheduler", dict()),
    },
}


def make_paths(names, have_diffusers: bool) -> dict:
    out = {}
    for n in names:
        if n == "ddpm":
            if have_diffusers:
                import diffusers

                ab = diffusers.DDPMScheduler(**{k: v for k, v in DDPM_CONFIG.items()}).alphas_cumprod.to(F64)
                out[n] = DDPMDiscrete(alphas_cumprod=ab)
            else:
                out[n] = DDPMDiscrete(T=1000)
        elif n == "vp":
            out[n] = VPLinear()
        elif n == "rf":
            out[n] = RectifiedFlow()
        elif n == "ve":
            out[n] = VE(sigma_min=0.01, sigma_max=50.0)
        elif n == "edm":
            out[n] = EDM()
        else:
            raise ValueError(f"unknown benchmark path {n!r}")
    return out


def path_kind(name: str) -> str:
    return {"ddpm": "vp", "vp": "vp", "rf": "rf", "ve": "ve", "edm": "ve"}[name]


@dataclass
class Row:
    """One sampler run: which sampler, its cost and its errors."""

    label: str  # "sampler/grid" (ours), "default", scheduler variant (diffusers) or the reference
    family: str  # "ours" | "default" | "diffusers" | "reference"
    nfe_budget: int  # the NFE column this run belongs to
    nfe: int  # denoiser evaluations actually made
    steps: int  # grid steps (ours) or num_inference_steps (diffusers)
    stochastic: bool
    warned: bool  # check_combination warns about it
    seconds: float
    sw2: float = math.inf
    excess: float = math.inf
    within_floor: bool = False
    ll_gap: float = -math.inf
    ll_se: float = math.nan
    sw2_ref: float = math.nan
    rms_ref: float = math.nan
    ll_gap_ref: float = math.nan
    ll_se_ref: float = math.nan


class SlicedW2:
    """``metrics.sliced_wasserstein(x, y, n_proj, Generator().manual_seed(seed))`` for equal-size sets,
    with the sorted projections of the fixed sets (Y, x_ref) computed once."""

    def __init__(self, dim: int, n_proj: int, seed: int):
        theta = randn((dim, n_proj), generator=torch.Generator().manual_seed(seed), dtype=F64)
        self.theta = theta / theta.norm(dim=0, keepdim=True)  # (D, P)
        self.n_proj, self.seed = n_proj, seed

    def sorted_projections(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sort((x.to(F64) @ self.theta).T.contiguous(), dim=1).values

    @staticmethod
    def distance(px: torch.Tensor, py: torch.Tensor) -> float:
        return float((px - py).pow(2).mean().sqrt())

    def check(self, x: torch.Tensor, y: torch.Tensor) -> None:
        ours = self.distance(self.sorted_projections(x), self.sorted_projections(y))
        lib = float(sliced_wasserstein(x, y, self.n_proj, generator=torch.Generator().manual_seed(self.seed)))
        if not math.isclose(ours, lib, rel_tol=1e-9, abs_tol=1e-12):
            raise RuntimeError(f"cached SW2 {ours} != metrics.sliced_wasserstein {lib}")


@dataclass
class Problem:
    """A mixture with its fixed true set Y, projections and Monte Carlo floor."""

    name: str
    mixture: GaussianMixture
    n: int
    proj_seed: int
    n_proj: int
    floor: float = math.nan
    floor_mean: float = math.nan
    floor_std: float = math.nan
    floor_samples: list = field(default_factory=list)

    def setup(self, seed: int, reps: int) -> None:
        self.sw = SlicedW2(self.mixture.dim, self.n_proj, self.proj_seed)
        gen = torch.Generator().manual_seed(seed)
        self.y = self.mixture.sample(self.n, gen)
        self.lp_y = self.mixture.log_prob(self.y)
        self.py = self.sw.sorted_projections(self.y)
        vals = []
        for r in range(reps):
            y2 = self.mixture.sample(self.n, gen)
            vals.append(self.sw.distance(self.sw.sorted_projections(y2), self.py))
            if r == 0:
                self.sw.check(y2, self.y)
        v = torch.tensor(vals, dtype=F64)
        self.floor_samples = vals
        self.floor = float(v.pow(2).mean().sqrt())
        self.floor_mean, self.floor_std = float(v.mean()), float(v.std()) if reps > 1 else 0.0
        self.x_ref = None

    def set_reference(self, x: torch.Tensor) -> None:
        self.x_ref, self.lp_xref, self.pxref = x, self.mixture.log_prob(x), self.sw.sorted_projections(x)

    def row(self, x, label, family, nfe_budget, nfe, steps, stochastic, warned, seconds) -> Row:
        r = Row(label, family, nfe_budget, nfe, steps, stochastic, warned, seconds)
        if not torch.isfinite(x).all():
            return r
        px, lp = self.sw.sorted_projections(x), self.mixture.log_prob(x)
        r.sw2 = self.sw.distance(px, self.py)
        r.excess = math.sqrt(max(r.sw2**2 - self.floor**2, 0.0))
        r.within_floor = r.sw2 <= self.floor_mean + 2 * self.floor_std
        r.ll_gap = float(lp.mean() - self.lp_y.mean())
        r.ll_se = float((lp.var() / lp.numel() + self.lp_y.var() / self.lp_y.numel()).sqrt())
        if self.x_ref is not None:
            r.sw2_ref = self.sw.distance(px, self.pxref)
            r.rms_ref = float((x - self.x_ref).pow(2).sum(1).mean().sqrt())
            d = lp - self.lp_xref
            r.ll_gap_ref, r.ll_se_ref = float(d.mean()), float(d.std() / math.sqrt(d.numel()))
        return r


# --------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------
def run_ours(problem: Problem, path, z, name: str, grid: str, steps: int, seed: int, opts=None):
    den = problem.mixture.denoiser(path)
    gen = torch.Generator().manual_seed(seed + 1)  # only stochastic samplers draw from it
    ts = time_grid(path, steps, grid)
    t0 = time.perf_counter()
    with torch.no_grad():
        x = SAMPLERS[name](den, z.clone() * path.prior_std, ts, generator=gen, **(opts or {}))
    sec = time.perf_counter() - t0
    if den.nfe != count_nfe(name, steps, **(opts or {})):
        raise RuntimeError(f"{name}/{grid}: spent {den.nfe} NFE, count_nfe says {count_nfe(name, steps)}")
    return x, den.nfe, sec


def make_scheduler(kind: str, label: str, path):
    import diffusers

    cls_name, overrides = DIFFUSERS[kind][label]
    cls = getattr(diffusers, cls_name)
    if kind == "vp":
        cfg = dict(DDPM_CONFIG)
        if isinstance(path, VPLinear):  # the continuous VP path on the grid t = (k + 1) / T
            t = torch.arange(1, 1001, dtype=F64) / 1000
            ab = path.alpha(t) ** 2
            betas = 1 - ab / torch.cat([torch.ones(1, dtype=F64), ab[:-1]])
            cfg = {k: v for k, v in cfg.items() if k not in ("beta_start", "beta_end", "beta_schedule")}
            cfg["trained_betas"] = betas.numpy()
        return cls(**cfg, **overrides)
    if kind == "rf":
        return cls(num_train_timesteps=1000, **overrides)
    sig = (path.sigma_min, path.sigma_max)
    return cls(sigma_min=sig[0], sigma_max=sig[1], sigma_data=0.5, **overrides)


def diffusers_steps(kind: str, label: str, nfe: int) -> int:
    """num_inference_steps within an NFE budget: Heun calls the model 2n - 1 times, the others n."""
    return (nfe + 1) // 2 if "Heun" in DIFFUSERS[kind][label][0] else nfe


def _our_time(path, name: str, sigma: float) -> float:
    """Our time at the scheduler's noise level (``sigma/alpha`` for VP / DDPM, ``t`` for flows, sigma for EDM / VE)."""
    if name in ("ddpm", "vp"):
        return float(path.t_from_log_snr(torch.tensor(-2 * math.log(sigma), dtype=F64)))
    if name == "ve":
        return math.log(sigma / path.sigma_min) / math.log(path.sigma_max / path.sigma_min)
    return sigma  # rf: t = sigma; edm: t = sigma


def run_diffusers(problem: Problem, name: str, path, z, label: str, steps: int):
    """The diffusers pipeline loop with the exact model of the right kind, at the scheduler's noise level."""
    kind = path_kind(name)
    den = problem.mixture.denoiser(path)
    sched = make_scheduler(kind, label, path)
    sched.set_timesteps(steps)
    B = z.shape[0]
    t0 = time.perf_counter()
    latents = z.clone() * float(getattr(sched, "init_noise_sigma", 1.0))
    for i, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(latents, t) if hasattr(sched, "scale_model_input") else latents
        idx = sched.step_index if getattr(sched, "step_index", None) is not None else 0
        if label == "DDIM":  # integer timesteps on its alphas_cumprod table
            ab = float(sched.alphas_cumprod[int(t)])
            tt = _our_time(path, name, math.sqrt((1 - ab) / ab))
        elif label.startswith("FlowMatch"):
            tt = float(t) / 1000.0
        else:
            tt = _our_time(path, name, float(sched.sigmas[idx]))
        tb = torch.full((B,), tt, dtype=F64)
        if kind == "vp":
            out = den(inp.to(F64), tb, kind="eps")
        elif kind == "rf":
            out = den(inp.to(F64), tb, kind="velocity")
        else:  # EDM preconditioning: c_skip x + c_out F = x0_hat on the unscaled sample
            s, sd = float(sched.sigmas[idx]), sched.config.sigma_data
            c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2)
            x0 = den(latents.to(F64), tb, kind="x0")
            out = (x0 - c_skip * latents) / c_out
        latents = sched.step(out.to(latents.dtype), t, latents).prev_sample
    return latents, den.nfe, time.perf_counter() - t0


def have_diffusers() -> str | None:
    try:
        import diffusers
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        return diffusers.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def run_problem(problem: Problem, name: str, path, nfes, args, use_diffusers: bool) -> list[Row]:
    z = torch.randn(problem.n, problem.mixture.dim, generator=torch.Generator().manual_seed(args.seed), dtype=F64)
    kind = path_kind(name)
    rows: list[Row] = []

    def log(r: Row):
        rows.append(r)
        print(f"  [{problem.name} {name}] {r.label:<24} NFE {r.nfe:>4}  SW2 {r.sw2:.4f}  ref {r.sw2_ref:.4f}  "
              f"LL {r.ll_gap:+.3f}  ({r.seconds:.1f}s)", file=sys.stderr, flush=True)

    s_name, s_grid = REFERENCE
    x, nfe, sec = run_ours(problem, path, z, s_name, s_grid, args.ref_steps, args.seed)
    log(problem.row(x, f"{s_name}/{s_grid} x{args.ref_steps}", "reference", args.ref_steps, nfe, args.ref_steps,
                    False, False, sec))
    problem.set_reference(x)
    grids = GRIDS + (["shift"] if kind == "rf" else [])
    d = default_sampler(path)
    for budget in nfes:
        st = steps_for_nfe(d["sampler"], budget, **d["options"])
        x, nfe, sec = run_ours(problem, path, z, d["sampler"], d["grid"], st, args.seed, d["options"])
        log(problem.row(x, "default", "default", budget, nfe, st, False, False, sec))
        for s in ODE_SAMPLERS + SDE_SAMPLERS:
            for grid in (grids if s in ODE_SAMPLERS else ["logsnr_x0"]):
                if s in SDE_SAMPLERS and kind == "rf":
                    continue  # the reverse SDE is singular at alpha = 0 (t = 1)
                st = steps_for_nfe(s, budget)
                warned = check_combination(path, s, grid) is not None
                x, nfe, sec = run_ours(problem, path, z, s, grid, st, args.seed)
                log(problem.row(x, f"{s}/{grid}", "ours", budget, nfe, st, s in SDE_SAMPLERS, warned, sec))
        if use_diffusers:
            for label in DIFFUSERS[kind]:
                st = diffusers_steps(kind, label, budget)
                x, nfe, sec = run_diffusers(problem, name, path, z, label, st)
                log(problem.row(x, label, "diffusers", budget, nfe, st, False, False, sec))
    return rows


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------
def monotone(rows: list[Row], problem: Problem) -> tuple[bool, bool]:
    """``(error, LL)``: is the row's error non-increasing in NFE, and is its |LL gap| (see the module docstring)?

    Error: deterministic rows, SW2 to the reference from the same noise (the discretisation error)
    rises by at most half a floor standard deviation between consecutive NFEs; stochastic rows, SW2
    to the true set by at most 2 floor standard deviations. LL: |LL gap vs the reference| (stochastic:
    vs the truth) rises by at most 2 standard errors of the LL gap to the truth.
    """
    rs = sorted(rows, key=lambda r: r.nfe_budget)
    err_ok = ll_ok = True
    for a, b in zip(rs, rs[1:]):
        if not math.isfinite(b.sw2):
            return False, False
        if a.stochastic:
            # two independent draws: their SW2 difference has about sqrt(2) floor std of noise
            err_ok &= b.sw2 <= a.sw2 + 3 * math.sqrt(2) * problem.floor_std
            ll_ok &= abs(b.ll_gap) <= abs(a.ll_gap) + 3 * math.sqrt(2) * b.ll_se
        else:
            err_ok &= b.sw2_ref <= a.sw2_ref + 0.5 * problem.floor_std
            ll_ok &= abs(b.ll_gap_ref) <= abs(a.ll_gap_ref) + 2 * b.ll_se
    return err_ok, ll_ok


def _cell(r: Row) -> str:
    if not math.isfinite(r.sw2):
        return "diverged"
    return f"{r.excess:.4f} {r.sw2_ref:.4f} {r.ll_gap:+7.2f}"


def table(problem: Problem, name: str, rows: list[Row], nfes) -> tuple[str, dict]:
    ref = next(r for r in rows if r.family == "reference")
    labels = list(dict.fromkeys(r.label for r in rows if r.family != "reference"))
    by = {(r.label, r.nfe_budget): r for r in rows if r.family != "reference"}
    mono = {lab: monotone([by[(lab, n)] for n in nfes if (lab, n) in by], problem) for lab in labels}
    w = max(len(s) for s in labels) + 3
    cw = 25
    out = [f"== {problem.name}, path {name}: N = {problem.n}; MC floor SW2 {problem.floor:.4f} (mean {problem.floor_mean:.4f} "
           f"+- {problem.floor_std:.4f}); reference {ref.label}: SW2 {ref.sw2:.4f}{' (within floor)' if ref.within_floor else ' (OUTSIDE the floor band: judge by ref)'}, "
           f"LL {ref.ll_gap:+.3f}",
           "cell = excess above floor, SW2 to ref, LL gap;  ! warned combination, ~ stochastic;  mono: error / |LL| "
           "non-increasing in NFE",
           " sampler".ljust(w) + "".join(f"NFE {n}".ljust(cw) for n in nfes) + "mono"]
    out.append("-" * len(out[-1]))
    fam = None
    for lab in labels:
        first = next(by[(lab, n)] for n in nfes if (lab, n) in by)
        if fam is not None and first.family != fam:
            out.append("-" * len(out[2]))
        fam = first.family
        mark = "~" if first.stochastic else ("!" if first.warned else " ")
        out.append((mark + lab).ljust(w) + "".join((_cell(by[(lab, n)]) if (lab, n) in by else "-").ljust(cw) for n in nfes)
                   + ("ok" if mono[lab][0] else "NO") + " / " + ("ok" if mono[lab][1] else "NO"))
    return "\n".join(out), mono


def _err(r: Row, use_ref: bool) -> float:
    return r.sw2_ref if use_ref else r.excess


def summary(problem: Problem, name: str, rows: list[Row], nfes, mono: dict, use_diffusers: bool) -> tuple[str, list[dict]]:
    ref = next(r for r in rows if r.family == "reference")
    use_ref = not ref.within_floor
    metric = "SW2 to ref" if use_ref else "SW2 excess above floor"
    out = [f"-- summary {problem.name}, {name} (error = {metric})"]
    data = []
    for n in nfes:
        dflt = next((r for r in rows if r.family == "default" and r.nfe_budget == n), None)
        diff = [r for r in rows if r.family == "diffusers" and r.nfe_budget == n and math.isfinite(r.sw2)]
        ours = [r for r in rows if r.family in ("ours", "default") and r.nfe_budget == n and not r.stochastic
                and not r.warned and math.isfinite(r.sw2)]
        dd = diff[0] if diff else None  # diffusers' default is the first of its kind
        db = min(diff, key=lambda r: _err(r, use_ref)) if diff else None
        ob = min(ours, key=lambda r: _err(r, use_ref)) if ours else None
        item = dict(problem=problem.name, path=name, nfe=n, metric=metric, default=_err(dflt, use_ref),
                    default_ll=dflt.ll_gap, best_ours=ob.label if ob else None, best_ours_err=_err(ob, use_ref) if ob else None)
        line = f"NFE {n:>3}: default {_err(dflt, use_ref):.4f} (LL {dflt.ll_gap:+.2f})"
        if dd is not None:
            def ratio(a, b):  # both within the floor (0 / 0) counts as a tie met
                return a / b if b > 0 else (0.0 if a == 0 else math.inf)

            r1 = ratio(_err(dflt, use_ref), _err(dd, use_ref))
            r2 = ratio(_err(dflt, use_ref), _err(db, use_ref))
            rb = ratio(_err(ob, use_ref), _err(db, use_ref))
            item.update(diffusers_default=dd.label, diffusers_default_err=_err(dd, use_ref), diffusers_default_ll=dd.ll_gap,
                        diffusers_best=db.label, diffusers_best_err=_err(db, use_ref), ratio_default=r1, ratio_best=r2,
                        ratio_best_vs_best=rb, ll_ok=abs(dflt.ll_gap) <= abs(dd.ll_gap) + 2 * dflt.ll_se)
            line += (f" | diffusers {dd.label} {_err(dd, use_ref):.4f} (LL {dd.ll_gap:+.2f}) -> ratio {r1:.2f} | "
                     f"diffusers best {db.label} {_err(db, use_ref):.4f} -> ratio {r2:.2f} | best ours {ob.label} "
                     f"{_err(ob, use_ref):.4f} / best diffusers -> {rb:.2f} | |LL| default <= diffusers': "
                     f"{'yes' if item['ll_ok'] else 'NO'}")
        out.append(line)
        data.append(item)
    top = max(nfes)
    ode = [r for r in rows if r.family in ("ours", "default") and r.nfe_budget == top and not r.stochastic]
    outside = [r.label for r in ode if not r.within_floor and (not use_ref or r.sw2_ref > 2 * problem.floor_std)]
    out.append(f"NFE {top}: our ODE rows outside the floor: {', '.join(outside) or 'none'}"
               + (" (2-D: by SW2 to ref > 2 floor std)" if use_ref else ""))
    warned = {r.label for r in rows if r.warned}
    for k, what in ((0, "error"), (1, "|LL gap|")):
        bad = [lab for lab, ok in mono.items() if not ok[k]]
        out.append(f"{what} not monotone in NFE: {', '.join(b + (' (warned)' if b in warned else '') for b in bad) or 'none'}")
    return "\n".join(out), data


def print_targets(targets: list[dict]) -> None:
    d0 = default_sampler(VPLinear())
    print(f"== targets at NFE 10 (default {d0['sampler']}/{d0['grid']}): error ratio to diffusers' default (<= 0.5) and "
          f"best (<= 0.7); |LL gap| <= diffusers' default at every NFE")
    for t in targets:
        if t["nfe"] == 10 and "ratio_default" in t:
            ok = t["ratio_default"] <= 0.5 and t["ratio_best"] <= 0.7
            print(f"  {t['problem']:<32} {t['path']:<5} {t['metric']:<22} vs default {t['ratio_default']:.2f}  vs best "
                  f"{t['ratio_best']:.2f} ({t['diffusers_best']})  {'met' if ok else 'NOT met'}")
    ll_bad = [f"{t['problem']} {t['path']} NFE {t['nfe']} ({t['default_ll']:+.2f} vs {t['diffusers_default_ll']:+.2f})"
              for t in targets if "ll_ok" in t and not t["ll_ok"]]
    print(f"  |LL gap| worse than diffusers' default: {', '.join(ll_bad) or 'nowhere'}")


def report_from_json(path: Path) -> int:
    """Print the tables, summaries and targets of a stored run again (with this file's reporting code)."""
    import json

    data = json.loads(Path(path).read_text())
    nfes, targets = data["meta"]["nfe"], []
    from scorelab.machine import machine_line

    print(f"run: {data['meta']['command']} ({data['meta']['runtime_s']:.0f} s); machine: {machine_line(data['machine'])}")
    for res in data["problems"]:
        p = Problem(res["problem"], None, res["n"], 0, 0, res["floor"], res["floor_mean"], res["floor_std"], res["floor_samples"])
        rows = [Row(**r) for r in res["rows"]]
        path = make_paths([res["path"]], False)[res["path"]]
        for r in rows:  # this file's warnings, whatever the run's
            if r.family == "ours":
                r.warned = check_combination(path, *r.label.split("/")) is not None
        tab, mono = table(p, res["path"], rows, nfes)
        summ, sdata = summary(p, res["path"], rows, nfes, mono, True)
        print(tab + "\n" + summ + "\n")
        targets += sdata
    print_targets(targets)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small N, NFE 5 10, paths ddpm rf edm: a few-minute demo")
    ap.add_argument("--n", type=int, default=None, help="samples per mixture (default 10000 in 2-D, 5000 above)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the start noise, true sets and SDE noise")
    ap.add_argument("--nfe", type=int, nargs="+", default=None, help="NFE budgets (default 5 10 20 50)")
    ap.add_argument("--ref-steps", type=int, default=None, help="steps of the reference row (default 1000)")
    ap.add_argument("--floor-reps", type=int, default=None, help="independent true sets for the floor (default 8)")
    ap.add_argument("--only", nargs="+", choices=["2d", "32d", "64d"], default=None, help="mixtures to run")
    ap.add_argument("--paths", nargs="+", choices=["ddpm", "vp", "rf", "ve", "edm"], default=None, help="paths to run")
    ap.add_argument("--no-diffusers", action="store_true", help="skip diffusers even if installed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared; at most 2)")
    ap.add_argument("--out", default="samplers.json", help="JSON file name under benchmarks/results/")
    ap.add_argument("--report", type=Path, default=None, help="print the tables of a stored JSON run instead of running")
    args = ap.parse_args(argv)
    if args.report is not None:
        return report_from_json(args.report)
    torch.set_num_threads(max(1, min(args.threads, 2)))
    warnings.simplefilter("ignore")  # the warned combinations are run on purpose and marked '!'
    machine = header("sampler accuracy: exact mixture denoisers, ours vs diffusers")
    nfes = args.nfe or ([5, 10] if args.quick else [5, 10, 20, 50])
    args.ref_steps = args.ref_steps or (300 if args.quick else 1000)
    args.floor_reps = args.floor_reps or (4 if args.quick else 8)
    n2, nh = (args.n, args.n) if args.n else ((3000, 1500) if args.quick else (10000, 5000))
    which = args.only or ["2d", "32d", "64d"]
    names = args.paths or (["ddpm", "rf", "edm"] if args.quick else ["ddpm", "vp", "rf", "ve", "edm"])
    dver = None if args.no_diffusers else have_diffusers()
    print(f"diffusers: {dver or 'not used'}; NFE {nfes}; paths {names}; mixtures {which}", flush=True)
    problems = []
    if "2d" in which:
        problems.append(Problem("8 Gaussians 2-D", eight_gaussians_mixture(), n2, args.seed + 7, 256))
    if "32d" in which:
        problems.append(Problem("random 32-D (K=8, full cov)", random_mixture(32, 8, seed=0), nh, args.seed + 7, 256))
    if "64d" in which:
        problems.append(Problem("random 64-D (K=16, isotropic)", random_mixture(64, 16, seed=1, full_cov=False), nh,
                                args.seed + 7, 256))
    paths = make_paths(names, dver is not None)
    t_start = time.perf_counter()
    results, texts, targets = [], [], []
    for p in problems:
        p.setup(args.seed + 100, args.floor_reps)
        for name, path in paths.items():
            rows = run_problem(p, name, path, nfes, args, dver is not None)
            tab, mono = table(p, name, rows, nfes)
            summ, sdata = summary(p, name, rows, nfes, mono, dver is not None)
            print(tab + "\n" + summ + "\n", flush=True)
            texts += [tab, summ]
            targets += sdata
            results.append(dict(problem=p.name, path=name, path_repr=repr(path), n=p.n, dim=p.mixture.dim, K=p.mixture.K,
                                floor=p.floor, floor_mean=p.floor_mean, floor_std=p.floor_std, floor_samples=p.floor_samples,
                                rows=[asdict(r) for r in rows], monotone=mono, summary=sdata))
    runtime = time.perf_counter() - t_start
    d0 = default_sampler(VPLinear())
    print_targets(targets)
    print(f"\ntotal {runtime:.0f} s")
    meta = dict(command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), runtime_s=runtime, nfe=nfes, seed=args.seed,
                ref_steps=args.ref_steps, floor_reps=args.floor_reps, paths={k: repr(v) for k, v in paths.items()},
                samplers_py_sha256=hashlib.sha256(SAMPLERS_FILE.read_bytes()).hexdigest()[:16], torch=torch.__version__,
                diffusers=dver, threads=torch.get_num_threads(), default=d0,
                diffusers_configs={k: {lab: dict(cls=v[0], **v[1]) for lab, v in d.items()} for k, d in DIFFUSERS.items()})
    write_json(args.out, dict(meta=meta, problems=results, targets=targets), machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
