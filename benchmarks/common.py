"""What every benchmark shares: the machine record printed in its header and stored in its JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scorelab.machine import machine_info, machine_line  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# fmnist-rf's recipe before it took OT pairs and lr 3e-3: the teacher / model the distillation and
# likelihood tables in the README were measured with (train overrides)
RF_RECIPE_BEFORE_OT = ("--train.lr", "2e-3", "--model.coupling", "independent")

__all__ = ["RESULTS", "RF_RECIPE_BEFORE_OT", "header", "write_json", "machine_info"]


def header(title: str) -> dict:
    """Print ``title`` and the machine line; return the machine record for the JSON."""
    info = machine_info()
    print(f"{title}\nmachine: {machine_line(info)}", flush=True)
    return info


def write_json(name: str, payload: dict, machine: dict | None = None) -> Path:
    """Write ``payload`` (with ``machine``) to ``benchmarks/results/<name>``; return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / name
    out.write_text(json.dumps({"machine": machine or machine_info(), **payload}, indent=2, default=str))
    print(f"wrote {out}")
    return out
