"""Data: analytic Gaussian mixtures, 2-D toys, image datasets, and one registry over them.

``load_dataset(name, **opts)`` returns a dataset object; the default is the Fashion-MNIST subset
shipped inside the package, so nothing needs the network. Image datasets are
:class:`~scorelab.data.images.ImageDataset` (uint8 storage, ``[-1, 1]`` float on access); toys
are :class:`~scorelab.data.toys.PointDataset` (float32 points). Both have ``shape``,
``num_classes``, ``labels`` (or None), ``len()``, ``dataset[i] -> (x, y)`` with ``y = -1`` when
unlabelled, and ``sample(n, generator)``.

| name | loader | options |
| --- | --- | --- |
| ``fmnist-embedded`` (default) | :func:`~scorelab.data.images.load_embedded_fmnist` | split |
| ``fmnist`` | :func:`~scorelab.data.images.load_fashion_mnist` | root, split, download, verify |
| ``mnist`` | :func:`~scorelab.data.images.load_mnist` | root or wheel, split |
| ``digits`` | :func:`~scorelab.data.images.load_digits` | split |
| ``folder`` | :func:`~scorelab.data.images.load_image_folder` | root, mode |
| ``npz`` | :func:`~scorelab.data.images.load_npz` | path, images_key, labels_key, layout, num_classes |
| ``moons``, ``swissroll``, ``8gaussians``, ``checkerboard``, ``rings`` | :func:`~scorelab.data.toys.load_toy` | n, seed, split, toy parameters |
"""

from __future__ import annotations

import inspect
from typing import Callable

from .images import (
    DataError,
    ImageDataset,
    load_digits,
    load_embedded_fmnist,
    load_fashion_mnist,
    load_image_folder,
    load_mnist,
    load_npz,
)
from .mixture import ExactDenoiser, GaussianMixture, eight_gaussians_mixture, random_mixture
from .toys import TOYS, PointDataset, Toy2D, load_toy, make_toy

__all__ = [
    "DATASETS",
    "load_split",
    "dataset_domain",
    "has_split",
    "DEFAULT_DATASET",
    "load_dataset",
    "dataset_names",
    "DataError",
    "ImageDataset",
    "PointDataset",
    "Toy2D",
    "TOYS",
    "make_toy",
    "load_toy",
    "GaussianMixture",
    "ExactDenoiser",
    "eight_gaussians_mixture",
    "random_mixture",
]

DEFAULT_DATASET = "fmnist-embedded"


def _toy_loader(name: str) -> Callable:
    toy_cls = TOYS[name]

    def load(n: int = 10_000, seed: int = 0, split: str = "train", **kwargs) -> PointDataset:
        return load_toy(name, n=n, seed=seed, split=split, **kwargs)

    load.__name__ = f"load_{name}"
    load.__doc__ = f"``load_toy({name!r}, n, seed, split, **kwargs)``: points of :class:`{toy_cls.__name__}`."
    load._toy_params = tuple(inspect.signature(toy_cls).parameters)  # noqa: SLF001 - for option checks
    return load


DATASETS: dict[str, Callable] = {
    "fmnist-embedded": load_embedded_fmnist,
    "fmnist": load_fashion_mnist,
    "mnist": load_mnist,
    "digits": load_digits,
    "folder": load_image_folder,
    "npz": load_npz,
    **{name: _toy_loader(name) for name in TOYS},
}


def dataset_names() -> list[str]:
    """The names :func:`load_dataset` accepts."""
    return list(DATASETS)


def _options(name: str) -> list[str]:
    fn = DATASETS[name]
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
    return [p.name for p in params] + list(getattr(fn, "_toy_params", ()))


def load_dataset(name: str = DEFAULT_DATASET, **opts):
    """The dataset ``name`` built with ``opts`` (see the table in this module's docstring).

    Unknown names and options raise ``ValueError`` listing the valid ones.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {dataset_names()}")
    allowed = _options(name)
    bad = sorted(set(opts) - set(allowed))
    if bad:
        raise ValueError(f"dataset {name!r} takes no option {bad}; its options are {allowed}")
    required = [p.name for p in inspect.signature(DATASETS[name]).parameters.values()
                if p.default is p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    missing = [r for r in required if r not in opts]
    if missing:
        raise DataError(f"dataset {name!r} needs data.options.{missing[0]} (e.g. --data.options.{missing[0]} FILE)")
    return DATASETS[name](**opts)


def has_split(name: str) -> bool:
    """Whether dataset ``name`` has its own train / test split (npz files and folders do not)."""
    return name in DATASETS and "split" in _options(name)


def load_split(name: str, split: str = "train", holdout: float = 0.1, **opts):
    """Split ``train`` or ``test`` of dataset ``name``.

    Datasets with their own split get it; for the others (``npz``, ``folder``) the held-out
    ``test`` split is a seeded random ``holdout`` share of the examples (permutation of
    ``torch.Generator().manual_seed(0)``, at least one example) and ``train`` is the rest, so a
    model never trains on the images it is evaluated against.
    """
    import torch

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name not in DATASETS:
        return load_dataset(name, **opts)  # the unknown-dataset error
    if has_split(name):
        return load_dataset(name, **({**opts, "split": "test"} if split == "test" else opts))
    if not 0 < holdout < 1:
        raise ValueError(f"data.holdout must be in (0, 1), got {holdout}")
    ds = load_dataset(name, **opts)
    n = len(ds)
    if n < 2:
        raise DataError(f"dataset {name!r} has {n} example(s): too few to hold some out for evaluation")
    k = max(1, int(round(holdout * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    idx = perm[:k] if split == "test" else perm[k:]
    return ds.subset(idx.sort().values)


def dataset_domain(name: str, dataset=None) -> str:
    """The feature domain eval uses for dataset ``name``: ``fmnist`` (the shipped LeNet), ``mnist``,
    ``digits``, ``points`` (2-D toys and other flat data), or ``images`` (npz / folder data)."""
    if name in ("fmnist", "fmnist-embedded"):
        return "fmnist"
    if name in ("mnist", "digits"):
        return name
    if name in TOYS or (dataset is not None and len(tuple(dataset.shape)) == 1):
        return "points"
    return "images"
