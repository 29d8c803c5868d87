"""Training-step throughput of the denoising nets on this CPU (not part of the test run).

One step = forward + eps-prediction MSE + backward + AdamW step on a random batch of
28x28x1 images (what training Fashion-MNIST costs). Every variant is built once, warmed up, and
then all variants are timed *side by side* in interleaved rounds (the machine is shared, so a
slow period hurts every variant alike); we report the median step time over all rounds.

Variants: our :class:`~scorelab.nets.UNet` at a few sizes in float32 and under bfloat16 autocast
(the caller's, as ``train.precision: bf16`` runs it; the nets hold no precision switch), channels_last, patchify stems, fewer convolutions at full resolution,
optionally ``torch.compile``; and ``diffusers.UNet2DModel`` at a matched parameter count, run by
the same loop (float32 as shipped, and with bfloat16 autocast + channels_last for fairness).

    .venv/bin/python benchmarks/net_speed.py                 # the default table
    .venv/bin/python benchmarks/net_speed.py --quick         # fewer variants and rounds
    .venv/bin/python benchmarks/net_speed.py --only default,diffusers --batch 64 128
    .venv/bin/python benchmarks/net_speed.py --compile       # add torch.compile variants

Prints a table and writes ``benchmarks/results/net_speed.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import header, write_json  # noqa: E402

from scorelab.nets import UNet, UNetConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "net_speed.json"

# name -> UNetConfig overrides. "ADM" = the DDPM / ADM layout on full 28x28 pixels (patch_size=1),
# layer for layer the same as the diffusers baseline with the same channels.
ADM32 = dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(2,), patch_size=1, pixel_channels=0)
ADM64 = dict(ADM32, base_channels=64)
OURS = {
    "ADM64 p1 fp32": dict(ADM64),
    "ADM64 p1 bf16": dict(ADM64, bf16=True),
    "ADM64 p1 bf16+cl": dict(ADM64, bf16=True, channels_last=True),
    "ADM64 p2 bf16": dict(ADM64, patch_size=2, bf16=True),
    "ADM32 p1 fp32": dict(ADM32),
    "ADM32 p1 fp32+cl": dict(ADM32, channels_last=True),
    "ADM32 p1 bf16": dict(ADM32, bf16=True),
    # fewer 3x3 convolutions at 28x28
    "ADM32 p1 bf16 nrb(1,2,2)": dict(ADM32, bf16=True, num_res_blocks=(1, 2, 2)),
    # patchify stem: 2x2 pixels -> one cell; the U-Net runs on 14 -> 7 -> 4
    "ADM32 p2 fp32": dict(ADM32, patch_size=2),
    "ADM32 p2 bf16": dict(ADM32, patch_size=2, bf16=True),
    "ADM32 p2 bf16 cl+layernorm": dict(ADM32, patch_size=2, bf16=True, channels_last=True, norm="layer"),
    "ADM32 p2 bf16 attn@14,7": dict(ADM32, patch_size=2, bf16=True, attention_levels=(1, 2)),
    # the default: one block per level on the way down
    "default = ADM32 p2 nrb1": dict(ADM32, patch_size=2, num_res_blocks=1),
    "default bf16": dict(ADM32, patch_size=2, bf16=True, num_res_blocks=1),
    # ... plus a full-resolution output conv after unpatchifying
    "ADM32 p2 bf16 nrb1 pix8": dict(ADM32, patch_size=2, bf16=True, num_res_blocks=1, pixel_channels=8),
    # matmul-heavier: 4x4 patches, a 7 -> 4 U-Net with attention at 4
    "ADM64 p4 (1,2) bf16": dict(ADM64, patch_size=4, channel_mult=(1, 2), attention_levels=(1,), bf16=True),
}
DEFAULT = "default = ADM32 p2 nrb1"
assert UNetConfig(**OURS[DEFAULT]) == UNetConfig(), "keep the benchmark's default row equal to UNetConfig()"
QUICK = ["ADM32 p1 fp32", "ADM32 p1 bf16", "ADM32 p2 bf16", DEFAULT, "default bf16"]


def _diffusers_kwargs(base: int) -> dict:
    """diffusers' DDPM-style UNet2DModel with our ADM layout: (b, 2b, 2b), 2 blocks, attention at 7x7."""
    return dict(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        block_out_channels=(base, 2 * base, 2 * base),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=32,
    )


