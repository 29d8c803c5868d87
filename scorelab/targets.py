"""What a network predicts, and the one conversion table between all of it.

Given ``x_t = alpha x_0 + sigma eps`` every prediction kind is linear in ``(x_0, eps)``:

=========== =====================================================
kind        value
=========== =====================================================
``eps``     eps
``x0``      x_0
``v``       alpha eps - sigma x_0                (Salimans & Ho 2022)
``score``   -eps / sigma                         (Tweedie: grad log p_t(x_t))
``velocity`` alpha' x_0 + sigma' eps             (rectified flow: eps - x_0)
=========== =====================================================

so any kind converts into any other through ``(x_0, eps)`` given ``x_t`` and the path's
coefficients. Samplers never see a network's own kind: they ask a :class:`Denoiser` (network +
path + kind) for what they need.
"""

from __future__ import annotations

import weakref
from typing import Callable, Protocol

import torch
from torch import Tensor

from .paths import Coefficients, Path

__all__ = ["KINDS", "PRECONDITIONINGS", "to_x0_eps", "from_x0_eps", "convert", "mse_factor", "Prediction", "Denoiser", "DenoiserLike",
           "register_times", "registered_time"]

KINDS = ("eps", "x0", "v", "score", "velocity")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown prediction kind {kind!r}: expected one of {', '.join(KINDS)}")


def to_x0_eps(value: Tensor, kind: str, x_t: Tensor, c: Coefficients) -> tuple[Tensor, Tensor]:
    """Recover ``(x_0, eps)`` from a prediction of ``kind`` at ``x_t``.

    ``c`` must already broadcast against ``x_t`` (``Coefficients.to(x_t)``).
    """
    _check_kind(kind)
    if kind == "eps":
        return (x_t - c.sigma * value) / c.alpha, value
    if kind == "x0":
        return value, (x_t - c.alpha * value) / c.sigma
    if kind == "score":
        eps = -c.sigma * value
        return (x_t - c.sigma * eps) / c.alpha, eps
    if kind == "v":
        # [alpha  sigma; -sigma  alpha] [x0; eps] = [x_t; v]
        n = c.alpha**2 + c.sigma**2
        return (c.alpha * x_t - c.sigma * value) / n, (c.sigma * x_t + c.alpha * value) / n
    # velocity: [alpha  sigma; alpha'  sigma'] [x0; eps] = [x_t; u]
    det = c.alpha * c.d_sigma - c.sigma * c.d_alpha
    return (c.d_sigma * x_t - c.sigma * value) / det, (c.alpha * value - c.d_alpha * x_t) / det


def from_x0_eps(x0: Tensor, eps: Tensor, kind: str, c: Coefficients) -> Tensor:
    """The value of ``kind`` for given ``(x_0, eps)``."""
    _check_kind(kind)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "score":
        return -eps / c.sigma
    if kind == "v":
        return c.alpha * eps - c.sigma * x0
    return c.d_alpha * x0 + c.d_sigma * eps


def convert(value: Tensor, from_kind: str, to_kind: str, x_t: Tensor, c: Coefficients) -> Tensor:
    """Convert a prediction between any two kinds at ``x_t: (B, ...)``; ``c`` from ``path.coefficients(t)``."""
    if from_kind == to_kind:
        _check_kind(from_kind)
        return value
    c = c.to(x_t)
    return from_x0_eps(*to_x0_eps(value, from_kind, x_t, c), to_kind, c)


def mse_factor(kind: str, c: Coefficients) -> Tensor:
    """``w`` with ``|target - pred|^2 = w |x_0 - x0_pred|^2`` when both come from the same ``x_t``.

    Used to move a weighting given for one target (e.g. min-SNR on x_0) onto another.
    eps: SNR; v: (alpha^2+sigma^2)^2/sigma^2; score: alpha^2/sigma^4; velocity: (alpha' - sigma' alpha/sigma)^2.
    """
    _check_kind(kind)
    a, s = c.alpha, c.sigma
    return {
        "x0": lambda: torch.ones_like(a),
        "eps": lambda: (a / s) ** 2,
        "v": lambda: (a**2 + s**2) ** 2 / s**2,
        "score": lambda: a**2 / s**4,
        "velocity": lambda: (c.d_alpha - c.d_sigma * a / s) ** 2,
    }[kind]()


