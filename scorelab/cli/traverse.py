"""``scorelab traverse RUN [--dims ...] [--range 3] [--n 9] [--out F]``: latent traversals (seed 001's
"disentangling" picture): one row per latent dimension swept over [-range, range], the others held
at a held-out image's posterior mean."""

from __future__ import annotations

import json
from pathlib import Path

from .common import UsageError, check_out


def add_parser(sub) -> None:
    t = sub.add_parser("traverse", help="latent traversal grid (VAE-style runs)", description=__doc__.split(":", 1)[1].strip())
    t.add_argument("run", help="run folder")
    t.add_argument("--dims", type=int, nargs="+", help="latent dimensions, one row each (default: the family's, e.g. the first 8)")
    t.add_argument("--range", dest="span", type=float, default=3.0, help="sweep each dim over [-range, range] (default 3)")
    t.add_argument("--n", type=int, default=9, help="images per row (default 9)")
    t.add_argument("--index", type=int, default=0, help="held-out example whose posterior mean fixes the other dims")
    t.add_argument("--precision", choices=["fp32", "bf16"], help="override the run's precision for the network")
    t.add_argument("--out", help="output .png")


def run(args, rest) -> int:
    from ..eval import reference_set
    from ..runs import open_run
    from ..viz import save_samples

    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}")
    if args.n < 2 or not args.span > 0 or args.span == float("inf"):
        raise UsageError("--n must be >= 2 and --range a finite number > 0")
    if args.index < 0 or (args.dims and min(args.dims) < 0):
        raise UsageError("--index and --dims must be >= 0")
    check_out(args.out)
    r = open_run(args.run, precision=args.precision)
    caps = r.family.capabilities()
    caps.require("traverse", r.family.name, caps.traverse)
    ref = reference_set(r.cfg, args.index + 1)
    if args.index >= len(ref.x):
        raise UsageError(f"--index {args.index} is beyond the {len(ref.x)} held-out examples")
    x = r.family.traverse(r.modules, ref.x[args.index : args.index + 1], args.dims, args.span, args.n)
    rows = x.shape[0] // args.n
    dims = args.dims or list(range(rows))  # the family's default: its first latents
    out = Path(args.out or Path(args.run) / "traversal.png")
    save_samples(x, out, nrow=args.n, title=f"dims {dims}, range ±{args.span}")
    print(json.dumps({"out": str(out), "dims": dims, "range": args.span, "n": args.n}))
    return 0
