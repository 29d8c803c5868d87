"""``scorelab train [CONFIG | PRESET] [--key value ...] [--runs DIR] [--resume RUN] [--nproc N]``.

Several processes (data parallel, :mod:`scorelab.train.distributed`): ``torchrun --nproc_per_node N
-m scorelab train ...`` on one machine or several, or ``--nproc N`` here, which runs exactly that
(``torchrun --standalone --nnodes 1 --nproc-per-node N -m scorelab train ...``, through
``torch.distributed.run``) for one machine. ``train.batch_size`` stays the global batch. Only rank 0
prints the header and the summary and writes the run folder. torchrun's own exit code is 1 when a
process failed (the failing process's line says why); ``--nproc`` exits with the failing process's
own code (2, 3, 130, 143) or 128 + the signal that killed it, and one line naming it.

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
    t.add_argument("--nproc", type=int, metavar="N", help="train with N processes on this machine (runs torchrun "
                   "--standalone --nproc-per-node N; one GPU per process on CUDA); train.batch_size is the global batch")
    t.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                   help="with several processes: how long a process waits for the others before it stops with an error "
                        "(default $SCORELAB_DIST_TIMEOUT or 600; a killed process is noticed at once)")


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


def torchrun_args(args, rest, nproc: int) -> list[str]:
    """torchrun's arguments for ``--nproc N``: this ``train`` on one machine, ``N`` processes."""
    cmd = ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "-m", "scorelab", "train"]
    if args.config:
        cmd.append(args.config)
    if args.resume is not None:
        cmd += ["--resume", args.resume]
    else:
        cmd += ["--runs", args.runs]
    if args.no_progress:
        cmd.append("--no-progress")
    if args.dist_timeout is not None:
        cmd += ["--dist-timeout", repr(args.dist_timeout)]
    return cmd + list(rest)


def _failure_code(e) -> int:
    """The exit code of ``--nproc`` when a process failed (torchrun's ChildFailedError ``e``): the
    first failing process's own code (2 error, 3 diverged, 130 / 143 stopped by a signal), or
    128 + signal when it was killed; with one line naming it."""
    rank, failure = e.get_first_failure()
    code = int(failure.exitcode)
    if code < 0:
        import signal

        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
        code = 128 - code
    else:
        how = f"exited with code {code}"
    print(f"scorelab train: process {rank} (pid {failure.pid}) {how}; the others were stopped", file=sys.stderr)
    return code if code > 0 else 1


def _launch(args, rest) -> int | None:
    """``--nproc N``: run torchrun (PyTorch's launcher, ``torch.distributed.run``) for this command
    on one machine and return the exit code; None when there is nothing to launch (no --nproc,
    N = 1, or already inside torchrun with N processes).

    From the command line torchrun runs in this very process (its agent then handles Ctrl-C: it
    passes the signal to the processes, which save their checkpoint, and this process exits with
    128 + signal); called from Python (tests) it runs as a child process, leaving the caller's
    signal handlers alone."""
    import os

    from ..train.distributed import launch_from_env, timeout_seconds

    n = args.nproc
    if args.dist_timeout is not None:
        timeout_seconds(args.dist_timeout)  # a bad value is refused here, not in N processes
    if n is None:
        return None
    if n < 1:
        raise UsageError(f"--nproc must be >= 1, got {n}")
    if "WORLD_SIZE" in os.environ:  # already started by torchrun: --nproc must agree with it
        inside = launch_from_env()
        world = inside.world_size if inside is not None else 1
        if n != world:
            raise UsageError(f"--nproc {n} inside torchrun, which started {world} process(es): give one or the other")
        return None
    if n == 1:
        return None
    argv = torchrun_args(args, rest, n)
    print("scorelab train: torchrun " + " ".join(argv), file=sys.stderr)
    sys.stderr.flush()
    if not getattr(args, "entry_point", False):
        import subprocess

        return subprocess.call([sys.executable, "-m", "torch.distributed.run", *argv])
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as e:
        return _failure_code(e)
    except SignalException as e:  # the agent was signalled: it has stopped the processes (they saved)
        return 128 + int(e.sigval)
    return 0


def run(args, rest) -> int:
    from ..train.distributed import shutdown

    code = _launch(args, rest)
    if code is not None:
        return code
    try:
        return _run(args, rest)
    finally:
        shutdown()


def _run(args, rest) -> int:
    import yaml

    from ..train.trainer import CKPT, GracefulStop, Trainer

    # start-up: a signal aborts at once (nothing is written yet); the process's own entry point keeps
    # ignoring signals after the run (it exits right after), a caller's process gets its handlers back
    with GracefulStop(defer=False, restore=not getattr(args, "entry_point", False)) as stop:
        cfg, run_dir = _config(args, rest)
        dataset = load_data(cfg)
        family = build(cfg, dataset)
        trainer = Trainer(cfg, run_dir, family, dataset, resume=args.resume is not None, progress=not args.no_progress,
                          dist_timeout=args.dist_timeout)
        preflight_sample(family, trainer)
        cfg.resolved["precision"] = trainer.precision.name
        cfg.resolved["precision_note"] = trainer.precision.describe()
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        main = trainer.is_main
        if main:
            procs = ""
            if trainer.world > 1:
                sync = ", ".join(f"{k} {how}" for k, how in trainer.synchronised.items()) or "none"
                procs = (f", {trainer.world} processes x {trainer.local_batch} of the global batch {cfg.train.batch_size}"
                         f" ({trainer.comm.backend}; gradients averaged: {sync})")
            if trainer.resumed_world and trainer.resumed_world != trainer.world:
                procs += f"; the checkpoint was written by {trainer.resumed_world} process(es), same global batch"
            print(f"training {cfg.name}: {family.name} on {cfg.data.name} {family.data.shape} x{len(dataset)} -> {run_dir} "
                  f"(device {trainer.device}{procs}, {trainer.precision.describe()})", file=sys.stderr)
        summary = trainer.fit(on_sample=sample_hook(family, dataset, run_dir), config_yaml=text, stop=stop)
        final = sorted((run_dir / "samples").glob("step_*.png")) if main else []
        if final and summary["status"] != "interrupted":
            import shutil

            from ..viz import atomic_path

            with atomic_path(run_dir / "samples.png") as tmp:
                shutil.copyfile(final[-1], tmp)
    if main:
        print(json.dumps({"run": str(run_dir), **summary, "checkpoint": str(run_dir / CKPT)}))
    if summary["status"] == "interrupted":
        return 128 + int(trainer.stop_signal or 2)
    return 0
