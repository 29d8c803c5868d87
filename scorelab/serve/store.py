"""The run folders the playground may open: discovery, containment, summaries and a cache of opened runs.

Only folders under the server's runs directory ``DIR`` are ever opened. A run name is the folder's
path relative to ``DIR`` (``toy`` or ``sweep/toy``); it is refused unless it is relative, has no
``..`` nor hidden component, and resolves (symlinks followed) inside ``DIR``; the files read from
it (``config.yaml``, the checkpoint, ``metrics.jsonl``, pictures) must resolve inside ``DIR`` too,
and so must the runs its config references (a latent model's autoencoder, a student's teacher).
Everything is read with :func:`scorelab.runs.open_run` (safetensors + YAML), JSON or PIL: nothing
is unpickled.

Opened runs are cached (least recently used first out, ``max_open`` at a time) and reopened when
their checkpoint or config changes on disk, so a run in training serves its newest weights.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ApiError", "RunStore", "CKPT", "METRICS"]

CKPT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
MAX_DEPTH = 3  # run folders are looked for down to DIR/a/b/c
MAX_NAME = 512  # characters in a run name


class ApiError(Exception):
    """A request the server refuses: an HTTP status (4xx) and a one-line message for the JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)
        self.message = str(message)


def _signature(path: Path) -> tuple | None:
    """What changes when a file is rewritten (atomic renames change the inode): (inode, size, mtime)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _locked_inodes() -> set[str] | None:
    """``maj:min:inode`` of every file held by a ``flock`` on this machine (Linux ``/proc/locks``), or None."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    out = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[1] in ("FLOCK", "->"):
            out.add(parts[5] if parts[1] == "FLOCK" else parts[6])
    return out


def training_now(folder: Path, locked: set[str] | None = None) -> bool | None:
    """Whether a trainer holds the run's ``.lock`` (True / False), or None where that cannot be read.

    Read from ``/proc/locks``, never by trying the lock ourselves: a probe could make a trainer that
    starts at that instant refuse the folder as "being trained by another process"."""
    lock = folder / ".lock"
    try:
        st = lock.stat()
    except OSError:
        return False
    locked = _locked_inodes() if locked is None else locked
    if locked is None:
        return None
    return f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}" in locked


def _numbers(d: dict) -> dict:
    """The finite numeric top-level fields of ``d`` (bools and strings left out)."""
    import math

    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


@dataclass
class _Cached:
    run: object  # scorelab.runs.Run
    signature: tuple  # (checkpoint signature, config signature) when it was opened


