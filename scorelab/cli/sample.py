"""``scorelab sample RUN [--n N] [--seed S] [--class K ...] [--out F] [family options]``.

The options a run takes depend on its family (``Family.capabilities().sample_options``): a
diffusion run takes ``--sampler --steps --grid --cfg --classifier``, an energy model
``--sampler langevin --steps --step-size``, and so on; any other is refused with one line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .common import UsageError, check_out, given, parse_classes

# command-line flags of the sample verb that map to Family.sample options (dest -> option name)
SAMPLE_FLAGS = ("sampler", "steps", "grid", "cfg", "classifier", "classifier_scale", "step_size", "init_std",
                "temperature", "truncation")


def add_sampling_flags(p, *, n_default: int = 64) -> None:
    """The flags shared by sample and eval (each passed to the family only when given)."""
    p.add_argument("--sampler", help="sampler name (diffusion and energy runs; default: the run's; auto: the path's default, unipc on logsnr_x0)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the run's)")
    p.add_argument("--grid", help="time grid: uniform karras logsnr shift (diffusion runs)")
    p.add_argument("--cfg", type=float, metavar="W", help="classifier-free guidance weight w: (1 + w) v_y - w v_null "
                   "(= gamma score_y + (1 - gamma) score_null with gamma = 1 + w); needs --class")
    p.add_argument("--classifier", metavar="RUN", help="classifier guidance with a noisy_classifier run on the same path; needs --class")
    p.add_argument("--classifier-scale", type=float, metavar="G", help="classifier guidance scale gamma (default 1)")
    p.add_argument("--step-size", type=float, help="Langevin step size (energy / score-matching runs)")
    p.add_argument("--init-std", type=float, help="std of the Langevin start points (energy / score-matching runs)")
    p.add_argument("--temperature", type=float, help="sampling temperature (families that take one, e.g. PixelCNN, VAE)")
    p.add_argument("--truncation", type=float, help="truncation psi in [0, 1] (StyleGAN-style generators)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="override the run's precision for the network")
    p.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed + i")


def sampling_options(args, family) -> dict:
    """The family options the user gave, with ``--classifier RUN`` opened through the run API."""
    from ..runs import open_run

    import math

    opts = given(args, *SAMPLE_FLAGS)
    if "steps" in opts and opts["steps"] < 1:
        raise UsageError(f"--steps must be >= 1, got {opts['steps']}")
    for k in ("cfg", "classifier_scale", "step_size", "init_std", "temperature", "truncation"):
        if k in opts and not math.isfinite(opts[k]):
            raise UsageError(f"--{k.replace('_', '-')} must be a finite number, got {opts[k]}")
    for k in ("step_size", "init_std"):
        if k in opts and not opts[k] > 0:
            raise UsageError(f"--{k.replace('_', '-')} must be > 0, got {opts[k]}")
    if "temperature" in opts and opts["temperature"] < 0:
        raise UsageError(f"--temperature must be >= 0, got {opts['temperature']}")
    if "classifier_scale" in opts and "classifier" not in opts:
        raise UsageError("--classifier-scale needs --classifier RUN")
    if "classifier" in opts:
        family.check_options("sample", {"classifier": None}, family.capabilities().sample_options)
        opts["classifier"] = open_run(opts["classifier"])
    return opts


def labels_for(args_classes, run, n: int, opts: dict):
    """(n,) labels, one block of rows per requested class, or None."""
    clf = opts.get("classifier")
    classes = parse_classes(args_classes, run.data, clf.family.num_classes if clf is not None else 0)
    if classes is None:
        return None, None
    return classes.repeat_interleave((n + len(classes) - 1) // len(classes))[:n], classes


def add_parser(sub) -> None:
    s = sub.add_parser("sample", help="draw samples from a trained run", description="Draw samples from a run's EMA weights.")
    s.add_argument("run", help="run folder")
    s.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    s.add_argument("--out", help="output .png (grid) or .npz (arrays)")
    s.add_argument("--class", dest="classes", nargs="+", help="class label(s) (index or name) for a conditional run; one row per class")
    add_sampling_flags(s)


def run(args, rest) -> int:
    from ..runs import open_run
    from ..viz import atomic_save

    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}")
    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    out = Path(args.out) if args.out else None
    check_out(out, (".png", ".jpg", ".jpeg", ".npz"))
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    r = open_run(args.run, precision=args.precision)
    if not r.family.capabilities().generate:
        r.family.sample(r.modules, args.n)  # raises the family's own "cannot sample" message
    opts = sampling_options(args, r.family)
    y, classes = labels_for(args.classes, r, args.n, opts)
    t0 = time.perf_counter()
    x = r.family.sample(r.modules, args.n, seed=args.seed, y=y, **opts)
    dt = time.perf_counter() - t0
    import torch

    if not torch.isfinite(x).all():
        raise UsageError(f"{args.run}: the model generated non-finite values: its weights are broken (diverged training?)")
    tag = "_".join(str(v) for k, v in opts.items() if k in ("sampler", "steps")) or "samples"
    out = out or Path(args.run) / f"sample_{tag}.png"
    nrow = (args.n + len(classes) - 1) // len(classes) if classes is not None and len(classes) > 1 else None
    atomic_save(x, out, labels=y, nrow=nrow)
    print(json.dumps({"out": str(out), "n": args.n, "seconds": round(dt, 3), "step": r.step,
                      **{k: v for k, v in opts.items() if isinstance(v, (int, float, str))}}))
    return 0
