"""``scorelab train | sample | eval``.

    scorelab train [CONFIG.yaml | PRESET] [--key value ...] [--runs DIR] [--resume]
    scorelab sample RUN [--sampler S] [--steps N] [--n N] [--seed S] [--out FILE] [--class K ...]
    scorelab eval RUN [--n N] [--sampler S] [--steps N] [--seed S] [--nll [--nll-method elbo|pf_ode|both]]
    scorelab interpolate RUN [--seeds A B] [--n N] [--mode linear|spherical|both] [--class K]

Bad input (a missing or malformed config key, an unknown sampler or path, a missing run folder,
a corrupt checkpoint, images of the wrong shape) ends with one line on stderr and exit code 2;
an existing run folder is never overwritten without ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]

DEFAULT_PRESET = "fmnist-rf"


class UsageError(ValueError):
    pass


# --------------------------------------------------------------------------------------
# Config and run folders
# --------------------------------------------------------------------------------------
def presets_dir() -> Path:
    return Path(__file__).resolve().parent / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def resolve_config(arg: str | None) -> dict:
    from .train.config import load_yaml

    if arg is None:
        arg = DEFAULT_PRESET
    p = Path(arg)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return load_yaml(p)
    preset = presets_dir() / f"{arg}.yaml"
    if preset.is_file():
        return load_yaml(preset)
    raise UsageError(f"config {arg!r} is neither a file nor a preset (presets: {', '.join(preset_names())})")


def parse_overrides(rest: list[str]) -> list[tuple[str, object]]:
    """``--a.b value`` / ``--a.b=value`` pairs from the unparsed command-line tail."""
    from .train.config import parse_value

    out, i = [], 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise UsageError(f"unexpected argument {tok!r} (overrides look like --train.steps 100)")
        key = tok[2:]
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                raise UsageError(f"override --{key} needs a value")
            val = rest[i + 1]
            i += 2
        out.append((key, parse_value(val)))
    return out


_TRAIN_FLAGS = {"--runs", "--resume", "--no-progress", "--help", "-h"}
_TRAIN_FLAGS_WITH_VALUE = {"--runs", "--resume"}


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``train``'s config overrides (``--key value`` / ``--key=value``) from its own flags,
    so that an override's value is never taken for the positional CONFIG."""
    if not argv or argv[0] != "train":
        return argv, []
    keep, overrides, i = [argv[0]], [], 1
    while i < len(argv):
        tok = argv[i]
        flag = tok.split("=", 1)[0]
        if tok.startswith("--") and flag not in _TRAIN_FLAGS:
            if "=" in tok:
                overrides.append(tok)
                i += 1
            else:
                overrides.extend(argv[i : i + 2])
                i += 2
        else:
            keep.append(tok)
            if flag in _TRAIN_FLAGS_WITH_VALUE and "=" not in tok and i + 1 < len(argv):
                keep.append(argv[i + 1])
                i += 1
            i += 1
    return keep, overrides


def load_data(cfg, split: str = "train"):
    from .data import load_dataset

    opts = dict(cfg.data.options)
    if split != "train":
        opts["split"] = split
    return load_dataset(cfg.data.name, **opts)


def build(cfg, dataset):
    """The run's family, its weights initialised from ``cfg.seed``."""
    import torch

    from .families import make_family

    torch.manual_seed(cfg.seed)
    return make_family(cfg.model, tuple(dataset.shape), dataset.num_classes or 0, cfg.data.class_conditional)


