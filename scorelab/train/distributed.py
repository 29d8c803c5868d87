"""Data-parallel training on PyTorch's own engine: torchrun starts the processes,
DistributedDataParallel averages the gradients; this module holds the rest (process group, device
choice, sharding, the few collectives of the trainer, faults).

**Launching.** One machine, ``N`` processes (CPUs: gloo; GPUs: nccl, one GPU per process)::

    torchrun --standalone --nproc_per_node N -m scorelab train PRESET [--key value ...]
    scorelab train PRESET --nproc N          # the same, through torch.distributed.run (torchrun)

Several machines (``HOST0:29500`` reachable from all; ``K`` = 0 .. M-1 on machine ``K``; the
commands of ``docs/distributed.md``)::

    torchrun --nnodes M --node_rank K --nproc_per_node N --rdzv_endpoint HOST0:29500 \\
             -m scorelab train PRESET --runs /shared/runs

The trainer reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): with ``WORLD_SIZE`` above 1 it joins the
process group (:func:`setup`); without it (or with 1) it is the ordinary single process and none of
this runs. Only rank 0 writes the run folder; ``--resume`` needs the folder (config and checkpoint)
readable by every rank, i.e. on a shared file system for several machines.

**Global semantics.** ``train.batch_size`` is the global batch ``B``; with ``W`` processes each takes
``b = B / W`` rows of it. A batch size that is not a multiple of ``W`` is refused in one line
(:func:`shard_of`): equal shards make the average of the per-rank mean losses, which DDP's gradient
average computes, the mean over the global batch, for every family's loss, without re-weighting.
The data order is the single-process one: the epoch's permutation (seeded by the run's seed and the
epoch), cut into global batches of ``B`` (the last ``n mod B`` examples of each permutation are left
out, as in one process: no padding, no repeated examples), and rank ``r`` takes rows
``[r b, (r + 1) b)`` of its step's batch. The training noise comes from
:class:`scorelab.random.ShardedGenerator`: every rank draws the global batch's noise from the shared
stream and keeps its rows, so a 2-process run and a 1-process run with the same global batch reach
the same weights up to the order of float sums (the reduction of the gradient over ranks).

**What is identical on every rank.** Weights (rank 0's initial state is broadcast, DDP keeps the
gradients equal), optimizer moments, EMA, buffers (updated from identical weights only;
``broadcast_buffers`` is off), the noise stream, the divergence guard (it sees the global mean loss)
and every decision between steps: a signal or ``train.max_minutes`` on any rank stops every rank
after the same step (an all-reduce of the flags). Each checkpoint compares a fingerprint of the
state across ranks first (:meth:`Comm.check_in_sync`) and refuses to write a state the ranks
disagree on. Torch's global generator (dropout) is not part of the scheme: rank 0 keeps the
single-process stream, rank ``r > 0`` reseeds it from ``(seed, step, r)`` at every step, so dropout
masks differ between ranks and a resume with the same world size is exact, but a net with dropout
> 0 does not train identically on different numbers of processes.

**Which modules DDP wraps.** A trained module (``Family.modules()``) listed by an optimizer and with
trainable parameters, whose forward the training step calls, is wrapped in
:class:`DataParallel` (DDP that forwards attribute access to the module, so ``modules["G"].z_dim``
works). Frozen modules (a teacher, an autoencoder) and modules without trainable parameters (an
EMA target, a scale buffer) are replicated, never wrapped. A module whose parameters receive
gradients without a call of its forward (VDM's schedule, read through its methods by the learned
path; a VAE's learned likelihood) cannot be served by DDP's hooks: its gradients are averaged by one
all-reduce after the backward pass (:meth:`Comm.all_mean_`). ``find_unused_parameters`` is set only
for a module whose parameters a backward pass reaches only in part (measured in the trainer's dry
run); none of the shipped families needs it. No net in scorelab has BatchNorm in a trained module
(the LeNet feature network, which has, is frozen in eval mode); a trained module with BatchNorm is
refused in one line under torchrun (its statistics would be each rank's shard's; no SyncBatchNorm).

**Faults.** Every collective runs under the process group's timeout (``--dist-timeout``, default
:data:`DEFAULT_TIMEOUT`, or ``$SCORELAB_DIST_TIMEOUT``): a rank that is killed is noticed at once
(its sockets close; torchrun also stops the others), a rank that hangs after the timeout; either
way the others raise :class:`DistributedError` (one line, exit code 2) and write nothing more, so
the last checkpoint stays intact and ``--resume`` continues. Rank 0's own work between steps
(checkpoints, sample grids, monitors) must fit in the timeout: the other ranks wait for it.

**CUDA.** :func:`choose_device` is the one device choice: ``auto`` or ``cuda`` under torchrun is
``cuda:LOCAL_RANK`` (refused when the node has fewer GPUs than processes), an explicit ``cuda:K``
is refused with several processes per node, and the backend follows the device (nccl / gloo).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["Launch", "Comm", "DataParallel", "DistributedError", "launch_from_env", "choose_device", "backend_for",
           "timeout_seconds", "setup", "shutdown", "shard_of", "gather_rows", "own_rows", "mean_over_ranks", "DEFAULT_TIMEOUT",
           "TIMEOUT_ENV"]

DEFAULT_TIMEOUT = 600.0  # seconds a collective may wait for the other ranks (torch's own default for gloo is 1800)
TIMEOUT_ENV = "SCORELAB_DIST_TIMEOUT"  # environment override of the timeout (the command line's --dist-timeout wins)


class DistributedError(ValueError):
    """The processes of a data-parallel run cannot go on together (another rank failed, was killed
    or stopped answering); one line."""


@dataclass(frozen=True)
class Launch:
    """What torchrun tells a process (its environment variables)."""

    rank: int  # RANK: this process among all processes
    world_size: int  # WORLD_SIZE: processes in the job
    local_rank: int  # LOCAL_RANK: this process among those of its machine (its GPU)
    local_world_size: int  # LOCAL_WORLD_SIZE: processes on this machine
    master_addr: str  # MASTER_ADDR: where rank 0's rendezvous store listens
    master_port: int  # MASTER_PORT: its port


def launch_from_env(env=None) -> Launch | None:
    """The torchrun environment of this process, or None when it is a single process (no
    ``WORLD_SIZE``, or ``WORLD_SIZE`` 1). A malformed environment is a :class:`DistributedError`."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return None

    def num(name: str, default: int | None = None) -> int:
        v = env.get(name)
        if v is None:
            if default is None:
                raise DistributedError(f"WORLD_SIZE is set but {name} is not: start the processes with torchrun")
            return default
        try:
            return int(v)
        except ValueError:
            raise DistributedError(f"{name}={v!r} in the environment is not an integer") from None

    world = num("WORLD_SIZE")
    if world < 1:
        raise DistributedError(f"WORLD_SIZE={world} in the environment must be >= 1")
    if world == 1:
        return None
    rank = num("RANK")
    local_rank = num("LOCAL_RANK", 0)
    local_world = num("LOCAL_WORLD_SIZE", world)
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    if not 0 <= local_rank < local_world:
        raise DistributedError(f"LOCAL_RANK={local_rank} is outside 0..{local_world - 1} (LOCAL_WORLD_SIZE={local_world})")
    return Launch(rank, world, local_rank, local_world, env.get("MASTER_ADDR", "127.0.0.1"), num("MASTER_PORT", 29500))


