"""Data-parallel scaling on this machine: images (examples) per second of the real trainer with 1
and 2 processes at the same global batch, and the communication share of a 2-process step.

Each configuration is one ``torchrun --standalone --nproc-per-node N`` (PyTorch's launcher) of this
file's worker, which builds the run exactly as ``scorelab train`` does and trains it (rank 0
writes the run folder in a temporary directory). Step times come from the trainer's
:data:`~scorelab.train.trainer.EVENT_HOOK` (``step`` -> ``step_done``: data, forward, backward with
DDP's all-reduce, optimizer, EMA, the trainer's own collectives), the median over the steps after
``--warmup``. Communication: after training, in the same process group, the all-reduces of one
step timed alone with the step's sizes (one of every synchronised module's gradients, flattened,
plus the trainer's scalars: the stop flag and one loss mean per optimizer update), median over
rounds; their share of the 2-process step is an upper bound of what the step spends waiting (DDP
overlaps its bucket all-reduces with the rest of the backward).

On a 2-core machine (shared with other work) 2 processes cannot be faster than 1 at the same
global batch; the point is the overhead. With ``--threads 1`` (default) each process uses one
intra-op thread, so 1 process uses one core and 2 processes two: a speed-up then says the cores
were free, not that data parallelism is free.

    .venv/bin/python benchmarks/scaling.py                      # moons-rf and fmnist-rf, 1 and 2 processes
    .venv/bin/python benchmarks/scaling.py --presets moons-rf --steps 100 --batch 256

Prints a table and writes ``benchmarks/results/scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULTS = {"moons-rf": {"steps": 150, "batch": 512}, "fmnist-rf": {"steps": 25, "batch": 64}}


def _timed_all_reduce(t, rounds: int) -> float:
    """Median seconds of one all-reduce of ``t`` over the group."""
    import torch.distributed as dist

    times = []
    for _ in range(rounds):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(args) -> None:
    """One process of a configuration (under torchrun): train, time, report from rank 0."""
    import torch

    import scorelab.train.trainer as T
    from scorelab.cli.common import build, load_data, parse_overrides, resolve_config
    from scorelab.train.config import RunConfig, apply_overrides
    from scorelab.train.distributed import shutdown

    over = ["--train.steps", str(args.steps), "--train.batch_size", str(args.batch), "--train.threads", str(args.threads),
            "--train.precision", "fp32", "--train.sample_every", "0", "--train.ckpt_every", "0", "--train.log_every",
            str(args.steps), "--train.device", "cpu"]
    cfg = RunConfig.from_dict(apply_overrides(resolve_config(args.preset), parse_overrides(over)))
    dataset = load_data(cfg)
    family = build(cfg, dataset)
    trainer = T.Trainer(cfg, Path(args.runs) / cfg.name, family, dataset, progress=False)
    starts, times = {}, []

    def hook(name, tr):
        if name == "step":
            starts[tr.step] = time.perf_counter()
        elif name == "step_done":
            times.append(time.perf_counter() - starts[tr.step - 1])

    T.EVENT_HOOK = hook
    try:
        trainer.fit()
    finally:
        T.EVENT_HOOK = None
    step_s = statistics.median(times[args.warmup:])
    out = {"preset": args.preset, "processes": trainer.world, "global_batch": args.batch, "local_batch": trainer.local_batch,
           "threads": torch.get_num_threads(), "steps_timed": len(times) - args.warmup, "step_s": step_s,
           "img_s": args.batch / step_s, "params": sum(p.numel() for m in trainer.modules.values() for p in m.parameters()
                                                     if p.requires_grad)}
    if trainer.comm is not None:
        sync = [k for k in trainer.synchronised]
        n = sum(p.numel() for k in sync for p in trainer.modules[k].parameters() if p.requires_grad)
        grad_s = _timed_all_reduce(torch.zeros(n), args.rounds)
        scalar_s = _timed_all_reduce(torch.zeros(1, dtype=torch.float64), args.rounds)
        updates = len(trainer.optimizers)  # one loss mean per optimizer update (a GAN: two)
        comm_s = grad_s + (1 + updates) * scalar_s
        out.update(synchronised=trainer.synchronised, grad_numel=n, allreduce_grad_s=grad_s, allreduce_scalar_s=scalar_s,
                   comm_s=comm_s, comm_share=comm_s / step_s)
    if trainer.is_main:
        with open(args.out, "a") as f:
            f.write(json.dumps(out) + "\n")
    del trainer
    shutdown()


def launch(preset: str, nproc: int, steps: int, batch: int, args, tmp: Path) -> dict:
    out = tmp / f"{preset}-{nproc}.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), __file__,
           "--worker", "--preset", preset, "--steps", str(steps), "--batch", str(batch), "--threads", str(args.threads),
           "--warmup", str(args.warmup), "--rounds", str(args.rounds), "--runs", str(tmp / f"runs-{preset}-{nproc}"),
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{preset} with {nproc} processes failed:\n{res.stderr[-3000:]}")
    return json.loads(out.read_text().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=list(DEFAULTS))
    p.add_argument("--steps", type=int, help="training steps per run (default: per preset)")
    p.add_argument("--batch", type=int, help="global batch (default: per preset)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the median")
    p.add_argument("--rounds", type=int, default=30, help="rounds of the all-reduce timing")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--runs", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from common import header, write_json

    machine = header("benchmarks/scaling.py: data-parallel training, 1 vs 2 processes (torchrun, gloo, CPU)")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for preset in args.presets:
            steps = args.steps or DEFAULTS.get(preset, {}).get("steps", 50)
            batch = args.batch or DEFAULTS.get(preset, {}).get("batch", 128)
            for nproc in (1, 2):
                load0 = os.getloadavg()
                r = launch(preset, nproc, steps, batch, args, Path(d))
                r["loadavg_before"], r["loadavg_after"] = load0, os.getloadavg()
                rows.append(r)
                print(f"  {preset} x{nproc}: {r['img_s']:.0f} img/s (load {load0[0]:.2f} -> {r['loadavg_after'][0]:.2f})",
                      flush=True)
    print()
    print(f"{'preset':10s} {'procs':>5s} {'batch':>11s} {'params':>8s} {'step ms':>8s} {'img/s':>7s} {'vs 1':>5s} "
          f"{'all-reduce ms':>13s} {'comm share':>10s} {'load 1m':>11s}")
    base = {}
    for r in rows:
        if r["processes"] == 1:
            base[r["preset"]] = r["img_s"]
        comm = f"{1e3 * r['comm_s']:.2f}" if "comm_s" in r else "-"
        share = f"{100 * r['comm_share']:.0f}%" if "comm_share" in r else "-"
        print(f"{r['preset']:10s} {r['processes']:5d} {r['global_batch']:5d}={r['processes']}x{r['local_batch']:<4d}"
              f"{r['params']:9d} {1e3 * r['step_s']:8.1f} {r['img_s']:7.0f} {r['img_s'] / base[r['preset']]:5.2f} "
              f"{comm:>13s} {share:>10s} {r['loadavg_before'][0]:5.2f}-{r['loadavg_after'][0]:<5.2f}")
    write_json("scaling.json", {"threads_per_process": args.threads, "warmup": args.warmup, "rounds": args.rounds, "rows": rows},
               machine)


if __name__ == "__main__":
    main()