class Prediction:
    """A denoiser's answer at ``(x_t, t)``: the estimates of ``x_0`` and ``eps``, each (B, ...).

    ``Prediction(x_t, coefficients, x0, eps)`` holds given estimates (``coefficients`` broadcast
    against ``x_t``). :meth:`of_kind` holds instead one network output ``value`` of a prediction
    ``kind`` and converts it only when asked (``x0`` and ``eps`` are then ``to_x0_eps(value, kind,
    x_t, c)``, computed on first access and kept), so a sampler that needs one linear combination
    ``a x0 + b eps`` pays for it once (:meth:`terms`) instead of for both conversions and the sum.
    """

    __slots__ = ("x_t", "_c", "_x0", "_eps", "_value", "_kind", "_at", "_c64", "_ax0")

    def __init__(self, x_t: Tensor, coefficients: Coefficients, x0: Tensor, eps: Tensor):
        self.x_t, self._c, self._x0, self._eps = x_t, coefficients, x0, eps
        self._value = self._kind = self._at = self._c64 = self._ax0 = None

    @classmethod
    def of_kind(cls, x_t: Tensor, value: Tensor, kind: str, at, c64: tuple) -> "Prediction":
        """The prediction whose ``kind`` is ``value`` at ``x_t``, converted lazily.

        ``at.c0``: the coefficients at this time as 0-d tensors in the dtype of ``x_t`` (the
        conversions then run exactly as ``to_x0_eps`` with broadcast ones); ``c64``: the same as
        float64 Python floats ``(alpha, sigma, d_alpha, d_sigma)``, for :meth:`terms`.
        """
        p = cls.__new__(cls)
        p.x_t, p._c, p._x0, p._eps = x_t, None, None, None
        p._value, p._kind, p._at, p._c64, p._ax0 = value, kind, at, c64, None
        if kind == "x0":
            p._x0 = value
        elif kind == "eps":
            p._eps = value
        return p

    @classmethod
    def given(cls, x_t: Tensor, x0: Tensor, eps: Tensor, at) -> "Prediction":
        """Given estimates ``x0, eps`` at a registered time ``at`` (its coefficients made only if asked)."""
        p = cls.__new__(cls)
        p.x_t, p._c, p._x0, p._eps = x_t, None, x0, eps
        p._value = p._kind = p._c64 = p._ax0 = None
        p._at = at
        return p

    def _convert(self) -> None:
        self._x0, self._eps = to_x0_eps(self._value, self._kind, self.x_t, self._at.c0)

    @property
    def x0(self) -> Tensor:
        if self._x0 is None:
            self._convert()
        return self._x0

    @property
    def eps(self) -> Tensor:
        if self._eps is None:
            self._convert()
        return self._eps

    @property
    def coefficients(self) -> Coefficients:
        """The path's coefficients at this time, broadcast against ``x_t``: fields (B, 1, ..., 1)."""
        if self._c is None:
            x, c0 = self.x_t, self._at.c0
            shape = (x.shape[0],) + (1,) * (x.ndim - 1)
            self._c = Coefficients(*(v.to(x.device).expand(shape) for v in (c0.alpha, c0.sigma, c0.d_alpha, c0.d_sigma)))
        return self._c

    def get(self, kind: str) -> Tensor:
        return from_x0_eps(self.x0, self.eps, kind, self._at.c0 if self._c is None else self._c)

    @property
    def score(self) -> Tensor:
        return self.get("score")

    def terms(self, a: float, b: float) -> list[tuple[float, Tensor]]:
        """``a x0 + b eps`` as a list of ``(coefficient, tensor)`` pairs to be summed (Python floats).

        For a lazy prediction of a network output ``u`` these are two terms in ``(x_t, u)``, from
        the table's linear maps (e.g. eps: ``x0 = (x_t - sigma u) / alpha``, so ``a x0 + b eps =
        (a / alpha) x_t + (b - a sigma / alpha) u``); otherwise ``[(a, x0), (b, eps)]``. Zero
        coefficients are dropped. A lazy eps prediction asked for ``x0`` alone (``b = 0``, as the
        multistep solvers do with their history) is one term instead, ``(a / alpha) (x_t - sigma u)``,
        with ``x_t - sigma u`` formed once and kept: a prediction reused by several updates costs one
        operation, not two per update. The terms do not depend on whether ``x0`` was asked for before
        (a callback reading it changes no result).
        """
        if self._value is not None:
            if b == 0 and self._kind == "eps" and self._c64[0] != 0:
                if self._ax0 is None:
                    self._ax0 = torch.add(self.x_t, self._value, alpha=-self._c64[1])  # alpha x0 = x_t - sigma u
                return [(a / self._c64[0], self._ax0)] if a != 0 else []
            lin = _linear_map(self._kind, self._c64, a, b)
            if lin is not None:
                cx, cu = lin
                return [(cx, self.x_t), (cu, self._value)]
        out = []
        if a != 0:
            out.append((a, self.x0))
        if b != 0:
            out.append((b, self.eps))
        return out


