"""Run configuration: small validated dataclasses, buildable from YAML with dotted overrides.

A run is ``RunConfig(name, seed, data, model, train)``. ``data`` and ``train`` are shared by every
model family; ``model`` is a plain mapping whose ``family`` key picks the family, which validates
the rest with its own dataclass (no god-config). Every error names the offending key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

import yaml

__all__ = ["ConfigError", "DataConfig", "TrainConfig", "RunConfig", "from_dict", "load_yaml", "apply_overrides", "parse_value"]


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


def from_dict(cls, d: dict | None, where: str):
    """Build dataclass ``cls`` from ``d``; unknown keys and bad types raise ConfigError naming ``where.key``."""
    d = dict(d or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in d.items():
        f = names[k]
        kwargs[k] = _coerce(v, f, f"{where}.{k}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _coerce(v, f: dataclasses.Field, key: str):
    """Check simple field types (int, float, bool, str, dict, list); ints are accepted as floats."""
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    base = typ.replace(" ", "").split("|")
    if v is None:
        if "None" in base:
            return None
        raise ConfigError(f"{key} must not be empty")
    checks = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict, "list": (list, tuple)}
    kinds = [b.split("[")[0] for b in base if b != "None"]
    for kind in kinds:
        want = checks.get(kind)
        if want is None:
            return v
        if kind == "int" and isinstance(v, bool):
            continue
        if kind == "float" and isinstance(v, bool):
            continue
        if isinstance(v, want):
            return float(v) if kind == "float" else v
        if kind == "float" and isinstance(v, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(v)
            except ValueError:
                pass
    raise ConfigError(f"{key} must be {' or '.join(kinds)}, got {v!r}")


@dataclass
class DataConfig:
    name: str = "fmnist-embedded"  # dataset registry name (scorelab.data.load_dataset)
    options: dict = field(default_factory=dict)  # loader options (path, split, ...)
    class_conditional: bool = False  # feed labels to the model
    holdout: float = 0.1  # share held out for eval when the dataset has no test split (npz, folder), seeded

    def __post_init__(self):
        if not 0 < self.holdout < 1:
            raise ConfigError(f"data.holdout must be in (0, 1), got {self.holdout}")
        if not isinstance(self.options, dict):
            raise ConfigError(f"data.options must be a mapping, got {self.options!r}")


@dataclass
class TrainConfig:
    steps: int = 2000  # optimisation steps
    batch_size: int = 128  # examples per step
    lr: float = 2e-3  # AdamW learning rate after warm-up
    warmup: int = 100  # linear warm-up steps
    schedule: str = "constant"  # learning rate after warm-up: constant, cosine or linear decay to min_lr_ratio * lr at train.steps
    min_lr_ratio: float = 0.0  # final lr / lr of the cosine and linear schedules
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: list = field(default_factory=lambda: [0.9, 0.99])  # AdamW betas
    grad_clip: float = 1.0  # max global gradient norm (0 disables)
    ema_decay: float = 0.999  # EMA decay; 0 disables EMA
    precision: str = "auto"  # "fp32", "bf16" (autocast) or "auto" (measured on this machine: bf16 only where clearly faster and accurate)
    device: str = "auto"  # "cpu", "cuda", "cuda:1" or "auto"
    log_every: int = 25  # steps between metrics lines
    sample_every: int = 500  # steps between sample grids (0: only at the end)
    ckpt_every: int = 500  # steps between checkpoints (always at the end and on Ctrl-C)
    max_minutes: float = 0.0  # stop (and checkpoint) after this wall time; 0: no limit
    schedule_length: str = "budget"  # steps the lr schedule spans: "steps" (train.steps) or "budget" (with max_minutes and a decaying schedule: the steps measured to fit in it, at most train.steps)
    threads: int = 0  # torch intra-op threads on CPU (0: torch's default)
    compile: bool = False  # torch.compile the networks
    nonfinite_skips: int = 3  # steps in a row whose update may be skipped for a non-finite loss or gradient before the run stops (0: stop at the first)
    divergence_factor: float = 1000.0  # a loss above median + factor * max(|median|, MAD) of its last 200 values is "exploding" (0: no check)
    divergence_patience: int = 20  # steps in a row of exploding loss after which the run stops (the last good checkpoint is kept)
    detect_anomaly: bool = False  # torch.autograd.detect_anomaly around each step: a NaN in backward names the operation (slow; for debugging)

    def __post_init__(self):
        for k in ("steps", "batch_size", "log_every", "divergence_patience"):
            if getattr(self, k) < 1:
                raise ConfigError(f"train.{k} must be >= 1, got {getattr(self, k)}")
        for k in ("warmup", "sample_every", "ckpt_every", "threads", "nonfinite_skips"):
            if getattr(self, k) < 0:
                raise ConfigError(f"train.{k} must be >= 0, got {getattr(self, k)}")
        for k in ("lr", "weight_decay", "grad_clip", "max_minutes", "min_lr_ratio", "ema_decay", "divergence_factor"):
            if not math.isfinite(getattr(self, k)):
                raise ConfigError(f"train.{k} must be a finite number, got {getattr(self, k)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        for k in ("weight_decay", "grad_clip", "max_minutes", "divergence_factor"):
            if getattr(self, k) < 0:
                raise ConfigError(f"train.{k} must be >= 0, got {getattr(self, k)}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.precision not in ("fp32", "bf16", "auto"):
            raise ConfigError(f"train.precision must be fp32, bf16 or auto, got {self.precision!r}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                           for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        self.betas = [float(b) for b in self.betas]
        if not self.device or not isinstance(self.device, str):
            raise ConfigError(f"train.device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if self.schedule not in ("constant", "cosine", "linear"):
            raise ConfigError(f"train.schedule must be constant, cosine or linear, got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.schedule_length not in ("steps", "budget"):
            raise ConfigError(f"train.schedule_length must be steps or budget, got {self.schedule_length!r}")


@dataclass
class RunConfig:
    name: str = "run"  # run folder name under --runs
    seed: int = 0  # seeds weights, data order and noise
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=lambda: {"family": "diffusion"})  # validated by the family
    train: TrainConfig = field(default_factory=TrainConfig)
    resolved: dict = field(default_factory=dict)  # choices the trainer measured for this run (precision), written by it

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        if not isinstance(d, dict):
            raise ConfigError("the config must be a mapping at the top level")
        d = copy.deepcopy(d)
        unknown = sorted(set(d) - {"name", "seed", "data", "model", "train", "resolved"})
        if unknown:
            raise ConfigError(f"unknown top-level key {unknown[0]!r} (known: name, seed, data, model, train)")
        resolved = d.get("resolved") or {}
        if not isinstance(resolved, dict):
            raise ConfigError("resolved must be a mapping (it is written by the trainer)")
        model = d.get("model", {"family": "diffusion"})
        if not isinstance(model, dict):
            raise ConfigError("model must be a mapping")
        for k in ("data", "train"):
            if k in d and not isinstance(d[k], dict):
                raise ConfigError(f"{k} must be a mapping")
        seed = d.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        if not 0 <= seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2^32), got {seed}")
        name = d.get("name", "run")
        if name is None or (isinstance(name, str) and not name.strip()):
            raise ConfigError("name must not be empty (the run folder's name, e.g. --name my-run)")
        if not isinstance(name, (str, int)) or isinstance(name, bool):
            raise ConfigError(f"name must be a plain folder name, got {name!r}")
        name = str(name)
        if "/" in name or "\\" in name or name.startswith(".") or name != name.strip() or "\0" in name or len(name) > 200:
            raise ConfigError(f"name must be a plain folder name, got {name!r}")
        return cls(
            name=name,
            seed=seed,
            data=from_dict(DataConfig, d.get("data"), "data"),
            model=model,
            train=from_dict(TrainConfig, d.get("train"), "train"),
            resolved=resolved,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_yaml(path) -> dict:
    p = FsPath(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not a text (YAML) file") from None
    except OSError as e:
        from .checkpoint import StorageError

        raise StorageError("read", p, e) from None
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        if isinstance(e, yaml.constructor.ConstructorError):  # !!python/object and friends: never constructed
            tag = str(getattr(e, "problem", "")).rsplit("tag:yaml.org,2002:", 1)[-1].rstrip("'")
            raise ConfigError(f"config file {p}{where}: the YAML tag !!{tag} is not allowed (plain values only)") from None
        raise ConfigError(f"config file {p} is not valid YAML{where}") from None
    if d is None:
        raise ConfigError(f"config file {p} is empty (expected a mapping with name, data, model, train)")
    if not isinstance(d, dict):
        raise ConfigError(f"config file {p} must hold a mapping")
    return d


def parse_value(s: str) -> Any:
    """A command-line value parsed as YAML (``3`` -> int, ``1e-3`` -> float, ``[1, 2]`` -> list)."""
    try:
        v = yaml.safe_load(s)
    except yaml.YAMLError:
        return s
    if isinstance(v, str):
        try:
            return float(v) if any(ch in v for ch in ".eE") and v.replace(".", "", 1).replace("e", "", 1).replace("E", "", 1).replace("-", "").replace("+", "").isdigit() else v
        except ValueError:
            return v
    return v


def apply_overrides(d: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Set dotted keys (``train.steps``, ``model.net.channels``) in a nested dict copy."""
    d = copy.deepcopy(d)
    for key, value in overrides:
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"bad override key {key!r}")
        node = d
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"cannot set {key}: {p} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return d
