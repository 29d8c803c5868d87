"""The run's arithmetic precision, ``train.precision: auto | fp32 | bf16``, measured where it runs.

Networks hold no precision switch: the caller runs their forward pass under
``torch.autocast(device, dtype=torch.bfloat16)`` (:func:`autocast`) or not at all (fp32). Which of
the two is faster depends on the processor far more than on the code:

* on an Intel Xeon with AMX-BF16 (oneDNN runs bfloat16 convolutions and matmuls on the tile unit)
  the default U-Net trains 1.5x faster in bf16 than in fp32 (numbers below);
* on an AMD EPYC with AVX2 only (no avx512_bf16 / amx_bf16), bfloat16 is emulated and was
  reported ~14x *slower* than fp32.

So nothing is hard-coded: ``auto`` on a CPU times the run's own training step in both dtypes
(:func:`resolve_precision` with the caller's ``probe``), picks bf16 only when it is clearly faster
*and* agrees with fp32, caches the decision per machine and net config, and prints it
(:meth:`PrecisionDecision.describe`). On CUDA ``auto`` means bf16 wherever the device supports it.

The decision rule (``ratio = median bf16 step time / median fp32 step time``)::

    bf16  iff  1 / ratio >= min_speedup  and  max_i ||o_i^bf16 - o_i^fp32|| / ||o_i^fp32|| <= rtol

where ``o_i`` are the probe's outputs (e.g. the loss and a gradient norm), ``||.||`` the Euclidean
norm of the whole tensor, computed in float64.

Other CPU-dependent choices, measured for the default U-Net (``configs/fmnist-rf.yaml``
net_options, batch 128, 28x28x1, forward + MSE + backward + AdamW step, median of ~40 interleaved
rounds, ``torch.set_num_threads(2)``; Intel(R) Xeon(R) Processor [avx2 avx512f avx512_bf16 amx_bf16
amx_tile], torch 2.13.0+cpu, 2 threads, a shared machine)::

                    NCHW       channels_last
    fp32          211 ms         203 ms     (channels_last 0.96x the step time: -4 %)
    bf16          140 ms         289 ms     (channels_last 2.07x the step time: twice as slow)

* channels_last: 3-4 % faster in fp32 (two runs: 0.97x, 0.96x), well below the 15 % worth a
  measured decision, and twice as slow in bf16 (CPU GroupNorm on NHWC tensors), so it is not
  decided here: ``UNetConfig.channels_last`` stays off.
* threads: 2 threads (torch's default, one per core) vs 1: 213 vs 360 ms fp32, 139 vs 219 ms bf16,
  so the default stands on a quiet machine; ``train.threads`` overrides it and is part of the cache
  key below. On the same machine busy with two other jobs, 2 threads took 5.9 s per fp32 step and
  1 thread 0.79 s: the thread count then matters more than the precision, but it follows the load
  of the moment, not the CPU, so it is not a cached decision either.
* ``torch.compile`` (``train.compile``): no measurable gain per step in ``benchmarks/net_speed.py``
  (see :mod:`scorelab.nets.unet`; not re-measured here) and minutes of compilation, far beyond a
  probe's budget of seconds; not decided here.
* first call: fp32 0.33 s, bf16 0.18 s (vs 0.22 / 0.13 s later), hence ``warmup``.

Cache: ``$SCORELAB_CACHE_DIR/precision.json`` if set, else ``$XDG_CACHE_HOME/scorelab/precision.json``,
else ``~/.cache/scorelab/precision.json``. Entries are keyed by a hash of the CPU model, the CPU
flags of :data:`scorelab.machine.CPU_FLAGS`, torch's version, the intra-op thread count, ISA
overrides in the environment, :data:`PROBE_VERSION` and the caller's ``key`` (net config, batch
size, data shape). An entry stores the *measurement* (step times, ratio, output difference); the
decision is re-derived from it with the current ``min_speedup`` and ``rtol``. A measurement taken
while the machine is busy (1-minute load average above :data:`MAX_CACHE_LOAD` per CPU) decides
this run only and is not cached. Delete the file to measure again.

The probe runs the *untrained* net, so the agreement check sees the first step only (with zero-
initialised output layers the loss is identical in both dtypes and the gradient norm agreed to
6e-5 for the default U-Net): it catches a net or a loss that breaks in bfloat16, not a slow drift
of training; ``train.precision: fp32`` remains the choice where accuracy matters more than speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..machine import cpu_model, machine_info

__all__ = [
    "PrecisionError",
    "PrecisionCacheWarning",
    "PrecisionDecision",
    "autocast",
    "has_native_bf16",
    "relative_difference",
    "cache_path",
    "cache_key",
    "resolve_precision",
    "share_decision",
    "PROBE_VERSION",
    "EARLY_STOP_RATIO",
    "MAX_CACHE_LOAD",
]

REQUESTS = ("auto", "fp32", "bf16")
# requested: train.precision fp32/bf16; measured: timed by the probe now; cache: a stored measurement;
# cuda: auto on a CUDA device; device: auto on another accelerator (fp32); no-probe: auto on CPU without
# a probe (fp32); recorded: the decision a resumed run recorded when it started
SOURCES = ("requested", "measured", "cache", "cuda", "device", "no-probe", "recorded")
PROBE_VERSION = 1  # part of the cache key: bump when the measurement protocol changes
# after the first timed round, stop timing if bf16 took more than this many times the fp32 step:
# noise on a shared machine doubles a single step at worst (max/median ~2 above), so a 4x slowdown is
# real, and an AVX2-only CPU (~14x slower) does not pay for `repeats` rounds of emulated bf16
EARLY_STOP_RATIO = 4.0
# a measurement is cached only if the 1-minute load average per CPU before the probe is at most this:
# other work on the cores distorts the timings (on the shared 2-core machine, with two other busy
# processes, a step took 10x longer and bf16 came out 3x *slower* than fp32, the reverse of a quiet
# run), and a cached decision outlives the moment; a busy machine re-measures on every run instead
MAX_CACHE_LOAD = 0.5
CACHE_FILE = "precision.json"
_NATIVE_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


class PrecisionError(ValueError):
    """``train.precision`` cannot be honoured on this device (bf16 without native bfloat16)."""


class PrecisionCacheWarning(UserWarning):
    """The precision cache file could not be read or written (the run goes on without it)."""


@dataclass
class PrecisionDecision:
    """The precision a run computes in, and why.

    ``dtype`` (a property) is the autocast dtype: ``torch.bfloat16`` for bf16, ``None`` for fp32.
    """

    name: str  # "fp32" | "bf16": what the run computes in
    requested: str  # "auto" | "fp32" | "bf16": train.precision
    source: str  # one of SOURCES: how the choice was made
    ratio: float | None = None  # median bf16 step time / median fp32 step time (measured or cached)
    max_rel_diff: float | None = None  # max over the probe outputs of ||bf16 - fp32|| / ||fp32||
    fp32_seconds: float | None = None  # median seconds per fp32 probe call (one step's forward + backward)
    bf16_seconds: float | None = None  # median seconds per bf16 probe call
    min_speedup: float | None = None  # the threshold the decision used (1 / ratio >= min_speedup)
    rtol: float | None = None  # the agreement threshold the decision used (max_rel_diff <= rtol)
    cpu: str | None = None  # the CPU model measured on
    error: str | None = None  # the bf16 probe's exception (then fp32), if it raised
    load: float | None = None  # 1-minute load average per CPU before the probe (measured: cached iff <= MAX_CACHE_LOAD)

    def __post_init__(self):
        if self.name not in ("fp32", "bf16"):
            raise ValueError(f"PrecisionDecision.name must be 'fp32' or 'bf16', got {self.name!r}")
        if self.requested not in REQUESTS:
            raise ValueError(f"PrecisionDecision.requested must be one of {REQUESTS}, got {self.requested!r}")
        if self.source not in SOURCES:
            raise ValueError(f"PrecisionDecision.source must be one of {SOURCES}, got {self.source!r}")

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype: ``torch.bfloat16``, or ``None`` (fp32: no autocast)."""
        return torch.bfloat16 if self.name == "bf16" else None

    @classmethod
    def recorded(cls, name: str, requested: str = "auto") -> "PrecisionDecision":
        """The decision a run recorded when it started (a resumed run keeps computing as it did)."""
        return cls(name=name, requested=requested, source="recorded")

    def to_dict(self) -> dict:
        """JSON/YAML-ready fields (for config.yaml's ``resolved`` and checkpoint metadata); a
        non-finite number (bf16 outputs that are inf / nan) is written as None."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "PrecisionDecision":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"a precision decision must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown precision decision field {unknown[0]!r}")
        return cls(**d)

    def describe(self) -> str:
        """One header line: the precision and why, e.g. ``precision fp32 — bf16 was 14.2x slower on
        this CPU (bf16 0.42 s vs fp32 0.03 s per step, measured now)``."""
        head = f"precision {self.name} — "
        if self.source == "requested":
            return head + f"requested (train.precision: {self.requested})"
        if self.source == "recorded":
            return head + f"recorded when the resumed run started (train.precision: {self.requested})"
        if self.source == "cuda":
            return head + ("this CUDA device supports bfloat16" if self.name == "bf16" else
                           "this CUDA device does not support bfloat16") + " (train.precision: auto)"
        if self.source == "device":
            return head + "train.precision auto measures CPUs and uses bf16 on CUDA only; this device runs fp32"
        if self.source == "no-probe":
            return head + "train.precision auto, but no probe of the run's step was given to time bf16 on this CPU"
        # measured / cache
        where = "measured now" if self.source == "measured" else f"cached for {self.cpu or 'this CPU'}"
        if self.source == "measured" and self.load is not None and self.load > MAX_CACHE_LOAD:
            where += f", not cached: the machine was busy, load {self.load:.2f} per CPU"
        if self.error is not None:
            return head + f"bf16 failed on this CPU ({self.error}; {where})"
        times = ""
        if self.bf16_seconds is not None and self.fp32_seconds is not None:
            times = f"bf16 {_secs(self.bf16_seconds)} vs fp32 {_secs(self.fp32_seconds)} per step, "
        speedup = 1.0 / self.ratio if self.ratio else float("inf")
        diff = self.max_rel_diff
        if self.name == "bf16":
            why = f"{speedup:.1f}x faster than fp32 and agrees within {_pct(diff)}"
        elif self.ratio is not None and self.ratio >= 1.0:
            why = f"bf16 was {self.ratio:.1f}x slower on this CPU"
        elif self.min_speedup is not None and speedup < self.min_speedup:
            why = f"bf16 was only {speedup:.2f}x faster on this CPU (needs {self.min_speedup:g}x)"
        elif diff is None or not math.isfinite(diff):
            why = f"bf16 was {speedup:.1f}x faster but its outputs are not finite where fp32's are"
        else:
            why = f"bf16 was {speedup:.1f}x faster but differs from fp32 by {_pct(diff)} (more than rtol {_pct(self.rtol)})"
        return head + f"{why} ({times}{where})"


def _secs(s: float) -> str:
    return f"{s:.3g} s"


def _pct(x: float) -> str:
    """Two significant digits: 0.011 -> 1.1%, 0.1 -> 10%, 3.1e-4 -> 0.031%."""
    return f"{100 * x:.2g}%"


def autocast(device, dtype: torch.dtype | None):
    """``torch.autocast(device.type, dtype)`` around the network forward; a no-op for ``dtype=None`` (fp32).

    Args:
        device: a ``torch.device`` or its name ("cpu", "cuda:0").
        dtype: ``torch.bfloat16`` or ``None`` (:attr:`PrecisionDecision.dtype`).
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def has_native_bf16(device, flags: dict | None = None) -> bool:
    """Whether ``device`` computes bfloat16 natively: on CUDA ``torch.cuda.is_bf16_supported()``; on
    CPU the ``avx512_bf16`` or ``amx_bf16`` instruction sets (``flags`` as from
    :func:`scorelab.machine.cpu_flags`; default this CPU's). Other device types: False."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        flags = machine_info()["flags"] if flags is None else flags
        return any(flags.get(f, False) for f in _NATIVE_CPU_FLAGS)
    return False


def relative_difference(ref, other) -> float:
    """``||other - ref|| / ||ref||`` (Euclidean norm over all elements, float64); ``inf`` if either is
    not finite or ``ref`` is zero while ``other`` is not; 0 if both are zero. Shapes must match."""
    a = torch.as_tensor(ref).detach().to("cpu", torch.float64)
    b = torch.as_tensor(other).detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"probe outputs differ in shape between fp32 {tuple(a.shape)} and bf16 {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    num, den = float(torch.linalg.vector_norm(b - a)), float(torch.linalg.vector_norm(a))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


# --- the cache ------------------------------------------------------------------------------------


def cache_path(cache_dir=None) -> Path:
    """The cache file: ``cache_dir`` / ``$SCORELAB_CACHE_DIR`` / ``$XDG_CACHE_HOME/scorelab`` /
    ``~/.cache/scorelab`` (first that is set), then ``precision.json``."""
    if cache_dir is None:
        cache_dir = os.environ.get("SCORELAB_CACHE_DIR")
    if not cache_dir:
        xdg = os.environ.get("XDG_CACHE_HOME")
        cache_dir = Path(xdg) / "scorelab" if xdg else Path.home() / ".cache" / "scorelab"
    return Path(cache_dir) / CACHE_FILE


def _canonical(obj):
    """JSON-stable form of the caller's key: dataclasses as dicts, tuples as lists, dtypes/paths as strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    raise TypeError(f"precision cache key holds a {type(obj).__name__} ({obj!r}); use plain config values")