class RunStore:
    """The runs under ``root`` and a cache of opened ones.

    ``root``: the runs directory (must exist). ``max_open``: runs kept open at once (each holds its
    weights in memory). ``precision``: ``fp32`` / ``bf16`` for sampling, ``None``: each run's own.
    """

    def __init__(self, root, max_open: int = 4, precision: str | None = None):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"runs directory {root} does not exist" if not root.exists() else f"{root} is not a folder")
        self.root = root.resolve()
        self.max_open = max(1, int(max_open))
        self.precision = precision
        self._cache: OrderedDict[Path, _Cached] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._open_locks: dict[Path, threading.Lock] = {}
        self._header_cache: dict[Path, tuple[tuple, dict]] = {}

    # --- names and containment ----------------------------------------------------------
    def _inside(self, p: Path) -> bool:
        try:
            p.resolve().relative_to(self.root)
            return True
        except (ValueError, OSError, RuntimeError):  # outside, or a symlink loop
            return False

    def folder(self, name) -> Path:
        """The folder of run ``name`` (checked: relative, no ``..`` / hidden part, inside the root, a run)."""
        if not isinstance(name, str) or not name.strip():
            raise ApiError(400, "'run' must be the name of a run (see GET /api/runs)")
        if len(name) > MAX_NAME or "\x00" in name or "\\" in name:
            raise ApiError(400, f"run name {name[:80]!r} is not a valid run name")
        parts = name.strip("/").split("/")
        if name.startswith("/") or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise ApiError(403, f"run name {name!r} is refused: names are paths inside the runs directory, without "
                                "'..', hidden parts or a leading '/'")
        d = self.root.joinpath(*parts)
        if not self._inside(d):
            raise ApiError(403, f"run {name!r} resolves outside the runs directory (a symlink out): refused")
        if not d.is_dir() or not (d / "config.yaml").is_file():
            raise ApiError(404, f"no run named {name!r} under the runs directory {self.root} (see GET /api/runs)")
        return d

    def file(self, name: str, relative: str) -> Path:
        """``relative`` inside run ``name``, refused (403) when it resolves outside the runs directory."""
        p = self.folder(name) / relative
        if p.exists() and not self._inside(p):
            raise ApiError(403, f"{relative} of run {name!r} resolves outside the runs directory (a symlink out): refused")
        return p

    def name_of(self, folder: Path) -> str:
        return folder.relative_to(self.root).as_posix()

    # --- discovery ----------------------------------------------------------------------
    def folders(self) -> list[Path]:
        """Every run folder (one holding ``config.yaml``) under the root, sorted by name."""
        found: list[Path] = []

        def walk(d: Path, depth: int) -> None:
            try:
                entries = sorted(d.iterdir())
            except OSError:
                return
            for e in entries:
                if e.name.startswith(".") or not e.is_dir() or not self._inside(e):
                    continue  # hidden (staging folders of a run being created), files, symlinks out
                if (e / "config.yaml").is_file():
                    found.append(e)
                elif depth < MAX_DEPTH:
                    walk(e, depth + 1)

        walk(self.root, 1)
        return found

    def _checkpoint_meta(self, ckpt: Path) -> dict | None:
        """The checkpoint's scorelab metadata from its header (no tensor is read), cached by signature."""
        sig = _signature(ckpt)
        if sig is None:
            return None
        hit = self._header_cache.get(ckpt)
        if hit is not None and hit[0] == sig:
            return hit[1]
        from safetensors import safe_open

        try:
            with safe_open(str(ckpt), framework="pt") as f:
                raw = (f.metadata() or {}).get("scorelab")
            meta = json.loads(raw) if raw else {}
        except Exception:  # noqa: BLE001 - a corrupt header is reported in the summary, not raised
            meta = {"_error": "checkpoint is corrupt or not a scorelab checkpoint"}
        self._header_cache[ckpt] = (sig, meta)
        return meta

    def summary(self, folder: Path, locked: set[str] | None = None) -> dict:
        """What the run list shows: family, dataset, steps, status, eval numbers, newest picture."""
        from ..train.config import load_yaml

        out: dict = {"name": self.name_of(folder)}
        try:
            cfg = load_yaml(folder / "config.yaml")
            model, data, train = cfg.get("model") or {}, cfg.get("data") or {}, cfg.get("train") or {}
            out.update(family=model.get("family", "diffusion"), dataset=data.get("name", ""),
                       steps=train.get("steps"), class_conditional=bool(data.get("class_conditional", False)))
        except Exception as e:  # noqa: BLE001 - one unreadable config must not hide the other runs
            out.update(family=None, dataset=None, steps=None, error=f"config.yaml: {_line(e)}")
        ckpt = folder / CKPT
        meta = self._checkpoint_meta(ckpt) if self._inside(ckpt) else None
        training = training_now(folder, locked)
        out["step"] = int(meta.get("step", 0)) if meta and "step" in meta else None
        if meta and "_error" in meta:
            out.setdefault("error", meta["_error"])
        if meta and isinstance(meta.get("data"), dict):
            out["shape"] = meta["data"].get("shape")
            out["classes"] = int(meta["data"].get("num_classes") or 0)
        if training:
            out["status"] = "training"
        elif meta is None:
            out["status"] = "no checkpoint"
        elif "error" in out:
            out["status"] = "error"
        elif isinstance(out.get("steps"), int) and out["step"] is not None and out["step"] >= out["steps"]:
            out["status"] = "done"
        else:
            out["status"] = "stopped"
        out["eval"], out["nll"] = self._evals(folder)
        latest = self.latest_picture(folder)
        out["latest_picture"] = latest.name if latest is not None else None
        sig = _signature(folder / METRICS)
        out["updated"] = max((s[2] for s in (sig, _signature(ckpt)) if s), default=None)
        if out["updated"] is not None:
            out["updated"] = out["updated"] / 1e9  # seconds since the epoch
        return out

    def summaries(self) -> list[dict]:
        locked = _locked_inodes()
        return [self.summary(f, locked) for f in self.folders()]

    def _evals(self, folder: Path) -> tuple[dict, dict]:
        """Numbers of ``eval.json`` (FID, KID, sliced W2, ...) and ``eval_nll.json`` (mean per method)."""
        ev, nll = {}, {}
        for name, kind in (("eval.json", "eval"), ("eval_nll.json", "nll")):
            p = folder / name
            if not p.is_file() or not self._inside(p) or p.stat().st_size > 1 << 20:
                continue
            try:
                d = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(d, dict):
                continue
            if kind == "eval":
                ev = {k: v for k, v in _numbers(d).items() if k not in ("n_real", "seed")}
            else:
                for m, entry in d.items():
                    if isinstance(entry, dict) and isinstance(entry.get("mean"), (int, float)):
                        nll[m] = {k: entry.get(k) for k in ("mean", "stderr", "units", "n", "exact")}
                if "step" in d:
                    nll["step"] = d["step"]
        return ev, nll

    def latest_picture(self, folder: Path) -> Path | None:
        """The newest sample picture the trainer wrote: ``samples/step_*.png`` or ``samples.png``."""
        cands = [folder / "samples.png"]
        sub = folder / "samples"
        if sub.is_dir() and self._inside(sub):
            cands += [p for p in sub.glob("step_*.png")]
        best, best_t = None, -1
        for p in cands:
            if p.name.startswith(".") or not p.is_file() or not self._inside(p):
                continue
            t = p.stat().st_mtime_ns
            if t > best_t:
                best, best_t = p, t
        return best

    # --- opening ------------------------------------------------------------------------
    def _check_references(self, folder: Path) -> None:
        """403 when the run's config names another run (``Family.references``) outside the root."""
        from ..families import family_class
        from ..train.config import load_yaml

        cfg = load_yaml(folder / "config.yaml")
        model = cfg.get("model") or {}
        try:
            cls = family_class(model.get("family", "diffusion"))
        except Exception:  # noqa: BLE001 - open_run reports an unknown family itself
            return
        for key in cls.references:
            target = model.get(key)
            if target and not self._inside(Path(target)):
                raise ApiError(403, f"run {self.name_of(folder)!r} refers to model.{key} = {target}, which is outside the "
                                    "runs directory: refused")

    def open(self, name: str):
        """The opened run ``name`` (cached; reopened when its checkpoint or config changed)."""
        folder = self.folder(name)
        key = folder.resolve()
        with self._cache_lock:
            lock = self._open_locks.setdefault(key, threading.Lock())
        with lock:
            ckpt, conf = folder / CKPT, folder / "config.yaml"
            for p in (ckpt, conf):
                if p.exists() and not self._inside(p):
                    raise ApiError(403, f"{p.name} of run {name!r} resolves outside the runs directory (a symlink out): refused")
            sig = (_signature(ckpt), _signature(conf))
            with self._cache_lock:
                hit = self._cache.get(key)
                if hit is not None and hit.signature == sig:
                    self._cache.move_to_end(key)
                    return hit.run
            run, sig = self._open_fresh(name, folder)
            with self._cache_lock:
                self._cache[key] = _Cached(run, sig)
                self._cache.move_to_end(key)
                while len(self._cache) > self.max_open:
                    self._cache.popitem(last=False)
            return run

    def _open_fresh(self, name: str, folder: Path):
        from ..runs import RunError, open_run
        from ..train.checkpoint import CheckpointError
        from ..train.config import ConfigError

        ckpt, conf = folder / CKPT, folder / "config.yaml"
        for _ in range(3):
            before = (_signature(ckpt), _signature(conf))
            if before[0] is None:
                raise ApiError(409, f"run {name!r} is being written: it has no checkpoint yet (try again in a moment)")
            self._check_references(folder)
            try:
                run = open_run(folder, precision=self.precision)
            except CheckpointError as e:
                if _signature(ckpt) != before[0] or training_now(folder):
                    continue  # replaced while we read it: read the new one
                raise ApiError(422, f"run {name!r} cannot be opened: {_line(e)}") from None
            except (ConfigError, RunError) as e:
                raise ApiError(422, f"run {name!r} cannot be opened: {_line(e)}") from None
            except OSError as e:  # the trainer's StorageError included: a file that cannot be read now
                raise ApiError(409, f"run {name!r} cannot be read right now: {_line(e)}") from None
            after = (_signature(ckpt), _signature(conf))
            if after == before:
                return run, after
        raise ApiError(409, f"run {name!r} is being written (its checkpoint changed while it was read): try again")

    def cached(self) -> list[str]:
        """Names of the runs open in the cache, least recently used first."""
        with self._cache_lock:
            return [self.name_of(k) if k.is_relative_to(self.root) else str(k) for k in self._cache]


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