def _linear_map(kind: str, c64: tuple, a: float, b: float) -> tuple[float, float] | None:
    """``(p, q)`` with ``a x0 + b eps = p x_t + q u`` for a prediction ``u`` of ``kind``; None where a
    coefficient divides by zero (alpha = 0 for eps / score, sigma = 0 for x0, ...)."""
    al, si, da, ds = c64
    try:
        if kind == "eps":
            return a / al, b - a * si / al
        if kind == "x0":
            return b / si, a - b * al / si
        if kind == "v":
            n = al * al + si * si
            return (a * al + b * si) / n, (b * al - a * si) / n
        if kind == "score":
            return a / al, a * si * si / al - b * si
        det = al * ds - si * da  # velocity
        return (a * ds - b * da) / det, (b * al - a * si) / det
    except ZeroDivisionError:
        return None


# Times a sampler registered in bulk (see :func:`register_times`): id(time tensor) -> _TimePoint; an
# entry holds a weak reference to its tensor and leaves the table when the tensor is freed.
_TIMES: dict[int, "_TimePoint"] = {}


class _TimeTable:
    """What every evaluation on one registered grid needs, made once for all its times.

    ``c64``: per time ``(alpha, sigma, d_alpha, d_sigma)`` as float64 Python floats; ``cx``: the same
    (N, 4) in the sampler's dtype (element for element what ``Coefficients.to(x)`` gives); the 0-d
    coefficient tensors (:meth:`c0`) and the net's time inputs (:meth:`tau`) are made on first use.
    ``memo``: other values a denoiser derives per time (its scalings), by key.
    """

    __slots__ = ("path", "dtype", "batch", "ts", "c64", "cx", "_c0", "_tau", "memo", "points")

    def __init__(self, path, ts, x, c):
        self.path, self.dtype, self.batch, self.ts = path, x.dtype, x.shape[0], ts
        c64 = torch.stack([c.alpha, c.sigma, c.d_alpha, c.d_sigma], 1).detach().cpu()  # (N, 4) float64
        self.c64 = [tuple(r) for r in c64.tolist()]
        self.cx = c64.to(x.dtype)
        self._c0: dict[int, Coefficients] = {}
        self._tau: dict = {}
        self.memo: dict = {}
        self.points: list = []  # the _TimePoint of each time, in order (set by register_times)

    def c0(self, i: int) -> Coefficients:
        c = self._c0.get(i)
        if c is None:
            c = self._c0[i] = Coefficients(*self.cx[i].unbind(0))
        return c

    def tau(self, dtype: torch.dtype, i: int) -> Tensor:
        """``path.c_noise(t_i).to(dtype)`` of shape (B,), computed for the whole grid on first use."""
        rows = self._tau.get(dtype)
        if rows is None:
            tau = self.path.c_noise(self.ts).to(dtype)  # (N,), elementwise as c_noise of each (B,) time
            rows = self._tau[dtype] = tau[:, None].expand(len(tau), self.batch).contiguous().unbind(0)
        return rows[i]


class _TimePoint:
    """One registered time tensor: its grid (:class:`_TimeTable`) and its index there."""

    __slots__ = ("ref", "version", "table", "i")

    def __init__(self, t: Tensor, table: _TimeTable, i: int):
        key = id(t)
        self.ref = weakref.ref(t, lambda _, key=key: _TIMES.pop(key, None))
        self.version, self.table, self.i = t._version, table, i

    @property
    def c64(self) -> tuple:
        return self.table.c64[self.i]

    @property
    def c0(self) -> Coefficients:
        return self.table.c0(self.i)


