"""The training loop, shared by every model family.

A *family* (:class:`scorelab.families.base.Family`) owns its networks and its maths: it lists its
trained and frozen modules, gives one :class:`~scorelab.families.base.OptimizerSpec` per optimizer,
turns a raw batch into model input (``prepare``), and supplies ``training_step(modules, batch,
ctx)``, in which it calls ``ctx.optimize(loss, name)`` once per optimizer it wants to step (a
diffusion model once, a GAN twice with alternating losses) and returns any metrics. The trainer
owns everything else: devices and precision (``train.precision``, measured by
:mod:`scorelab.train.precision`), AdamW with warm-up and schedule per optimizer, gradient
clipping, EMA weights, the data order, the random streams, checkpoints (safetensors, atomic),
metrics (JSONL), the progress bar, resuming, signals and the divergence guard.

**Determinism.** The data order of epoch ``e`` is a permutation drawn from a generator seeded by
``(seed, e)``, the learning rate is a function of the step, and the noise generator, torch's
global generator (dropout), EMA, optimizer moments and the guard's loss history are all
checkpointed — so ``N`` steps, a resume and ``N`` more give the same weights as ``2N`` steps
straight through (on CPU), however the first part ended: at its end, by ``max_minutes``, by
Ctrl-C / SIGTERM, or by ``kill -9`` (then from the last checkpoint).

**Nothing is lost, whatever happens.**

* *Validation first.* The constructor checks everything before the run folder is created or
  touched: the checkpoint of a resumed run (every tensor's name, shape, dtype and finiteness,
  optimizer moments included, the random-generator states, the step), and one dry training step
  on the first batch (forward + backward, nothing updated, every state restored), so data that
  does not fit the network is refused up front with a hint, not after the folder exists.
* *The folder.* A new run is built in a hidden staging folder next to it (config, step-0
  checkpoint) and renamed into place: a run folder either does not exist or can be resumed (so a
  run killed before its first periodic checkpoint resumes from step 0). ``--resume`` of a folder
  that has a config but no checkpoint (written by an older scorelab) also starts at step 0. A
  resume removes the temporaries a ``kill -9`` left behind and truncates ``metrics.jsonl`` to the
  rows up to the checkpoint's step, so no row is duplicated. A ``.lock`` (``flock``, released by
  the kernel even on ``kill -9``) keeps a second trainer off a run in training.
* *Signals.* SIGINT (Ctrl-C) and SIGTERM are deferred (:class:`GracefulStop`): the handler only
  sets a flag, and the loop acts on it between steps, so a step is never cut in half, even when a
  family calls ``ctx.optimize`` several times per step; the checkpoint written then equals a
  straight run's state after that step, random streams included. Later signals are ignored with a
  message. The command line exits with ``128 + signal`` (130 for SIGINT, 143 for SIGTERM). Under
  torchrun :meth:`Trainer._should_stop` is an all-reduce of the flag, so every rank stops after the
  same step (and saves the same checkpoint).
* *The divergence guard* (:class:`DivergenceGuard`), generic over families and optimizers: in
  ``ctx.optimize``, a non-finite loss or gradient norm skips that update (no optimizer step, no EMA
  update); ``train.nonfinite_skips`` skipped steps in a row are tolerated, one more stops the run.
  A finite loss above ``median + divergence_factor * max(|median|, MAD)`` of its optimizer's last
  200 ordinary values is reported; checkpoints wait while it lasts and after
  ``train.divergence_patience`` steps in a row the run stops. A stop raises :class:`DivergedError`
  (exit code 3) with one line naming the step, the loss and what to try, and writes nothing: the
  last good checkpoint stays byte for byte. No checkpoint with a non-finite tensor is ever written.
  ``train.detect_anomaly`` runs each step under :func:`torch.autograd.detect_anomaly`, so a NaN
  born in backward names its operation.
* *Errors.* An exception inside a step writes nothing more; it is raised as a one-line
  :class:`TrainingError` saying which checkpoint the folder keeps. A write that fails (disk full,
  read-only folder) raises :class:`~scorelab.train.checkpoint.StorageError` naming the file; the
  previous checkpoint is intact.

**Several processes** (torchrun, DistributedDataParallel; :mod:`scorelab.train.distributed` says
how to launch them and what is global): ``train.batch_size`` is the global batch, each rank trains
on its equal share of every batch, draws the global batch's noise and keeps its rows, and only rank
0 writes the run folder. The state, hence the checkpoint, does not depend on the number of
processes: a run can be resumed with another one (the same global batch). The decisions between
steps (signals, time limit, the divergence guard, which sees the global mean loss) are the same on
every rank; a rank that fails or stops answering stops the others with one line
(:class:`~scorelab.train.distributed.DistributedError`), and the last checkpoint stays as it was.

A test hook, :data:`EVENT_HOOK`, is called at named points (``step``: before a step, ``optimize``:
after each optimizer update, ``step_done``: after a step, ``save`` / ``saved``: around a
checkpoint write); tests and ``benchmarks/faults.py`` send signals there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    StorageError,
    atomic_write_text,
    check_optimizer_state,
    fsync_folder,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    remove_stale_temporaries,
    save_checkpoint,
    stale_temporaries,
    temporary_name,
)
from ..random import ShardedGenerator
from .config import RunConfig
from .distributed import Comm, DataParallel, DistributedError, choose_device, setup, shard_of
from .guard import DivergenceGuard
from .horizon import BudgetHorizon
from .signals import GracefulStop, Interrupted

__all__ = ["Trainer", "StepContext", "EMA", "resolve_device", "TrainingError", "DivergedError", "GracefulStop", "Interrupted",
           "DivergenceGuard", "EVENT_HOOK", "CKPT", "load_module_states", "dataset_tensors"]

CKPT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"

# Test hook: EVENT_HOOK(event, trainer) at the points named in the module docstring. None in normal use.
EVENT_HOOK: Callable[[str, "Trainer"], None] | None = None


def resolve_device(name: str) -> torch.device:
    """The device of a single process for ``train.device`` (see :func:`scorelab.train.distributed.choose_device`)."""
    return choose_device(name)


class EMA:
    """Exponential moving averages of the parameters and buffers of some modules.

    ``decay_t = min(decay, (1 + t) / (10 + t))`` warms the average up over the first steps.
    """

    def __init__(self, modules: dict[str, nn.Module], decay: float):
        self.decay = decay  # long-run decay per step
        self.shadow = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module], step: int, names: list[str] | None = None) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for name in names or list(modules):
            for k, v in modules[name].state_dict().items():
                s = self.shadow[name][k]
                if v.is_floating_point():
                    s.lerp_(v.detach(), 1 - d)
                else:
                    s.copy_(v)

    def copy_to(self, modules: dict[str, nn.Module]) -> None:
        for name, m in modules.items():
            m.load_state_dict(self.shadow[name])


@dataclass
class StepContext:
    """What a family's ``training_step`` gets: the step, device, precision, noise and ``optimize``.

    Under torchrun the batch is this rank's share of the global batch and ``generator`` a
    :class:`~scorelab.random.ShardedGenerator`; a computation that couples the rows of the batch
    uses :func:`~scorelab.train.distributed.gather_rows` / :func:`~scorelab.train.distributed.mean_over_ranks`
    with this context (they are the identity in one process)."""

    step: int
    device: torch.device
    generator: torch.Generator | ShardedGenerator  # the run's noise stream (checkpointed); under torchrun this rank's share of it
    autocast_dtype: torch.dtype | None
    _optimize: Callable[[torch.Tensor, str], float]
    metrics: dict = field(default_factory=dict)
    comm: Comm | None = None  # the process group under torchrun (None: one process, or a probe computing locally)

    def autocast(self):
        """Context manager for the network forward passes (bf16 autocast when enabled)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def optimize(self, loss: torch.Tensor, optimizer: str = "main") -> float:
        """Backward ``loss`` (a scalar), clip, step ``optimizer`` and update its modules' EMA.

        Returns the gradient norm before clipping. A non-finite loss or gradient skips the update
        (the trainer's divergence guard decides when to stop) and returns NaN / the norm."""
        return self._optimize(loss, optimizer)


