"""The contract every model family keeps, and the registry the trainer, runs, eval and CLI read.

A family is the model-specific part of scorelab: its networks, how raw data becomes model input,
one training step, and what the trained model can do. Everything else (the trainer, checkpoints,
resume, precision, run folders, eval, the command line) is shared and talks to a family only
through this class. To add a family, write one module in ``scorelab/families/`` with a config
dataclass and a :class:`Family` subclass decorated with :func:`register`, plus its presets in
``scorelab/configs/``; nothing else changes (the package imports every module in it).

A minimal family (see ``tests/test_families.py`` for one with two optimizers and a frozen module)::

    @dataclass
    class ToyConfig:
        family: str = "toy"      # registry name
        width: int = 32          # hidden units

    @register
    class ToyFamily(Family):
        name = "toy"
        Config = ToyConfig

        def build(self):                       # networks from self.cfg and self.data
            self.net = MLP(...)

        def modules(self):
            return {"net": self.net}

        def training_step(self, modules, batch, ctx):
            loss = ...(modules["net"], batch["x"], ctx.generator)
            return {"loss": loss.detach(), "grad_norm": ctx.optimize(loss)}

        def capabilities(self):
            return Capabilities(generate=True)

        def sample_batch(self, modules, generators, y, **options):
            return ...  # (len(generators), *self.data.shape) in model space

What the shared code asks of a family, and where the answer lives:

============================  ==============================================================
question                      method / field
============================  ==============================================================
which networks are trained    :meth:`Family.modules` (checkpointed, EMA-averaged)
which are frozen              :meth:`Family.frozen` (another run's, never checkpointed)
how they are optimised        :meth:`Family.optimizers` -> one :class:`OptimizerSpec` each
raw batch -> model input      :meth:`Family.prepare` (may use the frozen modules)
one step                      :meth:`Family.training_step` -> any dict of metrics
what it can do                :meth:`Family.capabilities` -> :class:`Capabilities`
draw samples                  :meth:`Family.sample` (batched; seed s gives example i seed s+i)
diffusion samplers apply      :meth:`Family.denoiser` (when ``capabilities().denoiser``)
likelihood                    :meth:`Family.nll` (methods in ``capabilities().nll``)
interpolation                 :meth:`Family.latents` + :meth:`Family.generate_from`
latent traversal              :meth:`Family.traverse`
its own eval numbers          :meth:`Family.evaluate`
other runs it builds on       ``Family.references`` (config field -> accepted families)
============================  ==============================================================

The CLI never probes a family's attributes: every verb checks ``capabilities()`` and passes only
the options the family declares, so a wrong request ("--sampler on a GAN run") is refused with
one line naming what the family does take (:class:`CapabilityError`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Protocol

import torch
from torch import Tensor, nn

from ..quantize import to_model
from ..random import generators_for_seeds
from ..train.config import ConfigError, from_dict

__all__ = ["Family", "Capabilities", "DataSpec", "OptimizerSpec", "CapabilityError", "RunLike", "register", "FAMILIES",
           "family_class", "SCHEDULES", "OPTIMIZER_FIELDS", "check_optimizer_overrides"]

FAMILIES: dict[str, type["Family"]] = {}  # registry name -> Family subclass (filled by @register)
SCHEDULES = ("constant", "cosine", "linear")  # learning-rate schedules after warm-up


class CapabilityError(ConfigError, NotImplementedError):
    """A request a family cannot serve (an option it does not take, a verb it does not support)."""


def register(cls: type["Family"]) -> type["Family"]:
    """Class decorator: add a :class:`Family` subclass to :data:`FAMILIES` under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a registry name (class attribute 'name')")
    if cls.name in FAMILIES and FAMILIES[cls.name] is not cls:
        raise TypeError(f"family name {cls.name!r} is taken by {FAMILIES[cls.name].__name__}")
    FAMILIES[cls.name] = cls
    return cls


