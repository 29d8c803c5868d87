"""Variational autoencoders (Kingma & Welling 2014; seed 001 "Variational Autoencoders"): the maths.

A latent ``z`` with the prior ``p(z) = N(0, I)`` and a decoder ``p_theta(x | z)`` define
``p_theta(x) = ∫ p_theta(x | z) p(z) dz``, which is intractable. An encoder gives a diagonal Gaussian
posterior ``q_phi(z | x) = N(mu(x), diag sigma^2(x))`` and, for every ``q``,

    log p(x) = E_q[log p(x | z)] - KL(q(z|x) || p(z)) + KL(q(z|x) || p(z|x))
             >= E_q[log p(x | z)] - KL(q(z|x) || p(z))                    = ELBO(x)

(reconstruction minus prior term; the dropped posterior-approximation KL is >= 0). Everything here
works per example and returns ``(B,)`` tensors in nats; the caller reduces.

* :class:`DiagonalGaussian`, :func:`reparameterize` (``z = mu + sigma eps``, ``eps`` drawn by
  :func:`scorelab.random.randn`, so a list of generators gives batch-independent draws),
  :func:`kl_standard_normal` (closed form), :func:`standard_normal_log_prob`.
* Decoders ``p(x | z)`` (:data:`DECODERS`, :func:`make_decoder`), each an ``nn.Module`` (learned
  variances are its parameters) with ``num_params`` parameter maps per data value that the decoder
  network outputs as ``params: (B, P, *S)`` for data ``x: (B, *S)``; ``log_prob(x, params) -> (B,)``,
  ``mean(params)`` and ``sample(params, generator)`` in model space:

  ====================== ===== =================================== ===========================
  decoder                P     data                                log_prob is
  ====================== ===== =================================== ===========================
  GaussianDecoder        1-2   real ``x`` (model space)             a density (nats)
  BernoulliDecoder       1     binary ``x in {-1, +1}`` (0 / 255)   a probability of 2 values
  DiscretizedGaussian... 2     8-bit ``k`` (uint8 or ``k/127.5-1``) a probability of 256 values
  ====================== ===== =================================== ===========================

  Bits/dim of 8-bit images: the discretized decoder gives ``log P(k)`` directly, so
  ``nats_to_bits_per_dim(-elbo, D)`` bounds the same ``-log2 P(k) / D`` as the diffusion family's
  discrete ELBO (same bins: :mod:`scorelab.quantize`). A Gaussian (continuous) decoder's ELBO is a
  bound on a density; for 8-bit data, evaluate it at uniformly dequantized ``y = dequantize(k)``
  and convert with :func:`scorelab.quantize.bits_per_dim` (Theis et al. 2016); at undequantized
  grid points a learned variance can shrink without bound and the number means nothing.
* :func:`elbo_terms` (reconstruction, KL, ELBO with beta = 1, the beta-VAE loss
  ``rec_loss + beta KL``; Higgins et al. 2017) and :func:`iwae_bound`, the importance-weighted
  bound (Burda et al. 2016) ``L_k = E log (1/k) sum_i p(x, z_i) / q(z_i | x)``, ``z_i ~ q``, with
  ``ELBO = L_1 <= L_k <= L_{k+1} <= log p(x)``.
* :func:`active_units` (Burda et al. 2016: ``A_u = Cov_x(E_q[u]) > 0.01``), :func:`latent_traversal`
  and :func:`interpolate_latents` (lerp / slerp of :mod:`scorelab.interpolation`), :func:`generate`.

Networks (``encode(x) -> (mean, log_var)``, ``decode(z) -> params``) live in
:mod:`scorelab.nets.vae`; the functions below take them as callables. Class labels ``y: (B,)``
go through the functions' ``y`` argument (``encode(x, y)``, and ``decode(z, y)`` with ``y``
repeated to match the ``n B`` latents decoded together).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .interpolation import interpolate_noise
from .quantize import discretized_gaussian_log_prob, to_model, to_uint8
from .random import Generator, rand, randn

__all__ = [
    "DiagonalGaussian",
    "reparameterize",
    "kl_standard_normal",
    "standard_normal_log_prob",
    "Decoder",
    "GaussianDecoder",
    "BernoulliDecoder",
    "DiscretizedGaussianDecoder",
    "DECODERS",
    "GAUSSIAN_VARIANCES",
    "make_decoder",
    "binarize",
    "ELBOTerms",
    "elbo_terms",
    "IWAEResult",
    "iwae_bound",
    "ActiveUnits",
    "active_units",
    "ACTIVE_UNIT_THRESHOLD",
    "latent_traversal",
    "interpolate_latents",
    "sample_prior",
    "generate",
]

_LOG_2PI = math.log(2 * math.pi)
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016: a unit is active if Cov_x(E_q[u]) > 0.01

Encode = Callable[[Tensor], "tuple[Tensor, Tensor]"]  # x: (B, *S) -> (mean, log_var), each (B, *L)
Decode = Callable[[Tensor], Tensor]  # z: (B, *L) -> params: (B, P, *S)


# --------------------------------------------------------------------------------------
# The posterior q(z | x) and the prior p(z)
# --------------------------------------------------------------------------------------
def _sum_event(v: Tensor, event_ndim: int) -> Tensor:
    """Sum over the last ``event_ndim`` dimensions."""
    return v.sum(dim=tuple(range(v.ndim - event_ndim, v.ndim))) if event_ndim else v


def reparameterize(mean: Tensor, log_var: Tensor, generator: Generator = None, n: int | None = None) -> Tensor:
    """``z = mean + exp(log_var / 2) * eps``, ``eps ~ N(0, I)`` (Kingma & Welling 2014), differentiable in both.

    ``mean, log_var``: (B, *L). ``n=None`` -> ``z: (B, *L)``; ``n`` samples -> ``(n, B, *L)``.
    ``eps`` comes from :func:`scorelab.random.randn`; with a list of generators example ``b`` draws
    its ``n`` noises from its own stream (drawn as ``(B, n, *L)``), so draws do not depend on the batch.
    """
    if mean.shape != log_var.shape:
        raise ValueError(f"mean and log_var differ in shape: {tuple(mean.shape)} vs {tuple(log_var.shape)}")
    if n is None:
        eps = randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)  # (B, *L)
        return mean + torch.exp(0.5 * log_var) * eps
    if n < 1:
        raise ValueError(f"need n >= 1 samples, got {n}")
    eps = randn((mean.shape[0], n, *mean.shape[1:]), generator=generator, dtype=mean.dtype, device=mean.device)
    eps = eps.movedim(1, 0)  # (n, B, *L)
    return mean[None] + torch.exp(0.5 * log_var)[None] * eps


def kl_standard_normal(mean: Tensor, log_var: Tensor) -> Tensor:
    """Closed-form ``KL(N(mean, diag exp(log_var)) || N(0, I))`` per example: (B, *L) -> (B,).

    ``KL = 1/2 sum_j (mean_j^2 + sigma_j^2 - 1 - log sigma_j^2)`` (Kingma & Welling 2014, App. B).
    """
    return 0.5 * (mean.square() + log_var.exp() - 1 - log_var).flatten(1).sum(1)


def standard_normal_log_prob(z: Tensor, event_ndim: int = 1) -> Tensor:
    """``log N(z; 0, I) = -1/2 (|z|^2 + d log 2 pi)`` summed over the last ``event_ndim`` dims."""
    return _sum_event(-0.5 * (z.square() + _LOG_2PI), event_ndim)


@dataclass
class DiagonalGaussian:
    """``q(z | x) = N(mean, diag exp(log_var))``; ``mean, log_var``: (B, *L) (the encoder's output)."""

    mean: Tensor  # (B, *L) posterior mean mu(x)
    log_var: Tensor  # (B, *L) log sigma^2(x)

    def __post_init__(self):
        if self.mean.shape != self.log_var.shape:
            raise ValueError(f"mean and log_var differ in shape: {tuple(self.mean.shape)} vs {tuple(self.log_var.shape)}")

    @property
    def event_ndim(self) -> int:
        return self.mean.ndim - 1

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.log_var)

    def rsample(self, generator: Generator = None, n: int | None = None) -> Tensor:
        """Reparameterized draws: (B, *L), or (n, B, *L) with ``n`` (see :func:`reparameterize`)."""
        return reparameterize(self.mean, self.log_var, generator, n)

    def log_prob(self, z: Tensor) -> Tensor:
        """``log q(z | x)`` for ``z: (..., B, *L)`` -> ``(..., B)``, computed in the dtype of ``z``."""
        m, lv = self.mean.to(z.dtype), self.log_var.to(z.dtype)
        return _sum_event(-0.5 * ((z - m).square() * torch.exp(-lv) + lv + _LOG_2PI), self.event_ndim)

    def kl_standard_normal(self) -> Tensor:
        """``KL(q || N(0, I))``: (B,) (:func:`kl_standard_normal`)."""
        return kl_standard_normal(self.mean, self.log_var)