def choose_device(requested: str, launch: Launch | None = None, cuda_count: int | None = None) -> torch.device:
    """The training device for ``train.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:K``): the one
    place where it is chosen.

    A single process: ``auto`` is ``cuda`` when CUDA is available, else ``cpu``. Under torchrun
    (``launch``): ``auto`` / ``cuda`` is ``cuda:LOCAL_RANK`` (one GPU per process) when CUDA is
    available (``auto`` without CUDA: ``cpu``); ``cuda:K`` is refused with more than one process per
    machine (they would share one GPU). ``cuda_count``: GPUs on this machine (default: torch's count)."""
    if cuda_count is None:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        dev = torch.device("cuda" if requested == "auto" and cuda_count else "cpu" if requested == "auto" else requested)
    except RuntimeError:
        raise ValueError(f"train.device {requested!r} is not a device") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"train.device {requested!r} is not supported (cpu, cuda, cuda:N or auto)")
    if dev.type == "cpu":
        return dev
    if not cuda_count:
        raise ValueError(f"train.device is {requested!r} but CUDA is not available")
    if launch is None:
        if dev.index is not None and dev.index >= cuda_count:
            raise ValueError(f"train.device is {requested!r} but this machine has {cuda_count} GPU(s)")
        return dev
    if dev.index is not None and launch.local_world_size > 1:
        raise ValueError(f"train.device {requested!r} names one GPU, but torchrun starts {launch.local_world_size} processes "
                         "on this machine: use train.device cuda or auto (process LOCAL_RANK takes GPU LOCAL_RANK)")
    index = dev.index if dev.index is not None else launch.local_rank
    if index >= cuda_count:
        raise ValueError(f"process LOCAL_RANK {launch.local_rank} needs GPU {index} but this machine has {cuda_count}: "
                         f"start at most {cuda_count} processes per machine (--nproc_per_node)")
    return torch.device("cuda", index)