def register_times(path: Path, ts: Tensor, x: Tensor, c: Coefficients | None = None) -> list[Tensor]:
    """The (B,) float64 time tensors of the grid ``ts: (N,)`` for ``x: (B, ...)``, with the path's
    coefficients at each computed here in bulk, once.

    A :class:`Denoiser` (or any denoiser that asks :func:`registered_time`) evaluated at one of
    these tensors uses the stored coefficients instead of recomputing them; the values are the
    same as ``path.coefficients(t).to(x)`` gives. Any other time tensor (or one changed in place)
    goes the ordinary way. ``c``: ``path.coefficients(ts)`` if the caller has it already.
    """
    ts = ts.to(torch.float64)
    c = path.coefficients(ts) if c is None else c
    ts_dev = ts.to(x.device)
    table = _TimeTable(path, ts_dev, x, c)
    times = ts_dev[:, None].expand(len(ts), x.shape[0]).unbind(0)  # N views of shape (B,)
    for i, t in enumerate(times):
        _TIMES[id(t)] = _TimePoint(t, table, i)
        table.points.append(_TIMES[id(t)])
    return list(times)


def registered_time(t: Tensor, path: Path, x: Tensor) -> _TimePoint | None:
    """The stored :class:`_TimePoint` of ``t`` when :func:`register_times` made it for ``path`` and a
    batch like ``x`` (same dtype and size) and it has not been changed in place since; else None."""
    e = _TIMES.get(id(t))
    if e is None or e.ref() is not t or e.version != t._version:
        return None
    tab = e.table
    if tab.path is not path or tab.dtype != x.dtype or tab.batch != x.shape[0]:
        return None
    return e


class DenoiserLike(Protocol):
    """Anything a sampler can use: a path and ``predict(x, t, **cond) -> Prediction``."""

    path: Path

    def predict(self, x: Tensor, t: Tensor, **cond) -> Prediction: ...


def as_time_batch(t, x: Tensor) -> Tensor:
    """``t`` as a float64 tensor of shape (B,) for ``x: (B, ...)``."""
    if isinstance(t, Tensor) and t.dtype is torch.float64 and t.ndim == 1 and t.device == x.device:
        return t  # already one (what torch.as_tensor below would return as is)
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t


PRECONDITIONINGS = ("none", "input", "edm")


