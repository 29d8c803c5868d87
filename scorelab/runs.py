"""Run folders: open one (config, checkpoint, EMA weights), rebuild its family, follow its references.

A run folder holds ``config.yaml`` (the run's validated config, with what the trainer measured
under ``resolved``) and ``checkpoint.safetensors`` (weights, EMA weights, optimizer and RNG state,
and JSON metadata: the step, the :class:`~scorelab.families.base.DataSpec`, the precision).
Loading never unpickles.

Every cross-run reference goes through here: a family declares config fields that name other runs
(``Family.references``, e.g. latent diffusion's ``model.autoencoder``, a student's
``model.teacher``), :func:`build_family` opens each with :func:`open_run` (frozen, EMA weights)
and hands them to the family; the CLI's ``--classifier RUN`` opens its run the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .families import DataSpec, Family, family_class
from .train.checkpoint import CheckpointError, load_checkpoint
from .train.config import ConfigError, RunConfig, load_yaml

__all__ = ["RunError", "Run", "open_run", "build_family", "data_spec"]


class RunError(ValueError):
    """A run folder that cannot be opened or does not fit the request (one-line message)."""


@dataclass
class Run:
    """An opened run: its config, rebuilt family, modules (EMA weights by default, eval mode), metadata."""

    path: Path  # the run folder
    cfg: RunConfig  # its config
    family: Family  # rebuilt from the config, at the run's precision
    modules: dict  # name -> module with the checkpoint's (EMA) weights, eval mode, no gradients
    meta: dict = field(default_factory=dict)  # checkpoint metadata (step, data, precision, ...)

    @property
    def data(self) -> DataSpec:
        return self.family.data

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    def __str__(self) -> str:
        return str(self.path)


def data_spec(cfg: RunConfig, dataset) -> DataSpec:
    """The :class:`DataSpec` of ``dataset`` loaded for ``cfg`` (shape, classes, names, feature domain)."""
    from .data import dataset_domain

    names = getattr(dataset, "class_names", None)
    return DataSpec(tuple(dataset.shape), int(dataset.num_classes or 0), bool(cfg.data.class_conditional),
                    tuple(names) if names else None, cfg.data.name, dataset_domain(cfg.data.name, dataset))


def build_family(cfg: RunConfig, data: DataSpec, *, _opening: tuple = ()) -> Family:
    """The family of ``cfg.model`` for ``data``, with the runs it references opened through :func:`open_run`.

    Weights are initialised from ``cfg.seed``. A reference must name a run of one of the families
    the referencing family accepts (``Family.references``) trained on data of the same shape."""
    cls = family_class(cfg.model.get("family", "diffusion"))
    refs = {}
    for key, accepted in cls.references.items():
        target = cfg.model.get(key)
        if not target:
            raise ConfigError(f"model.{key} is required: the folder of a trained {' or '.join(accepted)} run")
        if Path(target).resolve() in _opening:
            raise ConfigError(f"model.{key}: {target} refers back to a run being opened (a reference cycle)")
        try:
            ref = open_run(target, _opening=_opening)
        except (RunError, CheckpointError) as e:
            raise ConfigError(f"model.{key}: {e}") from None
        if ref.family.name not in accepted:
            raise ConfigError(f"model.{key}: {target} is a {ref.family.name} run, expected {' or '.join(accepted)}")
        if ref.data.shape != data.shape:
            raise ConfigError(f"model.{key}: {target} was trained on data of shape {ref.data.shape}, this run's data "
                              f"has shape {data.shape}")
        refs[key] = ref
    torch.manual_seed(cfg.seed)
    return cls(cfg.model, data, refs)


def open_run(path, *, use_ema: bool = True, precision: str | None = None, device=None, _opening: tuple = ()) -> Run:
    """Open the run folder ``path``: config, family, modules with the checkpoint's weights.

    ``use_ema``: EMA weights when the checkpoint has them (the default for sampling), else the raw
    weights. ``precision``: ``fp32`` / ``bf16`` to override the run's recorded precision for sampling
    (``None``: the run's own). ``device``: where the modules go (default CPU, or CUDA when the run
    was trained there and it is available). Raises :class:`RunError` / ``CheckpointError`` /
    ``ConfigError`` with one-line messages.
    """
    from .train.trainer import CKPT, load_module_states

    d = Path(path)
    if not d.is_dir():
        raise RunError(f"run folder {d} does not exist" if not d.exists() else f"{d} is not a folder")
    if not (d / "config.yaml").is_file():
        raise RunError(f"{d} is not a run folder (no config.yaml)")
    cfg = RunConfig.from_dict(load_yaml(d / "config.yaml"))
    tensors, meta = load_checkpoint(d / CKPT)
    if "data" in meta:
        data = DataSpec.from_dict(meta["data"])
    elif "data_shape" in meta:  # checkpoints written before the DataSpec
        data = DataSpec(tuple(meta["data_shape"]), int(meta.get("num_classes", 0)), bool(cfg.data.class_conditional),
                        name=cfg.data.name)
    else:
        raise CheckpointError(f"checkpoint in {d} does not record its data")
    family = build_family(cfg, data, _opening=(*_opening, d.resolve()))
    family.autocast_dtype = _sampling_dtype(precision or cfg.resolved.get("precision") or meta.get("precision") or "fp32")
    mods = family.modules()
    prefix = "ema" if use_ema and any(k.startswith("ema.") for k in tensors) else "model"
    load_module_states(mods, tensors, prefix, where=d / CKPT)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    for m in mods.values():
        m.to(dev).eval().requires_grad_(False)
    for m in family.frozen().values():
        m.to(dev).eval().requires_grad_(False)
    return Run(d, cfg, family, mods, meta)


def _sampling_dtype(name: str):
    if name not in ("fp32", "bf16"):
        raise RunError(f"precision must be fp32 or bf16, got {name!r}")
    return torch.bfloat16 if name == "bf16" else None
