"""``scorelab eval RUN [--n N] [--nll [--nll-method M ...]]``: metrics by what the run's family can do."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import UsageError, tty
from .sample import add_sampling_flags, sampling_options


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="measure a run against held-out data (FID/KID/precision/recall, likelihood, family metrics)",
                       description="Sample N examples and compare them with the held-out split in the domain's feature space "
                                   "(or, with --nll, score the held-out examples' likelihood). The output names the "
                                   "reference set and the features.")
    e.add_argument("run", help="run folder")
    e.add_argument("--n", type=int, default=1000, help="number of generated samples (default 1000)")
    e.add_argument("--n-real", type=int, default=0, help="number of held-out examples (default: all)")
    e.add_argument("--class", dest="classes", nargs="+", help="class label(s) (index or name) of a conditional run: the "
                   "samples are split evenly between them (default with --cfg: every class, evenly)")
    add_sampling_flags(e)
    e.add_argument("--nll", action="store_true", help="instead: negative log-likelihood of held-out examples "
                   "(bits/dim for images, nats for points), with the time each method took")
    e.add_argument("--nll-method", nargs="+", help="likelihood method(s) (default: all of the family's; diffusion: elbo pf_ode)")
    e.add_argument("--nll-n", type=int, default=256, help="held-out examples for --nll (default 256; 0: all)")
    e.add_argument("--nll-n-slow", type=int, default=16, help="examples for the slow methods, e.g. the PF-ODE at ~1 s per "
                   "image (default 16; 0: as --nll-n)")
    e.add_argument("--nll-t", type=int, help="times per example of a diffusion ELBO (default 64)")
    e.add_argument("--nll-k", type=int, help="importance samples of a VAE's IWAE bound (k = 1: the ELBO)")
    e.add_argument("--nll-batch", type=int, default=64, help="batch size for --nll (default 64)")


def eval_labels(classes, r, n: int, opts: dict):
    """``(y, description)`` of an evaluation's labels: the ``--class`` list split evenly over the
    ``n`` samples; with ``--cfg`` and no ``--class`` on a conditional run every class evenly
    (label ``i mod K``); else ``(None, None)`` (the family's own default)."""
    import torch

    from .sample import labels_for

    if classes:
        y, given = labels_for(classes, r, n, opts)
        return y, [int(c) for c in given]
    k = r.family.data.conditional_classes
    if "cfg" in opts and k:
        return torch.arange(n) % k, f"class-balanced over {k} classes"
    return None, None


def run(args, rest) -> int:
    from ..eval import evaluate, evaluate_nll
    from ..runs import open_run
    from ..train.checkpoint import atomic_write_text

    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}")
    for flag, value, low in (("--n", args.n, 1), ("--nll-batch", args.nll_batch, 1), ("--n-real", args.n_real, 0),
                             ("--nll-n", args.nll_n, 0), ("--nll-n-slow", args.nll_n_slow, 0)):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.nll_t is not None and args.nll_t < 1:
        raise UsageError(f"--nll-t must be >= 1, got {args.nll_t}")
    if args.nll_k is not None and args.nll_k < 1:
        raise UsageError(f"--nll-k must be >= 1, got {args.nll_k}")
    r = open_run(args.run, precision=args.precision)
    if args.nll:
        caps = r.family.capabilities()
        caps.require("nll", r.family.name, bool(caps.nll))
        methods = args.nll_method
        opts = {}
        if args.nll_t is not None:
            if args.nll_t < 1:
                raise UsageError(f"--nll-t must be >= 1, got {args.nll_t}")
            opts["n_t"] = args.nll_t
        elif "n_t" in caps.nll_options:
            opts["n_t"] = 64
        if args.nll_k is not None:
            if args.nll_k < 1:
                raise UsageError(f"--nll-k must be >= 1, got {args.nll_k}")
            opts["k"] = args.nll_k
        flags = {"n_t": "--nll-t", "k": "--nll-k"}
        for key in opts:
            if key not in caps.nll_options and (key != "n_t" or args.nll_t is not None):
                takes = ", ".join(flags.get(o, o) for o in caps.nll_options) or "no options"
                raise UsageError(f"{flags[key]} does not apply to {r.family.name} runs (their --nll takes: {takes})")
        if "n_t" in opts:  # the ELBO evaluates n_t noised copies of each image at once: keep a call near 2048 rows
            args.nll_batch = min(args.nll_batch, max(1, 2048 // opts["n_t"]))
        result = evaluate_nll(r, methods=methods, n=args.nll_n, n_slow=args.nll_n_slow, seed=args.seed, batch_size=args.nll_batch,
                              progress=tty(), **opts)
        name = "eval_nll.json"
    else:
        opts = sampling_options(args, r.family)
        y, labels = eval_labels(args.classes, r, args.n, opts)
        result = evaluate(r, n=args.n, n_real=args.n_real, seed=args.seed, progress=tty(), y=y, **opts)
        if labels is not None:
            result["labels"] = labels
        name = "eval.json"
    atomic_write_text(Path(args.run) / name, json.dumps(result, indent=2))
    print(json.dumps(result))
    if "fid" in result:
        print(f"FID {result['fid']:.2f} of {result['n']} samples against {result['compared_with']}, in the features of "
              f"{result['features']}", file=sys.stderr)
    return 0
