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

__all__ = ["KINDS", "to_x0_eps", "from_x0_eps", "convert", "mse_factor", "Prediction", "Denoiser", "DenoiserLike"]

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


class Denoiser:
    """A network seen through a path: answers any prediction kind.

    ``net(x_t, t, **cond)`` returns a prediction of ``kind`` with the shape of ``x_t``; ``t`` is
    passed in the path's own time units, shape (B,). The network runs in its own dtype
    (``net_dtype``, default: that of its first parameter); its output is cast back to the
    sampler's dtype before any conversion, so the conversions run in the sampler's precision.

    ``input_sigma_data > 0`` feeds the network ``c_in x_t`` with EDM's input scaling
    ``c_in = 1 / sqrt(alpha^2 sigma_data^2 + sigma^2)`` (Karras et al. 2022), so that its input has
    about unit variance at every noise level; the output keeps its meaning (kind ``kind``). VE paths
    need it: at ``sigma_max = 40`` the raw input is 40 times larger than the data.
    """

    def __init__(self, net: Callable[..., Tensor], path: Path, kind: str = "eps", net_dtype: torch.dtype | None = None,
                 input_sigma_data: float = 0.0):
        _check_kind(kind)
        if not input_sigma_data >= 0:
            raise ValueError(f"input_sigma_data must be >= 0 (0: no input scaling), got {input_sigma_data}")
        self.net = net  # the raw network (or any callable)
        self.path = path  # the forward process the network was trained on
        self.kind = kind  # what the network outputs
        self.input_sigma_data = float(input_sigma_data)  # sigma_data of EDM's c_in (0: the net sees x_t as is)
        if net_dtype is None and isinstance(net, torch.nn.Module):
            p = next(iter(net.parameters()), None)
            net_dtype = p.dtype if p is not None else None
        self.net_dtype = net_dtype

    def raw(self, x: Tensor, t, **cond) -> Tensor:
        """The network's own output (kind ``self.kind``) in the dtype of ``x``."""
        t = as_time_batch(t, x)
        dt = self.net_dtype or x.dtype
        if self.input_sigma_data > 0:
            c = self.path.coefficients(t).to(x)
            x = x * torch.rsqrt(c.alpha**2 * self.input_sigma_data**2 + c.sigma**2)
        out = self.net(x.to(dt), t.to(dt), **cond)
        return out.to(x.dtype)

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