def open_run(run: str):
    """(RunConfig, family, modules with EMA weights, meta) of a finished or interrupted run."""
    from .train.checkpoint import CheckpointError, load_checkpoint
    from .train.config import RunConfig, load_yaml
    from .train.trainer import CKPT, load_module_states

    d = Path(run)
    if not d.is_dir():
        raise UsageError(f"run folder {d} does not exist")
    if not (d / "config.yaml").is_file():
        raise UsageError(f"{d} is not a run folder (no config.yaml)")
    cfg = RunConfig.from_dict(load_yaml(d / "config.yaml"))
    tensors, meta = load_checkpoint(d / CKPT)
    dataset_shape, num_classes = meta.get("data_shape"), meta.get("num_classes", 0)
    if dataset_shape is None:
        raise CheckpointError(f"checkpoint in {d} does not record the data shape")
    from .families import make_family

    family = make_family(cfg.model, tuple(dataset_shape), num_classes, cfg.data.class_conditional)
    mods = family.modules()
    prefix = "ema" if any(k.startswith("ema.") for k in tensors) else "model"
    load_module_states(mods, tensors, prefix)
    for m in mods.values():
        m.eval()
    return cfg, family, mods, meta


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------
def cmd_train(args, rest) -> int:
    import yaml

    from .train.checkpoint import atomic_write_text
    from .train.config import RunConfig, apply_overrides, load_yaml
    from .train.trainer import CKPT, Trainer
    from .viz import plot_loss_curve, save_samples

    overrides = parse_overrides(rest)
    runs = Path(args.runs)
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise UsageError(f"cannot resume: {run_dir} is not a run folder (no config.yaml)")
        raw = load_yaml(run_dir / "config.yaml")
        if args.config:
            raise UsageError("give either a config or --resume RUN, not both")
    else:
        raw = resolve_config(args.config)
    raw = apply_overrides(raw, overrides)
    cfg = RunConfig.from_dict(raw)
    if not args.resume:
        run_dir = runs / cfg.name
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UsageError(f"run folder {run_dir} already exists: resume it with --resume {run_dir} or pick another --name")
    dataset = load_data(cfg)
    family = build(cfg, dataset)
    # the checkpoint records what `sample` / `eval` need to rebuild the model without the data
    meta = {"data_shape": list(dataset.shape), "num_classes": int(dataset.num_classes or 0)}
    trainer = Trainer(cfg, run_dir, family, dataset, resume=bool(args.resume), progress=not args.no_progress, extra_meta=meta)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    reference = None
    if len(dataset.shape) == 1:
        reference = family.prepare(dataset_tensors_head(dataset, 2000))

    def on_sample(tr: Trainer):
        if not getattr(family, "can_sample", True):  # a classifier: the loss curve is the picture
            plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
            return
        mods = tr.sampling_modules()
        n = 64 if len(family.data_shape) == 3 else 2000
        y = None
        if family.num_classes:
            import torch

            y = torch.arange(n) % family.num_classes
        x = family.sample(mods, n, generator=0, y=y)
        save_samples(x, run_dir / "samples" / f"step_{tr.step:06d}.png", reference=reference, nrow=8, title=f"step {tr.step}")
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")

    print(f"training {cfg.name}: {cfg.model.get('family', 'diffusion')} on {cfg.data.name} {tuple(dataset.shape)} "
          f"x{len(dataset)} -> {run_dir} (device {trainer.device}, precision {trainer.autocast_dtype or 'fp32'})", file=sys.stderr)
    summary = trainer.fit(on_sample=on_sample)
    final = sorted((run_dir / "samples").glob("step_*.png"))
    if final:
        import shutil

        shutil.copyfile(final[-1], run_dir / "samples.png")
    print(json.dumps({"run": str(run_dir), **summary, "checkpoint": str(run_dir / CKPT)}))
    return 130 if summary["status"] == "interrupted" else 0


def dataset_tensors_head(dataset, n):
    from .train.trainer import dataset_tensors

    x, _ = dataset_tensors(dataset)
    return x[:n]


def _parse_classes(values, family, num_classes: int = 0) -> "object":
    """(k,) labels from --class, checked against the run's classes (or ``num_classes`` of a guiding classifier)."""
    import torch

    if not values:
        return None
    num_classes = family.num_classes or num_classes
    if not num_classes:
        raise UsageError("--class needs a class-conditional run (data.class_conditional: true)")
    for v in values:
        if not 0 <= v < num_classes:
            raise UsageError(f"--class {v} is out of range 0..{num_classes - 1}")
    return torch.tensor(values, dtype=torch.long)


def _require_sampling(family, run) -> None:
    if not getattr(family, "can_sample", True):
        raise UsageError(f"{run} is a {family.cfg.family} run: it classifies and draws no samples "
                         f"(use it with scorelab sample DIFFUSION_RUN --classifier {run})")


def _open_classifier(run, family):
    """(family, modules) of a noisy_classifier run that can guide ``family`` (same path)."""
    _, clf_family, clf_mods, _ = open_run(run)
    if not hasattr(clf_family, "classifier"):
        raise UsageError(f"--classifier {run} is not a noisy_classifier run")
    if repr(clf_family.path) != repr(family.path):
        raise UsageError(f"--classifier {run} was trained on path {clf_family.path!r}, the model on "
                         f"{family.path!r}: the classifier must see the same x_t at the same t")
    return clf_family, clf_mods


