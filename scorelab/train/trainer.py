"""The training loop, shared by every model family.

A *family* (:class:`scorelab.families.base.Family`) owns its networks and its maths: it lists its
trained and frozen modules, gives one :class:`~scorelab.families.base.OptimizerSpec` per optimizer,
turns a raw batch into model input (``prepare``), and supplies ``training_step(modules, batch,
ctx)``, in which it calls ``ctx.optimize(loss, name)`` once per optimizer it wants to step (a
diffusion model once, a GAN twice with alternating losses) and returns any metrics. The trainer
owns everything else: devices and precision (``train.precision``, measured by
:mod:`scorelab.train.precision`), AdamW with warm-up and schedule per optimizer, gradient
clipping, EMA weights, the data order, the random streams, checkpoints (safetensors, atomic),
metrics (JSONL), the progress bar, resuming and Ctrl-C.

Determinism: the data order of epoch ``e`` is a permutation drawn from a generator seeded by
``(seed, e)``, the learning rate is a function of the step, and the noise generator, torch's
global generator (dropout), EMA and optimizer moments are all checkpointed — so ``N`` steps, a
resume and ``N`` more give the same weights as ``2N`` steps straight through (on CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint, optimizer_from_flat, optimizer_to_flat, save_checkpoint
from .config import RunConfig

__all__ = ["Trainer", "StepContext", "EMA", "resolve_device", "TrainingError"]

CKPT = "checkpoint.safetensors"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"train.device {name!r} is not a device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {name!r} but CUDA is not available")
    return dev


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
    """What a family's ``training_step`` gets: the step, device, precision, noise and ``optimize``."""

    step: int
    device: torch.device
    generator: torch.Generator  # the run's noise stream (checkpointed)
    autocast_dtype: torch.dtype | None
    _optimize: Callable[[torch.Tensor, str], float]
    metrics: dict = field(default_factory=dict)

    def autocast(self):
        """Context manager for the network forward passes (bf16 autocast when enabled)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def optimize(self, loss: torch.Tensor, optimizer: str = "main") -> float:
        """Backward ``loss`` (a scalar), clip, step ``optimizer`` and update its modules' EMA.

        Returns the gradient norm before clipping.
        """
        return self._optimize(loss, optimizer)


class TrainingError(ValueError):
    """Training cannot go on (a non-finite loss, a family asking for an unknown optimizer)."""


class Trainer:
    """Runs a family on a dataset into ``run_dir``; ``fit()`` trains to ``cfg.train.steps``."""

    def __init__(self, cfg: RunConfig, run_dir, family, dataset, *, resume: bool = False, progress: bool = True,
                 extra_meta: dict | None = None):
        self.cfg = cfg
        self.tc = cfg.train
        self.run_dir = Path(run_dir)
        self.family = family
        self.progress = progress
        self.extra_meta = dict(extra_meta or {})  # recorded in every checkpoint (e.g. the data shape)
        self.device = resolve_device(self.tc.device)
        if self.tc.threads > 0:
            torch.set_num_threads(self.tc.threads)

        # data, held as tensors on the device: uint8 images are converted per batch
        self.x, self.y = dataset_tensors(dataset)
        self.n = self.x.shape[0]
        if self.n < self.tc.batch_size:
            raise ValueError(f"train.batch_size {self.tc.batch_size} is larger than the dataset ({self.n} examples)")
        self.batches_per_epoch = self.n // self.tc.batch_size
        self._perm: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation), derived from the step

        torch.manual_seed(cfg.seed)
        self.modules: dict[str, nn.Module] = {k: m.to(self.device) for k, m in family.modules().items()}
        self.frozen: dict[str, nn.Module] = {k: m.to(self.device).eval().requires_grad_(False) for k, m in family.frozen().items()}
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
        self.step = 0
        self.elapsed = 0.0
        if resume:
            self._load()
        self.precision = self._resolve_precision(cfg.resolved.get("precision") if resume else None)
        self.autocast_dtype = self.precision.dtype
        family.autocast_dtype = self.autocast_dtype  # sampling during and after training uses the same precision
        self._step_fns = {k: (torch.compile(m) if self.tc.compile else m) for k, m in self.modules.items()}

    # --- precision -------------------------------------------------------------------------
    def _resolve_precision(self, recorded: str | None):
        """The run's precision: the recorded decision on resume (so a resumed run computes as the
        first part did), else ``train.precision`` resolved by measurement (see
        :func:`scorelab.train.precision.resolve_precision`) with a probe of this run's own step."""
        from .precision import PrecisionDecision, resolve_precision

        if recorded in ("fp32", "bf16"):
            return PrecisionDecision.recorded(recorded, self.tc.precision)
        key = {"model": self.cfg.model, "batch_size": self.tc.batch_size, "data_shape": list(self.x.shape[1:])}
        return resolve_precision(self.tc.precision, self.device, probe=self._probe, key=key)

    def _probe(self, dtype):
        """One forward + backward of this run's training step at ``dtype`` (no optimizer step; the
        weights, module buffers and every random stream are restored): ``[loss, grad norms...]``."""
        snapshot = {k: {n: v.clone() for n, v in m.state_dict().items()} for k, m in self.modules.items()}
        rng, noise = torch.get_rng_state(), self.noise.get_state()
        norms = []

        def backward_only(loss, name="main"):
            for p in (q for g in self.optimizers[name].param_groups for q in g["params"]):
                p.grad = None
            loss.backward()
            gn = torch.sqrt(sum((p.grad.detach().float() ** 2).sum() for g in self.optimizers[name].param_groups
                                for p in g["params"] if p.grad is not None))
            norms.append(gn)
            return float(gn)

        try:
            ctx = StepContext(0, self.device, self.noise, dtype, backward_only)
            out = self.family.training_step(self.modules, self.batch_at(0), ctx)
            first = next(iter(out.values()))
            return [torch.as_tensor(first).detach().float(), *norms]
        finally:
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
                                "data": self.family.data.to_dict(), "precision": self.precision.name, **self.extra_meta}
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
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.noise"] = self.noise.get_state()
        meta["config"] = self.cfg.to_dict()
        return tensors, meta

    def save(self) -> Path:
        tensors, meta = self.state_tensors()
        path = self.run_dir / CKPT
        save_checkpoint(path, tensors, meta)
        return path

    def _load(self) -> None:
        tensors, meta = load_checkpoint(self.run_dir / CKPT)
        load_module_states(self.modules, tensors, "model")
        if self.ema is not None:
            for name, sd in self.ema.shadow.items():
                for k in sd:
                    key = f"ema.{name}.{k}"
                    if key not in tensors:
                        raise CheckpointError(f"checkpoint lacks {key}")
                    sd[k].copy_(tensors[key])
        for name, opt in self.optimizers.items():
            if name not in meta.get("optimizers", {}):
                raise CheckpointError(f"checkpoint lacks optimizer {name!r}")
            optimizer_from_flat(opt, f"opt.{name}", tensors, meta["optimizers"][name])
        torch.set_rng_state(tensors["rng.torch"])
        self.noise.set_state(tensors["rng.noise"])
        self.step = int(meta["step"])
        self.elapsed = float(meta.get("elapsed", 0.0))

    # --- the loop -----------------------------------------------------------------------
    def lr_at(self, step: int, optimizer: str = "main") -> float:
        """The learning rate of ``optimizer`` at ``step`` (its spec's warm-up and schedule)."""
        name = optimizer if optimizer in self.specs else next(iter(self.specs))
        return self.specs[name].lr_at(step, self.tc.steps)

    def batch_at(self, step: int) -> dict:
        """The batch of ``step``: epoch permutation seeded by (seed, epoch), then a slice."""
        epoch, i = divmod(step, self.batches_per_epoch)
        if self._perm is None or self._perm[0] != epoch:  # one permutation per epoch, not per step
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        idx = self._perm[1][i * self.tc.batch_size : (i + 1) * self.tc.batch_size].to(self.x.device)
        batch = {"x": self.x[idx], "index": idx}
        if self.y is not None:
            batch["y"] = self.y[idx]
        return self.family.prepare(batch, {**self.modules, **self.frozen})

    def _optimize(self, loss: torch.Tensor, name: str) -> float:
        if name not in self.optimizers:
            raise TrainingError(f"the family asked for optimizer {name!r}; it has {', '.join(self.optimizers)}")
        opt, spec = self.optimizers[name], self.specs[name]
        for g in opt.param_groups:
            g["lr"] = spec.lr_at(self.step, self.tc.steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in opt.param_groups for p in g["params"]]
        if spec.grad_clip > 0:
            gn = float(torch.nn.utils.clip_grad_norm_(params, spec.grad_clip))
        else:
            gn = float(torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in params if p.grad is not None)))
        opt.step()
        if self.ema is not None:
            self.ema.update(self.modules, self.step, self._opt_modules[name])
        return gn

    def fit(self, on_sample: Callable[["Trainer"], None] | None = None) -> dict:
        """Train until ``train.steps`` (or ``max_minutes``, or Ctrl-C); always ends with a checkpoint.

        Every ``log_every`` steps (and at the last step, however the run ends) the mean of each
        metric over the steps since the last line goes to ``metrics.jsonl``. Returns ``{"step",
        "status", "elapsed", "steps_this_run"}`` with status ``done``, ``time_limit`` or ``interrupted``.
        """
        from tqdm.auto import tqdm

        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_f = open(self.run_dir / "metrics.jsonl", "a")
        status = "done"
        start_step, t0 = self.step, time.perf_counter()
        elapsed0 = self.elapsed
        bar = tqdm(total=self.tc.steps, initial=self.step, disable=not self.progress, dynamic_ncols=True, desc=self.cfg.name, unit="step")
        old_term = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        for m in self.modules.values():
            m.train()
        window: dict[str, list[float]] = {}
        last = {"t": time.perf_counter(), "step": self.step}

        def log_line() -> None:
            if not window:
                return
            now = time.perf_counter()
            its = (self.step - last["step"]) / max(now - last["t"], 1e-9)
            rec = {"step": self.step, **{k: sum(v) / len(v) for k, v in window.items()}}
            rec.update({"lr": self.lr_at(self.step - 1), "it_s": its, "ex_s": its * self.tc.batch_size, "elapsed": round(self.elapsed, 2)})
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()
            first = next(iter(window))
            bar.set_postfix({first: f"{rec[first]:.4g}", "ex_s": f"{rec['ex_s']:.0f}"})
            window.clear()
            last.update(t=now, step=self.step)

        try:
            while self.step < self.tc.steps:
                if self.tc.max_minutes and (elapsed0 + time.perf_counter() - t0) > 60 * self.tc.max_minutes:
                    status = "time_limit"
                    break
                batch = self.batch_at(self.step)
                ctx = StepContext(self.step, self.device, self.noise, self.autocast_dtype, self._optimize)
                out = self.family.training_step(self._step_fns, batch, ctx)
                vals = {k: float(v) for k, v in out.items()}
                first = next(iter(vals))
                if not math.isfinite(vals[first]):
                    raise TrainingError(f"{first} became {vals[first]} at step {self.step}; lower train.lr or check the data")
                for k, v in vals.items():
                    window.setdefault(k, []).append(v)
                self.step += 1
                self.elapsed = elapsed0 + time.perf_counter() - t0
                if self.step % self.tc.log_every == 0 or self.step == self.tc.steps:
                    log_line()
                bar.update(1)
                if self.tc.ckpt_every and self.step % self.tc.ckpt_every == 0 and self.step < self.tc.steps:
                    self.save()
                if on_sample is not None and self.tc.sample_every and self.step % self.tc.sample_every == 0 and self.step < self.tc.steps:
                    on_sample(self)
                every = self.family.monitor_every()
                if every and self.step % every == 0:
                    self._monitor(metrics_f)
        except KeyboardInterrupt:
            status = "interrupted"
        finally:
            signal.signal(signal.SIGTERM, old_term)
            log_line()  # the last step is always logged
            bar.close()
            metrics_f.close()
        self.save()
        if on_sample is not None:
            if status == "interrupted":
                print("interrupted: checkpoint saved; the final sample grid is skipped (scorelab sample draws one)", file=sys.stderr)
            else:
                on_sample(self)
        return {"step": self.step, "status": status, "elapsed": self.elapsed, "steps_this_run": self.step - start_step}

    def _monitor(self, metrics_f) -> None:
        """The family's watch numbers (:meth:`Family.monitor`) from the EMA modules, as their own metrics row."""
        from types import SimpleNamespace

        with torch.no_grad():
            out = self.family.monitor(self.sampling_modules(), SimpleNamespace(step=self.step, x=self.x[:2000], seed=0))
        if out:
            metrics_f.write(json.dumps({"step": self.step, **{k: float(v) for k, v in out.items()}}) + "\n")
            metrics_f.flush()

    def sampling_modules(self, use_ema: bool = True) -> dict[str, nn.Module]:
        """Copies of the modules in eval mode, with EMA weights when available."""
        import copy

        mods = {k: copy.deepcopy(m).eval() for k, m in self.modules.items()}
        if use_ema and self.ema is not None:
            self.ema.copy_to(mods)
        return mods


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def load_module_states(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Load ``prefix.<module>.<key>`` tensors into modules; a mismatch raises CheckpointError."""
    for name, m in modules.items():
        sd = {k[len(prefix) + len(name) + 2 :]: v for k, v in tensors.items() if k.startswith(f"{prefix}.{name}.")}
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
