"""Every family on one table: the same data, the same wall-clock budget, the same measurements.

    .venv/bin/python benchmarks/families.py                         # every preset below, 5 minutes each
    .venv/bin/python benchmarks/families.py --presets fmnist-rf fmnist-vae --minutes 2
    .venv/bin/python benchmarks/families.py --quick                 # a smoke run (20 s each, 200 samples)

Each preset is trained alone (one at a time, in its own process: ``python -m scorelab train``) on
the embedded Fashion-MNIST subset for ``--minutes`` of wall-clock training; a preset that builds on
another run (latent diffusion on an autoencoder) first trains what it needs with a share of the
same budget, so its row's total training time equals every other row's. Then, through the run API and the family's own capabilities:

* train img/s (the trainer's logged throughput), steps, the precision the run chose;
* sample time per 1000 images with the family's default sampler (timed, after one warm-up batch);
* domain FID / KID / precision / recall of ``--n`` samples against the 1000 held-out test images
  (the shipped Fashion-MNIST LeNet's features);
* bits/dim of the first ``--n-test`` test images for every likelihood the family has (diffusion:
  ELBO and PF-ODE; VAE: IWAE at k = 1 and k = ``--iwae-k``; PixelCNN: exact), marked bound /
  estimate / exact.

Prints a table and writes ``benchmarks/results/families.json`` and ``families.png`` (one sample
grid per row, side by side). Anchors from papers are labelled with their dataset in the README,
never mixed into this table.
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
from common import RESULTS, header, write_json  # noqa: E402

# preset -> the runs it needs first: config key -> (preset, share of the row's budget); the row's own
# run gets what is left, so every row spends the same total training time
PRESETS = {
    "fmnist-rf": {},
    "fmnist-vae": {},
    "fmnist-pixelcnn": {},
    "fmnist-pixelcnn-tiles": {},
    "fmnist-dcgan": {},
    "fmnist-stylegan": {},
    "fmnist-ldm": {"model.autoencoder": ("fmnist-autoencoder", 0.5)},
}


def scorelab(*args, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "scorelab", *map(str, args)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip().splitlines()[-1:]}")
    return res


def train(preset: str, work: Path, minutes: float, extra: list[str]) -> tuple[Path, float]:
    """Train ``preset`` for ``minutes`` into ``work``; returns the run folder and the wall time."""
    name = f"fam-{preset}"
    run = work / name
    if run.exists():
        import shutil

        shutil.rmtree(run)
    t0 = time.perf_counter()
    scorelab("train", preset, "--name", name, "--runs", work, "--no-progress", "--train.steps", 10**9,
             "--train.max_minutes", minutes, "--train.sample_every", 0, "--train.ckpt_every", 0, *extra)
    return run, time.perf_counter() - t0


def throughput(run: Path) -> float:
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if r.strip()]
    rows = [r for r in rows if "ex_s" in r][1:] or [r for r in rows if "ex_s" in r]  # the first window includes warm-up
    return sum(r["ex_s"] for r in rows) / max(len(rows), 1)


def measure(run_dir: Path, args) -> dict:
    from scorelab.eval import evaluate, evaluate_nll
    from scorelab.runs import open_run

    run = open_run(run_dir)
    fam = run.family
    caps = fam.capabilities()
    row = {"family": fam.name, "steps": run.step, "params": sum(p.numel() for m in run.modules.values() for p in m.parameters()),
           "train_img_s": round(throughput(run_dir), 1), "compute": run.cfg.resolved.get("precision", "?")}
    if caps.generate:
        ev = evaluate(run, n=args.n, seed=0, progress=False)  # draws the --n samples once, timed
        row["sample_s_per_1000"] = round(ev["sampling_seconds"] * 1000 / args.n, 2)
        row.update({k: ev[k] for k in ("fid", "kid", "precision", "recall") if k in ev})
        row["grid"] = fam.sample(run.modules, 32, seed=0)  # the first 32 of those samples (same seeds)
    bpd = {}
    for m in caps.nll:
        opts = {"n_t": args.n_t} if "n_t" in caps.nll_options else {}
        ks = [1, args.iwae_k] if "k" in caps.nll_options else [None]
        for k in ks:
            o = dict(opts, **({"k": k} if k is not None else {}))
            res = evaluate_nll(run, methods=[m], n=args.n_test, n_slow=args.n_slow, progress=False, **o)[m]
            kind = "exact" if res["exact"] else ("estimate" if m == "pf_ode" else "bound")
            label = m if k is None else f"{m} k={k}"
            bpd[label] = {"bpd": res["mean"], "stderr": res["stderr"], "n": res["n"], "kind": kind, "seconds": res["seconds"]}
    row["bits_per_dim"] = bpd
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), help="presets to compare (default: all)")
    ap.add_argument("--minutes", type=float, default=5.0, help="training wall time per run (default 5)")
    ap.add_argument("--n", type=int, default=1000, help="samples scored per run (default 1000)")
    ap.add_argument("--n-test", type=int, default=256, help="test images for bits/dim (default 256)")
    ap.add_argument("--n-slow", type=int, default=64, help="test images for the PF-ODE (default 64)")
    ap.add_argument("--n-t", type=int, default=64, help="ELBO times per image of diffusion runs (default 64)")
    ap.add_argument("--iwae-k", type=int, default=1000, help="importance samples of the VAE's IWAE bound (default 1000)")
    ap.add_argument("--workdir", default=str(RESULTS / "family_runs"))
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 s each, 200 samples, 32 test images")
    args = ap.parse_args()
    if args.quick:
        args.minutes, args.n, args.n_test, args.n_slow, args.iwae_k = 1 / 3, 200, 32, 8, 64
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    machine = header(f"families on Fashion-MNIST (embedded subset), {args.minutes:g} min of training each, "
                     f"{args.n} samples vs the 1000 test images, bits/dim of {args.n_test} test images")
    rows = []
    for preset in args.presets:
        needs = PRESETS.get(preset, {})
        try:
            extra, spent, share_left = [], 0.0, 1.0
            for key, (dep, share) in needs.items():
                dep_run, s = train(dep, work, share * args.minutes, [])
                extra += [f"--{key}", str(dep_run)]
                spent, share_left = spent + s, share_left - share
            run, s = train(preset, work, share_left * args.minutes, extra)
            row = {"preset": preset, "train_seconds_total": round(spent + s, 1), **measure(run, args)}
        except (RuntimeError, subprocess.SubprocessError) as e:
            row = {"preset": preset, "error": str(e)}
        rows.append(row)
        print(f"{preset}: " + json.dumps({k: v for k, v in row.items() if k != "grid"}), file=sys.stderr, flush=True)

    cols = ["preset", "family", "steps", "compute", "train_img_s", "sample_s_per_1000", "fid", "kid", "precision", "recall"]
    print("\n| " + " | ".join(cols + ["bits/dim (kind)"]) + " |")
    print("|" + " --- |" * (len(cols) + 1))
    for r in rows:
        if "error" in r:
            print(f"| {r['preset']} | failed: {r['error']} |")
            continue
        cells = [f"{r.get(c):.3g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols]
        b = "; ".join(f"{k} {v['bpd']:.3f}±{v['stderr'] or 0:.3f} ({v['kind']}, n={v['n']})" for k, v in r.get("bits_per_dim", {}).items())
        print("| " + " | ".join(cells) + f" | {b or '-'} |")
    grids = [(r["preset"], r.pop("grid")) for r in rows if "grid" in r]
    write_json("families_quick.json" if args.quick else "families.json", {"args": vars(args), "rows": rows}, machine)
    if grids:
        plot(grids, RESULTS / ("families_quick.png" if args.quick else "families.png"))


def plot(grids, out: Path) -> None:
    from scorelab.viz import _plt, atomic_path, image_grid

    plt = _plt()
    fig, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids), 3.0), dpi=110, squeeze=False)
    for ax, (name, x) in zip(axes[0], grids):
        ax.imshow(image_grid(x.clamp(-1, 1), nrow=4), cmap="gray", vmin=0, vmax=255)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
