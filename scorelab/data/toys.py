"""Two-dimensional toy distributions, and a dataset wrapper for any of them.

Every toy has ``sample(n, generator=None, return_labels=False) -> (n, 2) float32``. All draws go
through :mod:`scorelab.random` with leading dimension ``n``, so with a list of generators (one per
example) example ``i`` depends only on its own generator: the same seed gives the same point
whatever the batch size. The default scales give each coordinate a standard deviation between
about 1 and 1.75 and keep every point well inside ``[-4, 4]^2``.

| name | distribution | labels |
| --- | --- | --- |
| ``moons`` | two interleaved half circles, ``2 ((cos t, sin t) - (0.5, 0.25))`` and its mirror | moon (2) |
| ``swissroll`` | ``(t cos t, t sin t) / 5``, ``t ~ U[1.5 pi, 4.5 pi]``, plus noise | none |
| ``8gaussians`` | :func:`~scorelab.data.mixture.eight_gaussians_mixture` (analytic density in ``.mixture``) | component (8) |
| ``checkerboard`` | uniform on the 8 dark squares of a 4x4 board on ``[-2, 2]^2`` | none |
| ``rings`` | concentric circles of radii ``0.5, 1.0, ..., 0.5 K`` plus radial noise | ring (K) |
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..random import Generator, rand, randn
from .mixture import GaussianMixture, eight_gaussians_mixture

__all__ = [
    "Toy2D",
    "TwoMoons",
    "SwissRoll",
    "EightGaussians",
    "Checkerboard",
    "Rings",
    "PointDataset",
    "TOYS",
    "make_toy",
    "load_toy",
]


class Toy2D:
    """Base class: a distribution on the plane with ``sample(n, generator)``.

    Attributes: ``name`` (registry name), ``shape = (2,)``, ``num_classes`` (int, or None when the
    toy has no natural classes).
    """

    name: str = "toy"
    shape = (2,)
    num_classes: int | None = None

    def sample(self, n: int, generator: Generator = None, return_labels: bool = False):
        """``n`` points (n, 2) float32; with ``return_labels`` also (n,) int64 labels (-1 if none)."""
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        x, y = self._sample(n, generator)
        x = x.to(torch.float32)
        if not return_labels:
            return x
        return x, (torch.full((n,), -1, dtype=torch.long) if y is None else y.to(torch.long))

    def _sample(self, n: int, generator: Generator) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_") and k != "mixture")
        return f"{type(self).__name__}({args})"


class TwoMoons(Toy2D):
    """Two interleaved half circles (as scikit-learn's ``make_moons``), centred and scaled by 2.

    Upper moon ``(cos t, sin t)``, lower moon ``(1 - cos t, 0.5 - sin t)``, ``t ~ U[0, pi]``;
    then ``x -> scale * (x - (0.5, 0.25)) + noise * eps``.

    Args:
        noise: standard deviation of the Gaussian noise added after scaling.
        scale: factor applied to the centred moons.
    """

    name = "moons"
    num_classes = 2

    def __init__(self, noise: float = 0.1, scale: float = 2.0):
        self.noise, self.scale = float(noise), float(scale)

    def _sample(self, n, generator):
        u = rand((n, 2), generator=generator, dtype=torch.float64)  # (n, 2): angle, moon
        t = math.pi * u[:, 0]
        y = (u[:, 1] < 0.5).long()  # 0 upper, 1 lower
        upper = torch.stack([torch.cos(t), torch.sin(t)], 1)
        lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], 1)
        x = torch.where(y[:, None] == 0, upper, lower)
        x = self.scale * (x - torch.tensor([0.5, 0.25], dtype=torch.float64))
        x = x + self.noise * randn((n, 2), generator=generator, dtype=torch.float64)
        return x, y


class SwissRoll(Toy2D):
    """The 2-D Swiss roll ``(t cos t, t sin t) / 5 + noise * eps``, ``t = 1.5 pi (1 + 2 u)``, ``u ~ U[0, 1]``.

    Args:
        noise: standard deviation of the Gaussian noise (in the scaled units).
    """

    name = "swissroll"

    def __init__(self, noise: float = 0.1):
        self.noise = float(noise)

    def _sample(self, n, generator):
        t = 1.5 * math.pi * (1 + 2 * rand((n,), generator=generator, dtype=torch.float64))
        x = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 5
        x = x + self.noise * randn((n, 2), generator=generator, dtype=torch.float64)
        return x, None


class EightGaussians(Toy2D):
    """Eight equal Gaussians on a circle; the same law as ``eight_gaussians_mixture(radius, std)``.

    The exact density is available as ``.mixture`` (a :class:`GaussianMixture`), so models trained
    on this toy can be compared with the analytic score.

    Args:
        radius: radius of the circle carrying the eight means.
        std: isotropic standard deviation of each component.
    """

    name = "8gaussians"
    num_classes = 8

    def __init__(self, radius: float = 2.0, std: float = 0.1):
        self.radius, self.std = float(radius), float(std)
        self.mixture: GaussianMixture = eight_gaussians_mixture(self.radius, self.std)

    def _sample(self, n, generator):
        x, k = self.mixture.sample(n, generator, return_component=True)
        return x, k


class Checkerboard(Toy2D):
    """Uniform on the 8 squares ``(col, row)`` with ``col = row (mod 2)`` of a 4x4 board of side ``size``.

    ``x ~ U[-size/2, size/2]``; the row is drawn among the two of the same parity as the column.

    Args:
        size: side length of the whole board, centred at the origin.
    """

    name = "checkerboard"

    def __init__(self, size: float = 4.0):
        self.size = float(size)

    def _sample(self, n, generator):
        u = rand((n, 3), generator=generator, dtype=torch.float64)  # (n, 3)
        cx = 4 * u[:, 0]  # column coordinate in [0, 4)
        col = torch.floor(cx).clamp(max=3)
        row = 2 * torch.floor(2 * u[:, 1]).clamp(max=1) + torch.remainder(col, 2)
        x = torch.stack([cx, row + u[:, 2]], 1)  # board coordinates in [0, 4)^2
        return (x / 4 - 0.5) * self.size, None


class Rings(Toy2D):
    """``K`` concentric circles of radii ``spacing * (1..K)``, equally likely, radial noise ``noise``.

    Args:
        num_rings: number of circles ``K``.
        spacing: radius of the innermost ring and gap between rings.
        noise: standard deviation of the Gaussian radial noise.
    """

    name = "rings"

    def __init__(self, num_rings: int = 4, spacing: float = 0.5, noise: float = 0.04):
        if num_rings < 1:
            raise ValueError(f"num_rings must be >= 1, got {num_rings}")
        self.num_rings, self.spacing, self.noise = int(num_rings), float(spacing), float(noise)
        self.num_classes = self.num_rings

    def _sample(self, n, generator):
        u = rand((n, 2), generator=generator, dtype=torch.float64)  # (n, 2): ring, angle
        k = torch.floor(u[:, 0] * self.num_rings).clamp(max=self.num_rings - 1).long()
        r = self.spacing * (k + 1) + self.noise * randn((n,), generator=generator, dtype=torch.float64)
        a = 2 * math.pi * u[:, 1]
        return torch.stack([r * torch.cos(a), r * torch.sin(a)], 1), k


TOYS: dict[str, type[Toy2D]] = {
    c.name: c for c in (TwoMoons, SwissRoll, EightGaussians, Checkerboard, Rings)
}


def make_toy(name: str, **kwargs) -> Toy2D:
    """The toy distribution called ``name`` (a key of :data:`TOYS`), built with ``kwargs``."""
    if name not in TOYS:
        raise ValueError(f"unknown toy {name!r}; choose one of {sorted(TOYS)}")
    return TOYS[name](**kwargs)


class PointDataset(torch.utils.data.Dataset):
    """A fixed set of points drawn from a toy, usable as a ``torch.utils.data.Dataset``.

    ``dataset[i] -> (x (2,) float32, label () int64)``, label -1 when the toy has none.
    :meth:`sample` draws *fresh* points from ``distribution`` (infinite data for training).

    Args:
        distribution: the :class:`Toy2D` the points come from.
        points: (N, 2) float32.
        labels: (N,) int64, -1 where the toy has no classes.
    """

    def __init__(self, distribution: Toy2D, points: Tensor, labels: Tensor):
        if points.ndim != 2 or points.shape[1] != 2 or labels.shape != points.shape[:1]:
            raise ValueError(f"points must be (N, 2) with labels (N,); got {tuple(points.shape)}, {tuple(labels.shape)}")
        self.distribution = distribution
        self.points = points
        self.labels = labels if distribution.num_classes is not None else None
        self._targets = labels
        self.name = distribution.name
        self.shape = (2,)
        self.num_classes = distribution.num_classes

    def __len__(self) -> int:
        return self.points.shape[0]

    def __getitem__(self, i):
        return self.points[i], self._targets[i]

    def sample(self, n: int, generator: Generator = None, return_labels: bool = False):
        """Fresh draws from ``distribution``: (n, 2) float32 (and (n,) labels)."""
        return self.distribution.sample(n, generator, return_labels=return_labels)

    def __repr__(self) -> str:
        return f"PointDataset({self.distribution!r}, N={len(self)})"


def load_toy(name: str, n: int = 10_000, seed: int = 0, split: str = "train", **kwargs) -> PointDataset:
    """``n`` points of the toy ``name`` drawn with ``seed`` as a :class:`PointDataset`.

    Args:
        name: a key of :data:`TOYS`.
        n: number of stored points.
        seed: seed of the draw; ``split="test"`` uses an independent stream of the same seed.
        split: ``"train"`` or ``"test"``.
        kwargs: parameters of the toy (e.g. ``noise``).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    toy = make_toy(name, **kwargs)
    g = torch.Generator().manual_seed(int(seed) * 2 + (split == "test"))
    x, y = toy.sample(n, g, return_labels=True)
    return PointDataset(toy, x, y)
