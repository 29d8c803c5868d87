"""Train for a fixed wall-clock budget, then measure: scorelab's default vs diffusers' DDPM.

    python benchmarks/train_budget.py --minutes 10 --data fmnist          # the issue's setting
    python benchmarks/train_budget.py --minutes 1 --n-eval 200 --quick    # a smoke run

Each contender runs in its own subprocess (so peak memory is its own) on the same data, the same
batch size (the preset's unless ``--batch``) and the same budget: scorelab's default preset
(``configs/fmnist-rf.yaml``: rectified flow, patchified U-Net, its own learning rate) and, when
diffusers is installed, ``UNet2DModel`` + ``DDPMScheduler`` (eps prediction, uniform timesteps,
AdamW at ``--lr``, 100 warm-up steps) with a parameter count close to ours. Afterwards each
draws ``--n-eval`` samples (ours: its preset sampler; diffusers: ``DDPMScheduler`` ancestral with
``--ddpm-steps`` steps) and both are scored with the shipped domain classifier (FID, KID) against the test split. Prints a table and writes JSON to
``benchmarks/results/train_budget.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import RESULTS, header, write_json  # noqa: E402


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_split(data: str, split: str):
    from scorelab.data import load_dataset

    return load_dataset(data, split=split)


def worker_ours(args) -> dict:
    from scorelab.cli.common import build, resolve_config
    from scorelab.metrics import evaluate_images
    from scorelab.train.config import RunConfig
    from scorelab.train.trainer import Trainer

    raw = resolve_config(None)  # the default preset, fmnist-rf
    raw["name"] = "budget-ours"
    raw["data"] = {"name": args.data}
    raw["train"].update(steps=10**9, max_minutes=args.minutes, batch_size=args.batch, sample_every=0, ckpt_every=0)
    cfg = RunConfig.from_dict(raw)
    train = load_split(args.data, "train")
    fam = build(cfg, train)
    params = sum(p.numel() for p in fam.net.parameters())
    run_dir = Path(args.workdir) / "ours"
    shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's own scratch run: a rerun starts afresh
    tr = Trainer(cfg, run_dir, fam, train, progress=False)
    t0 = time.perf_counter()
    summary = tr.fit()
    train_s = time.perf_counter() - t0
    mods = tr.sampling_modules()
    t0 = time.perf_counter()
    x = fam.sample(mods, args.n_eval, seed=0)
    sample_s = time.perf_counter() - t0
    test = load_split(args.data, "test")
    m = evaluate_images(x, test.float_images()[: args.n_real])
    return {"name": "scorelab rf (default preset)", "params": params, "steps": summary["step"], "train_s": train_s,
            "img_s": summary["step"] * args.batch / summary["elapsed"], "sample_s": sample_s,
            "sampler": f"{fam.cfg.sampler} x{fam.cfg.sampling_steps}", "compute": tr.precision.describe(), **m,
            "peak_mb": peak_mb()}


def diffusers_unet(width: int):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, layers_per_block=2,
        block_out_channels=(width, 2 * width, 2 * width),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=32 if width % 32 == 0 else 8 if width % 8 == 0 else 4,  # must divide every width
    )


def worker_diffusers(args) -> dict:
    from diffusers import DDPMScheduler

    from scorelab.metrics import evaluate_images

    torch.manual_seed(0)
    target = args.match_params
    # the width whose parameter count is closest to ours
    best = min((abs(sum(p.numel() for p in diffusers_unet(w).parameters()) - target), w) for w in (16, 24, 28, 32, 40, 48, 64))
    net = diffusers_unet(best[1])
    params = sum(p.numel() for p in net.parameters())
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr)
    train = load_split(args.data, "train")
    x_all = train.float_images()
    g = torch.Generator().manual_seed(0)
    steps, t0 = 0, time.perf_counter()
    net.train()
    while time.perf_counter() - t0 < 60 * args.minutes:
        idx = torch.randint(0, len(x_all), (args.batch,), generator=g)
        x0 = x_all[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        loss = torch.nn.functional.mse_loss(net(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        for grp in opt.param_groups:
            grp["lr"] = args.lr * min(1.0, (steps + 1) / 100)
        opt.step()
        steps += 1
    train_s = time.perf_counter() - t0
    net.eval()
    sched.set_timesteps(args.ddpm_steps)
    t0 = time.perf_counter()
    outs = []
    with torch.no_grad():
        for i in range(0, args.n_eval, 250):
            b = min(250, args.n_eval - i)
            x = torch.randn((b, 1, 28, 28), generator=torch.Generator().manual_seed(i))
            for t in sched.timesteps:
                x = sched.step(net(x, t).sample, t, x).prev_sample
            outs.append(x.clamp(-1, 1))
    sample_s = time.perf_counter() - t0
    test = load_split(args.data, "test")
    m = evaluate_images(torch.cat(outs), test.float_images()[: args.n_real])
    return {"name": f"diffusers UNet2DModel+DDPM (width {best[1]})", "params": params, "steps": steps, "train_s": train_s,
            "img_s": steps * args.batch / train_s, "sample_s": sample_s, "sampler": f"DDPMScheduler x{args.ddpm_steps}",
            "compute": "fp32 (as shipped)", **m, "peak_mb": peak_mb()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per contender")
    p.add_argument("--data", default="fmnist", help="dataset registry name (fmnist: the full 60k/10k)")
    p.add_argument("--batch", type=int, default=0, help="batch size of both contenders (default: the preset's)")
    p.add_argument("--lr", type=float, default=2e-3, help="diffusers' AdamW learning rate (ours: the preset's)")
    p.add_argument("--n-eval", type=int, default=1000, help="generated images scored")
    p.add_argument("--n-real", type=int, default=10000, help="test images scored against")
    p.add_argument("--ddpm-steps", type=int, default=100, help="diffusers DDPM sampling steps")
    p.add_argument("--only", choices=["ours", "diffusers"], help="run one contender")
    p.add_argument("--quick", action="store_true", help="smoke run: shorter everything")
    p.add_argument("--out", default=str(RESULTS / "train_budget.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="/tmp/scorelab-train-budget", help=argparse.SUPPRESS)
    p.add_argument("--match-params", type=int, default=0, help="with --only diffusers: the parameter count its width is chosen to match (default 2M)")
    args = p.parse_args()
    if not args.batch:
        from scorelab.cli.common import resolve_config

        args.batch = int(resolve_config(None)["train"]["batch_size"])
    if args.quick:
        args.n_eval, args.n_real, args.ddpm_steps = min(args.n_eval, 200), min(args.n_real, 1000), min(args.ddpm_steps, 20)

    if args.worker:
        res = worker_ours(args) if args.worker == "ours" else worker_diffusers(args)
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        (Path(args.workdir) / f"{args.worker}.json").write_text(json.dumps(res))  # kept if the other contender fails
        print("RESULT " + json.dumps(res))
        return

    def launch(kind, extra=()):
        cmd = [sys.executable, __file__, "--worker", kind, "--minutes", str(args.minutes), "--data", args.data,
               "--batch", str(args.batch), "--lr", str(args.lr), "--n-eval", str(args.n_eval), "--n-real", str(args.n_real),
               "--ddpm-steps", str(args.ddpm_steps), "--workdir", args.workdir, *extra]
        print(f"running {kind} for {args.minutes} min ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            raise SystemExit(f"{kind} failed:\n{out.stderr[-3000:]}")
        return json.loads(line[-1][7:])

    rows = []
    if args.only != "diffusers":
        rows.append(launch("ours"))
    try:
        import diffusers  # noqa: F401

        have_diffusers = True
    except ImportError:
        have_diffusers = False
    if args.only != "ours" and have_diffusers:
        target = rows[0]["params"] if rows else (args.match_params or 2_000_000)
        rows.append(launch("diffusers", ["--match-params", str(target)]))
    cols = ["name", "params", "steps", "img_s", "peak_mb", "fid", "kid", "precision", "recall", "sampler", "sample_s"]
    machine = header(f"\nbudget {args.minutes} min per contender, data {args.data}, batch {args.batch}, {args.n_eval} samples vs "
                     f"{args.n_real} test images")
    for r in rows:
        print(f"  {r['name']}: {r['compute']}")
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    if len(rows) == 2:
        a, b = rows
        print(f"\nimg/s ratio ours/diffusers: {a['img_s'] / b['img_s']:.2f}; FID ratio ours/diffusers: {a['fid'] / b['fid']:.3f}")
    write_json(Path(args.out).name, {"args": vars(args), "rows": rows}, machine)


if __name__ == "__main__":
    main()