def _posterior(encode: Encode, x: Tensor, y: Tensor | None = None) -> DiagonalGaussian:
    out = encode(x) if y is None else encode(x, y)
    if isinstance(out, DiagonalGaussian):
        return out
    mean, log_var = out
    return DiagonalGaussian(mean, log_var)


# --------------------------------------------------------------------------------------
# Decoders p(x | z)
# --------------------------------------------------------------------------------------
class Decoder(nn.Module):
    """A likelihood ``p(x | z)`` given the decoder network's output ``params: (B, P, *S)``.

    Subclasses set ``num_params`` (P, the parameter maps per data value the network must output)
    and ``discrete`` (True when ``log_prob`` is a log probability of discrete values, so bits/dim
    follow from :func:`scorelab.quantize.nats_to_bits_per_dim`; False for a density).
    """

    num_params: int = 1
    discrete: bool = False

    def check(self, x: Tensor, params: Tensor) -> None:
        if params.ndim < 2 or params.shape[1] != self.num_params or params.shape[2:] != x.shape[1:] or params.shape[0] != x.shape[0]:
            raise ValueError(f"{type(self).__name__}: params must have shape (B, {self.num_params}, *S) = "
                             f"({x.shape[0]}, {self.num_params}, {', '.join(map(str, x.shape[1:]))}) for x of shape "
                             f"{tuple(x.shape)}, got {tuple(params.shape)}")

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """``log p(x | z)`` summed over the data dimensions: (B,) nats."""
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:
        """``E[x | z]`` in model space: (B, *S)."""
        raise NotImplementedError

    def sample(self, params: Tensor, generator: Generator = None) -> Tensor:
        """One draw ``x ~ p(x | z)`` in model space: (B, *S)."""
        raise NotImplementedError