class Denoiser:
    """A network seen through a path: answers any prediction kind.

    ``net(x_in, tau, **cond)`` returns a tensor with the shape of ``x_t``; ``tau = path.c_noise(t)``
    is the network's order-one time input (EDM's ``c_noise``: the time map lives here, with the
    rest of the preconditioning, not in the networks). The network runs in its own dtype
    (``net_dtype``, default: that of its first parameter), under ``torch.autocast(autocast)`` when
    ``autocast`` is a dtype (the run's ``train.precision``); its output is cast back to the
    sampler's dtype before any conversion, so the conversions run in the sampler's precision.

    Preconditioning (Karras et al. 2022, Table 1), written for any path by working in
    ``x~ = x_t / alpha`` with noise level ``s = sigma / alpha`` (on VE / EDM paths ``alpha = 1``)::

        c_in   = 1 / sqrt(s^2 + sigma_data^2)
        c_skip = sigma_data^2 / ((s - sigma_min)^2 + sigma_data^2)
        c_out  = (s - sigma_min) sigma_data / sqrt(s^2 + sigma_data^2)
        D(x_t, t) = c_skip x~ + c_out F(c_in x~, c_noise(t))          (an estimate of x_0)

    ``precond``: ``"none"`` (``F`` sees ``x_t`` and outputs ``kind``), ``"input"`` (``F`` sees
    ``c_in x~ = x_t / sqrt(sigma^2 + alpha^2 sigma_data^2)`` so that its input has unit variance at
    every noise level, and outputs ``kind``; VE paths need it: at ``sigma_max = 40`` the raw input is
    40 times the data) or ``"edm"`` (the whole form; the denoiser's ``kind`` is then ``x0``).
    ``sigma_min = 0`` is EDM; consistency models set it to the smallest noise level so that
    ``c_skip(sigma_min) = 1``, ``c_out(sigma_min) = 0`` and ``D(x, sigma_min) = x`` exactly (Song et
    al. 2023). The scalings are computed from ``alpha, sigma`` without dividing by ``alpha``, so
    they stay finite at rectified flow's ``alpha = 0``.
    ``input_sigma_data > 0`` is the older spelling of ``precond="input", sigma_data=input_sigma_data``.
    """

    def __init__(self, net: Callable[..., Tensor], path: Path, kind: str = "eps", net_dtype: torch.dtype | None = None,
                 input_sigma_data: float = 0.0, *, precond: str = "none", sigma_data: float = 0.5, sigma_min: float = 0.0,
                 autocast: torch.dtype | None = None):
        _check_kind(kind)
        if not input_sigma_data >= 0:
            raise ValueError(f"input_sigma_data must be >= 0 (0: no input scaling), got {input_sigma_data}")
        if input_sigma_data > 0:
            if precond not in ("none", "input"):
                raise ValueError("give either input_sigma_data or precond, not both")
            precond, sigma_data = "input", input_sigma_data
        if precond not in PRECONDITIONINGS:
            raise ValueError(f"unknown precond {precond!r}: expected one of {', '.join(PRECONDITIONINGS)}")
        if precond == "edm" and kind != "x0":
            raise ValueError(f"precond 'edm' makes the denoiser an x0 estimate: kind must be 'x0', got {kind!r}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        if not sigma_min >= 0:
            raise ValueError(f"sigma_min must be >= 0, got {sigma_min}")
        self.net = net  # the raw network F (or any callable)
        self.path = path  # the forward process the network was trained on
        self.kind = kind  # what the (preconditioned) network outputs
        self.precond = precond  # none | input | edm
        self.sigma_data = float(sigma_data)  # expected std of the data (EDM: 0.5)
        self.sigma_min = float(sigma_min)  # noise level where D is the identity (consistency models; 0: EDM)
        self.input_sigma_data = self.sigma_data if precond == "input" else 0.0
        self.autocast = autocast  # autocast dtype of the network call (None: the net's own dtype)
        if net_dtype is None and isinstance(net, torch.nn.Module):
            p = next(iter(net.parameters()), None)
            net_dtype = p.dtype if p is not None else None
        self.net_dtype = net_dtype

    def scalings(self, c: Coefficients) -> tuple[Tensor, Tensor, Tensor]:
        """``(c_in, c_skip, c_out)`` acting on ``x_t`` (so ``c_in`` and ``c_skip`` include the ``1/alpha``), shapes of ``c``."""
        a, s, sd, sm = c.alpha, c.sigma, self.sigma_data, self.sigma_min
        r = torch.sqrt(s**2 + (sd * a) ** 2)
        d = s - sm * a
        return 1 / r, sd**2 * a / (d**2 + (sd * a) ** 2), d * sd / r

    def _net(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        dt = self.net_dtype or x.dtype
        tau = self.path.c_noise(t)
        if self.autocast is None:
            return self.net(x.to(dt), tau.to(dt), **cond)
        with torch.autocast(x.device.type, dtype=self.autocast):
            return self.net(x.to(dt), tau.to(dt), **cond)

    def raw(self, x: Tensor, t, **cond) -> Tensor:
        """The (preconditioned) network's output, of kind ``self.kind``, in the dtype of ``x``."""
        t = as_time_batch(t, x)
        if self.precond == "none":
            return self._net(x, t, **cond).to(x.dtype)
        c_in, c_skip, c_out = self.scalings(self.path.coefficients(t).to(x))
        out = self._net(x * c_in, t, **cond).to(x.dtype)
        if self.precond == "input":
            return out
        return c_skip * x + c_out * out

    def predict(self, x: Tensor, t, **cond) -> Prediction:
        """``(x0, eps)`` at ``(x, t)``: ``to_x0_eps(self.raw(x, t), self.kind, x, c)``.

        At a time a sampler registered (:func:`register_times`) the same values are computed from the
        stored coefficients, the net's time input is made once per time, and the conversion is left
        to the sampler's first use (:meth:`Prediction.of_kind`).
        """
        e = _TIMES.get(id(t))  # registered_time(t, self.path, x), inlined: this is the per-step path
        tab = None if e is None or e.ref() is not t or e.version != t._version else e.table
        if tab is None or tab.path is not self.path or tab.dtype != x.dtype or tab.batch != x.shape[0]:
            t = as_time_batch(t, x)
            c = self.path.coefficients(t).to(x)
            x0, eps = to_x0_eps(self.raw(x, t, **cond), self.kind, x, c)
            return Prediction(x, c, x0, eps)
        return Prediction.of_kind(x, self._output(x, tab, e.i, cond), self.kind, e, tab.c64[e.i])

    def _output(self, x: Tensor, tab: "_TimeTable", i: int, cond: dict) -> Tensor:
        """:meth:`raw` at the registered time ``i`` of ``tab``, from its stored coefficients and time inputs."""
        dt = self.net_dtype or x.dtype
        rows = tab._tau.get(dt)
        tau = rows[i] if rows is not None else tab.tau(dt, i)  # path.c_noise(t).to(dt), as _net makes it
        if self.precond != "none":
            key = ("scalings", self.sigma_data, self.sigma_min, i)
            sc = tab.memo.get(key)
            if sc is None:  # the scalings of raw(), from the coefficients in x's dtype
                sc = tab.memo[key] = tuple(float(v) for v in self.scalings(tab.c0(i)))
            x_in = x * sc[0]
        else:
            x_in = x
        x_in = x_in if x_in.dtype is dt else x_in.to(dt)
        if self.autocast is None:
            out = self.net(x_in, tau, **cond)
        else:
            with torch.autocast(x.device.type, dtype=self.autocast):
                out = self.net(x_in, tau, **cond)
        out = out if out.dtype is x.dtype else out.to(x.dtype)
        if self.precond == "edm":
            out = sc[1] * x + sc[2] * out  # c_skip x~ + c_out F: an x0 estimate
        return out

    def outputs_at(self, times: list[Tensor], x: Tensor, cond: dict | None = None):
        """A sampler's fast path: ``(output, prediction)`` on one grid's registered ``times``
        (:func:`register_times`, for this path and batches like ``x``), or None.

        ``times`` is the list :func:`register_times` returned. ``output(x, i)`` is the network's output
        of ``self.kind`` at ``(x, times[i])`` (:meth:`raw`), the tensor :meth:`predict` wraps, without
        the :class:`Prediction`; ``prediction(x, u, i)`` the Prediction ``predict`` returns for it
        (``u = output(x, i)``); the coefficients of each time are ``registered_time(times[i], ...).c64``.
        None as well when ``predict`` is not this class's own (a subclass, or one replaced on the
        instance), whose answers these would not be.
        """
        e = registered_time(times[0], self.path, x)
        if e is None or type(self).predict is not Denoiser.predict or "predict" in self.__dict__:
            return None
        tab, kind, cond = e.table, self.kind, cond or {}
        if e.i != 0 or len(times) != len(tab.points):
            return None
        points = tab.points
        if self.precond == "none" and self.autocast is None and (self.net_dtype or x.dtype) is x.dtype:
            net, dtype = self.net, x.dtype
            tab.tau(dtype, 0)
            tau = tab._tau[dtype]  # path.c_noise(times[i]).to(dtype), made once per grid

            def output(x: Tensor, i: int) -> Tensor:  # _output() without the branches it does not take here
                out = net(x, tau[i], **cond)
                return out if out.dtype is dtype else out.to(dtype)
        else:
            def output(x: Tensor, i: int) -> Tensor:
                return self._output(x, tab, i, cond)

        def prediction(x: Tensor, u: Tensor, i: int) -> Prediction:
            return Prediction.of_kind(x, u, kind, points[i], tab.c64[i])

        return output, prediction

    def __call__(self, x: Tensor, t, kind: str = "x0", **cond) -> Tensor:
        """The prediction of ``kind`` at ``(x, t)`` (the raw output when ``kind`` is the net's own)."""
        if kind == self.kind:
            return self.raw(x, t, **cond)
        return self.predict(x, t, **cond).get(kind)
