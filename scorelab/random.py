"""Injected randomness.

Every random draw in scorelab takes a ``generator``: ``None`` (torch's global stream), one
``torch.Generator``, or a list of generators, one per example. With a list, example ``i`` draws
from its own stream, so a seed gives the same sample whatever the batch size (as in EDM's
``generate.py``).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

Generator = Union[None, torch.Generator, Sequence[torch.Generator]]

__all__ = ["Generator", "randn", "randn_like", "rand", "generators_for_seeds"]


def generators_for_seeds(seeds: Sequence[int], device="cpu") -> list[torch.Generator]:
    """One generator per example, seeded by ``seeds``."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _draw(fn, shape, generator: Generator, dtype, device) -> Tensor:
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        gdev = generator.device if generator is not None else (device or "cpu")
        return fn(shape, generator=generator, dtype=dtype, device=gdev).to(device or gdev)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}")
    return torch.stack([fn(shape[1:], generator=g, dtype=dtype, device=g.device) for g in gens]).to(device or gens[0].device)


def randn(shape, generator: Generator = None, dtype=torch.float32, device=None) -> Tensor:
    """Standard normal draws of ``shape`` from ``generator`` (see module docstring)."""
    return _draw(torch.randn, shape, generator, dtype, device)


def rand(shape, generator: Generator = None, dtype=torch.float32, device=None) -> Tensor:
    """Uniform draws on ``[0, 1)`` of ``shape`` from ``generator``."""
    return _draw(torch.rand, shape, generator, dtype, device)


def randn_like(x: Tensor, generator: Generator = None) -> Tensor:
    return randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
