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

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from .paths import Coefficients, Path

__all__ = ["KINDS", "PRECONDITIONINGS", "to_x0_eps", "from_x0_eps", "convert", "mse_factor", "Prediction", "Denoiser", "DenoiserLike"]

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


@dataclass
class Prediction:
    """A denoiser's answer at ``(x_t, t)``: the estimates of ``x_0`` and ``eps``, each (B, ...)."""

    x_t: Tensor
    coefficients: Coefficients  # broadcast against x_t
    x0: Tensor
    eps: Tensor

    def get(self, kind: str) -> Tensor:
        return from_x0_eps(self.x0, self.eps, kind, self.coefficients)

    @property
    def score(self) -> Tensor:
        return self.get("score")


class DenoiserLike(Protocol):
    """Anything a sampler can use: a path and ``predict(x, t, **cond) -> Prediction``."""

    path: Path

    def predict(self, x: Tensor, t: Tensor, **cond) -> Prediction: ...


def as_time_batch(t, x: Tensor) -> Tensor:
    """``t`` as a float64 tensor of shape (B,) for ``x: (B, ...)``."""
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
        t = as_time_batch(t, x)
        c = self.path.coefficients(t).to(x)
        x0, eps = to_x0_eps(self.raw(x, t, **cond), self.kind, x, c)
        return Prediction(x, c, x0, eps)

    def __call__(self, x: Tensor, t, kind: str = "x0", **cond) -> Tensor:
        """The prediction of ``kind`` at ``(x, t)`` (the raw output when ``kind`` is the net's own)."""
        if kind == self.kind:
            return self.raw(x, t, **cond)
        return self.predict(x, t, **cond).get(kind)