GAUSSIAN_VARIANCES = ("fixed", "global", "pixel", "output")


class GaussianDecoder(Decoder):
    """``p(x | z) = N(x; mu(z), diag s^2)`` on real model-space data ``x: (B, *S)``, a density in nats.

        log p(x | z) = -1/2 sum_j [ (x_j - mu_j)^2 / s_j^2 + log s_j^2 + log 2 pi ]

    with the ``-D/2 log 2 pi`` constant kept, so values are true log densities (seed 001: with a
    fixed ``s`` this is ``-|x - mu|^2 / (2 s^2) + C``, the L2 reconstruction loss). ``variance``:

    * ``"fixed"``: ``s = std`` everywhere (P = 1: ``params[:, 0] = mu``);
    * ``"global"``: one learned ``log s`` (a parameter of this module, initialised at ``log std``);
    * ``"pixel"``: a learned ``log s_j`` per data value, independent of ``z`` (needs ``shape``);
    * ``"output"``: the network outputs ``log s_j(z) - log std`` as ``params[:, 1]`` (P = 2).

    Learned standard deviations are floored at ``min_std``. For bits/dim of 8-bit data, evaluate at
    dequantized inputs (:func:`scorelab.quantize.dequantize`; see the module docstring).
    """

    discrete = False

    def __init__(self, variance: str = "fixed", std: float = 0.1, shape: tuple | None = None, min_std: float = 1e-3):
        super().__init__()
        if variance not in GAUSSIAN_VARIANCES:
            raise ValueError(f"GaussianDecoder: variance must be one of {', '.join(GAUSSIAN_VARIANCES)}, got {variance!r}")
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"GaussianDecoder: std must be a positive number, got {std!r}")
        if variance != "fixed" and not 0 <= min_std < std:
            raise ValueError(f"GaussianDecoder: min_std must lie in [0, std={std}), got {min_std!r}")
        if variance == "pixel" and not shape:
            raise ValueError("GaussianDecoder: variance='pixel' needs the data shape (shape=(C, H, W) or (D,))")
        self.variance = variance  # how s is chosen: fixed / global / pixel / output
        self.std = float(std)  # the fixed s (reconstruction weight 1 / (2 s^2)), or the initial s of a learned one
        self.min_std = float(min_std)  # floor of a learned s
        self.num_params = 2 if variance == "output" else 1
        if variance == "global":
            self.log_std = nn.Parameter(torch.tensor(math.log(std)))
        elif variance == "pixel":
            self.log_std = nn.Parameter(torch.full(tuple(shape), math.log(std)))

    def log_scale(self, params: Tensor) -> Tensor:
        """``log s`` broadcastable to the data ``(B, *S)``."""
        if self.variance == "fixed":
            return torch.full((), math.log(self.std), dtype=params.dtype, device=params.device)
        ls = params[:, 1] + math.log(self.std) if self.variance == "output" else self.log_std.to(params.dtype)
        return ls.clamp_min(math.log(self.min_std)) if self.min_std > 0 else ls

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        self.check(x, params)
        mu, ls = params[:, 0], self.log_scale(params)
        lp = -0.5 * ((x - mu) * torch.exp(-ls)).square() - ls - 0.5 * _LOG_2PI  # (B, *S)
        return lp.flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        return params[:, 0]

    def sample(self, params: Tensor, generator: Generator = None) -> Tensor:
        mu = params[:, 0]
        return mu + torch.exp(self.log_scale(params)) * randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)