def _guidance(args, family, classes, classifier=None):
    """A ``Denoiser -> guided denoiser`` function from --cfg / --classifier, or None.

    ``classifier``: the (family, modules) of the --classifier run, from :func:`_open_classifier`.
    """
    from .guidance import ClassifierFreeGuidance, ClassifierGuidance

    if args.cfg is None and classifier is None:
        return None
    if classes is None:
        raise UsageError("guidance needs the class(es) to steer toward: add --class K")
    if args.cfg is not None and not getattr(family, "num_classes", 0):
        raise UsageError("--cfg needs a class-conditional run trained with label dropout (model.label_dropout > 0)")
    wraps = []
    if args.cfg is not None:
        wraps.append(lambda den: ClassifierFreeGuidance(den, args.cfg, form="w"))
    if classifier is not None:
        clf_family, clf_mods = classifier
        if int(classes.max()) >= clf_family.num_classes:
            raise UsageError(f"--classifier {args.classifier} has {clf_family.num_classes} classes; "
                             f"--class {int(classes.max())} is out of its range")
        clf = clf_family.classifier(clf_mods)
        cond_model = bool(getattr(family, "num_classes", 0))
        wraps.append(lambda den: ClassifierGuidance(den, clf, args.classifier_scale, pass_label=cond_model))

    def wrap(den):
        for w in wraps:
            den = w(den)
        return den

    return wrap


def cmd_sample(args, rest) -> int:
    from .samplers import SAMPLERS
    from .viz import save_samples

    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}")
    if args.sampler and args.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {args.sampler!r}: expected one of {', '.join(SAMPLERS)}")
    cfg, family, mods, meta = open_run(args.run)
    _require_sampling(family, args.run)
    classifier = _open_classifier(args.classifier, family) if args.classifier else None
    classes = _parse_classes(args.classes, family, classifier[0].num_classes if classifier else 0)
    y = None
    if classes is not None:
        y = classes.repeat_interleave((args.n + len(classes) - 1) // len(classes))[: args.n]
    guidance = _guidance(args, family, classes, classifier)
    t0 = time.perf_counter()
    x = family.sample(mods, args.n, generator=args.seed, sampler=args.sampler, steps=args.steps, grid=args.grid, y=y,
                      **({"guidance": guidance} if guidance is not None else {}))
    dt = time.perf_counter() - t0
    out = Path(args.out or Path(args.run) / f"sample_{args.sampler or family.cfg.sampler}_{args.steps or family.cfg.sampling_steps}.png")
    if out.suffix == ".npz":
        import numpy as np

        np.savez_compressed(out, samples=x.numpy(), labels=(y.numpy() if y is not None else np.zeros(0)))
    else:
        nrow = None
        if classes is not None and len(classes) > 1:
            nrow = (args.n + len(classes) - 1) // len(classes)
        save_samples(x, out, nrow=nrow)
    print(json.dumps({"out": str(out), "n": args.n, "seconds": round(dt, 3), "step": meta.get("step")}))
    return 0


def cmd_eval(args, rest) -> int:
    import torch

    from . import metrics
    from .train.checkpoint import atomic_write_text

    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}")
    cfg, family, mods, meta = open_run(args.run)
    test = load_data(cfg, split="test") if _has_split(cfg) else load_data(cfg)
    if tuple(test.shape) != tuple(family.data_shape):
        raise UsageError(f"test data of shape {tuple(test.shape)} does not match the run's {tuple(family.data_shape)}")
    if args.nll:
        return _eval_nll(args, family, mods, meta, test)
    if not getattr(family, "can_sample", True):
        return _eval_classifier(args, family, mods, meta, test)
    t0 = time.perf_counter()
    x = family.sample(mods, args.n, generator=args.seed, sampler=args.sampler, steps=args.steps, grid=args.grid)
    dt = time.perf_counter() - t0
    real = family.prepare(dataset_tensors_head(test, args.n_real or len(test)))
    result = {"run": str(args.run), "step": meta.get("step"), "n": args.n, "sampler": args.sampler or family.cfg.sampler,
              "steps": args.steps or family.cfg.sampling_steps, "sampling_seconds": round(dt, 3)}
    if tuple(family.data_shape) == (1, 28, 28):
        result.update(metrics.evaluate_images(x, real))
    else:
        result["sliced_w2"] = float(metrics.sliced_wasserstein(x.flatten(1), real.flatten(1), generator=torch.Generator().manual_seed(0)))
    atomic_write_text(Path(args.run) / "eval.json", json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


def cmd_interpolate(args, rest) -> int:
    """Decode a path between two seeds' start noises with a deterministic sampler; one strip per mode."""
    import torch

    from .interpolation import DETERMINISTIC_SAMPLERS, MODES, interpolate_noise
    from .random import generators_for_seeds
    from .viz import save_samples

    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}")
    if args.n < 2:
        raise UsageError(f"--n must be >= 2, got {args.n}")
    modes = MODES if args.mode == "both" else (args.mode,)
    cfg, family, mods, meta = open_run(args.run)
    sampler = args.sampler or family.cfg.sampler
    if sampler not in DETERMINISTIC_SAMPLERS:
        raise UsageError(f"sampler {sampler!r} is stochastic: interpolation needs a deterministic one "
                         f"({', '.join(DETERMINISTIC_SAMPLERS)}); pass --sampler")
    classes = _parse_classes([args.cls] if args.cls is not None else None, family)
    shape = tuple(family.data_shape)
    if len(shape) != 3:
        raise UsageError("interpolation strips are drawn for image runs only")
    g0, g1 = generators_for_seeds(args.seeds, device="cpu")
    z0 = family.path.prior_sample(shape, generator=g0, dtype=torch.float32)
    z1 = family.path.prior_sample(shape, generator=g1, dtype=torch.float32)
    noise = torch.cat([interpolate_noise(z0, z1, args.n, m) for m in modes])
    y = classes.expand(len(noise)) if classes is not None else None
    opts = {"eta": 0.0} if sampler == "ddim" else {}
    x = family.sample(mods, len(noise), generator=None, sampler=sampler, steps=args.steps, grid=args.grid,
                      y=y, noise=noise, **opts)
    out = Path(args.out or Path(args.run) / f"interpolation_{args.seeds[0]}_{args.seeds[1]}.png")
    save_samples(x, out, nrow=args.n, title=" / ".join(f"row {i + 1}: {m}" for i, m in enumerate(modes)))
    print(json.dumps({"out": str(out), "modes": list(modes), "n": args.n, "sampler": sampler, "seeds": args.seeds}))
    return 0