def _key_facts(key: dict | None, machine: dict) -> dict:
    """Everything a cached measurement depends on."""
    return {"cpu": machine["cpu"], "flags": {k: bool(v) for k, v in sorted(machine["flags"].items())},
            "torch": machine["torch"], "threads": machine["threads"], "isa_env": machine.get("isa_env", {}),
            "probe": PROBE_VERSION, "key": _canonical(key or {})}


def cache_key(key: dict | None = None, machine: dict | None = None) -> str:
    """Hex SHA-256 (16 digits) of the CPU model, CPU flags, torch version, threads, ISA overrides,
    :data:`PROBE_VERSION` and the caller's ``key``; ``machine`` as from
    :func:`scorelab.machine.machine_info` (default: this machine, now)."""
    facts = _key_facts(key, machine or machine_info())
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


_MEASURED = ("ratio", "max_rel_diff", "fp32_seconds", "bf16_seconds")


def _read_cache(path: Path) -> dict:
    """The cache's entries (hash -> measurement); a missing file is empty, an unreadable or corrupt one
    warns and is empty."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        warnings.warn(f"precision cache {path} is unreadable ({e}); measuring again", PrecisionCacheWarning, stacklevel=3)
        return {}
    try:
        data = json.loads(text)
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise TypeError("entries is not a mapping")
    except (ValueError, KeyError, TypeError) as e:
        warnings.warn(f"precision cache {path} is corrupt ({type(e).__name__}: {e}); ignoring it", PrecisionCacheWarning,
                      stacklevel=3)
        return {}
    return entries


def _cached_measurement(entries: dict, h: str, path: Path) -> dict | None:
    entry = entries.get(h)
    if entry is None:
        return None
    try:
        m = {k: entry[k] for k in _MEASURED}
        if not all(isinstance(v, (int, float)) and math.isfinite(v) or (k == "max_rel_diff" and v is None)
                   for k, v in m.items()) or m["ratio"] <= 0:
            raise ValueError("non-numeric measurement")
        m["cpu"] = str(entry.get("cpu", ""))
        m["load"] = entry.get("load") if isinstance(entry.get("load"), (int, float)) else None
        return m
    except (KeyError, TypeError, ValueError) as e:
        warnings.warn(f"precision cache {path} has a corrupt entry {h} ({type(e).__name__}: {e}); measuring again",
                      PrecisionCacheWarning, stacklevel=3)
        return None


def _write_cache(path: Path, h: str, entry: dict) -> None:
    """Add ``entry`` under ``h`` (re-reading the file first) and replace the file atomically; any
    failure warns. Two processes writing at once may lose one entry (it is measured again later)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrecisionCacheWarning)  # a corrupt file was reported on reading
            entries = _read_cache(path)
        entries[h] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": 1, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        warnings.warn(f"precision cache {path} could not be written ({e}); the decision is not cached",
                      PrecisionCacheWarning, stacklevel=3)