def _binary_targets(x: Tensor) -> Tensor:
    if not bool(((x == -1) | (x == 1)).all()):
        raise ValueError("BernoulliDecoder: x must be binary model-space values -1 or +1 (pixels 0 / 255); "
                         "binarize grey data first (scorelab.vae.binarize)")
    return (x > 0).to(x.dtype)


class BernoulliDecoder(Decoder):
    """``p(x | z) = prod_j Bernoulli(b_j; sigmoid(l_j(z)))`` for binary data, ``params[:, 0] = l`` logits.

    Data are model-space ``x in {-1, +1}`` (pixel values 0 / 255; ``b = (x + 1) / 2``):
    ``log p = sum_j [b_j l_j - softplus(l_j)]``, a log probability of 2 values per dimension
    (bits/dim of binary data, *not* comparable with 8-bit bits/dim). Grey data: :func:`binarize`.
    """

    num_params = 1
    discrete = True

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        self.check(x, params)
        b = _binary_targets(x)
        return -F.binary_cross_entropy_with_logits(params[:, 0], b, reduction="none").flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        return 2 * torch.sigmoid(params[:, 0]) - 1

    def sample(self, params: Tensor, generator: Generator = None) -> Tensor:
        p = torch.sigmoid(params[:, 0])
        u = rand(p.shape, generator=generator, dtype=p.dtype, device=p.device)
        return 2 * (u < p).to(p.dtype) - 1


def binarize(x: Tensor, generator: Generator = None) -> Tensor:
    """Stochastic binarization of model-space grey data: ``b ~ Bernoulli((x + 1) / 2)``, returned as ``2 b - 1``."""
    u = rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return 2 * (u < (x + 1) / 2).to(x.dtype) - 1


