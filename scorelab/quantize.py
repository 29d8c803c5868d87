"""8-bit images and model space: the one uint8 map, dequantization, bits/dim, the discretized decoder.

Conventions (used by every family: diffusion, VDM, VAE, PixelCNN, latent diffusion):

* **The uint8 map.** A pixel value ``k in {0..255}`` is the model-space value
  ``x_k = k / 127.5 - 1`` in ``[-1, 1]`` (:func:`to_model`); :func:`to_uint8` rounds back.
* **The discretized decoder.** Bin ``k`` is ``[x_k - 1/255, x_k + 1/255]``; the first bin extends
  to ``-inf`` and the last to ``+inf``, so the 256 probabilities of a continuous density sum to
  one (Ho et al. 2020 §3.3; VDM; the DDPM ELBO's reconstruction term, the VAE's discretized
  decoder). :func:`discretized_gaussian_log_prob` integrates a Gaussian over those bins.
* **Uniform dequantization** (the probability-flow ODE's continuous density): ``y = 2 (k + u) / 256
  - 1`` with ``u ~ U[0, 1)`` (:func:`dequantize`), so that ``log P(k) >= E_u log p(y) + D log(2/256)``
  (Theis et al. 2016) and :func:`bits_per_dim` is that bound per dimension in bits. ``y`` puts ``k``
  at the left edge of a bin of width ``2/256`` rather than at the centre ``x_k`` of the decoder's bin
  of width ``2/255``; the two differ by less than one bin. Bits/dim from either convention bound the
  same quantity ``-log2 P(k) / D``, so numbers are comparable across families.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .random import Generator, rand

__all__ = ["to_model", "to_uint8", "dequantize", "bits_per_dim", "nats_to_bits_per_dim", "discretized_gaussian_log_prob",
           "log1mexp"]

_LN2 = math.log(2.0)


def to_model(u8: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 ``0..255`` -> ``[-1, 1]``: ``x = k / 127.5 - 1`` (any shape)."""
    return u8.to(dtype) / 127.5 - 1


def to_uint8(x: Tensor) -> Tensor:
    """``[-1, 1]`` -> uint8: ``round((x + 1) * 127.5)`` clipped to ``0..255`` (inverse of :func:`to_model`)."""
    return ((x.detach().to(torch.float32) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def dequantize(x_uint8: Tensor, generator: Generator = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """Uniformly dequantized model-space images ``y = 2 (k + u) / 256 - 1``, ``u ~ U[0, 1)``: (B, ...).

    ``y`` lies in ``[-1, 1)``; see the module docstring for how it relates to :func:`to_model`.
    """
    if x_uint8.dtype != torch.uint8:
        raise ValueError(f"x_uint8 must be a uint8 tensor, got {x_uint8.dtype}")
    u = rand(tuple(x_uint8.shape), generator=generator, dtype=dtype, device=x_uint8.device)
    return 2 * (x_uint8.to(dtype) + u) / 256 - 1


def bits_per_dim(log_prob_y: Tensor, dim: int) -> Tensor:
    """Bits/dim of uint8 data from a model-space density at dequantized ``y`` (:func:`dequantize`).

    ``bpd = -(log p_model(y) + D log(2/256)) / (D ln 2)``; ``log_prob_y``: (B,) nats; returns (B,).
    A model uniform on ``[-1, 1]^D`` (``log p = -D log 2``) gets exactly 8 bits/dim.
    """
    return -(log_prob_y + dim * math.log(2 / 256)) / (dim * _LN2)


def nats_to_bits_per_dim(nll_nats: Tensor, dim: int) -> Tensor:
    """``-log P(k)`` in nats per example (B,) of discrete data -> bits per dimension (B,)."""
    return nll_nats / (dim * _LN2)


def log1mexp(d: Tensor) -> Tensor:
    """``log(1 - exp(d))`` for ``d < 0``, accurate at both ends."""
    return torch.where(d > -_LN2, torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def discretized_gaussian_log_prob(k: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``log P(k)`` of pixel values ``k in {0..255}`` under ``N(mean, std^2)`` on the decoder's bins (elementwise).

    ``mean`` and ``std`` are in model space (broadcast against ``k``). Value ``k`` sits at
    ``x_k = k / 127.5 - 1`` with bin ``[x_k - 1/255, x_k + 1/255]``; the end bins extend to -inf and
    +inf, so the 256 probabilities sum to one. Computed in float64 as ``log(Phi(a) - Phi(b))`` with
    log-CDFs, flipped to the upper tail when the bin lies above the mean, so it stays finite however
    far or narrow the Gaussian. Returns float64 of the broadcast shape.
    """
    k = k.to(torch.float64)
    mean, std = mean.to(torch.float64), std.to(torch.float64)
    x = k / 127.5 - 1
    a = (x + 1 / 255 - mean) / std  # upper edge, standardised
    b = (x - 1 / 255 - mean) / std  # lower edge
    flip = (a + b) > 0
    hi, lo = torch.where(flip, -b, a), torch.where(flip, -a, b)
    la, lb = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    mid = la + log1mexp(lb - la)
    bottom = torch.special.log_ndtr(a)  # P(X < x_0 + 1/255)
    top = torch.special.log_ndtr(-b)  # P(X > x_255 - 1/255)
    return torch.where(k <= 0, bottom, torch.where(k >= 255, top, mid))
