"""``scorelab interpolate RUN [--seeds A B] [--n N] [--mode linear|spherical|both] [--space S]``."""

from __future__ import annotations

import json
from pathlib import Path

from .common import UsageError, check_out, given, parse_classes


def add_parser(sub) -> None:
    i = sub.add_parser("interpolate", help="strip between two latents (linear / spherical)",
                       description="Map a linear and/or spherical path between two seeds' latents (a diffusion run's start "
                                   "noises, a VAE's or GAN's z, a StyleGAN's w) to images and write them as a strip "
                                   "(one row per mode).")
    i.add_argument("run", help="run folder")
    i.add_argument("--seeds", type=int, nargs=2, default=[0, 1], metavar=("A", "B"), help="seeds of the two end latents")
    i.add_argument("--n", type=int, default=9, help="images per strip, ends included (default 9)")
    i.add_argument("--mode", choices=["linear", "spherical", "both"], default="both", help="path between the latents")
    i.add_argument("--space", help="latent space (default: the family's first: noise, z or w)")
    i.add_argument("--sampler", help="deterministic sampler of a diffusion run (default: the run's)")
    i.add_argument("--steps", type=int, help="sampler steps (default: the run's)")
    i.add_argument("--grid", help="time grid")
    i.add_argument("--class", dest="cls", help="class label (index or name) for a conditional run")
    i.add_argument("--precision", choices=["fp32", "bf16"], help="override the run's precision for the network")
    i.add_argument("--out", help="output .png")


def run(args, rest) -> int:
    import torch

    from ..interpolation import MODES, interpolate_noise
    from ..runs import open_run
    from ..viz import save_samples

    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}")
    if args.n < 2:
        raise UsageError(f"--n must be >= 2, got {args.n}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    check_out(args.out)
    r = open_run(args.run, precision=args.precision)
    fam, caps = r.family, r.family.capabilities()
    caps.require("interpolate", fam.name, bool(caps.interpolate))
    space = args.space or caps.interpolate[0]
    if space not in caps.interpolate:
        raise UsageError(f"--space {space!r} is not one of {fam.name}'s: {', '.join(caps.interpolate)}")
    modes = MODES if args.mode == "both" else (args.mode,)
    classes = parse_classes([args.cls] if args.cls is not None else None, r.data)
    z = fam.latents(r.modules, args.seeds, space, y=classes)
    path = torch.cat([interpolate_noise(z[0], z[1], args.n, m) for m in modes])
    y = classes.expand(len(path)) if classes is not None else None
    x = fam.generate_from(r.modules, path, space, y=y, **given(args, "sampler", "steps", "grid"))
    out = Path(args.out or Path(args.run) / f"interpolation_{space}_{args.seeds[0]}_{args.seeds[1]}.png")
    save_samples(x, out, nrow=args.n, title=" / ".join(f"row {i + 1}: {m}" for i, m in enumerate(modes)))
    print(json.dumps({"out": str(out), "modes": list(modes), "space": space, "n": args.n, "seeds": args.seeds,
                      **given(args, "sampler", "steps")}))
    return 0
