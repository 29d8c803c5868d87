"""What the sampling loop costs next to the network: ``sample()`` vs a bare loop vs diffusers, side by side.

A 3-layer MLP ``net(x, tau) = W3 SiLU(W2 SiLU(W1 [x, tau]))`` (width 128, float32, 2-D data) is
sampled for 50 steps on the DDPM path (``DDPMDiscrete(T=1000)``) through an eps-predicting
:class:`~scorelab.targets.Denoiser`. Every variant is timed as one whole call (grid, start and
loop), with ``torch.no_grad()`` around all of them, and the variants are interleaved: each round
times every variant once, in the same order, so a load change on the (shared) machine hits all of
them alike. The report is the median over rounds of the wall clock and of the process's CPU time
(the robust one when the machine's cores are oversubscribed: see :func:`measure`), and each
variant's ratio to the network's own 50 forward passes (the same net, inputs and time inputs, no
sampler at all):

* ``net only``: the 50 ``net(x, tau_i)`` calls with the time inputs made beforehand;
* ``bare loop``: the same calls with DDIM's update ``x = c1_i x + c2_i eps`` written inline, its
  coefficients made beforehand (the least any sampler can cost);
* ``diffusers DDIM``: ``DDIMScheduler.set_timesteps(50)`` and its ``step`` loop (``clip_sample=False``);
* ours: ``scorelab.samplers.sample(den, x, 50, sampler=..., grid=...)`` for DDIM, DPM-Solver++(2M)
  and UniPC on the uniform and log-SNR grids, and the default (``sampler=None``).

Usage (2 cores shared: one torch thread)::

    .venv/bin/python benchmarks/sampler_overhead.py              # batch 1 and 10000, 60 / 10 rounds
    .venv/bin/python benchmarks/sampler_overhead.py --rounds 30 --batch 1

Prints a table per batch size and writes ``benchmarks/results/sampler_overhead.json`` with the
machine record (``benchmarks/common.py``). The last column counts the tensor operations (ATen ops,
the network's included) of one call per step, from one extra untimed call of each variant: at
batch 1 each costs about a microsecond, so it shows where a variant's time over the network goes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, write_json  # noqa: E402
from scorelab.paths import DDPMDiscrete, time_grid  # noqa: E402
from scorelab.samplers import sample  # noqa: E402
from scorelab.targets import Denoiser  # noqa: E402

STEPS = 50
OURS = [("ddim", "uniform"), ("ddim", "logsnr"), ("dpmpp_2m", "uniform"), ("dpmpp_2m", "logsnr"),
        ("unipc", "logsnr_x0"), (None, None)]


class MLP3(torch.nn.Module):
    """``net(x: (B, D), tau: (B,)) -> (B, D)``: three linear layers with SiLU, time concatenated to the input."""

    def __init__(self, dim: int = 2, width: int = 128):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(dim + 1, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                                          torch.nn.SiLU(), torch.nn.Linear(width, dim))

    def forward(self, x, tau):
        return self.layers(torch.cat([x, tau[:, None]], 1))


def variants(batch: int, use_diffusers: bool) -> dict:
    """name -> zero-argument callable doing one whole sampling call (or the net's own passes)."""
    torch.manual_seed(0)
    net = MLP3()
    path = DDPMDiscrete(T=1000)
    den = Denoiser(net, path, "eps")
    x = torch.randn(batch, 2)
    ts = time_grid(path, STEPS, "uniform")
    c = path.coefficients(ts)
    a, s = c.alpha.tolist(), c.sigma.tolist()
    taus = [path.c_noise(t).to(torch.float32).expand(batch).contiguous() for t in ts[:-1]]
    c1 = [a[i + 1] / a[i] for i in range(STEPS - 1)]
    c2 = [s[i + 1] - a[i + 1] * s[i] / a[i] for i in range(STEPS - 1)]

    def net_only():
        for tau in taus:
            net(x, tau)

    def bare_loop():
        y = x
        for i in range(STEPS - 1):
            y = c1[i] * y + c2[i] * net(y, taus[i])
        eps = net(y, taus[-1])
        return (y - s[-2] * eps) / a[-2]  # the last step returns x0_hat

    out = {"net only": net_only, "bare loop": bare_loop}
    if use_diffusers:
        from diffusers import DDIMScheduler

        sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False)

        def diffusers_ddim():
            sched.set_timesteps(STEPS)
            y = x
            for t in sched.timesteps:
                eps = net(y, (t / 1000.0).expand(batch).to(torch.float32))
                y = sched.step(eps, t, y).prev_sample
            return y

        out["diffusers DDIM"] = diffusers_ddim
    for name, grid in OURS:
        label = f"{name}/{grid}" if name else "default"
        out[label] = (lambda name=name, grid=grid: sample(den, x, STEPS, sampler=name, grid=grid))
    return out