class TrainingError(ValueError):
    """Training cannot go on (an error inside a step, a family asking for an unknown optimizer); one line."""


class DivergedError(TrainingError):
    """The divergence guard stopped the run (non-finite or exploding loss); the last good checkpoint is kept."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


# --------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------
class Trainer:
    """Runs a family on a dataset into ``run_dir``; ``fit()`` trains to ``cfg.train.steps``.

    The constructor validates (see the module docstring) and writes nothing; ``fit()`` creates or
    takes over the run folder and trains."""

    def __init__(self, cfg: RunConfig, run_dir, family, dataset, *, resume: bool = False, progress: bool = True,
                 extra_meta: dict | None = None, dist_timeout: float | None = None):
        self.cfg = cfg
        self.tc = cfg.train
        self.run_dir = Path(run_dir)
        self.family = family
        self.progress = progress
        self.resume = resume
        self.extra_meta = dict(extra_meta or {})  # recorded in every checkpoint (e.g. the data shape)
        # the device, and under torchrun the process group (dist_timeout: seconds a collective waits)
        self.device, self.comm = setup(self.tc.device, dist_timeout)
        self.rank = self.comm.rank if self.comm else 0  # this process (0 writes the run folder)
        self.world = self.comm.world if self.comm else 1  # processes sharing each batch
        self.is_main = self.rank == 0
        if self.tc.threads > 0:
            torch.set_num_threads(self.tc.threads)

        # data, held as tensors on the device: uint8 images are converted per batch
        self.x, self.y = dataset_tensors(dataset)
        self.n = self.x.shape[0]
        if self.n < self.tc.batch_size:
            raise ValueError(f"train.batch_size {self.tc.batch_size} is larger than the dataset ({self.n} examples)")
        self.batches_per_epoch = self.n // self.tc.batch_size
        self._perm: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation), derived from the step
        self.shard = shard_of(self.tc.batch_size, self.rank, self.world)  # this rank's rows [start, stop) of every batch
        self.local_batch = self.shard[1] - self.shard[0]

        torch.manual_seed(cfg.seed)
        self.modules: dict[str, nn.Module] = {k: m.to(self.device) for k, m in family.modules().items()}
        self.frozen: dict[str, nn.Module] = {k: m.to(self.device).eval().requires_grad_(False) for k, m in family.frozen().items()}
        if self.comm is not None:  # every rank starts from rank 0's weights (frozen ones are another run's: identical)
            self.comm.broadcast_modules(self.modules)
        self.specs = family.optimizers(self.tc)  # optimizer name -> OptimizerSpec
        self.optimizers = {}
        self._opt_modules = {}  # optimizer name -> names of the modules it updates
        for name, spec in self.specs.items():
            unknown = [m for m in spec.modules if m not in self.modules]
            if unknown:
                raise ValueError(f"optimizer {name!r} names module {unknown[0]!r}, which the family does not train")
            self._opt_modules[name] = list(spec.modules)
            params = [p for mn in spec.modules for p in self.modules[mn].parameters() if p.requires_grad]
            self.optimizers[name] = torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
        self.ema = EMA(self.modules, self.tc.ema_decay) if self.tc.ema_decay > 0 else None
        self.noise = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        # what the family draws from: the stream itself, or under torchrun this rank's rows of the global batch's draws
        self._step_noise = self.noise if self.comm is None else ShardedGenerator(self.noise, *self.shard, self.tc.batch_size)
        self.guard = DivergenceGuard(self.tc.divergence_factor)
        self.step = 0
        self.elapsed = 0.0
        self.horizon = BudgetHorizon(self.tc, self.specs)  # the steps the lr schedule spans
        self.saved_step: int | None = None  # the step of the checkpoint on disk (None: none yet)
        self.stop_signal: int | None = None  # the signal that stopped fit() (None: it was not stopped by one)
        self.resumed_world: int | None = None  # processes of the run that wrote the resumed checkpoint (when recorded)
        self._updates_this_step = 0
        self._phase = "start-up"
        self._stopper: GracefulStop | None = None
        self._global_signal = 0  # the largest signal number any rank received (under torchrun)
        self._opened = False
        self._lock_fd: int | None = None
        self._pending_config: str | None = None  # a resumed run's new config.yaml, written with its next checkpoint
        self._writing: int | None = None  # the step whose checkpoint rank 0 is writing while this rank waits
        self._usage: dict[str, dict] = {}  # module -> what the dry run saw (forward calls, gradients reaching it)
        self._agree(self._validate, "to start")
        self.precision = self._resolve_precision(cfg.resolved.get("precision") if resume else None)
        self.autocast_dtype = self.precision.dtype
        family.autocast_dtype = self.autocast_dtype  # sampling during and after training uses the same precision
        self._step_fns = {k: (torch.compile(m) if self.tc.compile else m) for k, m in self.modules.items()}
        self._wrapped: dict[str, DataParallel] = {}  # modules DDP synchronises through their forward
        self._reduced_after: set[str] = set()  # modules whose gradients are all-reduced after each backward
        if self.comm is not None:
            self._wrap_modules()

    @property
    def synchronised(self) -> dict[str, str]:
        """How each trained module's gradients are averaged over the ranks under torchrun: ``ddp``
        (DistributedDataParallel around it) or ``all-reduce`` (one all-reduce after each backward).
        A module not listed (frozen, or without trainable parameters) is replicated, not
        synchronised. Empty in one process."""
        return {**{k: "ddp" for k in self._wrapped}, **{k: "all-reduce" for k in sorted(self._reduced_after)}}

    def _validate(self) -> None:
        """Load the resumed checkpoint and run the dry step (on every rank)."""
        if self.resume:
            self._load()
            if self.step >= self.tc.steps:
                raise TrainingError(f"run {self.run_dir} is at step {self.step} and train.steps is {self.tc.steps}: nothing "
                                    f"to train (raise it, e.g. --train.steps {max(2 * self.step, self.step + 1)})")
            if self.step >= self.horizon.steps:
                raise TrainingError(f"run {self.run_dir} is at step {self.step}, the end of its learning-rate schedule "
                                    f"planned for train.max_minutes {self.tc.max_minutes:g}: nothing to train (raise "
                                    "train.max_minutes, or train.schedule_length steps to span train.steps)")
        self._dry_run()

    def _agree(self, fn: Callable[[], Any], what: str) -> Any:
        """``fn()``; under torchrun on every rank, raising on every rank if it raised on one."""
        return fn() if self.comm is None else self.comm.agree(fn, what)

    def _wrap_modules(self) -> None:
        """DistributedDataParallel around each trained module that an optimizer updates, that has
        trainable parameters and whose forward the step calls. What DDP's hooks cannot serve is
        averaged after each backward instead (one all-reduce, :meth:`_average_unsynced`): a module
        whose gradients came without a call of its forward (VDM's schedule, read through its
        methods), and one of which a backward of the dry run reached only some parameters (an
        energy model, whose score is the gradient of its output: the output bias gets no gradient
        although it is reachable from the output, so ``find_unused_parameters`` would wait for it)."""
        import warnings

        # R1 / energy models: a double backward lays out some gradients unlike DDP's buckets (a speed note, not an error)
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        optimised = {m for ms in self._opt_modules.values() for m in ms}
        for k in self.modules:
            if k not in optimised or not any(p.requires_grad for p in self.modules[k].parameters()):
                continue  # replicated: identical on every rank, nothing to synchronise
            bn = next((n for n, m in self.modules[k].named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
            if bn is not None:  # its statistics would be each rank's shard's: ranks drift apart, 1 != N processes
                raise TrainingError(f"module {k!r} has BatchNorm ({bn or k}): under torchrun its batch statistics would be "
                                    "each process's share of the batch; use GroupNorm (scorelab's nets do) or train in one "
                                    "process")
            use = self._usage.get(k, {})
            if use.get("grad_without_forward") or use.get("partial"):
                self._reduced_after.add(k)
                continue
            self._wrapped[k] = self.comm.wrap(self._step_fns[k], find_unused=False)
            self._step_fns[k] = self._wrapped[k]

    def _event(self, name: str) -> None:
        if EVENT_HOOK is not None:
            EVENT_HOOK(name, self)

    # --- validation -----------------------------------------------------------------------
    def _dry_run(self) -> None:
        """One forward + backward of the first batch with nothing updated (:meth:`_probe`): an
        error here (data that does not fit the net, a bad option) is a one-line TrainingError
        before anything is written, with a hint where one is known."""
        try:
            self._probe(None, record=self.comm is not None)
        except TrainingError:
            raise
        except Exception as e:  # any failure of the first step is reported in one line
            msg = _first_line(e)
            kind = "images" if self.x.ndim == 4 else "points"
            hint = ""
            if "patch_size" in msg:
                hint = ("; try --model.net_options.patch_size 1, or images whose sides are a multiple of the patch "
                        "(pad or resize the data)")
            elif self.comm is not None and "Generator" in msg:
                hint = ("; under torchrun the step's generator is this rank's share of the global batch's stream: draw "
                        "with scorelab.random.rand / randn, not torch.rand(..., generator=ctx.generator)")
            raise TrainingError(f"the first training step fails on this data ({kind} of shape {tuple(self.x.shape[1:])}): "
                                f"{type(e).__name__}: {msg}{hint}") from e

    def _check_checkpoint(self, tensors: dict, meta: dict, path: Path) -> None:
        """CheckpointError unless ``tensors`` / ``meta`` fit this trainer exactly (names, shapes,
        dtypes, finite values, optimizer moments, generator states, family and data)."""
        fam = meta.get("family")
        if fam is not None and fam != self.family.name:
            raise CheckpointError(f"checkpoint {path} is a {fam} run; the config says model.family {self.family.name}")
        data = meta.get("data")
        if isinstance(data, dict) and "shape" in data:
            try:
                shape = tuple(int(s) for s in data["shape"])
            except (TypeError, ValueError):
                raise CheckpointError(f"checkpoint {path}: corrupt metadata (data shape {data['shape']!r})") from None
            if shape != tuple(self.family.data.shape):
                raise CheckpointError(f"checkpoint {path} and the data do not match: it was trained on data of shape {shape}, "
                                      f"the data now has shape {tuple(self.family.data.shape)}")
        expected, _ = self.state_tensors()
        for k, want in expected.items():
            if k.startswith("opt."):
                continue
            if k not in tensors:
                raise CheckpointError(f"checkpoint weights do not match the model: {path} lacks tensor {k} (the model "
                                      f"config or train.ema_decay changed since it was written?)")
            got = tensors[k]
            if k.startswith("rng."):
                if got.dtype != torch.uint8 or got.shape != want.shape:
                    raise CheckpointError(f"checkpoint {path}: random-generator state {k} is corrupt "
                                          f"({got.dtype} {tuple(got.shape)}, expected uint8 {tuple(want.shape)})")
                try:
                    g = torch.Generator(device=self.device) if k == "rng.noise" else torch.Generator()
                    g.set_state(got)
                except RuntimeError:
                    raise CheckpointError(f"checkpoint {path}: random-generator state {k} is corrupt") from None
                continue
            _check_tensor(k, got, want, path)
        for k in tensors:
            if (k.startswith("model.") or (k.startswith("ema.") and self.ema is not None)) and k not in expected:
                raise CheckpointError(f"checkpoint weights do not match the model: {path} has tensor {k}, which the model lacks")
        opts = meta.get("optimizers", {})
        for k in tensors:
            if k.startswith("opt.") and k.split(".")[1] not in self.optimizers:
                raise CheckpointError(f"checkpoint {path} has state of optimizer {k.split('.')[1]!r}; the family's "
                                      f"optimizers are {', '.join(self.optimizers)}")
        for name, opt in self.optimizers.items():
            if name not in opts:
                raise CheckpointError(f"checkpoint {path} lacks optimizer {name!r}")
            try:
                check_optimizer_state(opt, f"opt.{name}", tensors, opts[name])
            except CheckpointError as e:
                raise CheckpointError(f"checkpoint {path}: {e}") from None

    # --- precision -------------------------------------------------------------------------
    def _resolve_precision(self, recorded: str | None):
        """The run's precision: the recorded decision on resume (so a resumed run computes as the
        first part did), else ``train.precision`` resolved by measurement (see
        :func:`scorelab.train.precision.resolve_precision`) with a probe of this run's own step."""
        from .precision import PrecisionDecision, resolve_precision

        if recorded in ("fp32", "bf16"):
            return PrecisionDecision.recorded(recorded, self.tc.precision)
        # the probe times this process's step: its share of the batch (the whole batch in one process)
        key = {"model": self.cfg.model, "batch_size": self.local_batch, "data_shape": list(self.x.shape[1:])}
        if self.comm is None:
            return resolve_precision(self.tc.precision, self.device, probe=self._probe, key=key)
        # rank 0 decides (probing alone while the others wait) and every rank computes as it decided
        from .precision import share_decision

        return share_decision(lambda: resolve_precision(self.tc.precision, self.device, probe=self._probe, key=key),
                              self.comm.agree, self.comm.broadcast_object, self.is_main)

    def _probe(self, dtype, record: bool = False):
        """One forward + backward of this run's training step at ``dtype`` (no optimizer step; the
        weights, module buffers and every random stream are restored): ``[loss, grad norms...]``.

        Runs on this process alone (no collective: under torchrun the step of this rank's shard).
        ``record`` (the dry run): note in :attr:`_usage` which modules' forwards ran before each
        backward and which of their parameters it reached (the choice of what DDP wraps)."""
        snapshot = {k: {n: v.clone() for n, v in m.state_dict().items()} for k, m in self.modules.items()}
        rng, noise = torch.get_rng_state(), self.noise.get_state()
        norms = []
        calls = {k: 0 for k in self.modules}
        hooks = []
        if record:
            def counter(name):
                def hook(module, args):
                    if torch.is_grad_enabled():
                        calls[name] += 1
                return hook

            hooks = [m.register_forward_pre_hook(counter(k)) for k, m in self.modules.items()]

        def backward_only(loss, name="main"):
            if name not in self.optimizers:
                raise TrainingError(f"the family asked for optimizer {name!r}; it has {', '.join(self.optimizers)}")
            for p in (q for g in self.optimizers[name].param_groups for q in g["params"]):
                p.grad = None
            if record:  # see what this backward alone reaches
                for m in self.modules.values():
                    for p in m.parameters():
                        p.grad = None
            loss.backward()
            if record:
                for k, m in self.modules.items():
                    ps = [p for p in m.parameters() if p.requires_grad]
                    reached = sum(p.grad is not None for p in ps)
                    use = self._usage.setdefault(k, {})
                    if reached and not calls[k]:
                        use["grad_without_forward"] = True
                    if 0 < reached < len(ps):
                        use["partial"] = True
                    calls[k] = 0
            gn = torch.sqrt(sum((p.grad.detach().float() ** 2).sum() for g in self.optimizers[name].param_groups
                                for p in g["params"] if p.grad is not None))
            norms.append(gn)
            return float(gn)

        try:
            ctx = StepContext(0, self.device, self._step_noise, dtype, backward_only)
            out = self.family.training_step(self.modules, self.batch_at(0), ctx)
            if not isinstance(out, dict) or not out:
                raise TrainingError(f"{self.family.name}.training_step must return a non-empty dict of metrics, "
                                    f"got {type(out).__name__}")
            first = next(iter(out.values()))
            return [torch.as_tensor(first).detach().float(), *norms]
        finally:
            for h in hooks:
                h.remove()
            for k, m in self.modules.items():
                m.load_state_dict(snapshot[k])
                for p in m.parameters():
                    p.grad = None
            torch.set_rng_state(rng)
            self.noise.set_state(noise)

    # --- checkpoints ---------------------------------------------------------------------
    def state_tensors(self) -> tuple[dict, dict]:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"step": self.step, "elapsed": self.elapsed, "family": self.family.name, "optimizers": {},
                                "data": self.family.data.to_dict(), "horizon": self.horizon.state_dict(), **self.extra_meta}
        if hasattr(self, "precision"):
            meta["precision"] = self.precision.name
        for name, m in self.modules.items():
            for k, v in m.state_dict().items():
                tensors[f"model.{name}.{k}"] = v
        if self.ema is not None:
            for name, sd in self.ema.shadow.items():
                for k, v in sd.items():
                    tensors[f"ema.{name}.{k}"] = v
        for name, opt in self.optimizers.items():
            t, m = optimizer_to_flat(opt, f"opt.{name}")
            tensors.update(t)
            meta["optimizers"][name] = m
        tensors["rng.torch"] = torch.get_rng_state()  # rank 0's under torchrun (the other ranks reseed theirs each step)
        tensors["rng.noise"] = self.noise.get_state()
        meta["world_size"] = self.world  # informational: the state does not depend on it
        meta["guard"] = self.guard.state_dict()
        meta["config"] = self.cfg.to_dict()
        return tensors, meta

    def _kept(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written"
        if self._writing is not None and not self.is_main:  # rank 0 was lost while it wrote: either file is whole
            return (f"the checkpoint on disk is that of step {self.saved_step}, or of step {self._writing} if rank 0 "
                    f"finished writing it (resume with --resume {self.run_dir})")
        return f"the checkpoint at step {self.saved_step} is kept (resume with --resume {self.run_dir})"

    def save(self, folder: Path | None = None) -> Path:
        """Write the checkpoint of the current step (atomically). Refuses (DivergedError) a state
        with a non-finite tensor: the checkpoint on disk stays as it was.

        Under torchrun every rank calls it: the ranks first check that they hold the same state
        (:meth:`~scorelab.train.distributed.Comm.check_in_sync`), rank 0 writes, and the others
        wait to learn whether it could (a failure raises on every rank)."""
        return self._save(folder, collective=self.comm is not None)

    def _save(self, folder: Path | None, collective: bool) -> Path:
        tensors, meta = self.state_tensors()
        for k, v in tensors.items():
            if k.startswith(("model.", "ema.", "opt.")) and v.is_floating_point() and not torch.isfinite(v).all():
                raise DivergedError(f"step {self.step}: {k} holds non-finite values, so no checkpoint is written: training "
                                    f"diverged; {self._kept()}; {self._advice(nonfinite=False)}")
        if collective:
            self.comm.check_in_sync({k: v for k, v in tensors.items() if k != "rng.torch"}, self.step)
        path = Path(folder or self.run_dir) / CKPT
        phase, self._phase = self._phase, f"writing the checkpoint of step {self.step}"
        self._event("save")
        failure: StorageError | None = None
        try:
            if self.is_main:
                try:
                    if folder is None and self._pending_config is not None:
                        atomic_write_text(self.run_dir / "config.yaml", self._pending_config)  # before: a kill between keeps both usable
                        self._pending_config = None
                    save_checkpoint(path, tensors, meta)
                except StorageError as e:
                    failure = e
            if collective:  # the others wait for rank 0's write and learn how it went
                self._writing = self.step
                told = self.comm.broadcast_object(None if failure is None else _first_line(failure))
                self._writing = None
                if told is not None and not self.is_main:
                    raise DistributedError(f"rank 0 could not write the checkpoint of step {self.step} ({told}); {self._kept()}")
            if failure is not None:
                intact = (f"the checkpoint at step {self.saved_step} is intact; free space and resume with --resume "
                          f"{self.run_dir}") if self.saved_step is not None else "nothing was saved"
                raise failure.with_note(intact) from None
        finally:
            self._phase = phase
        self.saved_step = self.step
        self._event("saved")
        return path

    def _load(self) -> None:
        path = self.run_dir / CKPT
        if not path.exists() and (self.run_dir / "config.yaml").is_file():
            print(f"note: {self.run_dir} has no checkpoint (the run never saved one): it starts from step 0 with its "
                  "config", file=sys.stderr)
            return
        tensors, meta = load_checkpoint(path)
        self._check_checkpoint(tensors, meta, path)
        guard = DivergenceGuard(self.tc.divergence_factor)
        guard.load_state_dict(meta.get("guard"))
        load_module_states(self.modules, tensors, "model", where=path)
        if self.ema is not None:
            for name, sd in self.ema.shadow.items():
                for k in sd:
                    sd[k].copy_(tensors[f"ema.{name}.{k}"])
        for name, opt in self.optimizers.items():
            optimizer_from_flat(opt, f"opt.{name}", tensors, meta["optimizers"][name])
        torch.set_rng_state(tensors["rng.torch"])
        self.noise.set_state(tensors["rng.noise"])
        self.guard = guard
        self.step = int(meta["step"])
        self.elapsed = float(meta.get("elapsed", 0.0))
        self.horizon.load_state_dict(meta.get("horizon"))
        self.saved_step = self.step
        w = meta.get("world_size")
        self.resumed_world = int(w) if isinstance(w, int) and not isinstance(w, bool) else None

    # --- the run folder --------------------------------------------------------------------
    def _lock(self, folder: Path) -> None:
        """Hold an exclusive ``flock`` on ``folder/.lock`` while training (released on exit, even kill -9)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        p = folder / ".lock"
        try:
            fd = os.open(str(p), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageError("write", p, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise TrainingError(f"run folder {folder} is being trained by another process (wait for it, or stop it)") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _open_folder(self, config_yaml: str | None) -> None:
        """Create the run folder (staging folder, config, step-0 checkpoint, rename) or take over a
        resumed one (lock, stale temporaries removed, metrics truncated to the checkpoint's step;
        its config.yaml is rewritten with the next checkpoint, so a resume that stops before one,
        e.g. by the divergence guard, leaves the folder's config and checkpoint as they were)."""
        if self._opened:
            return

        def on_rank0() -> None:
            if not self.is_main:  # the other ranks never touch the folder
                return
            if self.resume:
                self._lock(self.run_dir)
                for sub in (self.run_dir, self.run_dir / "samples"):
                    remove_stale_temporaries(sub)
                self._pending_config = config_yaml  # written just before the first new checkpoint
                self._truncate_metrics()
            else:
                self._create(config_yaml)

        self._agree(on_rank0, "to open the run folder")
        if self.resume and self.saved_step is None:  # every rank read the same folder
            self.save()
        if self.comm is not None:
            self.saved_step = self.comm.broadcast_object(self.saved_step)
        self._opened = True

    def _create(self, config_yaml: str | None) -> None:
        import shutil

        final, parent = self.run_dir, self.run_dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError("create folder", parent, e) from None
        if final.exists() and (not final.is_dir() or any(final.iterdir())):
            raise TrainingError(f"run folder {final} already exists: resume it with --resume {final} or pick another name")
        for p in stale_temporaries(parent):  # staging folders of this name left by a kill -9
            if p.name.startswith(f".{final.name}.") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
        stage = temporary_name(final)
        try:
            try:
                stage.mkdir()
            except OSError as e:
                raise StorageError("create folder", final, e) from None
            self._lock(stage)
            if config_yaml is not None:
                atomic_write_text(stage / "config.yaml", config_yaml)
            self._save(stage, collective=False)  # rank 0 alone: the state of step 0 is rank 0's, broadcast
            try:
                os.rename(stage, final)
            except OSError as e:
                if final.exists():
                    raise TrainingError(f"run folder {final} already exists: resume it with --resume {final} or pick "
                                        "another name") from None
                raise StorageError("create folder", final, e) from None
            fsync_folder(parent)
        except StorageError as e:  # name the run's file, not the staging folder's
            self._unlock()
            shutil.rmtree(stage, ignore_errors=True)
            self.saved_step = None
            name = final / Path(e.filename).relative_to(stage) if str(e.filename).startswith(str(stage)) else e.filename
            raise StorageError(e.action, name, e, note="no run folder was created") from None
        except BaseException:
            self._unlock()
            shutil.rmtree(stage, ignore_errors=True)
            self.saved_step = None
            raise

    def _truncate_metrics(self) -> None:
        """Keep the rows of ``metrics.jsonl`` up to the checkpoint's step (a resume rewrites the rest)."""
        p = self.run_dir / METRICS
        if not p.is_file():
            return
        try:
            text = p.read_text(errors="replace")
        except OSError as e:
            raise StorageError("read", p, e) from None
        keep = []
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a row cut by kill -9
            s = rec.get("step") if isinstance(rec, dict) else None
            if isinstance(s, int) and s <= self.step:
                keep.append(line)
        new = "".join(line + "\n" for line in keep)
        if new != text:
            atomic_write_text(p, new)

    # --- the loop -----------------------------------------------------------------------
    def lr_at(self, step: int, optimizer: str = "main") -> float:
        """The learning rate of ``optimizer`` at ``step`` (its spec's warm-up and schedule)."""
        name = optimizer if optimizer in self.specs else next(iter(self.specs))
        return self.specs[name].lr_at(step, self.horizon.steps)

    def batch_at(self, step: int) -> dict:
        """The batch of ``step``: epoch permutation seeded by (seed, epoch), then a slice of
        ``train.batch_size`` (the last ``n mod batch_size`` rows of each permutation are unused);
        under torchrun this rank's rows ``[start, stop)`` of it (:attr:`shard`)."""
        epoch, i = divmod(step, self.batches_per_epoch)
        if self._perm is None or self._perm[0] != epoch:  # one permutation per epoch, not per step
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        lo, hi = i * self.tc.batch_size + self.shard[0], i * self.tc.batch_size + self.shard[1]
        idx = self._perm[1][lo:hi].to(self.x.device)
        batch = {"x": self.x[idx], "index": idx}
        if self.y is not None:
            batch["y"] = self.y[idx]
        return self.family.prepare(batch, {**self.modules, **self.frozen})

    def _optimize(self, loss: torch.Tensor, name: str) -> float:
        if name not in self.optimizers:
            raise TrainingError(f"the family asked for optimizer {name!r}; it has {', '.join(self.optimizers)}")
        opt, spec = self.optimizers[name], self.specs[name]
        for g in opt.param_groups:
            g["lr"] = spec.lr_at(self.step, self.horizon.steps)
        opt.zero_grad(set_to_none=True)
        if self.comm is None:
            value = float(loss.detach())
        else:  # the global batch's loss (the mean of equal shards' means): every rank judges the same number
            value = self.comm.mean_value(float(loss.detach()))
        if not math.isfinite(value):  # the guard: skip this update
            self.guard.nonfinite(name, "the loss", value)
            return float("nan")
        if self.comm is None:
            loss.backward()
        else:
            with self.comm.guard(f"in the backward pass of step {self.step + 1}"):
                loss.backward()  # DDP averages the wrapped modules' gradients over the ranks
            self._average_unsynced(name)
        params = [p for g in opt.param_groups for p in g["params"]]
        if spec.grad_clip > 0:
            gn = float(torch.nn.utils.clip_grad_norm_(params, spec.grad_clip))
        else:
            gn = float(torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in params if p.grad is not None)))
        if not math.isfinite(gn):
            opt.zero_grad(set_to_none=True)
            self.guard.nonfinite(name, "the gradient norm", gn)
            return gn
        self.guard.observe(name, value)
        opt.step()
        self._updates_this_step += 1
        if self.ema is not None:
            self.ema.update(self.modules, self.step, self._opt_modules[name])
        self._event("optimize")
        return gn

    def _average_unsynced(self, name: str) -> None:
        """After a backward under torchrun: average over the ranks the gradients of optimizer
        ``name``'s modules that DDP did not (modules used through their methods, or whose DDP
        forward did not run since the last backward: DDP's hooks fire only after its forward).
        Averaging an already averaged gradient again changes nothing, so this errs on the safe side."""
        grads = []
        for k in self._opt_modules[name]:
            w = self._wrapped.get(k)
            if k in self._reduced_after or (w is not None and not w.armed):
                ps = [p for p in self.modules[k].parameters() if p.requires_grad]
                grads += [p.grad for p in ps if p.grad is not None]  # None on one rank is None on all (same step)
        for w in self._wrapped.values():
            w.disarm()
        if grads:
            self.comm.all_mean_(grads)

    def _should_stop(self) -> bool:
        """Whether a stop was requested (checked between steps only). Under torchrun the largest
        signal number over the ranks (an all-reduce: every rank calls this at the same points), so
        that every rank stops after the same step."""
        mine = int(self._stopper.signum) if self._stopper is not None and self._stopper.signum is not None else 0
        if self.comm is not None:
            mine = self.comm.max_ints([mine])[0]
            self._global_signal = max(self._global_signal, mine)
        return mine > 0

    def _time_is_up(self, local: bool) -> bool:
        """``train.max_minutes`` reached (on any rank, under torchrun: their clocks differ)."""
        if self.comm is None:
            return local
        return self.comm.max_ints([int(local)])[0] > 0

    def _advice(self, nonfinite: bool) -> str:
        """What to try after a divergence (``nonfinite``: a NaN born in backward, which detect_anomaly can name)."""
        lrs = sorted({s.lr for s in self.specs.values()})
        tips = [f"a lower train.lr (now {lrs[0]:g})" if len(lrs) == 1 else
                f"lower learning rates (now {', '.join(f'{n} {s.lr:g}' for n, s in self.specs.items())})"]
        if any(s.grad_clip == 0 for s in self.specs.values()):
            tips.append("gradient clipping (train.grad_clip 1)")
        else:
            tips.append("a smaller train.grad_clip")
        tips.append("a longer train.warmup")
        if getattr(self, "precision", None) is not None and self.precision.name == "bf16":
            tips.append("train.precision fp32")
        if nonfinite and not self.tc.detect_anomaly:
            tips.append("train.detect_anomaly true to name the operation")
        return "try " + ", ".join(tips)

    def _judge_step(self, step: int) -> None:
        """Turn the guard's flags for ``step`` into warnings or a :class:`DivergedError`."""
        g = self.guard
        if g.step_skips:
            g.skipped_in_a_row += 1
            k = self.tc.nonfinite_skips
            if g.skipped_in_a_row > k:
                raise DivergedError(f"step {step}: {g.step_skips[0]}"
                                    + (f" ({g.skipped_in_a_row} steps in a row, train.nonfinite_skips is {k})" if k else "")
                                    + f": training diverged; {self._kept()}; "
                                    + self._advice(nonfinite="gradient" in g.step_skips[0]))
            self._warn(f"step {step}: {g.step_skips[0]}: update skipped ({g.skipped_in_a_row} of at most {k} in a row)")
        else:
            g.skipped_in_a_row = 0
        if g.step_explosion is not None:
            name, value, med = g.step_explosion
            g.exploding_in_a_row += 1
            if g.exploding_since is None:
                g.exploding_since = step
            p = self.tc.divergence_patience
            if g.exploding_in_a_row >= p:
                raise DivergedError(f"step {step}: loss {value:.4g} of optimizer {name!r} has been more than "
                                    f"{self.tc.divergence_factor:g}x its running median ({med:.4g}) for {p} steps: training "
                                    f"diverged; {self._kept()}; {self._advice(nonfinite=False)}")
            if g.exploding_in_a_row == 1:
                self._warn(f"step {step}: loss {value:.4g} of optimizer {name!r} is far above its running median {med:.4g}; "
                           f"checkpoints wait, and the run stops if this lasts {p} steps")
        elif g.exploding_in_a_row and not g.step_skips:  # a skipped step says nothing about recovery
            self._warn(f"step {step}: the loss is back near its running median after {g.exploding_in_a_row} step(s)")
            g.exploding_in_a_row, g.exploding_since = 0, None

    def _warn(self, text: str) -> None:
        if not self.is_main:  # every rank decides the same: rank 0 says it
            return
        from tqdm.auto import tqdm

        tqdm.write(f"scorelab: {text}", file=sys.stderr)

    def _train_step(self) -> dict[str, float]:
        """One step. If it raises before any optimizer update, the random streams are rolled back
        (the state is then exactly that before the step); after an update it cannot be undone, and
        nothing is saved (the caller keeps the last checkpoint)."""
        self._phase = f"step {self.step + 1}"
        self._event("step")
        if self.rank > 0:  # torch's global stream (dropout) of rank r > 0: its own, from (seed, step, rank)
            torch.manual_seed(((self.cfg.seed * 1_000_003 + self.step) * 1_009 + self.rank) % 2**63)
        rng, noise = torch.get_rng_state(), self.noise.get_state()
        self._updates_this_step = 0
        self.guard.begin_step()
        anomaly = torch.autograd.detect_anomaly() if self.tc.detect_anomaly else contextlib.nullcontext()
        try:
            with anomaly:
                batch = self.batch_at(self.step)
                ctx = StepContext(self.step, self.device, self._step_noise, self.autocast_dtype, self._optimize, comm=self.comm)
                out = self.family.training_step(self._step_fns, batch, ctx)
        except BaseException:
            if self._updates_this_step == 0:
                torch.set_rng_state(rng)
                self.noise.set_state(noise)
                for m in self.modules.values():
                    for p in m.parameters():
                        p.grad = None
            raise
        return {k: float(v) for k, v in out.items()}

    def fit(self, on_sample: Callable[["Trainer"], None] | None = None, *, config_yaml: str | None = None,
            stop: GracefulStop | None = None) -> dict:
        """Create or take over the run folder (``config_yaml``: the text of its ``config.yaml``) and
        train until ``train.steps`` (or ``max_minutes``, or a signal); ends with a checkpoint unless
        the divergence guard stopped the run.

        ``stop``: the caller's :class:`GracefulStop` (the command line installs one at start-up);
        default: one for the duration of this call. Every ``log_every`` steps, at every checkpoint
        and at the last step the mean of each metric over the steps since the last row goes to
        ``metrics.jsonl``. Returns ``{"step", "status", "elapsed", "steps_this_run"}`` with status
        ``done``, ``time_limit`` or ``interrupted`` (then :attr:`stop_signal` holds the signal).
        Raises :class:`DivergedError`, :class:`TrainingError` or StorageError (one line each)."""
        own = stop is None
        stopper = GracefulStop(defer=True) if own else stop
        stopper.describe = lambda: self._phase
        self._stopper = stopper
        with stopper if own else contextlib.nullcontext():
            stopper.defer = True  # from here on, something is written: signals wait for the end of the step
            try:
                self._open_folder(config_yaml)
                return self._fit(on_sample)
            finally:
                self._unlock()

    def _fit(self, on_sample) -> dict:
        from tqdm.auto import tqdm

        mpath = self.run_dir / METRICS
        metrics_f = None  # rank 0 writes the metrics
        if self.is_main:
            try:
                metrics_f = open(mpath, "a")
            except OSError as e:
                raise StorageError("write", mpath, e) from None
        status, save_at_end = "done", True
        start_step, t0 = self.step, time.perf_counter()
        elapsed0 = self.elapsed
        bar = tqdm(total=self.horizon.steps, initial=self.step, disable=not (self.progress and self.is_main), dynamic_ncols=True,
                   desc=self.cfg.name, unit="step")
        for m in self.modules.values():
            m.train()
        window: dict[str, list[float]] = {}
        skipped = [0]
        last = {"t": time.perf_counter(), "step": self.step}
        symmetric = [True]  # every rank is at the same point (False after an error of one rank: no more collectives)

        def log_line() -> None:
            if self.comm is not None:  # the mean over every rank's values (equal shards: the global batch's)
                if not symmetric[0]:
                    return
                parts = self.comm.gather_objects({k: (sum(v), len(v)) for k, v in window.items() if v})
                sums: dict[str, list[float]] = {}
                for part in parts:
                    for k, (total, count) in part.items():
                        acc = sums.setdefault(k, [0.0, 0])
                        acc[0] += total
                        acc[1] += count
                means = {k: t / c for k, (t, c) in sums.items()}
            else:
                means = {k: sum(v) / len(v) for k, v in window.items() if v}
            if not means and not skipped[0]:
                return
            now = time.perf_counter()
            its = (self.step - last["step"]) / max(now - last["t"], 1e-9)
            rec = {"step": self.step, **means}
            if skipped[0]:
                rec["skipped"] = skipped[0]
            # ex_s: examples per second of the whole job (train.batch_size is the global batch)
            rec.update({"lr": self.lr_at(self.step - 1), "it_s": its, "ex_s": its * self.tc.batch_size, "elapsed": round(self.elapsed, 2)})
            if metrics_f is not None:
                try:
                    metrics_f.write(json.dumps(rec) + "\n")
                    metrics_f.flush()
                except OSError as e:
                    raise StorageError("write", mpath, e) from None
            first = next(iter(means), None)
            if first is not None:
                bar.set_postfix({first: f"{rec[first]:.4g}", "ex_s": f"{rec['ex_s']:.0f}"})
            window.clear()
            skipped[0] = 0
            last.update(t=now, step=self.step)

        try:
            while True:
                if self._should_stop():
                    status = "interrupted"
                    break
                if self.step >= self.horizon.steps:
                    break
                if self.tc.max_minutes and self._time_is_up((elapsed0 + time.perf_counter() - t0) > 60 * self.tc.max_minutes):
                    status = "time_limit"
                    break
                vals = self._train_step()
                for k, v in vals.items():
                    if math.isfinite(v):
                        window.setdefault(k, []).append(v)
                if self.guard.step_skips:
                    skipped[0] += 1
                self.step += 1
                self.elapsed = elapsed0 + time.perf_counter() - t0
                if self.horizon.observe(self.step, self.elapsed):  # the budget's step count is now known (same step on every rank)
                    if self.comm is not None:  # rank 0's measurement on every rank: they must stop at the same step
                        self.horizon.load_state_dict(self.comm.broadcast_object(self.horizon.state_dict()))
                    bar.total = self.horizon.steps
                    bar.refresh()
                    if metrics_f is not None:
                        print(f"schedule: {self.horizon.describe()}", file=sys.stderr)
                        metrics_f.write(json.dumps({"step": self.step, "horizon": self.horizon.steps,
                                                    "seconds_per_step": self.horizon.seconds_per_step}) + "\n")
                self._phase = f"step {self.step}"
                self._judge_step(self.step)
                if self.step % self.tc.log_every == 0 or self.step == self.horizon.steps:
                    log_line()
                bar.update(1)
                every = self.family.monitor_every()
                if every and self.step % every == 0:
                    self._on_rank0(lambda: self._monitor(metrics_f), "while writing the monitor's metrics")
                if (on_sample is not None and self.tc.sample_every and self.step % self.tc.sample_every == 0
                        and self.step < self.horizon.steps and not self._should_stop()):
                    self._on_rank0(lambda: on_sample(self), "while drawing the sample grid")
                if self.tc.ckpt_every and self.step % self.tc.ckpt_every == 0 and self.step < self.horizon.steps:
                    if self.guard.alarm:
                        self._warn(f"step {self.step}: checkpoint deferred while the loss is exploding or non-finite")
                    else:
                        log_line()  # a row at every checkpoint: a resume continues the same rows
                        self.save()
                self._event("step_done")
        except KeyboardInterrupt:  # raised by code inside a step (signals are deferred, never raised there)
            status = "interrupted"
            self.stop_signal = signal.SIGINT
            if self._updates_this_step:
                save_at_end = False
                self._note(f"interrupted inside step {self.step + 1} after {self._updates_this_step} update(s): that state "
                           f"is not saved; {self._kept()}")
        except DivergedError:  # decided from global numbers: every rank stops here
            raise
        except DistributedError as e:  # another rank failed or is gone: nothing more is written
            symmetric[0] = False
            raise TrainingError(f"{e}; {self._kept()}") from None
        except TrainingError as e:
            symmetric[0] = self.comm is None
            raise TrainingError(f"{e}; {self._kept()}") from None
        except StorageError as e:
            symmetric[0] = self.comm is None
            raise (e if e.note else e.with_note(self._kept())) from None
        except OSError as e:
            symmetric[0] = self.comm is None
            raise StorageError("write", e.filename or self.run_dir, e, note=self._kept()) from None
        except Exception as e:  # an error inside a step: one line, the folder stays resumable
            symmetric[0] = self.comm is None
            if self.tc.detect_anomaly and isinstance(e, RuntimeError) and "nan" in str(e).lower():
                raise DivergedError(f"step {self.step + 1}: autograd anomaly (train.detect_anomaly): {_first_line(e)}; "
                                    f"{self._kept()}") from e
            hint = ""
            if self.comm is not None and "finished reduction in the prior iteration" in str(e):
                hint = (" (DistributedDataParallel: a backward reached only part of a module's parameters, which the dry "
                        "run of step 1 did not show)")
            raise TrainingError(f"step {self.step + 1}: {type(e).__name__}: {_first_line(e)}{hint}; {self._kept()}") from e
        finally:
            try:
                log_line()  # the last step is always logged
            finally:
                bar.close()
                if metrics_f is not None:
                    metrics_f.close()
        if status == "interrupted":
            own = self._stopper.signum if self._stopper is not None else None
            if own is not None or self._global_signal:
                self.stop_signal = own if own is not None else self._global_signal
        if self.guard.exploding_in_a_row and save_at_end:  # (skipped updates leave finite weights: those are saved)
            what = f"its loss was exploding (since step {self.guard.exploding_since})"
            if status == "interrupted":
                save_at_end = False
                self._note(f"stopped while {what}: that state is not saved; {self._kept()}")
            else:
                raise DivergedError(f"step {self.step}: the run ended while {what}: training diverged; {self._kept()}; "
                                    f"{self._advice(nonfinite=False)}")
        if save_at_end and self.saved_step != self.step:
            try:
                self.save()
            except DistributedError as e:
                raise TrainingError(f"{e}; {self._kept()}") from None
        if on_sample is not None:
            if status == "interrupted" or self._should_stop():  # a signal after the last step: done, but no picture
                self._note("interrupted: checkpoint saved; the final sample grid is skipped (scorelab sample draws one)")
            elif self.is_main:  # the others are done: nothing of theirs waits for the picture
                on_sample(self)
        return {"step": self.step, "status": status, "elapsed": self.elapsed, "steps_this_run": self.step - start_step}

    def _on_rank0(self, fn: Callable[[], None], what: str) -> None:
        """``fn()`` on rank 0 while the other ranks wait (they learn of its failure: every rank stops)."""
        if self.comm is None:
            fn()
        else:
            self.comm.agree(lambda: fn() if self.is_main else None, what)

    def _note(self, text: str) -> None:
        """A line on stderr from rank 0 (every rank would print the same)."""
        if self.is_main:
            print(text, file=sys.stderr)

    def _monitor(self, metrics_f) -> None:
        """The family's watch numbers (:meth:`Family.monitor`) from the EMA modules, as their own metrics row."""
        from types import SimpleNamespace

        with torch.no_grad():
            out = self.family.monitor(self.sampling_modules(), SimpleNamespace(step=self.step, x=self.x[:2000], seed=0))
        if out:
            try:
                metrics_f.write(json.dumps({"step": self.step, **{k: float(v) for k, v in out.items()}}) + "\n")
                metrics_f.flush()
            except OSError as e:
                raise StorageError("write", self.run_dir / METRICS, e) from None

    def sampling_modules(self, use_ema: bool = True) -> dict[str, nn.Module]:
        """Copies of the modules in eval mode, with EMA weights when available."""
        import copy

        mods = {k: copy.deepcopy(m).eval() for k, m in self.modules.items()}
        if use_ema and self.ema is not None:
            self.ema.copy_to(mods)
        return mods