class DiscretizedGaussianDecoder(Decoder):
    """``P(k | z)`` of 8-bit values ``k in {0..255}``: ``N(mu(z), s(z)^2)`` integrated over each value's bin.

    ``params[:, 0] = mu`` (model space), ``params[:, 1] = log s - log std`` (so an output of 0 means
    ``s = std``; softly capped at ``max_std``, see :meth:`log_scale`). The bins are those of :func:`scorelab.quantize.discretized_gaussian_log_prob`
    (THE decoder of the project, also the diffusion ELBO's reconstruction term): value ``k`` sits
    at ``x_k = k / 127.5 - 1`` with bin ``[x_k - 1/255, x_k + 1/255]``, the end bins open to
    ``-inf`` / ``+inf``, so the 256 probabilities sum to one and ``log_prob`` is a log probability
    (bits/dim by :func:`scorelab.quantize.nats_to_bits_per_dim`). ``x``: uint8 ``k`` or the
    model-space grid values ``k / 127.5 - 1`` (rounded with :func:`scorelab.quantize.to_uint8`).
    Returns float64 (the decoder integrates in float64).
    """

    num_params = 2
    discrete = True

    def __init__(self, std: float = 1.0, min_std: float = 0.0, max_std: float = 10.0):
        super().__init__()
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"DiscretizedGaussianDecoder: std must be a positive number, got {std!r}")
        if not 0 <= min_std < std:
            raise ValueError(f"DiscretizedGaussianDecoder: min_std must lie in [0, std={std}), got {min_std!r}")
        if not (math.isfinite(max_std) and max_std > std):
            raise ValueError(f"DiscretizedGaussianDecoder: max_std must be a number > std={std}, got {max_std!r}")
        self.std = float(std)  # s when the network's log-scale output is 0 (1: a stable start; 0.1 began at ~50 bits/dim)
        self.min_std = float(min_std)  # hard floor of s (0: none; the bins keep log P finite anyway)
        self.max_std = float(max_std)  # soft ceiling of s: beyond ~1e14 a bin's probability rounds to 0 in float64

    def log_scale(self, params: Tensor) -> Tensor:
        """``log s = log max_std - softplus(log max_std - (params[:, 1] + log std))``: ~ the raw value well
        below the ceiling, never above it, with a gradient everywhere (an early, unstable training step
        that pushes the raw value up by tens cannot reach a scale whose bins underflow to -inf)."""
        top = math.log(self.max_std)
        ls = top - F.softplus(top - (params[:, 1] + math.log(self.std)))
        return ls.clamp_min(math.log(self.min_std)) if self.min_std > 0 else ls

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        self.check(x, params)
        k = x if x.dtype == torch.uint8 else to_uint8(x)
        return discretized_gaussian_log_prob(k, params[:, 0], torch.exp(self.log_scale(params))).flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        """The Gaussian's mean clipped to ``[-1, 1]`` (round with ``to_uint8`` for an image)."""
        return params[:, 0].clamp(-1, 1)

    def sample(self, params: Tensor, generator: Generator = None) -> Tensor:
        """``k`` = the bin of ``mu + s eps`` (``to_uint8``'s rounding is exactly the bin map), in model space."""
        mu = params[:, 0]
        y = mu + torch.exp(self.log_scale(params)) * randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        return to_model(to_uint8(y), dtype=mu.dtype)


DECODERS = {"gaussian": GaussianDecoder, "bernoulli": BernoulliDecoder, "discretized_gaussian": DiscretizedGaussianDecoder}


