"""``scorelab train [CONFIG | PRESET] [--key value ...] [--runs DIR] [--resume RUN]``.

Everything is checked before the run folder is created or touched: the whole config, the data
against the network (one dry training step), the sampler the run will use for its pictures (two
samples), and on ``--resume`` the checkpoint (see :class:`scorelab.train.trainer.Trainer`). Exit
codes: 0 trained (or ``train.max_minutes`` reached), 2 refused or failed with one line (the run
keeps its last checkpoint), 3 stopped by the divergence guard (the last good checkpoint is kept
byte for byte), 128 + signal when stopped by SIGINT (130) or SIGTERM (143) after saving the
checkpoint of the last finished step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import UsageError, build, load_data, parse_overrides, preset_names, resolve_config


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model from a YAML config or preset",
                       description="Train from CONFIG (a YAML file or a preset name; default: fmnist-rf). "
                                   "Any config key can be overridden: --train.steps 500 --model.path ddpm.")
    t.add_argument("config", nargs="?", help=f"YAML file or preset name ({', '.join(preset_names()) or 'see configs/'})")
    t.add_argument("--runs", default="runs", help="parent folder of run folders (default: runs)")
    t.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN (same step, optimizer, EMA, RNG)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config(args, rest):
    from ..train.config import RunConfig, apply_overrides, load_yaml

    overrides = parse_overrides(rest)
    if args.resume is not None:
        run_dir = Path(args.resume)
        if not str(args.resume):
            raise UsageError("--resume needs a run folder")
        if run_dir.exists() and not run_dir.is_dir():
            raise UsageError(f"cannot resume: {run_dir} is a file, not a run folder")
        if not (run_dir / "config.yaml").is_file():
            raise UsageError(f"cannot resume: {run_dir} is not a run folder (no config.yaml)")
        if args.config:
            raise UsageError("give either a config or --resume RUN, not both")
        raw = load_yaml(run_dir / "config.yaml")
    else:
        raw = resolve_config(args.config)
    for key, _ in overrides:
        if key == "resolved" or key.startswith("resolved."):
            raise UsageError(f"--{key}: 'resolved' is written by the trainer, not set")
    cfg = RunConfig.from_dict(apply_overrides(raw, overrides))
    if args.resume is None:
        runs = Path(args.runs)
        if not str(args.runs):
            raise UsageError("--runs needs a folder")
        if runs.exists() and not runs.is_dir():
            raise UsageError(f"--runs {runs} is a file, not a folder")
        run_dir = runs / cfg.name
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise UsageError(f"run folder {run_dir} already exists: resume it with --resume {run_dir} or pick another --name")
    elif cfg.name != raw.get("name", cfg.name):
        raise UsageError("--name cannot change on --resume (the run folder keeps its name)")
    return cfg, run_dir


def preflight_sample(family, trainer) -> None:
    """Draw two samples with the run's own sampler, grid and options (diffusion-style families, whose
    pictures during and after training use them): a bad option fails now, not after training.
    Random streams are restored."""
    import torch

    from ..families.base import CapabilityError

    caps = family.capabilities()
    if not (caps.generate and caps.denoiser):  # the families whose sampler, grid and their options come from the config
        return
    rng = torch.get_rng_state()
    try:
        k = family.data.conditional_classes
        y = torch.arange(2) % k if k else None
        with torch.no_grad():
            family.sample(trainer.sampling_modules(), 2, seed=0, y=y)
    except CapabilityError:
        raise
    except (ValueError, TypeError, RuntimeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"sampling with the run's options fails (model.sampler / sampler_options / grid): {first}") from None
    finally:
        torch.set_rng_state(rng)


def sample_hook(family, dataset, run_dir: Path):
    """The trainer's ``on_sample``: a grid (images) or a scatter over the data (points), and the loss curve."""
    import torch

    from ..train.trainer import dataset_tensors
    from ..viz import plot_loss_curve, save_samples

    reference = None
    if not family.data.images:
        reference = dataset_tensors(dataset)[0][:2000].to(torch.float32)  # raw points, as the samples are

    def on_sample(tr) -> None:
        if family.capabilities().generate:
            n = family.preview_count()
            k = family.data.conditional_classes
            y = torch.arange(n) % k if k else None
            x = family.sample(tr.sampling_modules(), n, seed=0, y=y)
            save_samples(x, run_dir / "samples" / f"step_{tr.step:06d}.png", reference=reference, nrow=8, title=f"step {tr.step}")
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")

    return on_sample


def run(args, rest) -> int:
    import yaml

    from ..train.trainer import CKPT, GracefulStop, Trainer

    # start-up: a signal aborts at once (nothing is written yet); the process's own entry point keeps
    # ignoring signals after the run (it exits right after), a caller's process gets its handlers back
    with GracefulStop(defer=False, restore=not getattr(args, "entry_point", False)) as stop:
        cfg, run_dir = _config(args, rest)
        dataset = load_data(cfg)
        family = build(cfg, dataset)
        trainer = Trainer(cfg, run_dir, family, dataset, resume=args.resume is not None, progress=not args.no_progress)
        preflight_sample(family, trainer)
        cfg.resolved["precision"] = trainer.precision.name
        cfg.resolved["precision_note"] = trainer.precision.describe()
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        print(f"training {cfg.name}: {family.name} on {cfg.data.name} {family.data.shape} x{len(dataset)} -> {run_dir} "
              f"(device {trainer.device}, {trainer.precision.describe()})", file=sys.stderr)
        summary = trainer.fit(on_sample=sample_hook(family, dataset, run_dir), config_yaml=text, stop=stop)
        final = sorted((run_dir / "samples").glob("step_*.png"))
        if final and summary["status"] != "interrupted":
            import shutil

            from ..viz import atomic_path

            with atomic_path(run_dir / "samples.png") as tmp:
                shutil.copyfile(final[-1], tmp)
    print(json.dumps({"run": str(run_dir), **summary, "checkpoint": str(run_dir / CKPT)}))
    if summary["status"] == "interrupted":
        return 128 + int(trainer.stop_signal or 2)
    return 0