def _check_tensor(key: str, got: torch.Tensor, want: torch.Tensor, where) -> None:
    """CheckpointError unless ``got`` has ``want``'s shape and dtype and (floating) finite values."""
    if tuple(got.shape) != tuple(want.shape):
        raise CheckpointError(f"checkpoint weights do not match the model: {key} has shape {tuple(got.shape)} in {where}, "
                              f"the model's is {tuple(want.shape)}")
    if got.dtype != want.dtype:
        raise CheckpointError(f"checkpoint weights do not match the model: {key} has dtype {got.dtype} in {where}, the "
                              f"model's is {want.dtype}")
    if got.is_floating_point() and not torch.isfinite(got).all():
        raise CheckpointError(f"{key} in {where} holds non-finite values: the run diverged (resume from an earlier "
                              "checkpoint or train again with a lower train.lr)")


def load_module_states(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor], prefix: str, where="the checkpoint") -> None:
    """Load ``prefix.<module>.<key>`` tensors into modules. Every tensor is checked first (present,
    no extra, same shape and dtype, finite): a mismatch raises CheckpointError naming the tensor."""
    for name, m in modules.items():
        head = f"{prefix}.{name}."
        sd = {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)}
        own = m.state_dict()
        missing = [k for k in own if k not in sd]
        extra = [k for k in sd if k not in own]
        if missing or extra:
            what = f"lacks {head}{missing[0]}" if missing else f"has {head}{extra[0]}, which the model lacks"
            raise CheckpointError(f"checkpoint weights for {name!r} do not match the model: {where} {what}")
        for k, v in sd.items():
            _check_tensor(head + k, v, own[k], where)
        try:
            m.load_state_dict(sd)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"checkpoint weights for {name!r} do not match the model: {first}") from None


def dataset_tensors(ds) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, y)``: the stored examples (uint8 images or float points) and labels (or None)."""
    for attr in ("images", "points"):
        if hasattr(ds, attr):
            x = getattr(ds, attr)
            break
    else:
        raise TypeError(f"{type(ds).__name__} holds neither images nor points")
    y = getattr(ds, "labels", None)
    x = torch.as_tensor(x)
    y = None if y is None else torch.as_tensor(y).long()
    return x, y
