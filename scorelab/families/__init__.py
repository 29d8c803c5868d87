"""Model families: each owns its networks, its loss and its sampler; the trainer runs any of them.

A family provides ``modules()``, ``optimizer_groups()``, ``prepare(raw_batch)``,
``training_step(modules, batch, ctx)`` and ``sample(modules, n, generator, ...)``.
"""

from __future__ import annotations

from ..train.config import ConfigError
from .classifier import ClassifierConfig, NoisyClassifierFamily
from .diffusion import DiffusionConfig, DiffusionFamily
from .score_matching import ScoreMatchingConfig, ScoreMatchingFamily
from .vdm import VDMConfig, VDMFamily

FAMILIES = {"diffusion": DiffusionFamily, "noisy_classifier": NoisyClassifierFamily,
            "score_matching": ScoreMatchingFamily, "vdm": VDMFamily}

__all__ = ["FAMILIES", "make_family", "DiffusionFamily", "DiffusionConfig", "NoisyClassifierFamily", "ClassifierConfig",
           "ScoreMatchingFamily", "ScoreMatchingConfig", "VDMFamily", "VDMConfig"]


def make_family(model_cfg: dict, data_shape: tuple, num_classes: int = 0, class_conditional: bool = False):
    """The family named by ``model_cfg["family"]`` built for data of ``data_shape``."""
    name = model_cfg.get("family", "diffusion")
    if name not in FAMILIES:
        raise ConfigError(f"model.family {name!r} is unknown: expected one of {', '.join(FAMILIES)}")
    if class_conditional and not num_classes:
        raise ConfigError("data.class_conditional is set but the dataset has no labels")
    return FAMILIES[name](model_cfg, data_shape, num_classes, class_conditional)