# --- measuring ------------------------------------------------------------------------------------


def _as_outputs(out) -> list[Tensor]:
    if isinstance(out, (Tensor, int, float)):
        out = [out]
    if not isinstance(out, Sequence) or not len(out):
        raise ValueError(f"the precision probe must return a non-empty sequence of tensors, got {type(out).__name__}")
    return [torch.as_tensor(o).detach() for o in out]


def _measure(probe: Callable, timer: Callable[[], float], repeats: int, warmup: int) -> dict:
    """Time ``probe(None)`` (fp32) and ``probe(torch.bfloat16)``: ``warmup`` untimed calls of each,
    then up to ``repeats`` timed rounds of one call each, the order alternating between rounds (fp32
    first in even rounds); stop after the first timed round if bf16 took > EARLY_STOP_RATIO x fp32.
    Returns the medians, their ratio and the largest relative output difference (last outputs)."""
    times = {"fp32": [], "bf16": []}
    outs: dict[str, list[Tensor]] = {}
    dtypes = {"fp32": None, "bf16": torch.bfloat16}

    def call(name: str, timed: bool) -> None:
        t0 = timer() if timed else 0.0
        try:
            out = probe(dtypes[name])
        except (RuntimeError, NotImplementedError) as e:
            if name == "fp32":
                raise
            raise _Bf16Failed(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]) from e
        if timed:
            times[name].append(timer() - t0)
        outs[name] = _as_outputs(out)

    with torch.random.fork_rng(devices=[]):  # a safety net for the contract: the global CPU stream is restored
        for _ in range(warmup):
            call("fp32", False)
            call("bf16", False)
        for r in range(repeats):
            for name in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
                call(name, True)
            if r == 0 and times["bf16"][0] > EARLY_STOP_RATIO * times["fp32"][0]:
                break
    f, b = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    if len(outs["fp32"]) != len(outs["bf16"]):
        raise ValueError(f"the precision probe returned {len(outs['fp32'])} outputs in fp32 but {len(outs['bf16'])} in bf16")
    diff = max(relative_difference(o32, o16) for o32, o16 in zip(outs["fp32"], outs["bf16"]))
    return {"fp32_seconds": f, "bf16_seconds": b, "ratio": b / f if f > 0 else math.inf, "max_rel_diff": diff}


