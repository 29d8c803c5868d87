"""Facts of the machine a run or a benchmark ran on: CPU model and flags, torch, threads, device.

Every choice that depends on the CPU (precision, layout, threads) is measured where it runs and
keyed by these facts, and every benchmark records them next to its numbers, because the same code
is several times faster or slower in bfloat16 on one CPU than on another (AMX vs AVX2 only).
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache

import torch

__all__ = ["CPU_FLAGS", "cpu_model", "cpu_flags", "machine_info", "machine_line", "cache_dir"]

# the instruction-set flags that decide float32 / bfloat16 speed on x86 CPUs
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = val.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), frozenset(flags)


def cpu_model() -> str:
    """The CPU's model name, e.g. ``Intel(R) Xeon(R) Processor`` or ``AMD EPYC 7B13``."""
    return _cpuinfo()[0]


def cpu_flags() -> dict[str, bool]:
    """Which of :data:`CPU_FLAGS` this CPU has."""
    have = _cpuinfo()[1]
    return {f: f in have for f in CPU_FLAGS}


def machine_info() -> dict:
    """CPU model and flags, torch version, intra-op threads, CUDA device (if any), and the ISA
    overrides in the environment (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``)."""
    info = {"cpu": cpu_model(), "flags": cpu_flags(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    env = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}
    if env:
        info["isa_env"] = env
    return info


def machine_line(info: dict | None = None) -> str:
    """One line for a table header: ``Intel(R) Xeon(R) Processor [avx2 avx512f amx_bf16], torch 2.13.0, 2 threads``."""
    info = info or machine_info()
    flags = " ".join(f for f, on in info["flags"].items() if on) or "no avx2"
    extra = f", GPU {info['cuda']}" if info.get("cuda") else ""
    env = "".join(f", {k}={v}" for k, v in info.get("isa_env", {}).items())
    return f"{info['cpu']} [{flags}], torch {info['torch']}, {info['threads']} threads{extra}{env}"


def cache_dir(sub: str = "") -> "os.PathLike":
    """scorelab's per-user cache folder (``$SCORELAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/scorelab``,
    else ``~/.cache/scorelab``), with ``sub`` appended; not created here."""
    from pathlib import Path

    root = os.environ.get("SCORELAB_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scorelab"
    return base / sub if sub else base
