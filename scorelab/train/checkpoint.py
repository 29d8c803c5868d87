"""Checkpoints: safetensors tensors + JSON metadata, written atomically; loading never unpickles.

One file ``checkpoint.safetensors`` holds every tensor of a run (weights, EMA weights, optimizer
moments, random-generator states); its safetensors metadata holds the JSON trainer state (step,
optimizer hyper-parameters, the divergence guard's history).

Every file scorelab writes goes through :func:`atomic_write` (or :func:`scorelab.viz.atomic_path`
for pictures): it is written to a temporary name in the same folder,
``.<name>.<pid>.<random>.tmp``, fsynced and renamed over the old one, and the folder is fsynced,
so an interruption (even ``kill -9``) leaves either the old or the new file. A temporary whose
process is gone (``kill -9`` between the write and the rename) is removed by the next resume
(:func:`remove_stale_temporaries`). A write that fails (disk full, permission denied, read-only
folder) leaves the old file untouched and raises :class:`StorageError`, whose one-line message
names the file and the cause.
"""

from __future__ import annotations

import errno as _errno
import json
import os
import re
import secrets
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["CheckpointError", "StorageError", "atomic_write", "atomic_write_text", "save_checkpoint", "load_checkpoint",
           "optimizer_to_flat", "optimizer_from_flat", "temporary_name", "stale_temporaries", "remove_stale_temporaries",
           "fsync_folder", "WRITE_HOOK"]

# Test hook: called as WRITE_HOOK(path) after the temporary of ``path`` is written and fsynced and
# before it is renamed into place (tests/test_faults.py and benchmarks/faults.py kill the process
# there). None in normal use.
WRITE_HOOK: Callable[[Path], None] | None = None


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or does not match the model."""


class StorageError(OSError):
    """A file that cannot be written or read: ``cannot <action> <file>: <cause>`` (one line).

    ``errno``/``strerror``/``filename`` are those of the underlying :class:`OSError`, with
    ``filename`` the user's file (never the temporary); ``note`` says what is still intact."""

    def __init__(self, action: str, path, cause: BaseException, note: str = ""):
        code = getattr(cause, "errno", None) or _errno.EIO
        text = getattr(cause, "strerror", None) or os.strerror(code)
        super().__init__(code, text, str(path))
        self.action = action
        self.note = note

    def with_note(self, note: str) -> "StorageError":
        e = StorageError(self.action, self.filename, self)
        e.note = note
        return e

    def __str__(self) -> str:
        tail = f" ({self.note})" if self.note else ""
        return f"cannot {self.action} {self.filename}: {self.strerror}{tail}"


def _os_error(e: BaseException) -> OSError:
    """The OSError inside a safetensors error (``... (os error 28)``), or ``e`` itself."""
    if isinstance(e, OSError):
        return e
    m = re.search(r"os error (\d+)", str(e))
    code = int(m.group(1)) if m else _errno.EIO
    return OSError(code, os.strerror(code))