class _Bf16Failed(Exception):
    pass


def _decide(m: dict, requested: str, source: str, min_speedup: float, rtol: float) -> PrecisionDecision:
    ratio, diff = m["ratio"], m["max_rel_diff"]
    ok = ratio > 0 and 1.0 / ratio >= min_speedup and diff is not None and diff <= rtol
    return PrecisionDecision(name="bf16" if ok else "fp32", requested=requested, source=source, ratio=ratio,
                             max_rel_diff=diff, fp32_seconds=m["fp32_seconds"], bf16_seconds=m["bf16_seconds"],
                             min_speedup=min_speedup, rtol=rtol, cpu=m.get("cpu"), load=m.get("load"))


def resolve_precision(requested: str, device, probe: Callable | None = None, key: dict | None = None, *,
                      timer: Callable[[], float] = time.perf_counter, cache_dir=None, repeats: int = 3,
                      warmup: int = 1, min_speedup: float = 1.2, rtol: float = 0.05,
                      native_bf16: Callable[[torch.device], bool] | None = None,
                      machine: dict | None = None,
                      load_average: Callable[[], float] | None = None) -> PrecisionDecision:
    """Resolve ``train.precision`` on ``device``.

    * ``"fp32"``: fp32, never probes. ``"bf16"``: bf16; raises :class:`PrecisionError` (one line
      naming train.precision) if ``native_bf16(device)`` is False.
    * ``"auto"`` on CUDA: bf16 where ``native_bf16(device)``, else fp32 (source "cuda"); on another
      accelerator: fp32 (source "device").
    * ``"auto"`` on CPU: a cached measurement for (this machine, ``key``) if there is one (source
      "cache"); else, with a ``probe``, measure (source "measured") and cache the measurement; with no
      probe, fp32 (source "no-probe"). bf16 is chosen iff ``fp32_time / bf16_time >= min_speedup``
      (medians) and every probe output agrees, ``||o_bf16 - o_fp32|| / ||o_fp32|| <= rtol``. If a
      bf16 probe call raises (an op without bfloat16 support), fp32 is chosen and not cached.

    The probe contract: ``probe(dtype) -> sequence of tensors`` (``dtype`` is ``None`` for fp32 or
    ``torch.bfloat16``) runs one training step's forward + backward of the run's own net at the
    run's batch size under :func:`autocast` ``(device, dtype)``, without an optimizer step, and
    returns a few scalars to compare (e.g. the loss and the gradient norm). It must leave the
    weights, buffers, ``.grad`` and every random stream as it found them (so the run is the same
    whether or not it probed); the global CPU generator is also restored here as a safety net. It
    must compute the same thing on every call (same batch, same noise).

    Cost: ``2 * (warmup + repeats)`` probe calls (8 by default: ~1.5 s for the default U-Net at batch
    128 on the quiet 2-core AMX Xeon, from the step times in the module docstring; 23 s at batch 32
    while two other jobs kept its cores busy), or ``2 * (warmup + 1)`` when bf16 is more than
    :data:`EARLY_STOP_RATIO` times slower after the first timed round (an AVX2-only CPU). Keep a probe
    call under ~1 s (a smaller batch if needed: then pass that batch size in ``key``).

    Args:
        requested: train.precision, "auto" | "fp32" | "bf16".
        device: the run's device (``torch.device`` or its name).
        probe: the measurement callable above (None: auto on CPU falls back to fp32 without a cache hit).
        key: JSON-like description of what is timed (net config, batch size, data shape): part of the cache key.
        timer: seconds clock (injectable for tests).
        cache_dir: folder of ``precision.json`` (default: see :func:`cache_path`).
        repeats: timed calls per dtype (>= 1); the decision uses their medians.
        warmup: untimed calls per dtype first (>= 0; the first call sets up kernels).
        min_speedup: bf16 must be at least this many times faster than fp32 (> 0).
        rtol: largest relative difference of any probe output between bf16 and fp32 (>= 0).
        native_bf16: ``device -> bool`` (default :func:`has_native_bf16`), injectable for tests.
        machine: machine facts for the cache key, as from :func:`scorelab.machine.machine_info` (default: this one).
        load_average: ``() -> float``, the load per CPU before probing (default: 1-minute load average /
            CPU count); the measurement is cached only if it is at most :data:`MAX_CACHE_LOAD`.
    """
    if requested not in REQUESTS:
        raise PrecisionError(f"train.precision must be auto, fp32 or bf16, got {requested!r}")
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    if not (isinstance(warmup, int) and warmup >= 0):
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    if not min_speedup > 0:
        raise ValueError(f"min_speedup must be positive, got {min_speedup!r}")
    if not rtol >= 0:
        raise ValueError(f"rtol must be non-negative, got {rtol!r}")
    device = torch.device(device)
    native = native_bf16 or has_native_bf16

    if requested == "fp32":
        return PrecisionDecision("fp32", requested, "requested")
    if requested == "bf16":
        if not native(device):
            raise PrecisionError(_not_native_message(device, machine))
        return PrecisionDecision("bf16", requested, "requested")
    if device.type == "cuda":
        return PrecisionDecision("bf16" if native(device) else "fp32", requested, "cuda")
    if device.type != "cpu":
        return PrecisionDecision("fp32", requested, "device")

    machine = machine or machine_info()
    path = cache_path(cache_dir)
    h = cache_key(key, machine)
    cached = _cached_measurement(_read_cache(path), h, path)
    if cached is not None:
        return _decide(cached, requested, "cache", min_speedup, rtol)
    if probe is None:
        return PrecisionDecision("fp32", requested, "no-probe", cpu=machine["cpu"])
    load = float((load_average or _load_per_cpu)())
    try:
        m = _measure(probe, timer, repeats, warmup)
    except _Bf16Failed as e:
        return PrecisionDecision("fp32", requested, "measured", min_speedup=min_speedup, rtol=rtol, cpu=machine["cpu"],
                                 error=str(e), load=load)
    m["cpu"], m["load"] = machine["cpu"], load
    if load <= MAX_CACHE_LOAD and all(math.isfinite(m[k]) for k in ("ratio", "fp32_seconds", "bf16_seconds")):
        entry = {**m, "max_rel_diff": m["max_rel_diff"] if math.isfinite(m["max_rel_diff"]) else None,
                 "facts": _key_facts(key, machine), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_cache(path, h, entry)
    return _decide(m, requested, "measured", min_speedup, rtol)


def share_decision(decide: Callable[[], PrecisionDecision], agree: Callable, broadcast: Callable[[object], object],
                   main: bool) -> PrecisionDecision:
    """The precision of a data-parallel run: ``decide()`` (e.g. :func:`resolve_precision` with the
    run's probe) on rank 0 only, its decision on every rank.

    Every rank computes in the same dtype (a rank in bf16 next to one in fp32 would give different
    gradients for the same weights), and only one process probes, while the others wait: several
    processes timing the step at once on shared cores would each measure the others' load.

    Args:
        decide: the decision, called on rank 0 only.
        agree: ``agree(fn, what)`` runs ``fn`` on every rank and raises everywhere if it raised on one
            (:meth:`scorelab.train.distributed.Comm.agree`): a failure of rank 0's probe stops every rank.
        broadcast: ``broadcast(obj) -> obj``, rank 0's object on every rank.
        main: whether this process is rank 0.
    """
    decision = agree(lambda: decide() if main else None, "to decide the precision")
    d = broadcast(decision.to_dict() if main else None)
    return decision if main else PrecisionDecision.from_dict(d)


def _load_per_cpu() -> float:
    """1-minute load average / CPU count (0 where the OS does not report it)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (OSError, AttributeError):
        return 0.0


def _not_native_message(device: torch.device, machine: dict | None) -> str:
    if device.type == "cuda":
        return (f"train.precision is bf16 but CUDA device {device} does not support bfloat16 "
                "(torch.cuda.is_bf16_supported() is False); use train.precision: auto or fp32")
    if device.type == "cpu":
        cpu = (machine or {}).get("cpu") or cpu_model()
        return (f"train.precision is bf16 but this CPU ({cpu}) has no native bfloat16 (neither avx512_bf16 nor "
                "amx_bf16): bf16 would be emulated and many times slower; use train.precision: auto or fp32")
    return f"train.precision is bf16 but bfloat16 support on {device.type} devices is unknown; use train.precision: auto or fp32"
