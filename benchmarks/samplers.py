"""Sampler accuracy against the exact answer: our samplers and diffusers' schedulers, NFE for NFE.

Ground truth is a Gaussian mixture, whose denoiser ``E[x_0 | x_t]`` is exact
(``GaussianMixture.denoiser(path)``), so every error in the table is the sampler's own
discretisation error plus Monte Carlo noise. Everyone integrates the same forward process, the
DDPM discrete path ``DDPMDiscrete(T=1000)`` (linear betas 1e-4 .. 0.02, diffusers' default), in
float64 on CPU, from the same N(0, I) start noise ``z``.

Mixtures: the 2-D eight Gaussians (``eight_gaussians_mixture()``, N = 10000 samples) and a 32-D
random mixture (``random_mixture(32, K=8, seed=0)``, N = 5000).

Metrics, each against one fixed set ``Y`` of N fresh true samples:

* ``SW2``: sliced Wasserstein-2 (``scorelab.metrics.sliced_wasserstein``, fixed projections).
  The Monte Carlo floor is the SW2 of R further independent true sets against ``Y``
  (``floor = sqrt(mean SW2^2)``); a cell is starred when ``SW2 <= floor mean + 2 std``
  (indistinguishable from exact sampling at this N). The error above the floor is
  ``excess = sqrt(max(SW2^2 - floor^2, 0))`` (squared W2 of empirical measures is about the true
  squared distance plus the sampling term).
* ``LL gap``: ``mean log p(x_gen) - mean log p(Y)`` under the true density, signed (negative:
  samples fall between modes or spread too wide; positive: collapsed onto the modes), with its
  standard error ``sqrt(var_gen / N + var_Y / N)``.
* Same noise, against the reference row's output ``x_ref`` (second table): ``SW2(x_gen, x_ref)``
  and the paired LL gap ``mean(log p(x_gen) - log p(x_ref))``. Every deterministic sampler maps
  the same ``z``, so the Monte Carlo noise largely cancels and what is left is the
  discretisation error, resolved far below the floor (in 2-D the SW2 floor is dominated by the
  binomial noise of the mode weights, ~ N^(-1/4)). The JSON also holds ``rms_ref``, the RMS
  distance ``|x_gen - x_ref|`` per sample (the error of the flow map itself).

The summary compares the best deterministic row of ours with the best of diffusers at each NFE
under each criterion (SW2 above the floor, |LL gap|, SW2 to ref) and lists our ODE rows that
are still outside the floor at the largest NFE.

Rows:

* ours: ``sampler/grid`` for every sampler of ``scorelab.samplers.SAMPLERS`` among ddim, euler,
  heun, dpmpp_2m, dpmpp_3m, unipc (ODE) and ancestral, euler_maruyama (stochastic, marked ``~``),
  on the time grids uniform, logsnr and karras. ``steps = (NFE - 1) // nfe_per_step + 1`` grid
  steps (the last step, onto the clean time, costs one evaluation), so Heun uses 5, 9, 19, 49.
* diffusers (if installed): DDIM, DPM-Solver++(2M), Euler, Heun and UniPC (bh2) as configured
  by default for a DDPM model (``beta_schedule="linear"``, 1000 train steps, epsilon
  prediction; DDIM with ``clip_sample=False`` since the data are not in [-1, 1]), plus the
  Karras-sigmas / trailing-spacing variants, driven by the diffusers pipeline loop with an
  epsilon model ``eps = exact(x, t, kind="eps")`` evaluated at the scheduler's timestep
  (fractional timesteps interpolate log alphabar). NFE counts model calls (Heun: 2n - 1).
* ref: ``dpmpp_2m/logsnr`` with 1000 steps (discretisation error far below the floor).

Usage (2 cores shared: one torch thread is the default and usually fastest)::

    .venv/bin/python benchmarks/samplers.py            # full run (NFE 5 10 20 50), 5-8 min
    .venv/bin/python benchmarks/samplers.py --quick    # small N, NFE 5 10, ~20-40 s
    .venv/bin/python benchmarks/samplers.py --n 4000 --seed 1 --out /tmp/s.json

Prints one table per mixture and a summary (best of ours vs best of diffusers at each NFE) and
writes JSON (default ``benchmarks/results/samplers.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scorelab.data.mixture import GaussianMixture, eight_gaussians_mixture, random_mixture  # noqa: E402
from scorelab.metrics import sliced_wasserstein  # noqa: E402
from scorelab.paths import DDPMDiscrete  # noqa: E402
from scorelab.random import randn  # noqa: E402
from scorelab.samplers import SAMPLERS, nfe_per_step, sample  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "samplers.json"
SAMPLERS_FILE = Path(__file__).resolve().parents[1] / "scorelab" / "samplers.py"  # hashed into the JSON
F64 = torch.float64

ODE_SAMPLERS = [s for s in ("ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc") if s in SAMPLERS]
SDE_SAMPLERS = [s for s in ("ancestral", "euler_maruyama") if s in SAMPLERS]
GRIDS = ("uniform", "logsnr", "karras")
REFERENCE = ("dpmpp_2m", "logsnr")  # sampler, grid of the many-step reference row

# diffusers variants: label -> (class name, config overrides on top of the DDPM defaults)
DDPM_CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                   prediction_type="epsilon")
DIFFUSERS = {
    "DDIM": ("DDIMScheduler", dict(clip_sample=False)),  # default spacing "leading"
    "DDIM/trailing": ("DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing")),
    "DPM++2M": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    "DPM++2M/karras": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2,
                                                           use_karras_sigmas=True)),
    "Euler": ("EulerDiscreteScheduler", dict()),
    "Euler/karras": ("EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
    "Heun": ("HeunDiscreteScheduler", dict()),
    "Heun/karras": ("HeunDiscreteScheduler", dict(use_karras_sigmas=True)),
    "UniPC": ("UniPCMultistepScheduler", dict(solver_type="bh2")),
    "UniPC/karras": ("UniPCMultistepScheduler", dict(solver_type="bh2", use_karras_sigmas=True)),
}


@dataclass
class Row:
    """One sampler run: which sampler, its cost and its errors."""

    label: str  # "sampler/grid" (ours), scheduler variant (diffusers) or "sampler/grid xN" (reference)
    family: str  # "ours" | "diffusers" | "reference"
    nfe_budget: int  # the NFE column this run belongs to
    nfe: int  # denoiser evaluations actually made
    steps: int  # grid steps (ours) or num_inference_steps (diffusers)
    stochastic: bool
    seconds: float
    sw2: float = math.inf  # SW2 to the true set Y
    excess: float = math.inf  # sqrt(max(sw2^2 - floor^2, 0))
    within_floor: bool = False  # sw2 <= floor mean + 2 std (independent-set band)
    ll_gap: float = -math.inf  # mean log p(gen) - mean log p(Y)
    ll_se: float = math.nan  # its standard error
    sw2_ref: float = math.nan  # SW2 to the reference row's output from the same start noise
    rms_ref: float = math.nan  # sqrt(mean |x_i - x_ref_i|^2): flow-map error (ODE rows)
    ll_gap_ref: float = math.nan  # mean log p(gen) - mean log p(x_ref), paired
    ll_se_ref: float = math.nan  # paired standard error std(log p(gen) - log p(x_ref)) / sqrt(N)
    resolved: bool = False  # deterministic row whose distance to the reference is below the MC resolution


class SlicedW2:
    """``metrics.sliced_wasserstein(x, y, n_proj, Generator().manual_seed(seed))`` for equal-size sets,
    with the sorted projections of the fixed sets (Y, x_ref) computed once.

    ``theta: (D, n_proj)`` unit directions drawn exactly as ``sliced_wasserstein`` draws them;
    ``SW2 = sqrt(mean over directions and quantiles of (sort(x theta) - sort(y theta))^2)``.
    """

    def __init__(self, dim: int, n_proj: int, seed: int):
        theta = randn((dim, n_proj), generator=torch.Generator().manual_seed(seed), dtype=F64)
        self.theta = theta / theta.norm(dim=0, keepdim=True)  # (D, P)
        self.n_proj, self.seed = n_proj, seed

    def sorted_projections(self, x: torch.Tensor) -> torch.Tensor:
        """(P, N): each direction's sorted projections (rows contiguous: sorting is faster)."""
        return torch.sort((x.to(F64) @ self.theta).T.contiguous(), dim=1).values

    @staticmethod
    def distance(px: torch.Tensor, py: torch.Tensor) -> float:
        return float((px - py).pow(2).mean().sqrt())

    def check(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Agreement with ``scorelab.metrics.sliced_wasserstein`` (guards against drift of either)."""
        ours = self.distance(self.sorted_projections(x), self.sorted_projections(y))
        lib = float(sliced_wasserstein(x, y, self.n_proj, generator=torch.Generator().manual_seed(self.seed)))
        if not math.isclose(ours, lib, rel_tol=1e-9, abs_tol=1e-12):
            raise RuntimeError(f"cached SW2 {ours} != metrics.sliced_wasserstein {lib}")


@dataclass
class Problem:
    """A mixture with its fixed true set Y, projections, Monte Carlo floor and reference output."""

    name: str
    mixture: GaussianMixture
    n: int  # samples per set
    proj_seed: int  # seed of the SW2 directions (the same for every row)
    n_proj: int  # number of SW2 directions
    floor: float = math.nan  # sqrt(mean SW2^2) of independent true sets against Y
    floor_mean: float = math.nan
    floor_std: float = math.nan
    floor_ll_gap: float = math.nan  # LL gap of one independent true set
    floor_ll_se: float = math.nan
    floor_samples: list = field(default_factory=list)

    def setup(self, seed: int, reps: int) -> None:
        """Draw Y and ``reps`` independent true sets to measure the floor."""
        self.sw = SlicedW2(self.mixture.dim, self.n_proj, self.proj_seed)
        gen = torch.Generator().manual_seed(seed)
        self.y = self.mixture.sample(self.n, gen)  # (N, D) true samples
        self.lp_y = self.mixture.log_prob(self.y)  # (N,)
        self.py = self.sw.sorted_projections(self.y)
        self.x_ref = self.lp_xref = self.pxref = None
        vals = []
        for r in range(reps):
            y2 = self.mixture.sample(self.n, gen)
            vals.append(self.sw.distance(self.sw.sorted_projections(y2), self.py))
            if r == 0:
                self.sw.check(y2, self.y)
                self.floor_ll_gap, self.floor_ll_se = self.ll_gap(self.mixture.log_prob(y2))
        v = torch.tensor(vals, dtype=F64)
        self.floor_samples = vals
        self.floor = float(v.pow(2).mean().sqrt())
        self.floor_mean, self.floor_std = float(v.mean()), float(v.std()) if reps > 1 else 0.0

    def ll_gap(self, lp: torch.Tensor) -> tuple[float, float]:
        """``mean lp - mean log p(Y)`` and its standard error, for ``lp = log p(x_gen): (N,)``."""
        gap = lp.mean() - self.lp_y.mean()
        se = (lp.var() / lp.numel() + self.lp_y.var() / self.lp_y.numel()).sqrt()
        return float(gap), float(se)

    def set_reference(self, x: torch.Tensor) -> None:
        self.x_ref, self.lp_xref, self.pxref = x, self.mixture.log_prob(x), self.sw.sorted_projections(x)

    def row(self, x, label, family, nfe_budget, nfe, steps, stochastic, seconds) -> Row:
        r = Row(label, family, nfe_budget, nfe, steps, stochastic, seconds)
        if not torch.isfinite(x).all():
            return r  # diverged: infinite errors
        px, lp = self.sw.sorted_projections(x), self.mixture.log_prob(x)
        r.sw2 = self.sw.distance(px, self.py)
        r.excess = math.sqrt(max(r.sw2**2 - self.floor**2, 0.0))
        r.within_floor = r.sw2 <= self.floor_mean + 2 * self.floor_std
        r.ll_gap, r.ll_se = self.ll_gap(lp)
        if self.x_ref is not None:
            r.sw2_ref = self.sw.distance(px, self.pxref)
            r.rms_ref = float((x - self.x_ref).pow(2).sum(1).mean().sqrt())
            d = lp - self.lp_xref
            r.ll_gap_ref, r.ll_se_ref = float(d.mean()), float(d.std() / math.sqrt(d.numel()))
            # below the MC resolution: SW2 cannot move by more than sw2_ref (triangle inequality)
            r.resolved = (not stochastic) and r.sw2_ref <= 2 * self.floor_std and abs(r.ll_gap_ref) <= 2 * r.ll_se
        return r


# --------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------
def steps_for(name: str, nfe: int) -> int:
    """Grid steps of our sampler ``name`` that spend at most ``nfe`` evaluations (last step costs 1)."""
    return (nfe - 1) // nfe_per_step(name) + 1


def run_ours(problem: Problem, path, z, name: str, grid: str, steps: int, seed: int):
    den = problem.mixture.denoiser(path)
    gen = torch.Generator().manual_seed(seed + 1)  # only stochastic samplers draw from it
    t0 = time.perf_counter()
    x = sample(den, z.clone(), steps, sampler=name, grid=grid, generator=gen)
    return x, den.nfe, time.perf_counter() - t0


def make_scheduler(label: str):
    import diffusers

    cls_name, overrides = DIFFUSERS[label]
    return getattr(diffusers, cls_name)(**DDPM_CONFIG, **overrides)


def diffusers_steps(label: str, nfe: int) -> int:
    """num_inference_steps within an NFE budget: Heun calls the model 2n - 1 times, the others n."""
    return (nfe + 1) // 2 if DIFFUSERS[label][0] == "HeunDiscreteScheduler" else nfe


def run_diffusers(problem: Problem, path, z, label: str, steps: int):
    """The diffusers pipeline loop with an exact epsilon model on the DDPM path (t in its units)."""
    den = problem.mixture.denoiser(path)
    sched = make_scheduler(label)
    sched.set_timesteps(steps)
    t0 = time.perf_counter()
    latents = z.clone() * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(latents, t)
        tt = torch.full((inp.shape[0],), float(t), dtype=F64)
        eps = den(inp.to(F64), tt, kind="eps").to(latents.dtype)
        latents = sched.step(eps, t, latents).prev_sample
    return latents, den.nfe, time.perf_counter() - t0


def have_diffusers() -> str | None:
    try:
        import diffusers
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        return diffusers.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def run_problem(problem: Problem, nfes, args, use_diffusers: bool) -> list[Row]:
    path = DDPMDiscrete(T=1000)
    problem.setup(args.seed + 100, args.floor_reps)
    z = torch.randn(problem.n, problem.mixture.dim, generator=torch.Generator().manual_seed(args.seed), dtype=F64)
    rows: list[Row] = []

    def log(r: Row):
        rows.append(r)
        print(f"  [{problem.name}] {r.label:<26} NFE {r.nfe:>4}  SW2 {r.sw2:.4f}  LL gap {r.ll_gap:+.4f}"
              f"  ({r.seconds:.1f}s)", file=sys.stderr, flush=True)

    name, grid = REFERENCE
    x, nfe, sec = run_ours(problem, path, z, name, grid, args.ref_steps, args.seed)
    log(problem.row(x, f"{name}/{grid} x{args.ref_steps}", "reference", args.ref_steps, nfe, args.ref_steps,
                    False, sec))
    problem.set_reference(x)
    for budget in nfes:
        for name in ODE_SAMPLERS + SDE_SAMPLERS:
            steps = steps_for(name, budget)
            for grid in GRIDS:
                x, nfe, sec = run_ours(problem, path, z, name, grid, steps, args.seed)
                log(problem.row(x, f"{name}/{grid}", "ours", budget, nfe, steps, name in SDE_SAMPLERS, sec))
        if use_diffusers:
            for label in DIFFUSERS:
                steps = diffusers_steps(label, budget)
                x, nfe, sec = run_diffusers(problem, path, z, label, steps)
                log(problem.row(x, label, "diffusers", budget, nfe, steps, False, sec))
    return rows


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------
def _cell_true(r: Row) -> str:
    if not math.isfinite(r.sw2):
        return "diverged"
    return f"{r.sw2:.4f}{'*' if r.within_floor else ' '} {r.ll_gap:+.3f}"


def _cell_ref(r: Row) -> str:
    if not math.isfinite(r.sw2_ref):
        return "diverged"
    return f"{r.sw2_ref:.4f}{'*' if r.resolved else ' '} {r.ll_gap_ref:+.3f}"


def _grid_table(rows: list[Row], nfes, cell, cw: int = 18) -> list[str]:
    """Rows = sampler label (ours, then diffusers), columns = NFE budgets."""
    by = {(r.label, r.nfe_budget): r for r in rows if r.family != "reference"}
    labels = list(dict.fromkeys(r.label for r in rows if r.family != "reference"))
    w = max(len(s) for s in labels + ["sampler"]) + 3
    head = " sampler".ljust(w) + "".join(f"NFE {n}".ljust(cw) for n in nfes)
    out = [head, "-" * len(head)]
    family = None
    for lab in labels:
        first = next(by[(lab, n)] for n in nfes if (lab, n) in by)
        if family is not None and first.family != family:
            out.append("-" * len(head))
        family = first.family
        name = ("~" if first.stochastic else " ") + lab
        out.append(name.ljust(w) + "".join((cell(by[(lab, n)]) if (lab, n) in by else "-").ljust(cw) for n in nfes))
    return out


def table(problem: Problem, rows: list[Row], nfes) -> str:
    """The two per-mixture tables: against the true distribution, and against the reference row."""
    ref = next((r for r in rows if r.family == "reference"), None)
    out = [f"== {problem.name}: N = {problem.n}, {problem.n_proj} projections",
           f"   MC floor: SW2 = {problem.floor:.4f} (mean {problem.floor_mean:.4f} +- {problem.floor_std:.4f} over "
           f"{len(problem.floor_samples)} independent true sets; '*' = within floor: SW2 <= "
           f"{problem.floor_mean + 2 * problem.floor_std:.4f})",
           f"   LL gap of an independent true set: {problem.floor_ll_gap:+.4f} (se {problem.floor_ll_se:.4f})"]
    if ref is not None:
        out.append(f"   reference {ref.label} (NFE {ref.nfe}): SW2 {ref.sw2:.4f}{'*' if ref.within_floor else ''}  "
                   f"LL gap {ref.ll_gap:+.4f} (se {ref.ll_se:.4f})")
        if not ref.within_floor:
            out.append("   NOTE: the reference itself is outside the SW2 band: this start-noise draw is an unlucky one "
                       "(mode weights), and every deterministic row shares it; judge those rows by the second table.")
    out += ["", "cell = SW2 to fresh true samples ['*' within floor], LL gap = mean log p(gen) - mean log p(true)"]
    out += _grid_table(rows, nfes, _cell_true)
    if ref is not None:
        out += ["", f"same start noise, against the reference output: cell = SW2(gen, ref), LL gap vs ref (paired);",
                f"'*' = discretisation error below the MC resolution: SW2(gen, ref) <= 2 floor std = "
                f"{2 * problem.floor_std:.4f} and |LL gap vs ref| <= 2 se of the LL gap"]
        out += _grid_table(rows, nfes, _cell_ref)
    out.append("(~ stochastic: not coupled to the reference; ours heun and diffusers Heun spend 2n-1 NFE: 5, 9, 19, 49)")
    return "\n".join(out)


def _best(rows: list[Row], family: str, budget: int, key) -> Row | None:
    """Best deterministic row of ``family`` at an NFE budget (stochastic rows are not coupled to the noise)."""
    cand = [r for r in rows if r.family == family and r.nfe_budget == budget and not r.stochastic
            and math.isfinite(key(r))]
    return min(cand, key=key) if cand else None


CRITERIA = {
    # name: (key to minimise, error above the floor used for the ratio, format)
    "SW2": (lambda r: r.sw2, lambda r: r.excess),
    "|LL gap|": (lambda r: abs(r.ll_gap), lambda r: abs(r.ll_gap)),
    "SW2 to ref": (lambda r: r.sw2_ref, lambda r: r.sw2_ref),
}


def summary(problem: Problem, rows: list[Row], nfes, use_diffusers: bool) -> tuple[str, list[dict]]:
    """Best of ours vs best of diffusers (deterministic rows) per NFE, for each criterion."""
    out = [f"== summary {problem.name}: best deterministic row per NFE; ratio = ours / diffusers of the error above "
           f"the floor",
           f"   (SW2: excess = sqrt(SW2^2 - floor^2), floor {problem.floor:.4f}; |LL gap|: itself; SW2 to ref: itself)"]
    head = f"{'criterion':<11}{'NFE':>4}  {'best ours':<20}{'value':>9}{'error':>9}   {'best diffusers':<16}{'value':>9}" \
           f"{'error':>9}{'ratio':>8}"
    out += [head, "-" * len(head)]
    data = []
    for crit, (key, err) in CRITERIA.items():
        for n in nfes:
            o = _best(rows, "ours", n, key)
            d = _best(rows, "diffusers", n, key) if use_diffusers else None
            if o is None:
                continue
            ratio = math.nan
            if d is not None:
                ratio = err(o) / err(d) if err(d) > 0 else (0.0 if err(o) == 0 else math.inf)
            line = f"{crit:<11}{n:>4}  {o.label:<20}{key(o):>9.4f}{err(o):>9.4f}   "
            if d is not None:
                line += f"{d.label:<16}{key(d):>9.4f}{err(d):>9.4f}{ratio:>8.2f}"
            out.append(line)
            data.append(dict(criterion=crit, nfe=n, ours=o.label, ours_value=key(o), ours_error=err(o),
                             diffusers=d.label if d else None, diffusers_value=key(d) if d else None,
                             diffusers_error=err(d) if d else None, ratio=ratio))
    top = max(nfes)
    ode = [r for r in rows if r.family == "ours" and r.nfe_budget == top and not r.stochastic]
    bad_sw = [r.label for r in ode if not r.within_floor]
    bad_ll = [f"{r.label} ({r.ll_gap:+.3f}+-{r.ll_se:.3f})" for r in ode if abs(r.ll_gap) > 2 * r.ll_se]
    worst = max(ode, key=lambda r: r.sw2_ref) if ode else None
    out.append(f"NFE {top}, our ODE rows outside the floor by SW2: {', '.join(bad_sw) or 'none'}")
    out.append(f"NFE {top}, our ODE rows with |LL gap| > 2 se: {', '.join(bad_ll) or 'none'}")
    bad_ref = [f"{r.label} ({r.sw2_ref:.4f}, {r.ll_gap_ref:+.3f})" for r in ode if not r.resolved]
    out.append(f"NFE {top}, our ODE rows not resolved against the reference (SW2 to ref, LL gap vs ref): "
               f"{', '.join(bad_ref) or 'none'}")
    if worst is not None and math.isfinite(worst.sw2_ref):
        out.append(f"NFE {top}, largest SW2 to ref among our ODE rows: {worst.label} {worst.sw2_ref:.4f} "
                   f"(MC floor {problem.floor:.4f})")
    return "\n".join(out), data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small N, NFE 5 10, short reference: a ~1 min demo")
    ap.add_argument("--n", type=int, default=None, help="samples per mixture (default 10000 in 2-D, 5000 in 32-D)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the start noise, reference sets and SDE noise")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    ap.add_argument("--nfe", type=int, nargs="+", default=None, help="NFE budgets (default 5 10 20 50)")
    ap.add_argument("--ref-steps", type=int, default=None, help="steps of the reference row (default 1000)")
    ap.add_argument("--floor-reps", type=int, default=None, help="independent true sets for the floor (default 8)")
    ap.add_argument("--only", choices=["2d", "32d"], default=None, help="run one mixture only")
    ap.add_argument("--no-diffusers", action="store_true", help="skip diffusers even if installed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared; at most 2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(args.threads, 2)))
    nfes = args.nfe or ([5, 10] if args.quick else [5, 10, 20, 50])
    args.ref_steps = args.ref_steps or (200 if args.quick else 1000)
    args.floor_reps = args.floor_reps or (4 if args.quick else 8)
    n2, n32 = (args.n, args.n) if args.n else ((2000, 1000) if args.quick else (10000, 5000))
    problems = []
    if args.only in (None, "2d"):
        problems.append(Problem("8 Gaussians 2-D", eight_gaussians_mixture(), n2, args.seed + 7, 256))
    if args.only in (None, "32d"):
        problems.append(Problem("random mixture 32-D (K=8, seed 0)", random_mixture(32, 8, seed=0), n32,
                                args.seed + 7, 256))
    dver = None if args.no_diffusers else have_diffusers()
    print(f"ours: ODE {ODE_SAMPLERS}, stochastic {SDE_SAMPLERS}, grids {list(GRIDS)}; "
          f"diffusers: {dver or 'not used'}; NFE {nfes}", file=sys.stderr)

    t_start = time.perf_counter()
    results, texts = [], []
    for p in problems:
        rows = run_problem(p, nfes, args, dver is not None)
        tab = table(p, rows, nfes)
        summ, sdata = summary(p, rows, nfes, dver is not None)
        texts += [tab, summ]
        results.append(dict(name=p.name, n=p.n, dim=p.mixture.dim, K=p.mixture.K, n_proj=p.n_proj,
                            floor=p.floor, floor_mean=p.floor_mean, floor_std=p.floor_std,
                            floor_samples=p.floor_samples, floor_ll_gap=p.floor_ll_gap, floor_ll_se=p.floor_ll_se,
                            rows=[asdict(r) for r in rows], summary=sdata))
    runtime = time.perf_counter() - t_start
    print("\n\n".join(texts))
    print(f"\ntotal {runtime:.0f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), runtime_s=runtime, nfe=nfes,
                seed=args.seed, ref_steps=args.ref_steps, floor_reps=args.floor_reps, path=repr(DDPMDiscrete(T=1000)),
                samplers_py_sha256=hashlib.sha256(SAMPLERS_FILE.read_bytes()).hexdigest()[:16],
                torch=torch.__version__, diffusers=dver, threads=torch.get_num_threads(),
                python=platform.python_version(), machine=platform.machine(),
                diffusers_configs={k: dict(cls=v[0], **DDPM_CONFIG, **v[1]) for k, v in DIFFUSERS.items()})
    args.out.write_text(json.dumps(dict(meta=meta, problems=results), indent=1, default=float))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