def temporary_name(path: Path) -> Path:
    """``.<name>.<pid>.<random>.tmp`` next to ``path``: the pid lets a later run tell a stale one."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def fsync_folder(folder) -> None:
    """Make a rename inside ``folder`` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` to fill a temporary next to ``path``, fsync it and rename it onto ``path``.

    Any failure removes the temporary and leaves ``path`` as it was; an OS-level failure (or a
    safetensors I/O error) is raised as :class:`StorageError` naming ``path``."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if WRITE_HOOK is not None:
            WRITE_HOOK(path)
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except (OSError, SafetensorError) as e:
        if isinstance(e, SafetensorError) and "os error" not in str(e) and "I/O error" not in str(e):
            raise
        raise StorageError("write", path, _os_error(e)) from None
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


_TMP = re.compile(r"^\.(?P<name>.+?)\.(?P<pid>\d+)\.(?:[0-9a-f]+\.)?tmp(?:\.\w+)?$")
_OLD_TMP = re.compile(r"^\.(?:checkpoint\.safetensors|config\.yaml|metrics\.jsonl)\.\w+\.tmp$")  # mkstemp names


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def stale_temporaries(folder) -> list[Path]:
    """Temporaries in ``folder`` left by a process that no longer runs (``kill -9`` mid-write)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if (m and not _alive(int(m.group("pid")))) or (not m and _OLD_TMP.match(p.name)):
            out.append(p)
    return sorted(out)


def remove_stale_temporaries(folder) -> list[Path]:
    """Remove :func:`stale_temporaries` of ``folder`` (files and staging folders); return them."""
    import shutil

    gone = []
    for p in stale_temporaries(folder):
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            gone.append(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError("remove", p, e) from None
    return gone


def save_checkpoint(path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomically write ``tensors`` (name -> tensor) with JSON-serialisable ``meta``."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    text = json.dumps(meta)
    atomic_write(Path(path), lambda tmp: save_file(clean, str(tmp), metadata={"scorelab": text}))


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` from a checkpoint; a missing or corrupt file raises CheckpointError, an
    unreadable one StorageError. ``meta["step"]`` is checked to be a non-negative integer."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists() else f"checkpoint {path} is not a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise StorageError("read", path, e) from None
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("scorelab")
        meta = json.loads(raw) if raw else {}
    except (SafetensorError, OSError, json.JSONDecodeError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a scorelab checkpoint ({type(e).__name__})") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"checkpoint {path} has no scorelab metadata")
    step = meta["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint {path}: its step {step!r} is not a non-negative integer (corrupt metadata)")
    if not isinstance(meta.get("elapsed", 0.0), (int, float)) or not isinstance(meta.get("optimizers", {}), dict):
        raise CheckpointError(f"checkpoint {path}: corrupt metadata (elapsed / optimizers)")
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


def check_optimizer_state(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor], meta) -> None:
    """CheckpointError unless the ``prefix.*`` tensors and ``meta`` fit ``opt`` exactly: every state
    index names one of its parameters, every per-parameter tensor (Adam's moments) has that
    parameter's shape and dtype and is finite, every 0-d tensor (Adam's step) is a finite number >= 0,
    and the parameter groups have the same sizes."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list):
        raise CheckpointError(f"optimizer state {prefix!r}: corrupt metadata (no param_groups)")
    groups = meta["param_groups"]
    sizes = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups]
    if sizes != [len(g["params"]) for g in opt.param_groups]:
        raise CheckpointError(f"optimizer state {prefix!r} does not match the model: parameter groups of sizes {sizes}, "
                              f"the model's {[len(g['params']) for g in opt.param_groups]}")
    for key, v in tensors.items():
        if not key.startswith(prefix + "."):
            continue
        idx, _, name = key[len(prefix) + 1 :].partition(".")
        if not idx.isdigit() or not name or int(idx) >= len(params):
            raise CheckpointError(f"optimizer state {prefix!r} does not match the model: tensor {key} names no parameter "
                                  f"(the optimizer has {len(params)})")
        p = params[int(idx)]
        if v.ndim == 0:
            if not v.is_floating_point() and v.dtype not in (torch.int32, torch.int64):
                raise CheckpointError(f"optimizer state {key} has dtype {v.dtype}, expected a number")
            if not (torch.isfinite(v.double()) & (v.double() >= 0)).all():
                raise CheckpointError(f"optimizer state {key} is {float(v)}: not a finite count (corrupt checkpoint)")
        else:
            if tuple(v.shape) != tuple(p.shape):
                raise CheckpointError(f"optimizer state {prefix!r} does not match the model: {key} has shape "
                                      f"{tuple(v.shape)}, its parameter {tuple(p.shape)}")
            if v.dtype != p.dtype:
                raise CheckpointError(f"optimizer state {key} has dtype {v.dtype}, its parameter {p.dtype}")
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise CheckpointError(f"optimizer state {key} holds non-finite values (the run diverged?)")
    for key in meta.get("scalars", {}) or {}:
        idx, _, _name = str(key).partition(".")
        if not idx.isdigit() or int(idx) >= len(params):
            raise CheckpointError(f"optimizer state {prefix!r}: scalar {key!r} names no parameter")


def optimizer_from_flat(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`optimizer_to_flat` (checked first with :func:`check_optimizer_state`)."""
    check_optimizer_state(opt, prefix, tensors, meta)
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            idx, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(idx), {})[name] = v
    for key, v in (meta.get("scalars") or {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = meta["param_groups"]
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"optimizer state {prefix!r} does not match the model: {e}") from None
