"""Samplers: pure functions ``fn(denoiser, x, ts, *, generator, callback, cond, **opts) -> x``.

Every sampler integrates the reverse of the forward process ``x_t = alpha(t) x_0 + sigma(t) eps``
of ``denoiser.path`` over a decreasing time grid ``ts`` (from :func:`scorelab.paths.time_grid`),
asking the denoiser only for its estimates ``x0_hat = E[x_0 | x_t]`` and
``eps_hat = E[eps | x_t]`` (``score = -eps_hat / sigma``). No sampler knows how the model was
trained (Crowson's k-diffusion shape: ``sample_heun(model, x, sigmas)``). :func:`sample` is the
entry point: it builds the grid, draws the start, picks the default sampler of the path
(:func:`default_sampler`) and runs without autograd.

Conventions shared by all samplers
----------------------------------
* ``denoiser``: anything with ``.path`` and ``.predict(x, t, **cond) -> Prediction``;
  ``t`` is passed as a float64 tensor of shape (B,).
* ``x``: the start sample (B, ...), usually ``path.prior_sample``; the sampler integrates in
  ``x``'s dtype (float64 for low-dimensional data).
* ``ts``: 1-D float64 times, strictly decreasing (a grid never repeats a time: ValueError);
  ``ts[0]`` is usually ``t_max`` and the last entry ``t_clean`` (sigma = 0, alpha = 1). A step
  whose target time has sigma == 0 returns the denoised estimate ``x0_hat`` of the current point
  (one NFE). A step that starts at sigma == 0 (already clean) is skipped at no cost.
* ``generator``: ``None``, a ``torch.Generator`` or a list of generators (one per example, which
  makes the result of example i independent of the batch); all noise comes from
  :func:`scorelab.random.randn_like`.
* ``callback``: called after each step with ``dict(i=i, t=t_i, t_next=t_{i+1}, x=x, x0=x0_hat)``
  (``x`` after the step, ``x0`` the prediction made at ``t_i``).
* ``cond``: dict of extra keyword arguments forwarded to ``denoiser.predict`` (e.g. labels ``y``).

Notation for one step ``t -> s`` (s < t): ``alpha_t, sigma_t, alpha_s, sigma_s``;
``alpha_ts = alpha_t / alpha_s`` and ``sigma2_ts = sigma_t^2 - alpha_ts^2 sigma_s^2`` (the
forward transition ``q(x_t | x_s) = N(alpha_ts x_s, sigma2_ts I)``).
``log_snr = lambda = 2 log(alpha / sigma)`` is the full log-SNR, as in :mod:`scorelab.paths`.
The exponential integrators (DDIM, DPM-Solver++, UniPC) are written, as in their papers, in
``half_log_snr = log(alpha / sigma) = lambda / 2``; their step is ``h = half_log_snr_s -
half_log_snr_t > 0``. ``rho = sigma / alpha = exp(-half_log_snr)`` is the VE-equivalent noise
level of EDM's sampler (:func:`sample_heun_edm`).

NFE (denoiser evaluations): :func:`nfe_per_step` per step and :func:`count_nfe` for a whole
run; both are exact: the count a sampler reports is the count it spends.

Multistep orders: a step longer than ``pi / 2`` in half log-SNR is taken at first order
(:data:`MAX_MULTISTEP_H`, the convergence radius of a Gaussian posterior mean's Taylor series).

Speed: a grid's coefficients are computed once and kept for the same path object, times and
batch layout (``_Grid``); every time tensor handed to the denoiser is registered with them
(:func:`scorelab.targets.register_times`), so a :class:`~scorelab.targets.Denoiser` evaluation
costs the network plus a handful of Python operations; DDIM, DPM-Solver++(2M) and UniPC precompute
their per-step weights once per grid (a "plan"), and each update is one linear combination
(:func:`_lincomb`) of the current point and the raw network outputs (:meth:`Prediction.terms`).
On a :class:`~scorelab.targets.Denoiser` without autograd (as :func:`sample` runs) these three skip
the Prediction objects too and step on the network's raw outputs
(:meth:`~scorelab.targets.Denoiser.outputs_at`): DDIM with the same two tensor operations per step
(:func:`_ddim_fast`: the same results), the multistep solvers with one matrix product per step over
a buffer of the last (x, output) pairs (:func:`_multistep`: the same sum in another order, equal to
float rounding). At batch 1 a tensor operation costs about a microsecond and the step a few more
than the network alone (``benchmarks/sampler_overhead.py``). The results are those of the formulas
in the docstrings up to float rounding (``tests/test_samplers_robust.py`` pins every sampler, and
the fast paths, to a direct float64 implementation to 1e-12).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor

from .paths import EDM, VE, Path, RectifiedFlow, SubVP, time_grid
from .random import Generator, randn_like
from .targets import Prediction, _linear_map, register_times

__all__ = [
    "sample_ancestral",
    "sample_ddim",
    "sample_euler",
    "sample_heun",
    "sample_heun_edm",
    "sample_dpmpp_2m",
    "sample_dpmpp_3m",
    "sample_unipc",
    "sample_euler_maruyama",
    "sample_pc",
    "langevin",
    "sample_annealed_langevin",
    "SAMPLERS",
    "DETERMINISTIC",
    "nfe_per_step",
    "count_nfe",
    "steps_for_nfe",
    "default_sampler",
    "check_combination",
    "sample",
]

Callback = Callable[[dict], None] | None


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------
def _path_key(path: Path) -> tuple | None:
    """A key that changes whenever ``path``'s coefficients can: its type, identity and fields
    (numbers and strings by value, tensors by identity and version); None when a field is anything
    else (e.g. a learned schedule's module), and then nothing about the path is cached."""
    items = []
    for k, v in vars(path).items():
        if v is None or isinstance(v, (bool, int, float, str)):
            items.append((k, v))
        elif isinstance(v, Tensor):
            items.append((k, id(v), v._version))
        else:
            return None
    return (type(path), id(path), tuple(items))


class _Cache:
    """A small LRU cache of values computed from a path, each entry held with a weak reference to
    the path it was computed for (a hit needs that very path alive, with unchanged fields)."""

    def __init__(self, size: int):
        self.size, self.data = size, OrderedDict()

    def get(self, path: Path, key: tuple):
        e = self.data.get(key)
        if e is None or e[0]() is not path:
            return None
        self.data.move_to_end(key)
        return e[1]

    def put(self, path: Path, key: tuple, value) -> None:
        self.data[key] = (weakref.ref(path), value)
        self.data.move_to_end(key)
        while len(self.data) > self.size:
            self.data.popitem(last=False)


_GRIDS = _Cache(16)  # (path, times, batch, dtype, device) -> _GridData
_TIME_GRIDS = _Cache(64)  # (path, steps, kind, grid options) -> ts


def _half_log_snr(a: float, s: float) -> float:
    """``log(a / s)``: +inf at a clean time (s = 0), -inf where a = 0."""
    if s == 0:
        return math.inf
    if a == 0:
        return -math.inf
    return math.log(a) - math.log(s)


class _GridData:
    """What one grid costs to prepare: its times and the path's coefficients there as Python floats
    (float64), and the (B,) time tensors handed to the denoiser (registered with those
    coefficients, :func:`~scorelab.targets.register_times`)."""

    def __init__(self, path: Path, ts: Tensor, x: Tensor):
        c = path.coefficients(ts)
        self.ts = ts
        self.t = ts.tolist()
        self.alpha = c.alpha.detach().tolist()
        self.sigma = c.sigma.detach().tolist()
        self.d_alpha = c.d_alpha.detach().tolist()
        self.d_sigma = c.d_sigma.detach().tolist()
        self.times = register_times(path, ts, x, c)  # (B,) float64 time tensors, one per entry
        self.version = self.times[0]._version  # the views share one version counter
        self.sde = None  # (f, g^2) lists, on first use
        self.hl = [_half_log_snr(a, s) for a, s in zip(self.alpha, self.sigma)]  # log(alpha / sigma)
        self.memo: dict = {}  # per-step solver weights, by key (they depend on the grid only)


class _Grid:
    """A sampler's grid ``ts`` for ``denoiser`` and batch ``x`` (see :class:`_GridData`); prepared
    grids are reused across calls for the same path object, times and batch layout."""

    def __init__(self, denoiser, ts, x: Tensor):
        ts = torch.as_tensor(ts, dtype=torch.float64).detach().cpu()
        if ts.ndim != 1 or ts.numel() < 1:
            raise ValueError(f"ts must be a non-empty 1-D tensor of times, got shape {tuple(ts.shape)}")
        t = ts.tolist()
        self.denoiser = denoiser
        self.path = path = denoiser.path
        pk = _path_key(path)
        key = None if pk is None else (pk, tuple(t), x.shape[0], x.dtype, x.device)
        data = None if key is None else _GRIDS.get(path, key)
        if data is None or data.times[0]._version != data.version:
            if any(b >= a for a, b in zip(t, t[1:])):  # (a cached grid has these times: checked when made)
                raise ValueError(f"ts must be strictly decreasing (a grid never repeats a time), got {t}")
            data = _GridData(path, ts, x)
            if key is not None:
                _GRIDS.put(path, key, data)
        self.data = data
        self.ts, self.t, self.times = data.ts, data.t, data.times
        self.alpha, self.sigma, self.d_alpha, self.d_sigma = data.alpha, data.sigma, data.d_alpha, data.d_sigma
        self.hl, self.memo = data.hl, data.memo

    def __len__(self) -> int:
        return len(self.t)

    def steps(self):
        """Indices ``i`` of the steps ``ts[i] -> ts[i+1]`` that do anything (start at sigma > 0)."""
        for i in range(len(self.t) - 1):
            if self.sigma[i] > 0:
                yield i

    def predict(self, x: Tensor, i: int, cond: dict | None) -> Prediction:
        """One denoiser evaluation at ``ts[i]`` for the whole batch."""
        if cond:
            return self.denoiser.predict(x, self.times[i], **cond)
        return self.denoiser.predict(x, self.times[i])

    def outputs(self, x: Tensor, cond: dict | None):
        """The fast path's ``(output, prediction)`` (:meth:`~scorelab.targets.Denoiser.outputs_at`) of the
        denoiser on this grid for batches like ``x``, or None (a denoiser without one: guidance, mixtures)."""
        f = getattr(type(self.denoiser), "outputs_at", None)  # the class's own (not a wrapper's __getattr__)
        return None if f is None else f(self.denoiser, self.times, x, cond)

    def half_log_snr(self, i: int) -> float:
        """``log(alpha_i / sigma_i)`` (half the log-SNR): +inf at a clean time, -inf where alpha = 0."""
        return self.hl[i]

    def order_cap(self, i: int, lower_order_final: bool) -> int:
        """Highest multistep order allowed for step ``i`` (see :func:`_order_cap`)."""
        return _order_cap(self, i, lower_order_final)

    def sde(self, i: int) -> tuple[float, float]:
        """``(f(t_i), g(t_i)^2)`` of the forward SDE ``dx = f x dt + g dw``; finite or a ValueError."""
        if self.data.sde is None:
            f, g2 = self.path.drift(self.ts), self.path.g2(self.ts)
            self.data.sde = (f.detach().tolist(), g2.detach().tolist())
        f, g2 = self.data.sde[0][i], self.data.sde[1][i]
        if not (math.isfinite(f) and math.isfinite(g2)):
            raise ValueError(
                f"reverse SDE of path {self.path!r} is singular at t={self.t[i]} (f={f}, g2={g2}); "
                "start the grid where alpha(t) > 0 (e.g. RectifiedFlow(t_max=0.99))"
            )
        return f, g2


# A multistep step extrapolates the data prediction x0_hat(lambda), a smooth function of the
# log-SNR, from its values at earlier times across the step. For one Gaussian component
# x0_hat = m + sigmoid(lambda + c) (x / alpha - m) in the full log-SNR lambda, whose Taylor series
# about any real point converges only within pi (the poles of the sigmoid at +-i pi), i.e. within
# pi / 2 in half log-SNR; a polynomial extrapolation over a longer step does not converge, so such
# a step is taken at first order (the exponential integrator's exact weight on the current
# prediction). This replaces diffusers' "lower the final orders on grids of fewer than 15 steps",
# whose switch made the error jump between 15 and 16 steps: the step sizes of a grid, unlike its
# length, change smoothly with the number of steps. (Measured on the exact-mixture benchmark: the
# mean log error at NFE 5 / 10 falls by 0.3 / 0.2 and the non-monotone sampler x grid cells
# halve; a rule on the step ratio h / h_prev > 2 instead helped half as much.)
MAX_MULTISTEP_H = math.pi / 2


def _order_cap(g: _Grid, i: int, lower_order_final: bool) -> int:
    """Highest multistep order for step ``i``: 3, or 1 when ``lower_order_final`` and the step is
    longer than :data:`MAX_MULTISTEP_H` in half log-SNR."""
    if not lower_order_final:
        return 3
    h = g.half_log_snr(i + 1) - g.half_log_snr(i)
    if math.isfinite(h) and h > MAX_MULTISTEP_H:
        return 1
    return 3


_SCALARS: dict = {}  # (value, dtype) -> 0-d CPU tensor: multiplying by one is twice as fast as by a float


def _scalar(c: float, dtype: torch.dtype) -> Tensor:
    """``c`` as a 0-d CPU tensor of ``dtype`` (kept: a cached grid's coefficients recur every call).

    ``T * _scalar(c, T.dtype)`` equals ``T * c`` exactly (torch casts a Python scalar to the
    tensor's dtype the same way); a 0-d CPU tensor also multiplies tensors on any device.
    """
    key = (c, dtype)
    v = _SCALARS.get(key)
    if v is None:
        if len(_SCALARS) > 65536:
            _SCALARS.clear()
        v = _SCALARS[key] = torch.tensor(c, dtype=dtype)
    return v


def _lincomb(terms: list[tuple[float, Tensor]]) -> Tensor:
    """``sum_j c_j T_j`` for ``(c_j, T_j)`` pairs with Python-float ``c_j``.

    Terms on the same tensor object are merged first (``x_t`` of a prediction is usually the
    current point), zero coefficients are dropped, and the sum is one multiplication and
    in-place ``add_(T, alpha=c)`` calls: the cheapest way to form it with small tensors.
    """
    if len(terms) == 2:  # the most common case (DDIM, Euler): two distinct tensors
        (c0, T0), (c1, T1) = terms
        if T0 is not T1 and c0 != 0 and c1 != 0:
            return torch.add(T0, T1, alpha=c1) if c0 == 1 else (T0 * _scalar(c0, T0.dtype)).add_(T1, alpha=c1)
    merged: dict[int, list] = {}
    for c, T in terms:
        e = merged.get(id(T))
        if e is None:
            merged[id(T)] = [c, T]
        else:
            e[0] += c
    out, fresh = None, False
    for c, T in merged.values():
        if c == 0:
            continue
        if out is None:
            out, fresh = (T, False) if c == 1 else (T * _scalar(c, T.dtype), True)
        elif fresh:
            out.add_(T, alpha=c)
        else:
            out, fresh = torch.add(out, T, alpha=c), True
    if out is None:
        return torch.zeros_like(terms[0][1])
    return out


def _report(callback: Callback, i: int, g: _Grid, x: Tensor, pred: Prediction) -> None:
    if callback is not None:
        callback(dict(i=i, t=g.t[i], t_next=g.t[i + 1], x=x, x0=pred.x0))


def _c64(g: _Grid, i: int) -> tuple:
    return g.alpha[i], g.sigma[i], g.d_alpha[i], g.d_sigma[i]


def _multistep(g: _Grid, x: Tensor, key: tuple, plan: list, fast, callback: Callback) -> Tensor | None:
    """The fast path of a multistep plan (DPM-Solver++(2M), UniPC) of steps ``(i, clean, r, w)``:

        x_{n+1} = r x_n + sum_j w_j x0_hat_{n-j}     (x0_hat_m: the prediction made at x_m)

    on the raw network outputs ``u_m`` of a :class:`~scorelab.targets.Denoiser` (``fast`` from
    :meth:`_Grid.outputs`; ``key``: the plan's memo key). None where it does not apply: the caller
    then runs its general loop, whose results these are up to float rounding (the same sum, in
    another order).

    Each ``x0_hat_m = p_m x_m + q_m u_m`` (the conversion table of :mod:`scorelab.targets`), so a step
    is one fixed linear combination of the last ``k`` pairs ``(x_m, u_m)``. They are kept as the rows
    of one (2k, N) buffer (a ring: the pair of step n in slot n mod k), and the step is one matrix
    product of a precomputed weight row with it: three tensor operations (copy u_n in, the product,
    copy x_{n+1} in) whatever the order, instead of one per term and conversion (~1 us each at batch 1).
    """
    if fast is None or torch.is_grad_enabled() or not x.is_contiguous():
        return None  # in-place copies into a buffer are not for autograd; keep x's memory layout
    key = key + ("fast", g.denoiser.kind)
    prog = g.memo.get(key)
    if prog is None:
        prog = g.memo[key] = _multistep_program(g, plan, x)
    if prog is False:
        return None
    k, steps = prog
    output, prediction = fast
    H = torch.zeros((2 * k,) + tuple(x.shape), dtype=x.dtype, device=x.device)
    Hm, hs = H.view(2 * k, -1), H.unbind(0)  # hs[2 s], hs[2 s + 1]: x and u of slot s, shaped like x
    y = torch.empty((1, Hm.shape[1]), dtype=x.dtype, device=x.device)
    ys = y.view(x.shape)
    hs[0].copy_(x)
    for i, s, w, s_next in steps:
        xn = hs[s]
        u = output(xn, i)
        if w is None:  # onto a clean time (the last step): x0_hat
            pred = prediction(xn, u, i)
            _report(callback, i, g, pred.x0, pred)
            return pred.x0
        if callback is not None:
            pred = prediction(xn, u, i)
            pred.x0  # made now: the slot of x_n may be the one x_{n+1} goes to
        hs[s + 1].copy_(u)
        torch.mm(w, Hm, out=y)
        x = hs[s_next]
        x.copy_(ys)
        if callback is not None:
            _report(callback, i, g, x.clone(), pred)
    return x.clone()  # not a view of the buffer


def _multistep_program(g: _Grid, plan: list, x: Tensor):
    """``(k, steps)`` for :func:`_multistep`: per step ``(i, row of x_n, weight row (1, 2k) or None on a
    clean step, row of x_{n+1})``; False when the fast path cannot run the plan (a conversion that
    divides by zero, e.g. an eps prediction at alpha = 0; a clean step that is not the last)."""
    k = max([len(w) for _, clean, _, w in plan if not clean], default=1)
    steps, rows = [], []
    for n, (i, clean, r, w) in enumerate(plan):
        if clean:
            if n != len(plan) - 1:
                return False
            steps.append((i, 2 * (n % k), None, None))
            continue
        row = [0.0] * (2 * k)
        row[2 * (n % k)] += r
        for j, c in enumerate(w[: n + 1]):  # w_j x0_hat_{n-j} = w_j (p x_{n-j} + q u_{n-j})
            pq = _linear_map(g.denoiser.kind, _c64(g, plan[n - j][0]), c, 0.0)
            if pq is None:
                return False
            row[2 * ((n - j) % k)] += pq[0]
            row[2 * ((n - j) % k) + 1] += pq[1]
        steps.append((i, 2 * (n % k), len(rows), 2 * ((n + 1) % k)))
        rows.append(row)
    W = torch.tensor(rows, dtype=x.dtype, device=x.device).reshape(len(rows), 1, 2 * k).unbind(0) if rows else ()
    return k, [(i, s, None if r is None else W[r], s1) for i, s, r, s1 in steps]


# --------------------------------------------------------------------------------------
# Ancestral sampling and DDIM
# --------------------------------------------------------------------------------------
def sample_ancestral(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
                     cond: dict | None = None) -> Tensor:
    """Ancestral sampling: draw ``x_s ~ q(x_s | x_t, x_0 = x0_hat)`` at every step (1 NFE per step).

    DDPM (Ho et al. 2020) written for any path in the form of Kingma et al. 2021 (VDM, eq. 32-33):
    with ``alpha_ts = alpha_t / alpha_s`` and ``sigma2_ts = sigma_t^2 - alpha_ts^2 sigma_s^2``,

        mean = alpha_ts sigma_s^2 / sigma_t^2 * x_t + alpha_s sigma2_ts / sigma_t^2 * x0_hat
        var  = sigma2_ts sigma_s^2 / sigma_t^2
        x_s  = mean + sqrt(var) z,   z ~ N(0, I)

    On the VE path this is the SMLD/NCSN ancestral sampler (alpha = 1, sigma2_ts = sigma_t^2 -
    sigma_s^2). A step onto a clean time (sigma_s = 0) returns ``x0_hat``.
    Shapes: ``x`` (B, ...), ``ts`` (N+1,); returns (B, ...).
    """
    g = _Grid(denoiser, ts, x)
    for i in g.steps():
        pred = g.predict(x, i, cond)
        a_t, s_t, a_s, s_s = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        if s_s == 0:
            x = pred.x0
        else:
            a_ts = a_t / a_s
            s2_ts = max(s_t**2 - a_ts**2 * s_s**2, 0.0)
            std = math.sqrt(s2_ts * s_s**2 / s_t**2)
            x = _lincomb([(a_ts * s_s**2 / s_t**2, x)] + pred.terms(a_s * s2_ts / s_t**2, 0.0)
                         + [(std, randn_like(x, generator))])
        _report(callback, i, g, x, pred)
    return x


def sample_ddim(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
                cond: dict | None = None, eta: float = 0.0) -> Tensor:
    """DDIM (Song, Meng & Ermon 2021, eq. 12 and 16) for any path; 1 NFE per step.

        c   = eta * sigma_s * sqrt(sigma2_ts) / sigma_t
        x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,   z ~ N(0, I)

    ``eta = 0`` is deterministic and equals the first-order exponential integrator of the
    probability-flow ODE (DPM-Solver-1 / DPM-Solver++(1)); ``eta = 1`` gives the ancestral
    sampler's transition (same mean and variance as :func:`sample_ancestral`).
    A step onto a clean time returns ``x0_hat``. Shapes: ``x`` (B, ...), ``ts`` (N+1,).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    g = _Grid(denoiser, ts, x)
    plan = g.memo.get(("ddim", eta))
    if plan is None:  # (i, clean, a_s, eps weight, noise std) per step: the grid decides them
        plan = []
        for i in g.steps():
            a_t, s_t, a_s, s_s = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
            if s_s == 0:
                plan.append((i, True, 0.0, 0.0, 0.0))
                continue
            s2_ts = max(s_t**2 - (a_t / a_s) ** 2 * s_s**2, 0.0)
            c = eta * s_s * math.sqrt(s2_ts) / s_t
            plan.append((i, False, a_s, math.sqrt(max(s_s**2 - c**2, 0.0)), c))
        g.memo[("ddim", eta)] = plan
    fast = g.outputs(x, cond)
    if fast is not None:
        return _ddim_fast(g, x, eta, plan, fast, generator, callback)
    predict, times, kw = denoiser.predict, g.times, cond or {}
    for i, clean, a_s, b, c in plan:
        pred = predict(x, times[i], **kw) if kw else predict(x, times[i])
        if clean:
            x = pred.x0
        elif c > 0:
            x = _lincomb(pred.terms(a_s, b) + [(c, randn_like(x, generator))])
        else:
            x = _lincomb(pred.terms(a_s, b))
        if callback is not None:
            _report(callback, i, g, x, pred)
    return x


def _ddim_fast(g: _Grid, x: Tensor, eta: float, plan: list, fast, generator: Generator, callback: Callback) -> Tensor:
    """:func:`sample_ddim`'s loop on the raw network outputs ``u`` of a Denoiser (``fast``:
    :meth:`_Grid.outputs`), with the same operations and so the same results: the pair ``(p, q)``
    with ``a_s x0_hat + b eps_hat = p x + q u`` that ``Prediction.terms`` gives at every step is made
    once per grid and summed by the same :func:`_lincomb`. A step with noise (eta > 0) or any other
    special case goes through a Prediction as in the general loop."""
    key = ("ddim", eta, "fast", g.denoiser.kind)
    fplan = g.memo.get(key)
    if fplan is None:  # per step: (p, q) where the update is p x + q u, else None
        fplan = [None if clean or c > 0 or b == 0 else _linear_map(g.denoiser.kind, _c64(g, i), a_s, b)
                 for i, clean, a_s, b, c in plan]
        g.memo[key] = fplan
    output, prediction = fast
    for (i, clean, a_s, b, c), pq in zip(plan, fplan):
        u = output(x, i)
        pred = prediction(x, u, i) if pq is None or callback is not None else None
        if pq is not None:
            x = _lincomb([(pq[0], x), (pq[1], u)])
        elif clean:
            x = pred.x0
        else:
            x = _lincomb(pred.terms(a_s, b) + ([(c, randn_like(x, generator))] if c > 0 else []))
        if callback is not None:
            _report(callback, i, g, x, pred)
    return x


# --------------------------------------------------------------------------------------
# Probability-flow ODE solvers
# --------------------------------------------------------------------------------------
def sample_euler(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
                 cond: dict | None = None) -> Tensor:
    """Explicit Euler on the probability-flow ODE in the path's own time ``t``; 1 NFE per step.

        dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat   (= f x - 1/2 g^2 score, Song et al. 2021)
        x_s   = x_t + (s - t) dx/dt

    A step onto a clean time returns ``x0_hat``. First order in the step size.
    ``generator`` is unused (deterministic). Shapes: ``x`` (B, ...), ``ts`` (N+1,).
    """
    g = _Grid(denoiser, ts, x)
    for i in g.steps():
        pred = g.predict(x, i, cond)
        if g.sigma[i + 1] == 0:
            x = pred.x0
        else:
            dt = g.t[i + 1] - g.t[i]
            x = _lincomb([(1.0, x)] + pred.terms(dt * g.d_alpha[i], dt * g.d_sigma[i]))
        _report(callback, i, g, x, pred)
    return x


def sample_heun(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
                cond: dict | None = None) -> Tensor:
    """Heun's method (explicit trapezoid) on the probability-flow ODE in the path's own time ``t``.

        d   = v(x_t, t),   x'  = x_t + (s - t) d,   d' = v(x', s)
        x_s = x_t + (s - t) (d + d') / 2

    with ``v = alpha' x0_hat + sigma' eps_hat``. 2 NFE per step, except a step onto a clean time
    (1 NFE, returns ``x0_hat``), as in k-diffusion's ``sample_heun``. Second order.
    On EDM (``t = sigma``) this is Karras et al. 2022, Alg. 1. On VP / DDPM paths the velocity in
    ``t`` is stiff near ``t = 0`` (``sigma' ~ 1/sqrt(t)``) and its error at small NFE is erratic;
    :func:`sample_heun_edm` integrates the same ODE in ``rho = sigma / alpha`` instead and is the
    Heun to use there. Shapes: ``x`` (B, ...), ``ts`` (N+1,).
    """
    g = _Grid(denoiser, ts, x)
    for i in g.steps():
        pred = g.predict(x, i, cond)
        if g.sigma[i + 1] == 0:
            x = pred.x0
        else:
            dt = g.t[i + 1] - g.t[i]
            x_euler = _lincomb([(1.0, x)] + pred.terms(dt * g.d_alpha[i], dt * g.d_sigma[i]))
            pred2 = g.predict(x_euler, i + 1, cond)
            half = 0.5 * dt
            x = _lincomb([(1.0, x)] + pred.terms(half * g.d_alpha[i], half * g.d_sigma[i])
                         + pred2.terms(half * g.d_alpha[i + 1], half * g.d_sigma[i + 1]))
        _report(callback, i, g, x, pred)
    return x


def sample_heun_edm(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
                    cond: dict | None = None) -> Tensor:
    """EDM's Heun (Karras et al. 2022, Alg. 1, deterministic) on ``y = x / alpha`` in ``rho = sigma / alpha``.

    Every path is a VE path in these variables: ``y = x_0 + rho eps``, and the probability-flow
    ODE is ``dy/drho = eps_hat`` (Karras et al. 2022, eq. 4 with ``s(t) = alpha``), which is not
    stiff where ``alpha`` and ``sigma`` change fast in ``t`` (VP / DDPM near ``t = 0``):

        y'  = y_t + (rho_s - rho_t) eps_hat(x_t),        x' = alpha_s y'
        y_s = y_t + (rho_s - rho_t) (eps_hat(x_t) + eps_hat(x')) / 2,   x_s = alpha_s y_s

    2 NFE per step; a step onto a clean time is EDM's final Euler step ``y - rho eps_hat = x0_hat``
    (1 NFE). A step from ``alpha = 0`` (rectified flow at ``t = 1``, ``rho = inf``) has no finite
    ``y``; it is the trapezoid of the exponential integrator instead: predictor
    ``x' = (sigma_s / sigma_t) x_t + alpha_s x0_hat(x_t)`` (exact DDIM), corrector
    ``x_s = (sigma_s / sigma_t) x_t + alpha_s (x0_hat(x_t) + x0_hat(x')) / 2`` (2 NFE as well).
    On EDM and VE paths (``alpha = 1``) with the same grid this is :func:`sample_heun` in
    ``sigma``. Second order. Shapes: ``x`` (B, ...), ``ts`` (N+1,).
    """
    g = _Grid(denoiser, ts, x)
    for i in g.steps():
        pred = g.predict(x, i, cond)
        a_t, s_t, a_s, s_s = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
        if s_s == 0:
            x = pred.x0
        elif a_t == 0:
            r = s_s / s_t
            x1 = _lincomb([(r, x)] + pred.terms(a_s, 0.0))
            pred2 = g.predict(x1, i + 1, cond)
            x = _lincomb([(r, x)] + pred.terms(0.5 * a_s, 0.0) + pred2.terms(0.5 * a_s, 0.0))
        else:
            d_rho = s_s / a_s - s_t / a_t  # < 0
            x1 = _lincomb([(a_s / a_t, x)] + pred.terms(0.0, a_s * d_rho))
            pred2 = g.predict(x1, i + 1, cond)
            half = 0.5 * a_s * d_rho
            x = _lincomb([(a_s / a_t, x)] + pred.terms(0.0, half) + pred2.terms(0.0, half))
        _report(callback, i, g, x, pred)
    return x


def sample_dpmpp_2m(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
                    cond: dict | None = None, lower_order_final: bool = True) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2); 1 NFE per step, second order.

    Exponential integrator of the probability-flow ODE in ``half_log_snr = log(alpha / sigma)``
    with data (x0) predictions, for any path. With ``h = half_log_snr_s - half_log_snr_t`` and
    ``r = h_prev / h``:

        D   = (1 + 1/(2r)) x0_hat_i - 1/(2r) x0_hat_{i-1}      (D = x0_hat_i on the first step)
        x_s = (sigma_s / sigma_t) x_t - alpha_s expm1(-h) D

    The first step (no history) and a step onto a clean time (which returns ``x0_hat``) are first
    order. A step from ``alpha = 0`` (``half_log_snr = -inf``, e.g. rectified flow at t = 1) is
    exact first order and is not used as history. With ``lower_order_final`` a step longer than
    :data:`MAX_MULTISTEP_H` ``= pi / 2`` in ``h`` is first order too (e.g. the last noisy step of a
    uniform-time grid on a VP / DDPM path; diffusers instead lowers the order on every grid of
    fewer than 15 steps, which made the error jump between 15 and 16 steps). Shapes: ``x``
    (B, ...), ``ts`` (N+1,).
    """
    g = _Grid(denoiser, ts, x)
    key = ("dpmpp_2m", lower_order_final)
    plan = g.memo.get(key)
    if plan is None:  # (i, clean, sigma ratio, weights of x0_hat_i and x0_hat_{i-1}) per step
        plan, first, h_prev = [], True, math.nan
        for i in g.steps():
            if g.sigma[i + 1] == 0:
                plan.append((i, True, 0.0, []))
            else:
                h = g.hl[i + 1] - g.hl[i]
                c = -g.alpha[i + 1] * math.expm1(-h)  # x_s = (sigma_s / sigma_t) x_t + c D
                if not first and math.isfinite(h_prev) and math.isfinite(h) and g.order_cap(i, lower_order_final) >= 2:
                    r = h_prev / h
                    plan.append((i, False, g.sigma[i + 1] / g.sigma[i], [c * (1 + 0.5 / r), -c * (0.5 / r)]))
                else:
                    plan.append((i, False, g.sigma[i + 1] / g.sigma[i], [c]))
                h_prev = h
            first = False
        g.memo[key] = plan
    out = _multistep(g, x, key, plan, g.outputs(x, cond), callback)
    if out is not None:
        return out
    predict, times, kw = denoiser.predict, g.times, cond or {}
    prev = None
    for i, clean, r_s, w in plan:
        pred = predict(x, times[i], **kw) if kw else predict(x, times[i])
        if clean:
            x = pred.x0
        elif len(w) == 1:
            x = _lincomb([(r_s, x)] + pred.terms(w[0], 0.0))
        else:
            x = _lincomb([(r_s, x)] + pred.terms(w[0], 0.0) + prev.terms(w[1], 0.0))
        prev = pred
        if callback is not None:
            _report(callback, i, g, x, pred)
    return x


def sample_dpmpp_3m(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
                    cond: dict | None = None, lower_order_final: bool = True) -> Tensor:
    """DPM-Solver++(3M): third-order multistep exponential integrator with x0 predictions; 1 NFE per step.

    (Lu et al. 2022, "DPM-Solver++", §4 / App.; the multistep ``dpmsolver++`` update of diffusers'
    ``DPMSolverMultistepScheduler`` with ``solver_order=3``.) With the current and two previous
    predictions ``m0, m1, m2`` at half log-SNRs ``l_0 > l_1 > l_2`` (most recent first),
    ``h = l_s - l_0``, ``h0 = l_0 - l_1``, ``h1 = l_1 - l_2``, ``r0 = h0 / h``, ``r1 = h1 / h``:

        D1_0 = (m0 - m1) / r0,   D1_1 = (m1 - m2) / r1
        D1   = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1)          ~ h   d x0 / d l
        D2   = (D1_0 - D1_1) / (r0 + r1)                    ~ h^2 d^2 x0 / d l^2 / 2
        phi1 = expm1(-h),  phi2 = phi1 / h + 1,  phi3 = phi2 / h - 1/2
        x_s  = (sigma_s / sigma_0) x_t - alpha_s phi1 m0 + alpha_s phi2 D1 - 2 alpha_s phi3 D2

    The last term is the exact integral ``alpha_s int_0^h e^{u-h} u^2/2 du * x0''`` of the
    second-order Taylor term. (diffusers and the DPM-Solver reference code write
    ``- alpha_s phi3 D2``, half of it, which leaves the method second order: on the closed-form
    Gaussian flow of ``tests/test_samplers.py`` with 32-256 log-SNR steps the measured order is
    3.3 with the factor 2 and 2.2 without; with it removed this function matches diffusers'
    scheduler to 1e-6.) Step 1 is first order, step 2 is
    DPM-Solver++(2M); a step onto a clean time returns ``x0_hat``. ``lower_order_final``: a step
    longer than :data:`MAX_MULTISTEP_H` is first order (see :func:`sample_dpmpp_2m`). Shapes: ``x`` (B, ...).
    """
    g = _Grid(denoiser, ts, x)
    hist: list[tuple[Prediction, float]] = []  # (prediction, half log-SNR) of previous steps, most recent last
    for i in g.steps():
        pred = g.predict(x, i, cond)
        l0 = g.half_log_snr(i)
        if not math.isfinite(l0):
            hist = []  # a prediction at alpha = 0 is no Taylor anchor
        if g.sigma[i + 1] == 0:
            x = pred.x0
        else:
            h = g.half_log_snr(i + 1) - l0
            a_s = g.alpha[i + 1]
            phi1 = math.expm1(-h)
            terms = [(g.sigma[i + 1] / g.sigma[i], x)]
            c0 = -a_s * phi1  # coefficient of m0
            cap = g.order_cap(i, lower_order_final)
            if hist and math.isfinite(h) and cap >= 2:
                phi2 = phi1 / h + 1
                m1, l1 = hist[-1]
                r0 = (l0 - l1) / h
                if len(hist) >= 2 and cap >= 3:
                    m2, l2 = hist[-2]
                    r1 = (l1 - l2) / h
                    # D1 = (1 + r0/(r0+r1)) D1_0 - r0/(r0+r1) D1_1,  D2 = (D1_0 - D1_1) / (r0 + r1)
                    # x += alpha_s phi2 D1 - 2 alpha_s phi3 D2, expanded on m0, m1, m2
                    phi3 = phi2 / h - 0.5
                    w = r0 / (r0 + r1)
                    k1 = a_s * phi2 * (1 + w) - 2 * a_s * phi3 / (r0 + r1)  # coefficient of D1_0
                    k2 = -a_s * phi2 * w + 2 * a_s * phi3 / (r0 + r1)  # coefficient of D1_1
                    terms += (pred.terms(c0 + k1 / r0, 0.0) + m1.terms(-k1 / r0 + k2 / r1, 0.0)
                              + m2.terms(-k2 / r1, 0.0))
                else:  # second order: x0 linear in half log-SNR through (l1, m1), (l0, m0)
                    k = a_s * phi2 / r0
                    terms += pred.terms(c0 + k, 0.0) + m1.terms(-k, 0.0)
            else:
                terms += pred.terms(c0, 0.0)
            x = _lincomb(terms)
        if math.isfinite(l0):
            hist = (hist + [(pred, l0)])[-2:]
        _report(callback, i, g, x, pred)
    return x


def _solve(A: list[list[float]], b: list[float]) -> list[float]:
    """Solve the small dense system ``A z = b`` (Gaussian elimination with partial pivoting, floats)."""
    n = len(b)
    M = [list(row) + [bi] for row, bi in zip(A, b)]
    for k in range(n):
        p = max(range(k, n), key=lambda r: abs(M[r][k]))
        M[k], M[p] = M[p], M[k]
        for r in range(k + 1, n):
            f = M[r][k] / M[k][k]
            for j in range(k, n + 1):
                M[r][j] -= f * M[k][j]
    z = [0.0] * n
    for k in reversed(range(n)):
        z[k] = (M[k][n] - sum(M[k][j] * z[j] for j in range(k + 1, n))) / M[k][k]
    return z


def _unipc_weights(h: float, rks: list[float], order: int, variant: str, corrector: bool) -> tuple[float, float, list[float]]:
    """``(h_phi_1, B_h, rhos)`` of one UniPC update of ``order`` with data predictions (Zhao et al. 2023).

    ``hh = -h``; ``h_phi_1 = expm1(hh)``; ``B_h = hh`` (bh1) or ``expm1(hh)`` (bh2) (``expm1(hh)``
    too when ``h`` is infinite, its finite limit); ``b_k = k! h phi_{k+1}(hh) / B_h`` from the
    recursion ``h_phi_{k+1} = h_phi_k / hh - 1/k!``; ``R`` has rows ``rks^(k-1)``, ``rks`` ending in 1.
    Predictor (UniP-p): ``rhos = solve(R[:-1, :-1], b[:-1])`` (0.5 for order 2); corrector (UniC-p):
    ``rhos = solve(R, b)`` (0.5 for order 1). The reference code's choices, as in diffusers'
    ``UniPCMultistepScheduler``.
    """
    hh = -h
    h_phi_1 = math.expm1(hh)
    B_h = hh if (variant == "bh1" and math.isfinite(h)) else math.expm1(hh)
    if corrector and order == 1:
        return h_phi_1, B_h, [0.5]
    if not corrector and order == 1:
        return h_phi_1, B_h, []
    if not corrector and order == 2:
        return h_phi_1, B_h, [0.5]
    h_phi_k = h_phi_1 / hh - 1
    fact = 1
    b = []
    for k in range(1, order + 1):
        b.append(h_phi_k * fact / B_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R = [[rk ** (k - 1) for rk in rks] for k in range(1, order + 1)]
    if corrector:
        return h_phi_1, B_h, _solve(R, b)
    return h_phi_1, B_h, _solve([row[:-1] for row in R[:-1]], b[:-1])


def sample_unipc(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
                 cond: dict | None = None, order: int = 2, variant: str = "bh2", corrector: bool = True,
                 lower_order_final: bool = True) -> Tensor:
    """UniPC (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework"); 1 NFE per step.

    Multistep exponential integrator in ``half_log_snr`` with data predictions. With the current
    prediction ``m0`` at ``l_0``, earlier ones ``m_k`` at ``l_k`` (k = 1..p-1),
    ``h = l_s - l_0``, ``r_k = (l_k - l_0) / h`` and ``D1_k = (m_k - m0) / r_k``, the predictor
    UniP-p is

        x_s = (sigma_s / sigma_0) x_0 - alpha_s h_phi_1 m0 - alpha_s B_h sum_k rho^p_k D1_k

    and, once the model has been evaluated at the predicted ``x_s`` (giving ``m_s``), the
    corrector UniC-p replaces ``x_s`` by the same formula with ``rho^c`` and one more term,
    ``rho^c_p (m_s - m0)``: it raises the order by one at no extra NFE (``m_s`` is the next step's
    ``m0``). Weights from :func:`_unipc_weights`; ``variant``: ``"bh1"`` (``B(h) = h``, Zhao et al.
    recommend it for unconditional sampling at very low NFE) or ``"bh2"`` (``B(h) = e^h - 1``).
    ``order`` 1-3 (the predictor's; warm-up steps use what history there is); ``corrector``: apply
    UniC. ``lower_order_final``: a step longer than :data:`MAX_MULTISTEP_H` is first order (as in
    :func:`sample_dpmpp_2m`). A step onto a clean time returns ``x0_hat`` (the
    corrector of the last noisy point would be discarded by it, as in diffusers). A prediction at
    ``alpha = 0`` (rectified flow at t = 1) is no Taylor anchor: the step from there is DDIM,
    corrected with ``B_h = expm1(-inf) = -1`` (the trapezoid ``alpha_s (m0 + m_s) / 2``).
    Shapes: ``x`` (B, ...), ``ts`` (N+1,).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1, 2 or 3, got {order}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc variant must be 'bh1' or 'bh2', got {variant!r}")
    g = _Grid(denoiser, ts, x)
    plan = _unipc_plan(g, order, variant, corrector, lower_order_final)
    out = _multistep(g, x, ("unipc", order, variant, corrector, lower_order_final), plan, g.outputs(x, cond), callback)
    if out is not None:
        return out
    predict, times, kw = denoiser.predict, g.times, cond or {}
    preds: list[Prediction] = []  # predictions so far, most recent first
    for i, clean, r_s, w in plan:
        pred = predict(x, times[i], **kw) if kw else predict(x, times[i])  # at the predicted (uncorrected) point
        preds = [pred] + preds[:order]
        if clean:
            x = pred.x0
        else:  # UniC of the last step and UniP of this one in one combination (see _unipc_plan)
            terms = [(r_s, x)]
            for c, m in zip(w, preds):
                terms += m.terms(c, 0.0)
            x = _lincomb(terms)
        if callback is not None:
            _report(callback, i, g, x, pred)
    return x


def _unipc_plan(g: _Grid, order: int, variant: str, corrector: bool, lower_order_final: bool) -> list:
    """Per step ``(i, clean, sigma_s / sigma_i, w)``, memoised per grid, with
    ``x_{i+1} = (sigma_s / sigma_i) x_pred_i + sum_j w_j m_{i-j}`` over this and the previous
    ``order`` predictions ``m_i, m_{i-1}, ...`` (``m_i`` made at the predicted point ``x_pred_i``).

    UniC corrects ``x_pred_i`` to ``x_c = x_pred_i + sum_j dc_j m_j`` (the corrector's weights of step
    ``i-1`` minus its predictor's, on that step's anchors, and its weight of ``m_i``), and UniP
    steps from it: ``x_{i+1} = r x_c + sum_j cp_j m_j``; ``x_c`` itself is never needed, so the two
    combine into ``w = r dc + cp`` (one linear combination per step). The anchors of a step are the
    previous predictions with a finite half log-SNR.
    """
    key = ("unipc", order, variant, corrector, lower_order_final)
    plan = g.memo.get(key)
    if plan is not None:
        return plan
    plan, hist, last = [], [], None  # hist: half log-SNRs of the anchors
    for i in g.steps():
        l0 = g.hl[i]
        dc = [0.0] * (order + 2)  # on m_i, m_{i-1}, ...
        if corrector and last is not None and g.sigma[i + 1] != 0:
            j, p, anchors, cp_j = last
            cc = _unipc_coefficients(g, j, p, anchors, variant, True)
            dc[0] = cc[-1]  # m_s of step j is m_i
            for k, (c, d) in enumerate(zip(cc, cp_j)):  # anchors of step j: m_{i-1}, m_{i-2}, ...
                dc[k + 1] += c - d
        if not math.isfinite(l0):
            hist = []
        if g.sigma[i + 1] == 0:
            plan.append((i, True, 0.0, []))
            last = None
        else:
            p = 1 if not math.isfinite(l0) else min(order, len(hist) + 1, g.order_cap(i, lower_order_final))
            anchors = [(None, l0)] + [(None, lk) for lk in reversed(hist)][: p - 1]
            cp = _unipc_coefficients(g, i, p, anchors, variant, False)
            last = (i, p, anchors, cp)
            r = g.sigma[i + 1] / g.sigma[i]
            w = [r * d for d in dc]
            for k, c in enumerate(cp):
                w[k] += c
            while w and w[-1] == 0:
                w.pop()
            plan.append((i, False, r, w))
        if math.isfinite(l0):
            hist = (hist + [l0])[-2:]
    g.memo[key] = plan
    return plan


def _unipc_coefficients(g: _Grid, i: int, p: int, anchors, variant: str, corrector: bool) -> list[float]:
    """Coefficients of the anchors ``m0, m1, ...`` (then of ``m_s`` for the corrector) in the UniPC update
    of step ``i``, the term ``(sigma_s / sigma_0) x_0`` aside; they depend on the grid only (memoised):

        x_s = (sigma_s / sigma_0) x_0 - alpha_s h_phi_1 m0
              - alpha_s B_h (sum_k rho_k (m_k - m0) / r_k  [+ rho_s (m_s - m0)])
    """
    key = ("unipc", i, p, variant, corrector, tuple(lk for _, lk in anchors))
    cs = g.memo.get(key)
    if cs is None:
        l0 = anchors[0][1]
        h = g.hl[i + 1] - l0
        rks = [(lk - l0) / h for _, lk in anchors[1:]] + [1.0]
        h_phi_1, B_h, rhos = _unipc_weights(h, rks, p, variant, corrector)
        a_s = g.alpha[i + 1]
        k = -a_s * B_h
        c0 = -a_s * h_phi_1
        rest = []
        for rk, rho in zip(rks[:-1], rhos):  # D1_k = (m_k - m0) / r_k
            rest.append(k * rho / rk)
            c0 -= k * rho / rk
        if corrector:  # D1_s = m_s - m0 with weight rho[-1]
            rest.append(k * rhos[-1])
            c0 -= k * rhos[-1]
        cs = g.memo[key] = [c0] + rest
    return cs


# --------------------------------------------------------------------------------------
# Reverse SDE, predictor-corrector and Langevin dynamics
# --------------------------------------------------------------------------------------
def _em_step(x: Tensor, g: _Grid, i: int, pred: Prediction, generator: Generator) -> Tensor:
    """One Euler–Maruyama step of the reverse SDE from ``ts[i]`` to ``ts[i+1]`` (backward in time):
    ``x + (f x - g^2 score) dt + sqrt(g^2 (-dt)) z`` with ``score = -eps_hat / sigma``."""
    f, g2 = g.sde(i)
    dt = g.t[i + 1] - g.t[i]  # < 0
    return _lincomb([(1.0 + f * dt, x)] + pred.terms(0.0, g2 * dt / g.sigma[i])
                    + [(math.sqrt(g2 * -dt), randn_like(x, generator))])


def sample_euler_maruyama(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
                          cond: dict | None = None) -> Tensor:
    """Euler–Maruyama on the reverse SDE (Anderson 1982; Song et al. 2021, eq. 6); 1 NFE per step.

        dx = [f(t) x - g(t)^2 score(x, t)] dt + g(t) dw_bar,   integrated backward in t:
        x_s = x_t - (f x_t - g^2 score) (t - s) + g sqrt(t - s) z,   z ~ N(0, I)

    with ``f = path.drift(t)``, ``g^2 = path.g2(t)`` and ``score = -eps_hat / sigma_t``, all at
    the step's start ``t``. A step onto a clean time returns ``x0_hat``. Weak order 1: it needs
    many more steps than the ODE solvers. Shapes: ``x`` (B, ...), ``ts`` (N+1,).
    """
    g = _Grid(denoiser, ts, x)
    for i in g.steps():
        pred = g.predict(x, i, cond)
        x = pred.x0 if g.sigma[i + 1] == 0 else _em_step(x, g, i, pred, generator)
        _report(callback, i, g, x, pred)
    return x


def _norms(v: Tensor) -> Tensor:
    """Per-example Euclidean norms of ``v: (B, ...)``, shaped (B, 1, ..., 1) to broadcast against v."""
    return v.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (v.ndim - 1))


def sample_pc(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
              cond: dict | None = None, n_corrector: int = 1, snr: float = 0.16,
              norm: str = "batch") -> Tensor:
    """Predictor–corrector sampling (Song et al. 2021, Alg. 4 / 5, "PC sampling").

    Predictor: one Euler–Maruyama reverse-SDE step ``t -> s`` (:func:`sample_euler_maruyama`).
    Corrector: ``n_corrector`` Langevin steps at the new time ``s`` targeting ``p_s``:

        eps_step = 2 (snr ||z|| / ||score(x, s)||)^2
        x        = x + eps_step score(x, s) + sqrt(2 eps_step) z,   z ~ N(0, I)

    ``snr`` (the paper's r) default 0.16, the value Song et al. use for VE / NCSN++; it sets the
    step to about ``2 snr^2`` times the local variance, so the same default is reasonable on every
    path (their VP corrector differs only by a factor ``1 - beta_i`` ~ 1).
    ``norm``: how ``||z||`` and ``||score||`` are taken.

    * ``"batch"`` (default): batch means of the per-example norms, as in the score_sde reference
      code (``LangevinCorrector``). Stable in any dimension, but couples the examples of a batch.
    * ``"example"``: per example, as Alg. 4/5 are written; batch-independent. Near a mode the
      ratio ``||z||^2 / ||score||^2`` is F(D, D)-distributed, which has an infinite mean for
      D <= 2 and heavy tails for small D: in 2-D a few examples per step take huge steps and the
      samples are wrong (measured on the 2-D test mixtures with the exact denoiser: modes too
      wide by ~8 standard errors, SW2 3-4x the Monte Carlo floor). Use it only for
      high-dimensional data (images), where the ratio concentrates.
    NFE: ``1 + n_corrector`` per step; the final step onto a clean time costs 1 and returns
    ``x0_hat`` (no corrector). Shapes: ``x`` (B, ...), ``ts`` (N+1,).
    """
    if n_corrector < 0 or snr <= 0:
        raise ValueError(f"need n_corrector >= 0 and snr > 0, got n_corrector={n_corrector}, snr={snr}")
    if norm not in ("example", "batch"):
        raise ValueError(f"norm must be 'example' or 'batch', got {norm!r}")
    g = _Grid(denoiser, ts, x)
    for i in g.steps():
        pred = g.predict(x, i, cond)
        if g.sigma[i + 1] == 0:
            x = pred.x0
        else:
            x = _em_step(x, g, i, pred, generator)
            for _ in range(n_corrector):
                score = g.predict(x, i + 1, cond).score
                z = randn_like(x, generator)
                z_norm, s_norm = _norms(z), _norms(score)
                if norm == "batch":
                    z_norm, s_norm = z_norm.mean(), s_norm.mean()
                step = 2 * (snr * z_norm / s_norm) ** 2
                x = x + step * score + torch.sqrt(2 * step) * z
        _report(callback, i, g, x, pred)
    return x


def langevin(score_fn: Callable[[Tensor], Tensor], x: Tensor, step_size: float, n_steps: int,
             generator: Generator = None, callback: Callback = None) -> Tensor:
    """Unadjusted Langevin dynamics (seed 000 §3.4; Welling & Teh 2011; Song & Ermon 2019 eq. 4).

        x <- x + (eps / 2) grad log p(x) + sqrt(eps) z,   z ~ N(0, I),   repeated ``n_steps`` times

    ``score_fn(x) -> grad log p(x)`` with the shape of ``x: (B, ...)``; ``step_size`` is eps.
    With a finite number of steps it cannot cross low-density regions between modes, so the
    mode weights it returns are those of its starting points (the "islands" of seed 000 §3.4).
    ``callback(dict(i=i, x=x))`` after each step.
    """
    if step_size <= 0 or n_steps < 0:
        raise ValueError(f"need step_size > 0 and n_steps >= 0, got step_size={step_size}, n_steps={n_steps}")
    for i in range(n_steps):
        x = x + (0.5 * step_size) * score_fn(x) + math.sqrt(step_size) * randn_like(x, generator)
        if callback is not None:
            callback(dict(i=i, x=x))
    return x


def sample_annealed_langevin(denoiser, x: Tensor, ts, *, generator: Generator = None, callback: Callback = None,
                             cond: dict | None = None, eps: float | None = None, n_steps_each: int = 100,
                             final_denoise: bool = True) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1; seed 000 §3.6).

    The noise levels are the path's ``sigma_i`` at the grid times (a clean final entry is
    excluded), largest first; ``sigma_L = sigma(ts[0])`` is the largest. For each level, with

        alpha_i = eps * sigma_i^2 / sigma_L^2,

    run ``T = n_steps_each`` Langevin steps on the noised marginal ``p_{t_i}``:

        x <- x + (alpha_i / 2) score(x, t_i) + sqrt(alpha_i) z,   z ~ N(0, I).

    ``eps`` is the step at the largest level; default ``0.2 sigma_L^2``, i.e. ``alpha_i / sigma_i^2
    = 0.2`` at every level, the ratio of Song & Ermon's setting (their eps = 2e-5 over their
    smallest sigma^2 = 1e-4, T = 100, which is also the default ``n_steps_each``). The step is
    tied to sigma_i, so once sigma_i is well below a mode's own width the chain barely moves
    within the mode: mixing there needs many steps per level. With ``final_denoise`` (Jolicoeur-Martineau et al. 2021) the result is
    the denoised estimate ``x0_hat`` at the last level (one more NFE). NFE: ``n_steps_each`` per
    level (+1). ``callback`` after each level with ``i, t, x, x0`` (x0 from that level's last step).
    Shapes: ``x`` (B, ...), ``ts`` (L,) or (L+1,) with a clean end.
    """
    if n_steps_each < 1:
        raise ValueError(f"n_steps_each must be >= 1, got {n_steps_each}")
    g = _Grid(denoiser, ts, x)
    levels = [i for i in range(len(g)) if g.sigma[i] > 0]
    if not levels:
        raise ValueError("annealed Langevin needs at least one grid time with sigma > 0")
    sigma_L = g.sigma[levels[0]]
    if eps is None:
        eps = 0.2 * sigma_L**2
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    for i in levels:
        a_i = eps * g.sigma[i] ** 2 / sigma_L**2
        for _ in range(n_steps_each):
            pred = g.predict(x, i, cond)  # x + (a_i / 2) score + sqrt(a_i) z,  score = -eps_hat / sigma_i
            x = _lincomb([(1.0, x)] + pred.terms(0.0, -0.5 * a_i / g.sigma[i]) + [(math.sqrt(a_i), randn_like(x, generator))])
        if callback is not None:
            callback(dict(i=i, t=g.t[i], x=x, x0=pred.x0))
    if final_denoise:
        x = g.predict(x, levels[-1], cond).x0
    return x


# --------------------------------------------------------------------------------------
# Registry, defaults and the convenience entry point
# --------------------------------------------------------------------------------------
SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ancestral": sample_ancestral,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "heun_edm": sample_heun_edm,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "unipc": sample_unipc,
    "euler_maruyama": sample_euler_maruyama,
    "pc": sample_pc,
    "annealed_langevin": sample_annealed_langevin,
}

# samplers that map a start noise to one sample with no fresh randomness (ddim with eta = 0)
DETERMINISTIC = ("ddim", "euler", "heun", "heun_edm", "dpmpp_2m", "dpmpp_3m", "unipc")


def _check_name(name: str) -> None:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: expected one of {', '.join(SAMPLERS)}")


def nfe_per_step(name: str, **opts) -> int:
    """Denoiser evaluations per grid step of sampler ``name`` (with its options ``opts``).

    ``heun``, ``heun_edm``: 2; ``pc``: ``1 + n_corrector``; ``annealed_langevin``:
    ``n_steps_each`` per level; all others 1 (UniPC's corrector reuses the next step's
    evaluation). The step onto a clean time costs 1 for every sampler (Heun and PC there do a
    single evaluation and return ``x0_hat``); annealed Langevin adds 1 for its final denoising.
    """
    _check_name(name)
    if name in ("heun", "heun_edm"):
        return 2
    if name == "pc":
        return 1 + int(opts.get("n_corrector", 1))
    if name == "annealed_langevin":
        return int(opts.get("n_steps_each", 100))
    return 1


def count_nfe(name: str, steps: int, **opts) -> int:
    """Denoiser evaluations that :func:`sample` with ``steps`` grid steps spends (exactly).

    ``time_grid(path, steps)`` gives ``steps + 1`` distinct times ending at a clean one, so every
    sampler spends ``(steps - 1) nfe_per_step + 1`` (the clean step costs 1), and annealed
    Langevin ``steps * n_steps_each + 1`` (``steps`` noise levels and the final denoising).
    """
    k = nfe_per_step(name, **opts)
    if name == "annealed_langevin":
        return steps * k + (1 if opts.get("final_denoise", True) else 0)
    return (steps - 1) * k + 1


def steps_for_nfe(name: str, nfe: int, **opts) -> int:
    """The most grid steps whose run costs at most ``nfe`` evaluations (at least 1)."""
    k = nfe_per_step(name, **opts)
    if name == "annealed_langevin":
        return max(1, (nfe - 1) // k)
    return max(1, (nfe - 1) // k + 1)


def _path_kind(path: Path) -> str:
    """``"rf"`` (rectified flow: alpha = 1 - t), ``"ve"`` (alpha = 1: VE, EDM) or ``"vp"`` (every other path)."""
    if isinstance(path, RectifiedFlow):
        return "rf"
    if isinstance(path, (VE, EDM)):
        return "ve"
    return "vp"


def default_sampler(path: Path) -> dict:
    """The default sampler of ``path``: ``dict(sampler=..., grid=..., grid_opts=..., options=...)``.

    The rule (the same for every path kind: VP / DDPM / cosine / sub-VP / learned VP, VE / EDM and
    rectified flow): **UniPC-bh2 of order 2 with its corrector** (:func:`sample_unipc`; 1 NFE per
    step) on the **``logsnr_x0`` grid**: ``steps`` equal intervals of log-SNR from ``t_max`` to the
    path's ``t_min`` (for rectified flow, whose log-SNR is infinite at both ends, the noise range
    ``sigma/alpha`` in [0.01, 80]), the last interval being the final step onto ``t_clean`` that
    returns ``x0_hat``. Multistep steps longer than ``pi / 2`` in half log-SNR are first order
    (:data:`MAX_MULTISTEP_H`). Chosen by ``benchmarks/samplers.py`` across the DDPM, VP, RF, VE and
    EDM paths and 2-, 32- and 64-dimensional mixtures at NFE 5-50 (exact denoisers): it had the
    lowest error at NFE 10 on every path and dimension but rectified flow in 32-D (where the
    uniform grid ties it), and UniPC's order-2 predictor with the corrector beat DPM-Solver++(2M)
    / (3M) and UniPC-3 at NFE 5-20 on every grid.
    """
    return dict(sampler="unipc", grid="logsnr_x0", grid_opts={}, options={})


def check_combination(path: Path, sampler: str, grid: str, **opts) -> str | None:
    """Why ``sampler`` on ``grid`` is known to be wrong on ``path`` (a warning), or None.

    Measured (``tests/test_samplers_robust.py``, ``benchmarks/samplers.py``): these are the
    combinations of default options whose error is not non-increasing in NFE on the benchmark
    mixtures, or that do something other than their name says.
    """
    kind = _path_kind(path)
    if grid == "shift" and kind != "rf":
        return (f"the 'shift' grid is the resolution shift of rectified flow; on {type(path).__name__} it only "
                "pushes a uniform grid toward noise")
    if sampler == "heun" and (kind == "vp" or (kind == "rf" and grid not in ("uniform", "shift"))):
        return ("Heun in the path's own time is stiff here (sigma' ~ 1/sqrt(t) near t = 0 on VP paths) and its error "
                "is not monotone in NFE; use 'heun_edm' (Heun in sigma/alpha) or a multistep sampler")
    if sampler in ("euler", "heun") and isinstance(path, VE):
        return (f"{sampler} in the VE path's own time t = log(sigma / sigma_min) / log(sigma_max / sigma_min) takes steps "
                "proportional to sigma and its error is erratic at small NFE; use 'ddim' or 'heun_edm' (sigma-space)")
    if grid == "karras" and isinstance(path, SubVP):
        return "sub-VP reaches sigma/alpha = 1e-4 at t_min and the Karras grid spends most steps there"
    if grid == "karras" and kind == "rf":
        return ("the Karras grid is EDM's, for sigma-space solvers; on rectified flow it starts from alpha = 0 "
                "(sigma/alpha infinite) and its first intervals are too large at small NFE; use 'logsnr_x0' or 'uniform'")
    return None


def sample(denoiser, shape_or_x, steps: int, sampler: str | None = None, grid: str | None = None,
           generator: Generator = None, *, dtype: torch.dtype = torch.float32, device=None,
           grid_opts: dict | None = None, callback: Callback = None, cond: dict | None = None,
           enable_grad: bool = False, **opts) -> Tensor:
    """Sample with a registered sampler on ``time_grid(path, steps, grid)`` (ending at ``t_clean``).

    ``shape_or_x``: a shape (B, ...) — the start is then ``path.prior_sample(shape, generator,
    dtype, device)`` — or a start tensor. ``steps`` counts grid steps, not NFE (see
    :func:`count_nfe`). ``sampler`` / ``grid`` None: :func:`default_sampler` of the path (its grid
    options and sampler options too, under any given here). ``grid_opts`` go to ``time_grid``
    (e.g. ``rho``, ``shift``), ``opts`` to the sampler (e.g. ``eta``, ``n_corrector``).
    Runs under ``torch.no_grad()`` unless ``enable_grad`` (guidance takes its own gradients
    inside). Warns about a combination :func:`check_combination` knows to be wrong. Returns (B, ...).
    """
    path = denoiser.path
    default = default_sampler(path)
    if sampler is None:
        sampler = default["sampler"]
        opts = {**default["options"], **opts}
    _check_name(sampler)
    if grid is None:
        grid = default["grid"]
        grid_opts = {**default["grid_opts"], **(grid_opts or {})}
    problem = check_combination(path, sampler, grid, **opts)
    if problem is not None:
        warnings.warn(f"sampler {sampler!r} on grid {grid!r}: {problem}", stacklevel=2)
    pk = _path_key(path)
    key = None if pk is None else (pk, steps, grid, tuple(sorted((grid_opts or {}).items())))
    try:
        hash(key)
    except TypeError:  # an unhashable grid option: no caching
        key = None
    ts = None if key is None else _TIME_GRIDS.get(path, key)
    if ts is None:  # (a cached grid was checked when made)
        ts = time_grid(path, steps, grid, **(grid_opts or {}))
        if not torch.isfinite(ts[:-1]).all():
            raise ValueError(
                f"time grid {grid!r} is not finite on path {path!r} (log-SNR infinite at an end?): "
                f"{ts.tolist()}; try grid='uniform' or grid='shift'"
            )
        if key is not None:
            _TIME_GRIDS.put(path, key, ts)
    with torch.set_grad_enabled(enable_grad):
        if torch.is_tensor(shape_or_x):
            x = shape_or_x
        else:
            x = path.prior_sample(tuple(shape_or_x), generator=generator, dtype=dtype, device=device)
        return SAMPLERS[sampler](denoiser, x, ts, generator=generator, callback=callback, cond=cond, **opts)