def _write_eval(run, result: dict, name: str = "eval.json") -> None:
    from .train.checkpoint import atomic_write_text

    atomic_write_text(Path(run) / name, json.dumps(result, indent=2))
    print(json.dumps(result))


def _eval_nll(args, family, mods, meta, test) -> int:
    """Negative log-likelihood of the first ``--nll-n`` test examples by ELBO and/or PF-ODE."""
    import torch
    from tqdm.auto import tqdm

    from .train.trainer import dataset_tensors

    if not hasattr(family, "nll"):
        raise UsageError(f"model.family {family.cfg.family!r} has no likelihood (--nll works for diffusion and vdm runs)")
    methods = family.NLL_METHODS if args.nll_method == "both" else (args.nll_method,)
    x, y = dataset_tensors(test)
    n = min(args.nll_n, len(x)) if args.nll_n > 0 else len(x)
    x = x[:n]
    y = y[:n] if (y is not None and family.num_classes) else None
    result = {"run": str(args.run), "step": meta.get("step"), "n": n, "split": "test"}
    for m in methods:
        # the ELBO evaluates n_t noised copies of each image at once: keep a call near 2048 rows
        bs = min(args.nll_batch, max(1, 2048 // args.nll_t)) if m == "elbo" else args.nll_batch
        t0 = time.perf_counter()
        parts = []
        for i in tqdm(range(0, n, bs), desc=f"nll {m}", unit="batch", leave=False, disable=not sys.stderr.isatty()):
            parts.append(family.nll(mods, x[i : i + bs], method=m, generator=args.seed + i, n_t=args.nll_t,
                                    y=y[i : i + bs] if y is not None else None))
        dt = time.perf_counter() - t0
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "units"}
        tot = out.pop("total")
        entry = {"units": parts[0]["units"], "mean": round(float(tot.mean()), 5),
                 "stderr": round(float(tot.std() / max(n, 2) ** 0.5), 5) if n > 1 else None, "seconds": round(dt, 2)}
        entry.update({k: round(float(v.mean()), 5) for k, v in out.items()})
        result[m] = entry
    _write_eval(args.run, result, "eval_nll.json")
    return 0


def _eval_classifier(args, family, mods, meta, test) -> int:
    """A noise-aware classifier's test accuracy at five times from t_min to t_max."""
    import torch

    from .train.trainer import dataset_tensors

    x, y = dataset_tensors(test)
    n = min(args.n, len(x))
    xs, ys = family.prepare(x[:n]), y[:n]
    p = family.path
    times = [p.t_min + f * (p.t_max - p.t_min) for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
    acc = {f"t={t:.4g}": round(family.accuracy(mods, xs, ys, t, generator=torch.Generator().manual_seed(args.seed)), 4)
           for t in times}
    _write_eval(args.run, {"run": str(args.run), "step": meta.get("step"), "n": n, "accuracy": acc})
    return 0


def _has_split(cfg) -> bool:
    return cfg.data.name not in ("folder", "npz")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scorelab", description="Train, sample and evaluate score-based and diffusion models.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model from a YAML config or preset",
                       description="Train from CONFIG (a YAML file or a preset name; default: fmnist-rf). "
                                   "Any config key can be overridden: --train.steps 500 --model.path ddpm.")
    t.add_argument("config", nargs="?", help=f"YAML file or preset name ({', '.join(preset_names()) or 'see configs/'})")
    t.add_argument("--runs", default="runs", help="parent folder of run folders (default: runs)")
    t.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN (same step, optimizer, EMA, RNG)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = sub.add_parser("sample", help="draw samples from a trained run", description="Draw samples from a run's EMA weights.")
    s.add_argument("run", help="run folder")
    s.add_argument("--sampler", help="sampler name (default: the run's)")
    s.add_argument("--steps", type=int, help="sampler steps (default: the run's)")
    s.add_argument("--grid", help="time grid: uniform karras logsnr shift")
    s.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    s.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed + i")
    s.add_argument("--out", help="output .png (grid) or .npz (arrays)")
    s.add_argument("--class", dest="classes", type=int, nargs="+", help="class label(s) for a conditional run; one row per class")
    s.add_argument("--cfg", type=float, metavar="W", help="classifier-free guidance weight w: (1 + w) v_y - w v_null "
                   "(= gamma score_y + (1 - gamma) score_null with gamma = 1 + w); needs --class")
    s.add_argument("--classifier", metavar="RUN", help="classifier guidance with a noisy_classifier run on the same path; needs --class")
    s.add_argument("--classifier-scale", type=float, default=1.0, metavar="G", help="classifier guidance scale gamma (default 1)")
    e = sub.add_parser("eval", help="measure a run: FID, KID, precision/recall (domain features)",
                       description="Sample N images and compare them with the test split in the domain classifier's feature space.")
    e.add_argument("run", help="run folder")
    e.add_argument("--n", type=int, default=1000, help="number of generated samples (default 1000)")
    e.add_argument("--n-real", type=int, default=0, help="number of test images (default: all)")
    e.add_argument("--sampler", help="sampler name (default: the run's)")
    e.add_argument("--steps", type=int, help="sampler steps (default: the run's)")
    e.add_argument("--grid", help="time grid")
    e.add_argument("--seed", type=int, default=0, help="first seed")
    e.add_argument("--nll", action="store_true", help="instead: negative log-likelihood of test examples "
                   "(bits/dim for images, nats for points) by ELBO and probability-flow ODE, with the time each took")
    e.add_argument("--nll-method", choices=["elbo", "pf_ode", "both"], default="both", help="likelihood estimate(s) (default both)")
    e.add_argument("--nll-n", type=int, default=256, help="test examples for --nll (default 256; 0: all)")
    e.add_argument("--nll-t", type=int, default=64, help="times per example of the ELBO's diffusion term (default 64)")
    e.add_argument("--nll-batch", type=int, default=64, help="batch size for --nll (default 64)")
    i = sub.add_parser("interpolate", help="image strip between two start noises (linear / spherical)",
                       description="Map a linear and/or spherical path between two seeds' start noises through a "
                                   "deterministic sampler and write the images as a strip (one row per mode).")
    i.add_argument("run", help="run folder")
    i.add_argument("--seeds", type=int, nargs=2, default=[0, 1], metavar=("A", "B"), help="seeds of the two end noises")
    i.add_argument("--n", type=int, default=9, help="images per strip, ends included (default 9)")
    i.add_argument("--mode", choices=["linear", "spherical", "both"], default="both", help="path between the noises")
    i.add_argument("--sampler", help="deterministic sampler (default: the run's): ddim euler heun dpmpp_2m dpmpp_3m")
    i.add_argument("--steps", type=int, help="sampler steps (default: the run's)")
    i.add_argument("--grid", help="time grid")
    i.add_argument("--class", dest="cls", type=int, help="class label for a conditional run")
    i.add_argument("--out", help="output .png")
    return p


def main(argv: list[str] | None = None) -> int:
    from .data.images import DataError
    from .train.checkpoint import CheckpointError
    from .train.config import ConfigError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, rest = split_overrides(argv)
    args, unknown = parser.parse_known_args(argv)
    rest = unknown + rest
    cmd = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "interpolate": cmd_interpolate}[args.command]
    try:
        return cmd(args, rest)
    except (UsageError, ConfigError, CheckpointError, DataError) as e:
        print(f"scorelab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # validation inside the library (paths, samplers, nets, shapes)
        print(f"scorelab {args.command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"scorelab {args.command}: error: {e.filename or e}: file not found", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