def backend_for(device: torch.device) -> str:
    """nccl for CUDA devices, gloo for CPUs."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def timeout_seconds(value: float | str | None = None, env=None) -> float:
    """The collective timeout: ``value`` if given, else ``$SCORELAB_DIST_TIMEOUT``, else
    :data:`DEFAULT_TIMEOUT`; must be a positive finite number of seconds."""
    env = os.environ if env is None else env
    where = "--dist-timeout"
    if value is None and env.get(TIMEOUT_ENV):
        value, where = env[TIMEOUT_ENV], f"${TIMEOUT_ENV}"
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number of seconds, got {value!r}") from None
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"{where} must be a positive number of seconds, got {value!r}")
    return s


def shard_of(batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a global batch of ``batch_size`` held by ``rank`` of ``world``
    processes; ValueError (one line) unless ``batch_size`` is a multiple of ``world``."""
    if batch_size % world:
        lo, hi = world * (batch_size // world), world * (batch_size // world + 1)
        alt = f"{lo} or {hi}" if lo else f"{hi}"
        raise ValueError(f"train.batch_size {batch_size} is not a multiple of the {world} processes: each takes an equal "
                         f"share of the global batch (use e.g. --train.batch_size {alt})")
    b = batch_size // world
    return rank * b, (rank + 1) * b


# --------------------------------------------------------------------------------------
# DDP, forwarding attributes to the module
# --------------------------------------------------------------------------------------
class DataParallel(nn.parallel.DistributedDataParallel):
    """DistributedDataParallel whose unknown attributes are the wrapped module's (``modules["G"].z_dim``,
    ``modules["D"].requires_grad_`` act on the module), and which records whether its forward ran
    with autograd on since the trainer last looked (:attr:`armed`): a backward pass synchronises a
    wrapped module's gradients only after such a forward."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(super().__getattr__("module"), name)

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            self.__dict__["armed"] = True
        return super().forward(*args, **kwargs)

    @property
    def armed(self) -> bool:
        return self.__dict__.get("armed", False)

    def disarm(self) -> None:
        self.__dict__["armed"] = False

    def release(self) -> None:
        """Drop DDP's C++ reducer and logger (their gloo work and threads), leaving the module as it
        is; the wrapper cannot train afterwards. :func:`shutdown` calls it before leaving the group:
        a reducer that outlives the process group and is freed during interpreter teardown (a
        wrapper kept by a reference cycle, e.g. a trainer referenced from its own signal handler's
        closure) aborts the process ("terminate called without an active exception", SIGABRT)."""
        for name in ("reducer", "logger"):
            self.__dict__.pop(name, None)


# --------------------------------------------------------------------------------------
# The process group and the trainer's collectives
# --------------------------------------------------------------------------------------
_GLOO_PREFIX = re.compile(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*")


def is_comm_failure(e: BaseException) -> bool:
    """Whether ``e`` (raised by a collective or by DDP's backward) says the other ranks are gone."""
    dist = torch.distributed
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    if not isinstance(e, RuntimeError):
        return False
    text = str(e)
    return any(s in text for s in ("gloo", "Gloo", "NCCL", "Connection reset", "Connection closed", "Connection refused",
                                   "Broken pipe", "Timed out", "timed out", "ProcessGroup", "Socket"))


class Comm:
    """One rank's handle on the default process group: the trainer's collectives.

    Every method is collective (all ranks call it in the same order) and turns a failure of the
    group into a :class:`DistributedError` naming the timeout."""

    def __init__(self, launch: Launch, device: torch.device, timeout: float):
        self.launch = launch
        self.rank = launch.rank  # this process (0 writes the run folder)
        self.world = launch.world_size  # processes in the job
        self.device = device  # this process's training device
        self.timeout = timeout  # seconds a collective waits for the others
        self.backend = backend_for(device)
        self.wrapped: list[DataParallel] = []  # every DDP wrapper made by :meth:`wrap` (released by :func:`shutdown`)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def lost(self, e: BaseException, what: str = "") -> DistributedError:
        """The one-line error for a failed collective ``e`` (``what``: the work being synchronised)."""
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        text = _GLOO_PREFIX.sub("", text)
        text = text.split(". This is typically caused")[0]
        return DistributedError(f"rank {self.rank} of {self.world} lost the other processes{' ' + what if what else ''}: "
                                f"one was killed, crashed or did not answer within {self.timeout:g} s (--dist-timeout) "
                                f"({text})")

    @contextlib.contextmanager
    def guard(self, what: str = ""):
        """Turn a failure of the process group inside the block into a :class:`DistributedError`."""
        try:
            yield
        except DistributedError:
            raise
        except Exception as e:
            if is_comm_failure(e):
                raise self.lost(e, what) from None
            raise

    # --- collectives ------------------------------------------------------------------
    def all_mean(self, t: Tensor) -> Tensor:
        """The mean over ranks of ``t`` (same shape on every rank), float64 sums, as ``t``'s dtype."""
        buf = t.detach().to(torch.float64).clone()
        with self.guard():
            torch.distributed.all_reduce(buf)
        return (buf / self.world).to(t.dtype)

    def all_mean_(self, tensors: list[Tensor]) -> None:
        """Replace every tensor of ``tensors`` (the same list on every rank) by its mean over ranks,
        one all-reduce per dtype."""
        groups: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            groups.setdefault(t.dtype, []).append(t)
        for ts in groups.values():
            flat = torch.cat([t.detach().reshape(-1) for t in ts])
            with self.guard():
                torch.distributed.all_reduce(flat)
            flat /= self.world
            i = 0
            for t in ts:
                n = t.numel()
                t.copy_(flat[i : i + n].view_as(t))
                i += n

    def mean_value(self, value: float) -> float:
        """The mean over ranks of a Python number (float64)."""
        return float(self.all_mean(torch.tensor([value], dtype=torch.float64, device=self._cdev()))[0])

    def max_ints(self, values: list[int]) -> list[int]:
        """Element-wise maximum over ranks of a list of small integers."""
        buf = torch.tensor(values, dtype=torch.int64, device=self._cdev())
        with self.guard():
            torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MAX)
        return [int(v) for v in buf.tolist()]

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable value of our own: numbers, strings, dicts)."""
        box = [obj if self.is_main else None]
        with self.guard():
            torch.distributed.broadcast_object_list(box, src=0, device=self._cdev())
        return box[0]

    def gather_objects(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        out = [None] * self.world
        with self.guard():
            torch.distributed.all_gather_object(out, obj)
        return out

    def gather_rows(self, t: Tensor) -> Tensor:
        """Every rank's ``t`` (same shape on every rank) concatenated along dim 0 in rank order:
        for a shard of the batch, the global batch's rows in order."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        with self.guard():
            torch.distributed.all_gather(parts, t.detach().contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        with self.guard():
            torch.distributed.barrier()

    def broadcast_modules(self, modules: dict[str, nn.Module]) -> None:
        """Copy rank 0's parameters and buffers of ``modules`` to every rank (in place)."""
        with self.guard("while sharing the initial weights"):
            for m in modules.values():
                for t in list(m.parameters()) + list(m.buffers()):
                    with torch.no_grad():
                        torch.distributed.broadcast(t.data, src=0)

    def agree(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn`` on every rank; if it raised on any rank, raise on every rank (the failing
        rank its own exception, the others a :class:`DistributedError` naming rank and message).
        ``what``: the work, for the message."""
        err: BaseException | None = None
        result = None
        try:
            result = fn()
        except Exception as e:
            err = e
        text = None
        if err is not None:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            text = f"{type(err).__name__}: {first}"
        reports = self.gather_objects(text)
        if err is not None:
            raise err
        for r, rep in enumerate(reports):
            if rep is not None:
                raise DistributedError(f"rank {r} failed {what}: {rep}")
        return result

    def check_in_sync(self, tensors: dict[str, Tensor], step: int) -> None:
        """DistributedError unless every rank holds the same ``tensors``, bit for bit (a 64-bit
        BLAKE2 digest of each tensor's bytes, compared with rank 0's; independent of thread counts)."""
        import hashlib

        names = sorted(tensors)
        digest = []
        for k in names:
            raw = tensors[k].detach().cpu().contiguous().reshape(-1)
            raw = raw if raw.dtype == torch.uint8 else raw.view(torch.uint8)
            h = hashlib.blake2b(raw.numpy().tobytes(), digest_size=8).digest()
            digest.append(int.from_bytes(h, "little", signed=True))
        ref = self.broadcast_object(digest)
        first = next((i for i, (a, b) in enumerate(zip(digest, ref)) if a != b), -1 if len(ref) == len(digest) else 0)
        firsts = self.max_ints([first])
        if firsts[0] >= 0:
            raise DistributedError(f"step {step}: the processes' copies of {names[firsts[0]]} differ, so no checkpoint is "
                                   "written: a step computed something from its own shard only (a family's batch "
                                   "statistic or a per-rank draw); report it with the family's name")

    def wrap(self, module: nn.Module, find_unused: bool) -> DataParallel:
        """``module`` in :class:`DataParallel` (one GPU per process: ``device_ids`` on CUDA)."""
        import inspect

        ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers are not re-broadcast before every forward: they are identical on every rank (the module docstring)
        takes = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
        sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in takes else {"broadcast_buffers": False}
        with self.guard("while setting up DistributedDataParallel"):
            wrapped = DataParallel(module, device_ids=ids, output_device=ids[0] if ids else None,
                                   find_unused_parameters=find_unused, **sync)
        self.wrapped.append(wrapped)
        return wrapped

    def _cdev(self) -> torch.device:
        """Where small collective buffers live (nccl needs them on the GPU)."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


_COMM: Comm | None = None


def setup(requested_device: str, timeout: float | None = None, env=None) -> tuple[torch.device, Comm | None]:
    """``(device, comm)`` of this process: the device of :func:`choose_device`, and under torchrun a
    :class:`Comm` on the default process group (joined here once per process, gloo / nccl by device,
    the collective timeout of :func:`timeout_seconds`); ``comm`` is None for a single process."""
    global _COMM
    launch = launch_from_env(env)
    device = choose_device(requested_device, launch)
    if launch is None:
        return device, None
    dist = torch.distributed
    if not dist.is_available():
        raise DistributedError("torch.distributed is not available in this build of torch: cannot train under torchrun")
    secs = timeout_seconds(timeout, env)
    if _COMM is not None and dist.is_initialized():
        if _COMM.device != device:
            raise DistributedError(f"this process already trains on {_COMM.device}; train.device now gives {device}")
        return device, _COMM
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=secs),
                                    **({"device_id": device} if device.type == "cuda" else {}))
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(f"rank {launch.rank} of {launch.world_size} could not join the process group at "
                                   f"{launch.master_addr}:{launch.master_port} ({backend_for(device)}): {first}") from None
    _COMM = Comm(launch, device, secs)
    return device, _COMM


