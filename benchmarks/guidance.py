"""Classifier-free guidance on class-conditional Fashion-MNIST: fidelity vs diversity, U-Net vs DiT.

    python benchmarks/guidance.py                    # train both nets for 4.5 min each, then measure
    python benchmarks/guidance.py --minutes 0.3 --n 100 --scales 0,2 --quick    # a smoke run

Two class-conditional rectified-flow models, trained with label dropout 0.1 for the same wall
time, one after the other in their own processes: the U-Net of ``fmnist-rf-cond`` and the DiT of
``fmnist-dit`` (adaLN-Zero). For each guidance weight ``w`` in ``--scales`` (``v = (1 + w) v_y -
w v_null``, seed 001; gamma = 1 + w in seed 002's form) both draw ``--n`` samples, an equal number
per class, from the same seeds (Heun, 10 steps, one batched conditional + unconditional pass per
evaluation), and are scored with the shipped domain classifier:

* accuracy: the fraction the classifier assigns to the requested class (fidelity to the label);
* FID (and precision/recall) against the test split (quality and diversity).

Prints a table, writes ``benchmarks/results/guidance.json`` and draws the trade-off (accuracy vs
FID, one curve per net, points labelled by w) to ``benchmarks/results/guidance.png``, plus a grid
of samples per w (``guidance_samples.png``: one row per w, one column per class).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import RESULTS, header, write_json  # noqa: E402
NETS = {"unet": "fmnist-rf-cond", "dit": "fmnist-dit"}


def train(preset: str, name: str, work: Path, minutes: float) -> dict:
    cmd = [sys.executable, "-m", "scorelab", "train", preset, "--name", name, "--runs", str(work), "--no-progress",
           "--train.steps", "1000000", "--train.max_minutes", str(minutes), "--train.sample_every", "0"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    return {"steps": summary["step"], "train_seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=4.5, help="training wall time per net (default 4.5)")
    ap.add_argument("--scales", default="0,0.5,1,2,3,4", help="guidance weights w")
    ap.add_argument("--n", type=int, default=1000, help="samples per (net, w), equal per class (default 1000)")
    ap.add_argument("--nets", default="unet,dit", help="comma-separated subset of unet,dit")
    ap.add_argument("--workdir", default=str(RESULTS / "guidance_runs"), help="where the runs live")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs in --workdir instead of retraining")
    ap.add_argument("--quick", action="store_true", help="smoke run: write guidance_quick.* instead")
    args = ap.parse_args()

    from scorelab.eval import reference_set
    from scorelab.metrics import DomainMetrics, class_accuracy
    from scorelab.quantize import to_model
    from scorelab.runs import open_run
    from scorelab.viz import save_image_grid

    scales = [float(s) for s in args.scales.split(",")]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows, grids = [], {}
    real = None
    metrics = DomainMetrics()
    for key in args.nets.split(","):
        if key not in NETS:
            raise SystemExit(f"--nets: unknown net {key!r} (expected {', '.join(NETS)})")
        name = f"guid-{key}"
        run = work / name
        if args.reuse and (run / "checkpoint.safetensors").is_file():
            info = {"steps": None, "train_seconds": None}
        else:
            if run.exists():
                import shutil

                shutil.rmtree(run)
            info = train(NETS[key], name, work, args.minutes)
            print(f"trained {key}: {info['steps']} steps in {info['train_seconds']} s", file=sys.stderr)
        opened = open_run(str(run))
        family, mods = opened.family, opened.modules
        info["steps"] = opened.step
        info["precision"] = opened.cfg.resolved.get("precision_note", "")
        params = sum(p.numel() for p in family.net.parameters())
        if real is None:
            real = to_model(reference_set(opened.cfg).x)
            metrics.set_real(real)
        K = family.num_classes
        y = torch.arange(args.n) % K
        for w in scales:
            t0 = time.perf_counter()
            x = family.sample(mods, args.n, seed=0, y=y, **({"cfg": w} if w else {}))
            dt = time.perf_counter() - t0
            m = metrics.evaluate(x)
            acc = class_accuracy(x, y)
            rows.append({"net": key, "params": params, "w": w, "gamma": 1 + w, "accuracy": round(acc, 4),
                         "fid": round(m["fid"], 3), "precision": round(m["precision"], 4), "recall": round(m["recall"], 4),
                         "sampling_seconds": round(dt, 1), **info, "minutes": args.minutes})
            print(f"{key} w={w}: acc {acc:.3f} FID {m['fid']:.2f} ({dt:.0f} s)", file=sys.stderr)
            grids.setdefault(key, []).append(x[:K])

    machine = header(f"\nclassifier-free guidance, class-conditional Fashion-MNIST, {args.n} samples per row "
                     f"({args.minutes} min of training per net)\n")
    print(f"{'net':5s} {'params':>7s} {'steps':>6s} {'w':>4s} {'accuracy':>9s} {'FID':>8s} {'prec':>6s} {'recall':>6s} {'sample s':>9s}")
    for r in rows:
        print(f"{r['net']:5s} {r['params'] / 1e6:6.2f}M {r['steps']:6d} {r['w']:4.1f} {r['accuracy']:9.3f} {r['fid']:8.2f} "
              f"{r['precision']:6.3f} {r['recall']:6.3f} {r['sampling_seconds']:9.1f}")
    suffix = "_quick" if args.quick else ""
    write_json(f"guidance{suffix}.json", {"n": args.n, "scales": scales, "rows": rows}, machine)
    plot(rows, RESULTS / f"guidance{suffix}.png")
    for key, g in grids.items():
        save_image_grid(torch.cat(g), RESULTS / f"guidance_samples_{key}{suffix}.png", nrow=g[0].shape[0])
    print(f"\nwrote {RESULTS / f'guidance{suffix}.json'}, guidance{suffix}.png, guidance_samples_*{suffix}.png")


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for net in dict.fromkeys(r["net"] for r in rows):
        rs = [r for r in rows if r["net"] == net]
        ax.plot([r["fid"] for r in rs], [r["accuracy"] for r in rs], "o-", label=f"{net} ({rs[0]['steps']} steps)")
        for r in rs:
            ax.annotate(f"w={r['w']:g}", (r["fid"], r["accuracy"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("FID to the test split (domain features; lower is better)")
    ax.set_ylabel("accuracy on the requested class")
    ax.set_title("classifier-free guidance: fidelity vs diversity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
