"""What the verbs share: errors, presets, config overrides, data loading, class labels, options."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["UsageError", "DEFAULT_PRESET", "presets_dir", "preset_names", "resolve_config", "parse_overrides",
           "split_overrides", "load_data", "check_data_options", "build", "parse_classes", "given", "tty", "check_out"]

DEFAULT_PRESET = "fmnist-rf"


class UsageError(ValueError):
    """A bad command line (one line, exit 2)."""


def check_out(out, suffixes: tuple = (".png",), flag: str = "--out") -> None:
    """UsageError unless ``out`` can be written: its folder exists and is a folder, ``out`` is not
    a folder, and it ends in one of ``suffixes`` (checked before anything is computed)."""
    if out is None:
        return
    out = Path(out)
    if out.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {out}: the file must end in {' or '.join(suffixes)}")
    parent = out.parent
    if not parent.exists():
        raise UsageError(f"{flag} {out}: folder {parent} does not exist")
    if not parent.is_dir():
        raise UsageError(f"{flag} {out}: {parent} is a file, not a folder")
    if out.is_dir():
        raise UsageError(f"{flag} {out} is a folder; give a file name")


def tty() -> bool:
    """Progress bars only on a terminal."""
    return sys.stderr.isatty()


def presets_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def resolve_config(arg: str | None) -> dict:
    """The config mapping of a YAML file or a preset name (default: the default preset)."""
    from ..train.config import load_yaml

    if arg is None:
        arg = DEFAULT_PRESET
    p = Path(arg)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return load_yaml(p)
    preset = presets_dir() / f"{arg}.yaml"
    if preset.is_file():
        return load_yaml(preset)
    raise UsageError(f"config {arg!r} is neither a file nor a preset (presets: {', '.join(preset_names())})")


def parse_overrides(rest: list[str]) -> list[tuple[str, object]]:
    """``--a.b value`` / ``--a.b=value`` pairs from the unparsed command-line tail."""
    from ..train.config import parse_value

    out, i = [], 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise UsageError(f"unexpected argument {tok!r} (overrides look like --train.steps 100)")
        key = tok[2:]
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                raise UsageError(f"override --{key} needs a value")
            val = rest[i + 1]
            i += 2
        out.append((key, parse_value(val)))
    return out


_TRAIN_FLAGS = {"--runs", "--resume", "--no-progress", "--nproc", "--dist-timeout", "--help", "-h"}
_TRAIN_FLAGS_WITH_VALUE = {"--runs", "--resume", "--nproc", "--dist-timeout"}


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``train``'s config overrides (``--key value`` / ``--key=value``) from its own flags,
    so that an override's value is never taken for the positional CONFIG."""
    if not argv or argv[0] != "train":
        return argv, []
    keep, overrides, i = [argv[0]], [], 1
    while i < len(argv):
        tok = argv[i]
        flag = tok.split("=", 1)[0]
        if tok.startswith("--") and flag not in _TRAIN_FLAGS:
            if "=" in tok:
                overrides.append(tok)
                i += 1
            else:
                overrides.extend(argv[i : i + 2])
                i += 2
        else:
            keep.append(tok)
            if flag in _TRAIN_FLAGS_WITH_VALUE and "=" not in tok and i + 1 < len(argv):
                keep.append(argv[i + 1])
                i += 1
            i += 1
    return keep, overrides


def check_data_options(name: str, options: dict) -> None:
    """DataError naming ``data.options.<key>`` whose value has not the type of the loader's default
    (``n: 'many'``), or a count (``n``) below 1. Unknown names and options are the loader's errors."""
    import inspect

    from ..data import DATASETS, DataError

    fn = DATASETS.get(name)
    if fn is None:
        return
    if name == "npz" and isinstance(options.get("path"), str):
        import zipfile

        p = Path(options["path"])
        if p.is_file() and not zipfile.is_zipfile(p):
            raise DataError(f"{p}: not a readable npz (not a zip archive: an .npy file? write one with numpy.savez)")
    defaults = {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.default is not p.empty}
    toy_cls = None
    if getattr(fn, "_toy_params", None):
        from ..data.toys import TOYS

        toy_cls = TOYS.get(name)
    if toy_cls is not None:
        defaults.update({p.name: p.default for p in inspect.signature(toy_cls).parameters.values() if p.default is not p.empty})
    for key, value in options.items():
        if key not in defaults or defaults[key] is None:
            continue
        d = defaults[key]
        if isinstance(d, bool):
            ok = isinstance(value, bool)
        elif isinstance(d, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(d, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(d, str):
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            raise DataError(f"data.options.{key} must be {type(d).__name__} (like its default {d!r}), got {value!r}")
        if key == "n" and value < 1:
            raise DataError(f"data.options.n must be >= 1, got {value}")


def load_data(cfg, split: str = "train"):
    """The run's dataset split (``test``: the held-out split, see :func:`scorelab.data.load_split`).

    A loader that fails on the given options (a wrong type, a value out of range) is one DataError
    naming ``data.options``; an unreadable file is the loader's own DataError naming the file."""
    from ..data import DataError, load_split

    check_data_options(cfg.data.name, cfg.data.options)
    try:
        return load_split(cfg.data.name, split, holdout=cfg.data.holdout, **cfg.data.options)
    except (DataError, OSError, ValueError):  # the loaders' own one-line messages
        raise
    except (TypeError, RuntimeError, KeyError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"data {cfg.data.name!r} cannot be loaded with data.options {cfg.data.options}: {first}") from None


def build(cfg, dataset):
    """The run's family for ``dataset``, its weights initialised from ``cfg.seed``, references opened."""
    from ..runs import build_family, data_spec

    return build_family(cfg, data_spec(cfg, dataset))


def parse_classes(values, data, n_classes: int = 0):
    """(k,) labels from ``--class`` values, each an index or a class name of the data.

    ``n_classes``: the range to check against when the model itself is unconditional (a guiding
    classifier's classes); otherwise the model's conditional classes."""
    import torch

    if not values:
        return None
    k = data.conditional_classes or n_classes
    if not k:
        raise UsageError("--class needs a class-conditional run (data.class_conditional: true) or --classifier")
    names = [str(c).lower() for c in (data.class_names or ())]
    out = []
    for v in values:
        s = str(v)
        if s.lstrip("-").isdigit():
            i = int(s)
        elif s.lower() in names:
            i = names.index(s.lower())
        else:
            known = f" (classes: {', '.join(data.class_names)})" if data.class_names else ""
            raise UsageError(f"--class {s!r} is neither an index nor a class name of this data{known}")
        if not 0 <= i < k:
            raise UsageError(f"--class {s} is out of range 0..{k - 1}")
        out.append(i)
    return torch.tensor(out, dtype=torch.long)


def given(args, *names) -> dict:
    """``{name: value}`` of the command-line options the user set (not None)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