def make_decoder(name: str, **options) -> Decoder:
    """A decoder by registry name (:data:`DECODERS`) with its constructor options."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}: expected one of {', '.join(DECODERS)}")
    return DECODERS[name](**options)


# --------------------------------------------------------------------------------------
# ELBO and the importance-weighted bound
# --------------------------------------------------------------------------------------
def _decode_many(decode: Decode, z: Tensor, y: Tensor | None = None) -> Tensor:
    """Decode ``z: (n, B, *L)`` as one batch -> params ``(n * B, P, *S)``; labels ``y: (B,)`` repeated to ``(n B,)``."""
    return decode(z.flatten(0, 1)) if y is None else decode(z.flatten(0, 1), y.repeat(z.shape[0]))


def _repeat(x: Tensor, n: int) -> Tensor:
    """``x: (B, *S)`` -> ``(n * B, *S)`` in the order of ``z.flatten(0, 1)``."""
    return x[None].expand(n, *x.shape).flatten(0, 1)


@dataclass
class ELBOTerms:
    """Per-example ELBO terms in nats, each (B,)."""

    reconstruction: Tensor  # E_q[log p(x | z)], Monte Carlo over n_samples reparameterized z
    kl: Tensor  # KL(q(z|x) || p(z)): closed form, or the same-sample estimate E_q[log q - log p(z)]
    beta: float = 1.0  # weight of the KL in the training loss (beta-VAE, Higgins et al. 2017)

    @property
    def elbo(self) -> Tensor:
        """``reconstruction - kl``: the evidence lower bound (always beta = 1), (B,)."""
        return self.reconstruction - self.kl

    @property
    def loss(self) -> Tensor:
        """The training loss ``-reconstruction + beta * kl`` (B,); equals ``-elbo`` at beta = 1."""
        return -self.reconstruction + self.beta * self.kl


def elbo_terms(
    x: Tensor,
    encode: Encode,
    decode: Decode,
    decoder: Decoder,
    beta: float = 1.0,
    n_samples: int = 1,
    generator: Generator = None,
    analytic_kl: bool = True,
    y: Tensor | None = None,
) -> ELBOTerms:
    """ELBO terms of ``x: (B, *S)`` (seed 001's training objective), differentiable, each (B,) nats.

    ``q = N(mean, diag exp(log_var)) = encode(x)``; ``z_i = mean + sigma eps_i`` (``i < n_samples``);
    ``reconstruction = (1/n) sum_i decoder.log_prob(x, decode(z_i))``; ``kl`` is the closed form
    (``analytic_kl``) or ``(1/n) sum_i [log q(z_i|x) - log p(z_i)]`` from the same ``z_i`` (then each
    term ``log p(x|z_i) + log p(z_i) - log q(z_i|x)`` is one IWAE log weight, and an exact posterior
    gives ``elbo = log p(x)`` for every draw). ``beta`` only changes :attr:`ELBOTerms.loss`.
    ``y: (B,)``: class labels for conditional nets (``encode(x, y)``, ``decode(z, y)``).
    """
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a non-negative number, got {beta!r}")
    q = _posterior(encode, x, y)
    B = x.shape[0]
    z = q.rsample(generator, n_samples)  # (n, B, *L)
    params = _decode_many(decode, z, y)  # (n B, P, *S)
    rec = decoder.log_prob(_repeat(x, n_samples), params).view(n_samples, B).mean(0)  # (B,)
    if analytic_kl:
        kl = q.kl_standard_normal()
    else:
        kl = (q.log_prob(z) - standard_normal_log_prob(z, q.event_ndim)).mean(0)
    return ELBOTerms(reconstruction=rec, kl=kl, beta=float(beta))


@dataclass
class IWAEResult:
    """The importance-weighted bound of each example; per-example tensors are (B,) float64 nats."""

    bound: Tensor  # L_k = logsumexp_i(log w_i) - log k, log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x)
    stderr: Tensor  # delta-method Monte Carlo standard error of L_k: std_i(w_i / mean w) / sqrt(k) (nan for k = 1)
    ess: Tensor  # effective sample size (sum w)^2 / sum w^2, in [1, k]
    k: int  # importance samples per example
    log_weights: Tensor | None = None  # (k, B) float64 when asked for

    def mean(self) -> float:
        """Mean bound over the examples."""
        return float(self.bound.mean())

    def mean_stderr(self) -> float:
        """Standard error of :meth:`mean` over the examples (their spread, std / sqrt(B))."""
        return float(self.bound.std() / math.sqrt(self.bound.numel())) if self.bound.numel() > 1 else float("nan")


def iwae_bound(
    x: Tensor,
    encode: Encode,
    decode: Decode,
    decoder: Decoder,
    k: int,
    generator: Generator = None,
    chunk_size: int | None = None,
    return_log_weights: bool = False,
    y: Tensor | None = None,
) -> IWAEResult:
    """The importance-weighted bound (Burda et al. 2016) of ``x: (B, *S)`` with ``k`` samples.

        L_k(x) = log (1/k) sum_{i<k} w_i,   w_i = p(x | z_i) p(z_i) / q(z_i | x),   z_i ~ q(z | x)

    ``E[L_1] = ELBO``, ``E[L_k]`` increases with ``k`` and tends to ``log p(x)``; to first order
    ``log p(x) - E[L_k] = Var(w / p(x)) / (2k)``. The ``z_i`` are decoded ``chunk_size`` at a time
    (default: chunks of about 4096 rows, so ``k = 1000`` fits in memory) and the log weights are
    combined with logsumexp in float64. Differentiable (IWAE training) unless run under
    ``torch.no_grad()``. Draws from ``generator`` chunk by chunk: the values depend on ``chunk_size``.
    ``y: (B,)``: class labels for conditional nets.
    """
    if k < 1:
        raise ValueError(f"need k >= 1 importance samples, got {k}")
    B = x.shape[0]
    chunk = chunk_size or max(1, 4096 // max(B, 1))
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    q = _posterior(encode, x, y)
    q64 = DiagonalGaussian(q.mean.double(), q.log_var.double())
    pieces = []
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        z = q.rsample(generator, n)  # (n, B, *L)
        rec = decoder.log_prob(_repeat(x, n), _decode_many(decode, z, y)).view(n, B).double()
        z64 = z.double()
        pieces.append(rec + standard_normal_log_prob(z64, q.event_ndim) - q64.log_prob(z64))  # (n, B)
    log_w = torch.cat(pieces)  # (k, B)
    lse = torch.logsumexp(log_w, dim=0)
    bound = lse - math.log(k)
    with torch.no_grad():
        wn = torch.exp(log_w - bound)  # w_i / mean(w): (k, B), mean 1
        stderr = wn.std(dim=0) / math.sqrt(k) if k > 1 else torch.full_like(bound, float("nan"))
        ess = torch.exp(2 * lse - torch.logsumexp(2 * log_w, dim=0))
    return IWAEResult(bound=bound, stderr=stderr, ess=ess, k=k, log_weights=log_w if return_log_weights else None)


# --------------------------------------------------------------------------------------
# Latent-space analysis
# --------------------------------------------------------------------------------------
@dataclass
class ActiveUnits:
    """Active latent units (Burda et al. 2016, §5.2)."""

    count: int  # number of active units
    variance: Tensor  # (L,) Cov_x(E_q[u]) per latent dimension (float64)
    active: Tensor  # (L,) bool, variance > threshold
    threshold: float


def active_units(posterior_means: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> ActiveUnits:
    """Units ``u`` with ``A_u = Cov_x(E_{q(z|x)}[u]) > threshold`` (Burda et al. 2016: 0.01).

    ``posterior_means``: (N, *L), the encoder's means over a dataset (N >= 2); the variance over the
    N examples (unbiased) is taken per latent dimension, in float64.
    """
    if posterior_means.ndim < 2 or posterior_means.shape[0] < 2:
        raise ValueError(f"posterior_means must have shape (N, *L) with N >= 2, got {tuple(posterior_means.shape)}")
    var = posterior_means.detach().double().flatten(1).var(dim=0)
    act = var > threshold
    return ActiveUnits(count=int(act.sum()), variance=var, active=act, threshold=float(threshold))


def latent_traversal(z: Tensor, dims=None, values=None, n: int = 7, span: float = 3.0) -> Tensor:
    """Vary one latent dimension at a time around ``z`` (a posterior mean): ``(*batch, L) -> (*batch, len(dims), n, L)``.

    Row ``(d, j)`` is ``z`` with ``z[dims[d]]`` replaced by ``values[j]``; ``values`` defaults to
    ``n`` points evenly spaced on ``[-span, span]`` (the prior's ``±3`` standard deviations), ``dims``
    to every dimension. Decode the rows to see what each latent controls (seed 001 "Disentangling").
    """
    L = z.shape[-1]
    dims = list(range(L)) if dims is None else [int(d) for d in dims]
    if any(not 0 <= d < L for d in dims):
        raise ValueError(f"dims must lie in 0..{L - 1}, got {dims}")
    if values is None:
        if n < 2:
            raise ValueError(f"need n >= 2 traversal points, got {n}")
        values = torch.linspace(-span, span, n, dtype=z.dtype, device=z.device)
    values = torch.as_tensor(values, dtype=z.dtype, device=z.device)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {tuple(values.shape)}")
    out = z[..., None, None, :].expand(*z.shape[:-1], len(dims), len(values), L).clone()
    for i, d in enumerate(dims):
        out[..., i, :, d] = values
    return out


def interpolate_latents(z0: Tensor, z1: Tensor, n: int, mode: str = "spherical") -> Tensor:
    """``n`` latents from ``z0`` to ``z1`` (ends included): (n, *L). ``mode``: "linear" or "spherical"
    (slerp keeps the prior's typical norm; :func:`scorelab.interpolation.interpolate_noise`)."""
    return interpolate_noise(z0, z1, n, mode)


def sample_prior(n: int, latent_shape: tuple, generator: Generator = None, dtype=torch.float32, device=None) -> Tensor:
    """``z ~ N(0, I)``: (n, *latent_shape)."""
    return randn((n, *latent_shape), generator=generator, dtype=dtype, device=device)


def generate(decode: Decode, decoder: Decoder, z: Tensor, generator: Generator = None, mode: str = "mean",
             y: Tensor | None = None) -> Tensor:
    """Images from latents ``z: (B, *L)`` (seed 001 "Sampling": z from the prior, then the decoder).

    ``mode="mean"``: ``E[x | z]`` (the usual VAE picture); ``"sample"``: one draw of ``p(x | z)``
    (per-pixel noise for Gaussian decoders). Model space, (B, *S). ``y: (B,)``: labels of a conditional decoder.
    """
    if mode not in ("mean", "sample"):
        raise ValueError(f"mode must be 'mean' or 'sample', got {mode!r}")
    params = decode(z) if y is None else decode(z, y)
    return decoder.mean(params) if mode == "mean" else decoder.sample(params, generator)
