"""Every preset: valid, and free of choices that depend on the CPU (the machine measures those)."""

from __future__ import annotations

import pytest
import yaml

from scorelab.cli import preset_names
from scorelab.cli.common import presets_dir
from scorelab.families.base import family_class
from scorelab.train.config import RunConfig, from_dict, load_yaml

PRESETS = preset_names()


def _keys(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{prefix}{k}"
            yield from _keys(v, f"{prefix}{k}.")


@pytest.mark.parametrize("name", PRESETS)
def test_preset_sets_no_precision_of_its_own(name):
    """train.precision: auto decides by measurement where the run runs; a preset must not fix it."""
    raw = load_yaml(presets_dir() / f"{name}.yaml")
    keys = list(_keys(raw))
    assert "train.precision" not in keys, f"{name} fixes train.precision"
    assert not [k for k in keys if k.endswith(".bf16")], f"{name} has a bf16 switch"
    cfg = RunConfig.from_dict(raw)
    assert cfg.train.precision == "auto"
    # the family's own config validates (references to other runs are checked when the run is built)
    cls = family_class(cfg.model.get("family", "diffusion"))
    model = {k: v for k, v in cfg.model.items() if k not in cls.references}
    from_dict(cls.Config, {**model, "family": cls.name}, "model")


def test_every_preset_is_listed_and_parses_as_yaml():
    assert len(PRESETS) >= 20
    for name in PRESETS:
        assert isinstance(yaml.safe_load((presets_dir() / f"{name}.yaml").read_text()), dict)
