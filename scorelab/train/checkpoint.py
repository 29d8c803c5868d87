"""Checkpoints: safetensors tensors + JSON metadata, written atomically; loading never unpickles.

One file ``checkpoint.safetensors`` holds every tensor of a run (weights, EMA weights, optimizer
moments, random-generator states); its safetensors metadata holds the JSON trainer state (step,
optimizer hyper-parameters). The file is written to a temporary name in the same folder, fsynced
and renamed over the old one, so an interruption leaves either the old or the new checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["CheckpointError", "atomic_write_text", "save_checkpoint", "load_checkpoint", "optimizer_to_flat", "optimizer_from_flat"]


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or does not match the model."""


def _atomic(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text))


def save_checkpoint(path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomically write ``tensors`` (name -> tensor) with JSON-serialisable ``meta``."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(clean, tmp, metadata={"scorelab": json.dumps(meta)}))


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` from a checkpoint; a missing or corrupt file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("scorelab")
        meta = json.loads(raw) if raw else {}
    except (SafetensorError, OSError, json.JSONDecodeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a scorelab checkpoint ({type(e).__name__})") from None
    if "step" not in meta:
        raise CheckpointError(f"checkpoint {path} has no scorelab metadata")
    return tensors, meta


def optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as flat tensors ``prefix.<param index>.<name>`` plus JSON hyper-parameters."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{idx}.{name}"] = v
            else:
                scalars[f"{idx}.{name}"] = v
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`optimizer_to_flat`."""
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            idx, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = meta["param_groups"]
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state {prefix!r} does not match the model: {e}") from None
