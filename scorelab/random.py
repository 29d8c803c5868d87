"""Injected randomness.

Every random draw in scorelab takes a ``generator``: ``None`` (torch's global stream), one
``torch.Generator``, a list of generators, one per example, or a :class:`ShardedGenerator` (one
process's share of a data-parallel batch). With a list, example ``i`` draws from its own stream,
so a seed gives the same sample whatever the batch size (as in EDM's ``generate.py``).

**Data parallelism.** Under torchrun each process holds rows ``[start, stop)`` of the global batch
of ``total`` rows. Its training step draws from a :class:`ShardedGenerator` around the run's noise
stream: every draw is made for the *global* batch from the shared stream and the process keeps its
own rows, so example ``i`` of step ``s`` gets the same noise whatever the number of processes and
the stream advances identically on every rank (a 2-process run and a 1-process run with the same
global batch draw the same numbers). Which rows of a draw belong to which example is read from
its shape, with ``b = stop - start`` the rows this process holds:

* ``(b, ...)``: one row per example (noise, times, latents): drawn as ``(total, ...)``, rows
  ``[start, stop)`` kept;
* ``(k b, ...)`` with ``k > 1``: ``k`` rows per example, example-major (row ``i k + j`` is example
  ``i``'s ``j``-th, as ``repeat_interleave`` lays them out): drawn as ``(k total, ...)``, rows
  ``[k start, k stop)`` kept;
* anything else (0-d, or a leading dimension that is not a multiple of ``b``): drawn as it is,
  the same on every process (a draw shared by all examples).

So a per-example draw must put the batch first; ``(n_probes, B, ...)`` would be read as shared.
Draw through :func:`randn` / :func:`rand` / :func:`randn_like`: ``torch.rand(..., generator=g)``
refuses a ShardedGenerator (it is not a ``torch.Generator``), which is the intended loud failure.
:func:`batch_rows` and :func:`rand_whole` serve computations that couple the rows of a batch (VDM's
low-discrepancy times).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

__all__ = ["Generator", "ShardedGenerator", "randn", "randn_like", "rand", "rand_whole", "batch_rows",
           "generators_for_seeds"]


class ShardedGenerator:
    """One process's view of a shared ``torch.Generator`` in a data-parallel step (module docstring).

    Holds no state of its own: every draw advances ``generator`` by the global batch's amount.
    """

    def __init__(self, generator: torch.Generator, start: int, stop: int, total: int):
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"ShardedGenerator wraps a torch.Generator, got {type(generator).__name__}")
        if not 0 <= start < stop <= total:
            raise ValueError(f"a shard needs 0 <= start < stop <= total, got start={start}, stop={stop}, total={total}")
        self.generator = generator  # the run's noise stream, the same on every process
        self.start = start  # first global row held here
        self.stop = stop  # one past the last global row held here
        self.total = total  # rows of the global batch

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @property
    def rows(self) -> int:
        """Rows of the global batch held by this process (``b``)."""
        return self.stop - self.start

    def span(self, n: int) -> tuple[int, int, int] | None:
        """For a draw with leading dimension ``n``: ``(global n, first, last + 1)`` of this
        process's rows, or None for a shared draw."""
        b = self.rows
        if n <= 0 or n % b:
            return None
        k = n // b
        return k * self.total, k * self.start, k * self.stop

    def __repr__(self) -> str:
        return f"ShardedGenerator(rows {self.start}:{self.stop} of {self.total})"


Generator = Union[None, torch.Generator, ShardedGenerator, Sequence[torch.Generator]]


def generators_for_seeds(seeds: Sequence[int], device="cpu") -> list[torch.Generator]:
    """One generator per example, seeded by ``seeds``."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _draw(fn, shape, generator: Generator, dtype, device, whole: bool = False) -> Tensor:
    shape = tuple(shape)
    if isinstance(generator, ShardedGenerator):
        g = generator.generator
        span = generator.span(shape[0]) if shape else None
        if span is None:  # shared by every example (and every process)
            return fn(shape, generator=g, dtype=dtype, device=g.device).to(device or g.device)
        n, lo, hi = span
        out = fn((n, *shape[1:]), generator=g, dtype=dtype, device=g.device)
        return (out if whole else out[lo:hi]).to(device or g.device)
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


def rand_whole(shape, generator: Generator = None, dtype=torch.float32, device=None) -> Tensor:
    """:func:`rand` of ``shape`` for the whole global batch: ``(k total, ...)`` rows from a
    :class:`ShardedGenerator` (every process gets all of them; the stream advances as :func:`rand`
    would), exactly :func:`rand` otherwise."""
    return _draw(torch.rand, shape, generator, dtype, device, whole=True)


def batch_rows(generator: Generator, n: int) -> tuple[int, int]:
    """``(first, total)``: where a draw of ``n`` leading rows sits in the global batch's draw
    (``(k start, k total)`` for a :class:`ShardedGenerator`, ``(0, n)`` for anything else)."""
    if isinstance(generator, ShardedGenerator):
        span = generator.span(n)
        if span is not None:
            return span[1], span[0]
    return 0, n


def randn_like(x: Tensor, generator: Generator = None) -> Tensor:
    return randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