DIFFUSERS = {
    "diffusers 32 fp32": (_diffusers_kwargs(32), dict()),
    "diffusers 32 bf16": (_diffusers_kwargs(32), dict(bf16=True)),
    "diffusers 64 fp32": (_diffusers_kwargs(64), dict()),
}
REFERENCE = "diffusers 32 fp32"  # same layout and ~ the same parameter count as our default


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class _DiffusersWrap(torch.nn.Module):
    """``UNet2DModel`` behind our interface, with the same bf16 / channels_last switches."""

    def __init__(self, kwargs: dict, bf16: bool = False, channels_last: bool = False):
        super().__init__()
        from diffusers import UNet2DModel

        self.net = UNet2DModel(**kwargs)
        self.bf16, self.channels_last = bf16, channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    def forward(self, x, t, y=None):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.net(x, t * 1000, return_dict=False)[0].float()


class _Autocast(torch.nn.Module):
    """Our net under the caller's bfloat16 autocast (what ``train.precision: bf16`` does)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, t, y=None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.net(x, t, y)


def build(name: str, compile_: bool = False):
    if name in OURS:
        cfg = dict(OURS[name])
        bf16 = cfg.pop("bf16", False)
        net = UNet(UNetConfig(in_channels=1, **cfg))
        net = _Autocast(net) if bf16 else net
    else:
        kw, opts = DIFFUSERS[name]
        net = _DiffusersWrap(kw, **opts)
    params = n_params(net)
    if compile_:
        net = torch.compile(net)
    return net, params


def make_step(net, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 1, 28, 28, generator=g)
    eps = torch.randn(batch, 1, 28, 28, generator=g)
    t = torch.rand(batch, generator=g)
    a = torch.cos(0.5 * torch.pi * t)[:, None, None, None]
    s = torch.sin(0.5 * torch.pi * t)[:, None, None, None]
    xt = a * x0 + s * eps
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step():
        loss = F.mse_loss(net(xt, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[128], help="batch sizes")
    ap.add_argument("--only", default="", help="comma-separated substrings of variant names to keep")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per variant per round")
    ap.add_argument("--quick", action="store_true", help="three variants + diffusers M, 3 rounds")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the default config")
    ap.add_argument("--no-diffusers", action="store_true", help="skip the diffusers baselines")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", default=str(RESULTS), help="JSON output path")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    names = list(OURS) + ([] if args.no_diffusers else list(DIFFUSERS))
    if args.quick:
        names = QUICK + ([] if args.no_diffusers else [REFERENCE])
        args.rounds = min(args.rounds, 3)
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        names = [n for n in names if any(k in n for k in keys)]
    variants = [(n, False) for n in names] + ([(DEFAULT, True)] if args.compile else [])

    rows = []
    for batch in args.batch:
        built = []
        for name, comp in variants:
            label = name + (" +compile" if comp else "")
            net, params = build(name, comp)
            step = make_step(net, batch)
            t0 = time.perf_counter()
            step()  # warm-up (and compilation)
            first = time.perf_counter() - t0
            step()
            built.append(dict(name=label, params=params, step=step, first=first, times=[]))
            print(f"  built {label:28s} {params / 1e6:6.2f}M params, first step {first:6.2f}s", flush=True)
        for r in range(args.rounds):
            for b in built:
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    b["step"]()
                    b["times"].append(time.perf_counter() - t0)
        for b in built:
            med = statistics.median(b["times"])
            rows.append(dict(name=b["name"], batch=batch, params=b["params"], step_s=med, img_per_s=batch / med,
                             first_step_s=b["first"], n=len(b["times"])))
        del built

    ref = {r["batch"]: r["img_per_s"] for r in rows if r["name"] == REFERENCE}
    machine = header("\ntraining step (fwd + bwd + AdamW), 28x28x1, medians of interleaved rounds")
    print(f"{'variant':30s} {'batch':>5s} {'params':>8s} {'ms/step':>8s} {'img/s':>7s} {'vs ' + REFERENCE:>18s}")
    for r in rows:
        rel = f"{r['img_per_s'] / ref[r['batch']]:.2f}x" if r["batch"] in ref else "-"
        print(f"{r['name']:30s} {r['batch']:5d} {r['params'] / 1e6:7.2f}M {1e3 * r['step_s']:8.1f} {r['img_per_s']:7.1f} {rel:>18s}")
    meta = dict(load=os.getloadavg(), rounds=args.rounds, steps=args.steps, default_config=UNetConfig.default_fmnist().to_dict())
    write_json(Path(args.out).name, dict(meta=meta, rows=rows), machine)


if __name__ == "__main__":
    main()
