"""Bits/dim on the Fashion-MNIST test split: DDPM-eps, VDM and rectified flow at equal training budget.

    python benchmarks/likelihood.py                       # train the three presets, then measure
    python benchmarks/likelihood.py --steps 50 --n-test 16 --quick    # a smoke run

Each model is its preset (``fmnist-ddpm``, ``fmnist-vdm``, ``fmnist-rf``: the same 1.19M-parameter
U-Net, batch 128) trained for the same number of optimisation steps in its own process (equal
steps rather than equal minutes, so that a noisy shared machine cannot tilt the comparison; the
wall time of each is reported). Then ``scorelab eval RUN --nll`` measures, on the first
``--n-test`` test images:

* the ELBO in bits/dim: the discrete DDPM ELBO (prior + denoising sum + discretized-Gaussian
  reconstruction; ``--n-t`` sampled steps per image, default 256) for DDPM, the continuous-time ELBO
  (VDM's, on the learned schedule for VDM, on the fixed path for rectified flow);
* the probability-flow ODE bits/dim (uniform dequantization, Hutchinson trace, dopri5 at
  rtol = atol = 1e-5),

each with its standard error over images (which includes the time, noise, dequantization and probe
randomness) and the seconds it took. Prints a table and writes
``benchmarks/results/likelihood.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import RESULTS, RF_RECIPE_BEFORE_OT, header, write_json  # noqa: E402
MODELS = {"ddpm": "fmnist-ddpm", "vdm": "fmnist-vdm", "rf": "fmnist-rf"}
# the recipe the README's table was measured with, where a preset has moved on since
PINNED = {"rf": RF_RECIPE_BEFORE_OT}


def scorelab(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "scorelab", *map(str, args)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return res


def trained_steps(run: Path) -> int:
    from scorelab.train.checkpoint import load_checkpoint

    ck = run / "checkpoint.safetensors"
    return int(load_checkpoint(ck)[1].get("step", 0)) if ck.is_file() else -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1100, help="optimisation steps per model (default: the presets' 1100)")
    ap.add_argument("--n-test", type=int, default=256, help="test images measured (default 256)")
    ap.add_argument("--n-t", type=int, default=256, help="times per image for the ELBO's diffusion term (default 256)")
    ap.add_argument("--models", default="ddpm,vdm,rf", help="comma-separated subset of ddpm,vdm,rf")
    ap.add_argument("--workdir", default=str(RESULTS / "likelihood_runs"), help="where the runs live (reused if complete)")
    ap.add_argument("--quick", action="store_true", help="smoke run: write likelihood_quick.json instead")
    args = ap.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for key in args.models.split(","):
        if key not in MODELS:
            raise SystemExit(f"--models: unknown model {key!r} (expected {', '.join(MODELS)})")
        name = f"lik-{key}-{args.steps}"
        run = work / name
        train_s = None
        if trained_steps(run) != args.steps:
            if run.exists():
                import shutil

                shutil.rmtree(run)
            t0 = time.perf_counter()
            scorelab("train", MODELS[key], "--name", name, "--runs", work, "--no-progress", "--train.steps", args.steps,
                     "--train.batch_size", 128, "--train.max_minutes", 0, "--train.sample_every", 0,  # one batch for all
                     *PINNED.get(key, ()))
            train_s = time.perf_counter() - t0
            print(f"trained {name} in {train_s:.0f} s", file=sys.stderr)
        res = {}
        for method in ("elbo", "pf_ode"):
            # each estimate is cached in the run folder: changing --n-t re-runs only the (cheap) ELBO
            cache = run / (f"bench_nll_{method}_n{args.n_test}" + ("" if method == "pf_ode" else f"_t{args.n_t}") + ".json")
            if not cache.is_file():
                bs = max(1, 2048 // args.n_t) if method == "elbo" else 64  # the ELBO evaluates n_t noised copies per image
                scorelab("eval", run, "--nll", "--nll-method", method, "--nll-n", args.n_test, "--nll-n-slow", 0,
                         "--nll-t", args.n_t, "--nll-batch", bs)
                cache.write_text((run / "eval_nll.json").read_text())
            res[method] = json.loads(cache.read_text())[method]
        rows.append({"model": key, "preset": MODELS[key], "steps": args.steps, "train_seconds": train_s, **res})

    machine = header(f"\nbits/dim on the first {args.n_test} Fashion-MNIST test images ({args.steps} training steps each)\n")
    print(f"{'model':6s} {'ELBO bpd':>16s} {'(prior/diff/recon)':>22s} {'s':>7s} {'PF-ODE bpd':>16s} {'s':>7s} {'NFE':>5s}")
    for r in rows:
        e, p = r["elbo"], r["pf_ode"]
        terms = f"{e['prior']:.3f}/{e['diffusion']:.3f}/{e['reconstruction']:.3f}"
        print(f"{r['model']:6s} {e['mean']:9.3f} ± {e['stderr']:.3f} {terms:>22s} {e['seconds']:7.1f} "
              f"{p['mean']:9.3f} ± {p['stderr']:.3f} {p['seconds']:7.1f} {p.get('nfe', float('nan')):5.0f}")
    write_json("likelihood_quick.json" if args.quick else "likelihood.json", {"n_test": args.n_test, "n_t": args.n_t, "rows": rows},
               machine)


if __name__ == "__main__":
    main()