def family_class(name: str) -> type["Family"]:
    """The registered family ``name``; ConfigError naming ``model.family`` otherwise."""
    if name not in FAMILIES:
        raise ConfigError(f"model.family {name!r} is unknown: expected one of {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


# --------------------------------------------------------------------------------------
# What a family is told about the data, and what it declares
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSpec:
    """What a family may know about its data (recorded in every checkpoint).

    ``shape``: one example without the batch, ``(C, H, W)`` images (stored as uint8, model space
    ``[-1, 1]``) or ``(D,)`` points. ``num_classes``: labels in the data (0: unlabelled).
    ``class_conditional``: the model is given the labels. ``domain``: the feature space eval
    uses for this data (e.g. ``fmnist``, ``mnist``, ``digits``, ``points``, or ``images``).
    """

    shape: tuple  # one example: (C, H, W) or (D,)
    num_classes: int = 0  # labels in the dataset (0: none)
    class_conditional: bool = False  # the model sees the labels
    class_names: tuple | None = None  # names of the classes, when the dataset has them
    name: str = ""  # the dataset's registry name (data.name)
    domain: str = ""  # eval's feature domain

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        if self.class_conditional and not self.num_classes:
            raise ConfigError("data.class_conditional is set but the dataset has no labels")

    @property
    def images(self) -> bool:
        return len(self.shape) == 3

    @property
    def conditional_classes(self) -> int:
        """Number of classes the model is conditioned on (0: unconditional)."""
        return self.num_classes if self.class_conditional else 0

    @property
    def dim(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["class_names"] = list(self.class_names) if self.class_names is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "DataSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class OptimizerSpec:
    """One AdamW optimizer: which modules it updates and its hyper-parameters.

    The learning rate follows ``lr * warmup(step) * schedule(step)``: linear warm-up over
    ``warmup`` steps, then ``constant``, ``cosine`` (to ``lr * min_lr_ratio`` at ``total_steps``)
    or ``linear`` decay. How often an optimizer steps is the family's business (it calls
    ``ctx.optimize(loss, name)``; a GAN's n_critic lives in its config).
    """

    modules: tuple  # names from Family.modules() whose parameters this optimizer updates
    lr: float = 2e-3  # peak learning rate
    betas: tuple = (0.9, 0.99)  # AdamW betas
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup: int = 100  # linear warm-up steps
    schedule: str = "constant"  # after warm-up: constant cosine linear
    min_lr_ratio: float = 0.0  # final lr / lr of the cosine and linear schedules
    grad_clip: float = 1.0  # max global gradient norm of these parameters (0: off)

    def __post_init__(self):
        object.__setattr__(self, "modules", tuple(self.modules))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if not self.modules:
            raise ConfigError("an optimizer needs at least one module")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule {self.schedule!r} is unknown: expected one of {', '.join(SCHEDULES)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("warmup, weight_decay and grad_clip must be >= 0")

    def lr_at(self, step: int, total_steps: int) -> float:
        """The learning rate of (0-based) ``step`` in a run of ``total_steps``."""
        import math

        w = min(1.0, (step + 1) / self.warmup) if self.warmup > 0 else 1.0
        if self.schedule == "constant" or total_steps <= self.warmup:
            return self.lr * w
        frac = min(1.0, max(0.0, (step - self.warmup) / max(1, total_steps - self.warmup)))
        lo = self.min_lr_ratio
        decay = lo + (1 - lo) * (0.5 * (1 + math.cos(math.pi * frac)) if self.schedule == "cosine" else 1 - frac)
        return self.lr * w * decay


OPTIMIZER_FIELDS = ("lr", "betas", "weight_decay", "warmup", "schedule", "min_lr_ratio", "grad_clip")  # OptimizerSpec's, but modules


def check_optimizer_overrides(opts, where: str) -> None:
    """ConfigError naming ``where.<key>`` unless ``opts`` (e.g. ``model.optim_d``) holds valid
    :class:`OptimizerSpec` fields; the ones it leaves out come from ``train.*`` later."""
    if not isinstance(opts, Mapping):
        raise ConfigError(f"{where} must be a mapping of optimizer settings, got {opts!r}")
    unknown = sorted(set(opts) - set(OPTIMIZER_FIELDS))
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]} (known: {', '.join(OPTIMIZER_FIELDS)})")
    try:
        OptimizerSpec(modules=("check",), **opts)
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


@dataclass(frozen=True)
class Capabilities:
    """What a trained model of a family can do, and the options each verb takes.

    Option names are keyword arguments of the matching method and CLI flags with ``-`` for ``_``
    (``classifier_scale`` is ``--classifier-scale``).
    """

    generate: bool = False  # sample() draws new examples
    sample_options: tuple = ()  # keyword options of sample() beyond n, seed, y (e.g. sampler, steps, grid)
    conditional: bool = False  # sample() takes labels y (a class-conditional model)
    denoiser: bool = False  # denoiser() exists: every diffusion sampler, grid, guidance and the PF-ODE apply
    nll: tuple = ()  # likelihood methods of nll(); the first is the default
    nll_options: tuple = ()  # keyword options of nll() (e.g. n_t for the ELBO, k for IWAE)
    nll_exact: tuple = ()  # the methods that give an exact likelihood rather than a bound or estimate
    nll_slow: tuple = ()  # the methods that cost minutes per hundred examples (eval runs them on fewer by default)
    interpolate: tuple = ()  # latent spaces of latents()/generate_from() (noise, z, w)
    traverse: bool = False  # traverse() draws latent traversals
    classify: bool = False  # a classifier: evaluate() reports accuracy, nothing is generated

    def require(self, verb: str, family: str, ok: bool, alternatives: str = "") -> None:
        """CapabilityError ``"<family> runs cannot <verb>"`` unless ``ok``."""
        if not ok:
            supported = ", ".join(sorted(n for n, c in FAMILIES.items() if _can(c, verb)))
            tail = f" (families that can: {supported})" if supported else ""
            raise CapabilityError(f"{family} runs cannot {verb}{tail}{alternatives}")


def _can(cls: type["Family"], verb: str) -> bool:
    caps = getattr(cls, "declared", None)
    if caps is None:
        return False
    return {"sample": caps.generate, "interpolate": bool(caps.interpolate), "traverse": caps.traverse,
            "nll": bool(caps.nll)}.get(verb, False)


class RunLike(Protocol):
    """What a family receives for a referenced run (:class:`scorelab.runs.Run`)."""

    path: Any  # the run folder
    family: "Family"  # the referenced run's family, rebuilt from its config
    modules: dict  # its modules with EMA weights, frozen, in eval mode
    data: DataSpec  # the data it was trained on


LIBRARY_OPTIONS = ("callback", "grid_options", "sampler_options")  # sample options with no command-line flag


# --------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------
class Family:
    """Base class of every model family (see the module docstring for the contract).

    Construction: ``Family(model_cfg, data, refs)`` validates ``model_cfg`` with ``Config`` (unknown
    keys and bad values raise :class:`ConfigError` naming ``model.<key>``), keeps the
    :class:`DataSpec` and the referenced runs, then calls :meth:`build`.
    """

    name: ClassVar[str] = ""  # registry name (model.family)
    Config: ClassVar[type]  # the family's config dataclass (validated in __post_init__)
    references: ClassVar[dict] = {}  # config field holding a run folder -> names of the families it may be
    declared: ClassVar[Capabilities | None] = None  # class-level capabilities, for "which families can ..." messages

    def __init__(self, model_cfg: Mapping | Any, data: DataSpec, refs: Mapping[str, RunLike] | None = None):
        if isinstance(model_cfg, Mapping):
            cfg = dict(model_cfg)
            cfg.setdefault("family", self.name)
            self.cfg = from_dict(self.Config, cfg, "model")
        else:
            self.cfg = model_cfg
        self.data = data
        self.refs: dict[str, RunLike] = dict(refs or {})
        missing = [k for k in self.references if getattr(self.cfg, k, None) and k not in self.refs]
        if missing:
            raise ConfigError(f"model.{missing[0]} names a run that was not opened (use scorelab.runs.build_family)")
        self.autocast_dtype: torch.dtype | None = None  # the run's compute precision (set by the trainer / run API)
        self.build()

    # --- to provide --------------------------------------------------------------------
    def build(self) -> None:
        """Create the networks from ``self.cfg`` and ``self.data``."""
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        """The trained networks, by name (checkpointed, EMA-averaged, wrapped for data parallelism)."""
        raise NotImplementedError

    def training_step(self, modules: dict, batch: dict, ctx) -> dict:
        """One optimisation step; returns metrics (floats or 0-d tensors) to log. The first key is
        shown on the progress bar. Call ``ctx.optimize(loss, name)`` for each optimizer."""
        raise NotImplementedError

    def capabilities(self) -> Capabilities:
        """What this model can do (may depend on the config and the data, e.g. ``conditional``)."""
        return self.declared or Capabilities()

    # --- defaults ----------------------------------------------------------------------
    def frozen(self) -> dict[str, nn.Module]:
        """Networks of referenced runs used in :meth:`prepare` or the loss: moved to the device, in
        eval mode, without gradients, never checkpointed nor averaged."""
        return {}

    def optimizers(self, train) -> dict[str, OptimizerSpec]:
        """One :class:`OptimizerSpec` per optimizer; default: one ``main`` AdamW over every module
        with ``train.lr, betas, weight_decay, warmup, schedule, min_lr_ratio, grad_clip``."""
        return {"main": self.optimizer_from_train(train, tuple(self.modules()))}

    @staticmethod
    def optimizer_from_train(train, modules: tuple, **overrides) -> OptimizerSpec:
        """An :class:`OptimizerSpec` over ``modules`` with the run's ``train`` settings, some overridden."""
        base = dict(lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay, warmup=train.warmup,
                    schedule=train.schedule, min_lr_ratio=train.min_lr_ratio, grad_clip=train.grad_clip)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return OptimizerSpec(modules=modules, **base)

    def prepare(self, batch: dict, modules: dict) -> dict:
        """Raw batch -> model input: uint8 images to ``[-1, 1]`` float32, points to float32.

        ``batch``: ``x`` (B, ...) as stored, ``index`` (B,) dataset rows, ``y`` (B,) labels when the
        data has them. ``modules``: the trained and frozen modules (e.g. an encoder). Returns a dict
        with at least ``x``."""
        out = dict(batch)
        x = batch["x"]
        out["x"] = to_model(x) if x.dtype == torch.uint8 else x.to(torch.float32)
        return out

    # --- capabilities (override what the family declares) ----------------------------
    def sample(self, modules: dict, n: int, *, seed: int = 0, y: Tensor | None = None, batch_size: int = 0,
               **options) -> Tensor:
        """``n`` samples in model space, (n, *shape) float32 on CPU (images clipped to [-1, 1]).

        Example ``i`` draws its randomness from a generator seeded ``seed + i``, so a sample does not
        depend on ``n`` or on the batch size. ``y``: (n,) labels of a conditional model. ``options``:
        those in ``capabilities().sample_options``; anything else is a :class:`CapabilityError`.
        """
        caps = self.capabilities()
        caps.require("sample", self.name, caps.generate)
        self.check_options("sample", options, caps.sample_options)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if y is not None:
            y = torch.as_tensor(y).long().reshape(-1)
            if y.shape[0] != n:
                raise ValueError(f"y must hold one label per sample: {y.shape[0]} labels for n={n}")
        gens = generators_for_seeds(range(seed, seed + n))
        bs = batch_size or self.sample_batch_size(**options)
        outs = []
        for i in range(0, n, bs):
            j = min(n, i + bs)
            out = self.sample_batch(modules, gens[i:j], None if y is None else y[i:j], **options)
            outs.append(out.detach().float().cpu())
        x = torch.cat(outs)
        return x.clamp(-1, 1) if self.data.images else x

    def preview_count(self) -> int:
        """Samples in the grid the trainer draws (a slow sequential sampler may ask for fewer)."""
        return 64 if self.data.images else 2000

    def sample_batch_size(self, **options) -> int:
        """Rows per :meth:`sample_batch` call (memory bound, not a result-changing choice)."""
        return 256 if self.data.images else 4096

    def sample_batch(self, modules: dict, generators: list, y: Tensor | None, **options) -> Tensor:
        """One batch of samples, one generator per row: (len(generators), *shape)."""
        raise CapabilityError(f"{self.name} runs cannot sample")

    def denoiser(self, modules: dict):
        """A :class:`~scorelab.targets.DenoiserLike` of the trained model (diffusion-style families)."""
        raise CapabilityError(f"{self.name} runs have no denoiser: diffusion samplers, grids and guidance do not apply")

    def nll(self, modules: dict, x: Tensor, *, method: str, seed: int = 0, y: Tensor | None = None, **options) -> dict:
        """Per-example negative log-likelihood of raw data ``x`` (uint8 images -> bits/dim, points ->
        nats): ``{"total": (B,), <terms>: (B,), "units": str}``; example ``i`` uses seed ``seed + i``."""
        raise CapabilityError(f"{self.name} runs have no likelihood")

    def latents(self, modules: dict, seeds: Iterable[int], space: str, y: Tensor | None = None) -> Tensor:
        """The latent points of ``seeds`` in ``space`` (one of ``capabilities().interpolate``): (k, ...)."""
        raise CapabilityError(f"{self.name} runs cannot interpolate")

    def generate_from(self, modules: dict, z: Tensor, space: str, y: Tensor | None = None, **options) -> Tensor:
        """Deterministic images / points from latents ``z`` in ``space``: (k, *shape) model space."""
        raise CapabilityError(f"{self.name} runs cannot interpolate")

    def traverse(self, modules: dict, reference: Tensor | None, dims: list[int], span: float, n: int) -> Tensor:
        """Latent traversal: for each dim in ``dims``, ``n`` decodes with that latent swept over
        ``[-span, span]`` and the others held at the reference's posterior mean: (len(dims) n, *shape)."""
        raise CapabilityError(f"{self.name} runs cannot draw latent traversals")

    def monitor_every(self) -> int:
        """Steps between :meth:`monitor` calls during training (0: never)."""
        return 0

    def monitor(self, modules: dict, ctx) -> dict:
        """Numbers to watch while training, from the EMA ``modules`` (e.g. a GAN's FID on a fixed
        set of samples, since its losses do not say whether it improves). ``ctx``: ``step``, ``x``
        (up to 2000 raw training examples, a fixed set), ``seed``. Must not touch the training
        random streams (draw from seeded generators). Written to ``metrics.jsonl`` as its own row."""
        return {}

    def evaluate(self, modules: dict, ev) -> dict:
        """Numbers of this family's own (e.g. a classifier's accuracy, a VAE's active units), given
        the evaluation context ``ev`` (:class:`scorelab.eval.EvalContext`). Default: none."""
        return {}

    # --- helpers for subclasses and the shared code --------------------------------------
    def check_options(self, verb: str, options: Mapping, allowed: Iterable[str]) -> None:
        """CapabilityError naming the first option in ``options`` that ``allowed`` lacks."""
        allowed = tuple(allowed)
        for k in options:
            if k not in allowed:
                flags = [a for a in allowed if a not in LIBRARY_OPTIONS]
                takes = ", ".join("--" + a.replace("_", "-") for a in flags) or "no options"
                raise CapabilityError(f"--{k.replace('_', '-')} does not apply to {self.name} runs ({verb} takes: {takes})")

    def autocast(self, device: torch.device | str):
        """Context for network calls at the run's precision (:attr:`autocast_dtype`)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.autocast_dtype)

    def null_labels(self, n: int, device=None) -> Tensor:
        """``n`` copies of the null label (``num_classes``) of a conditional model."""
        return torch.full((n,), self.data.conditional_classes, dtype=torch.long, device=device)

    def sample_labels(self, n: int, generators, y: Tensor | None, device) -> Tensor | None:
        """Labels for ``n`` samples of a model conditioned on ``data.conditional_classes`` classes:
        ``y`` as given (checked), else one uniform draw from each example's generator; None for an
        unconditional model (a CapabilityError if ``y`` was given)."""
        k = self.data.conditional_classes
        if not k:
            if y is not None:
                raise CapabilityError(f"--class given but this {self.name} run is unconditional")
            return None
        if y is None:
            y = torch.cat([torch.randint(k, (1,), generator=g, device=g.device) for g in generators])
        y = torch.as_tensor(y).long().reshape(-1).to(device)
        if y.shape[0] != n:
            raise ValueError(f"y must hold one label per sample: {y.shape[0]} labels for {n} samples")
        if int(y.min()) < 0 or int(y.max()) >= k:
            raise ValueError(f"labels must lie in 0..{k - 1}")
        return y

    @staticmethod
    def device_of(modules: Mapping[str, nn.Module]) -> torch.device:
        for m in modules.values():
            for p in m.parameters():
                return p.device
        return torch.device("cpu")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.data.shape}, classes={self.data.conditional_classes})"