def measure(fns: dict, rounds: int) -> tuple[dict, dict]:
    """Interleaved timings: ``rounds`` rounds, each timing every variant once.

    Returns ``(wall, cpu)``: name -> list of seconds, by ``time.perf_counter`` and by
    ``time.process_time`` (the CPU time this one-threaded process spent: on a shared machine whose
    cores are oversubscribed, a millisecond call is often descheduled for a whole time slice, which
    the wall clock counts and the CPU clock does not).
    """
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():  # warm-up (first-call allocations, caches)
            f()
            f()
        for _ in range(rounds):
            for k, f in fns.items():
                c0, t0 = time.process_time(), time.perf_counter()
                f()
                t1, c1 = time.perf_counter(), time.process_time()
                wall[k].append(t1 - t0)
                cpu[k].append(c1 - c0)
    return wall, cpu


def ops_per_step(fns: dict) -> dict:
    """name -> ATen operations of one call divided by the steps (untimed: a dispatch mode counts them)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    out = {}
    with torch.no_grad():
        for k, f in fns.items():
            with Count() as c:
                f()
            out[k] = c.n / STEPS
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 10000], help="batch sizes (default 1 10000)")
    ap.add_argument("--rounds", type=int, nargs="+", default=None, help="rounds per batch size (default 60 for "
                    "batch < 1000, 10 otherwise)")
    ap.add_argument("--no-diffusers", action="store_true", help="skip diffusers even if installed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = header(f"sampler overhead: {STEPS} steps, 3-layer MLP (width 128), DDPM path, eps denoiser")
    use_diffusers = False
    if not args.no_diffusers:
        try:
            import diffusers  # noqa: F401

            use_diffusers = True
        except ImportError:
            print("diffusers not installed: its row is skipped")
    results = []
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores")
    for j, batch in enumerate(args.batch):
        rounds = args.rounds[min(j, len(args.rounds) - 1)] if args.rounds else (60 if batch < 1000 else 10)
        fns = variants(batch, use_diffusers)
        wall, cpu = measure(fns, rounds)
        ops = ops_per_step(fns)
        mw = {k: statistics.median(v) for k, v in wall.items()}
        mc = {k: statistics.median(v) for k, v in cpu.items()}
        bw, bc = mw["net only"], mc["net only"]
        print(f"\nbatch {batch}: medians of {rounds} interleaved rounds (wall clock | CPU time of this process)")
        print(f"  {'variant':<20}{'wall ms':>10}{'x net':>8}{'cpu ms':>10}{'x net':>8}{'cpu us/step over net':>22}"
              f"{'ops/step':>10}")
        for k in mw:
            print(f"  {k:<20}{mw[k] * 1e3:>10.3f}{mw[k] / bw:>8.2f}{mc[k] * 1e3:>10.3f}{mc[k] / bc:>8.2f}"
                  f"{(mc[k] - bc) / STEPS * 1e6:>22.1f}{ops[k]:>10.2f}")
        results.append(dict(batch=batch, rounds=rounds, median_wall_s=mw, median_cpu_s=mc,
                            ratio_wall={k: m / bw for k, m in mw.items()}, ratio_cpu={k: m / bc for k, m in mc.items()},
                            ops_per_step=ops, wall_s=wall, cpu_s=cpu))
    write_json("sampler_overhead.json", dict(command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), steps=STEPS,
                                             threads=torch.get_num_threads(), loadavg=load, results=results), machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
