"""Model families: each owns its networks, its loss and what it can do; the trainer runs any of them.

The contract is :class:`scorelab.families.base.Family`; every module of this package is imported
here, so a family registered with ``@register`` in a new file is known to the trainer, the run API,
eval and the CLI without any other change.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import FAMILIES, Capabilities, CapabilityError, DataSpec, Family, OptimizerSpec, family_class, register

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["FAMILIES", "Family", "Capabilities", "CapabilityError", "DataSpec", "OptimizerSpec", "family_class", "register",
           "make_family"]


def make_family(model_cfg: dict, data_shape: tuple, num_classes: int = 0, class_conditional: bool = False,
                refs: dict | None = None) -> Family:
    """The family named by ``model_cfg["family"]`` (default ``diffusion``) for data of ``data_shape``
    with ``num_classes`` labels (conditioned on them when ``class_conditional``). Referenced runs
    (``refs``) are opened by :func:`scorelab.runs.build_family`."""
    cls = family_class(model_cfg.get("family", "diffusion"))
    return cls(model_cfg, DataSpec(tuple(data_shape), int(num_classes or 0), bool(class_conditional)), refs)