def shutdown() -> None:
    """Leave the process group (if this process joined one).

    In this order: release every DDP wrapper's reducer (:meth:`DataParallel.release`), collect
    garbage, then ``destroy_process_group``. The other order, or no call at all, leaves gloo work
    owned by a reducer to be freed while the interpreter is torn down, which aborts the process
    (SIGABRT) at random: whether the reducer is still alive then depends on when the garbage
    collector last ran."""
    global _COMM
    import gc

    if _COMM is not None:
        for w in _COMM.wrapped:
            w.release()
        _COMM.wrapped.clear()
    gc.collect()
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _COMM = None


def rank_from_env(env=None) -> int:
    """This process's RANK under torchrun (0 otherwise, or when the environment is malformed)."""
    env = os.environ if env is None else env
    try:
        return int(env.get("RANK", "0")) if int(env.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


# --------------------------------------------------------------------------------------
# For families: the few computations that couple the rows of a batch
# --------------------------------------------------------------------------------------
def _comm_of(ctx) -> Comm | None:
    return getattr(ctx, "comm", None)


def gather_rows(t: Tensor, ctx) -> Tensor:
    """The rows of every rank's ``t`` in rank order (for a per-example tensor: the global batch's),
    without gradient; ``t`` itself in one process or for a ``ctx`` with no process group. For a
    statistic of the whole batch (e.g. the latent family's first-batch std)."""
    comm = _comm_of(ctx)
    return t if comm is None else comm.gather_rows(t)


def own_rows(t: Tensor, ctx) -> Tensor:
    """This rank's rows of a global-batch tensor ``t`` (the inverse of :func:`gather_rows`); ``t``
    itself in one process."""
    comm = _comm_of(ctx)
    if comm is None:
        return t
    b = t.shape[0] // comm.world
    return t[comm.rank * b:(comm.rank + 1) * b]


def mean_over_ranks(t: Tensor, ctx) -> Tensor:
    """The mean over ranks of ``t`` (e.g. the gradient of a shard's mean loss: its mean over ranks is
    the gradient of the global mean loss), without gradient; ``t`` itself in one process."""
    comm = _comm_of(ctx)
    return t if comm is None else comm.all_mean(t)


def say(text: str) -> None:
    """One line on stderr, from rank 0 only."""
    if rank_from_env() == 0:
        print(text, file=sys.stderr)
