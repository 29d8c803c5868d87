"""The PixelCNN family: exact autoregressive likelihood of 8-bit images (seed 001 "Autoregressive
Models of Images").

An image is a sequence of ``N = C H W`` subpixels, each a 256-way softmax given the ones before it,
and the chain rule gives the exact likelihood ``log p(x) = sum_s log p(x_s | x_<s)`` from one pass
of a causal network (:mod:`scorelab.autoregressive`). ``model.net`` chooses the network
(:mod:`scorelab.nets.pixelcnn`):

* ``gated``: :class:`~scorelab.nets.pixelcnn.GatedPixelCNN` (van den Oord et al. 2016: mask A then
  mask B, vertical and horizontal stacks, no blind spot), raster order. Sampling costs ``C H W``
  sequential evaluations of the whole network (784 for Fashion-MNIST).
* ``tiles``: :class:`~scorelab.nets.pixelcnn.TilePixelCNN`, the seed's answer to "a 1024² image is
  3M subpixels": a causal transformer over ``k x k`` tiles and a within-tile pixel model (``head``:
  ``autoregressive``, exact with no independence assumption, or ``independent``). Sampling costs
  ``H W / k^2`` context evaluations plus ``C k^2`` evaluations of a small head on one tile per tile
  (or one). Still an exact likelihood.

Training minimises ``-log p(x) / N`` (nats per subpixel; ``bpd`` = that / ln 2 is logged first).
``nll(method="exact")`` is ``-log2 p(x) / N`` of the raw 8-bit images: exact, with no bound, no
estimate and no dequantization (the model is discrete), so it is comparable with the diffusion and
VAE families' bounds on the same ``-log2 P(k) / N``; it is computed in float32 whatever the run's
precision, and ``seed`` does not enter it. Sampling draws the subpixels one at a time in the
model's order with the uniforms of :mod:`scorelab.autoregressive` (one per subpixel from each
example's generator, so a seed gives the same image whatever the batch), at temperature
``--temperature`` (default ``model.temperature``; 0: the most likely value), with a tqdm bar on
stderr when it is a terminal. A conditional model's sample takes ``--class``; without one, each
example draws a uniform label from its generator first. There is no sampler, step count or grid:
``--sampler`` / ``--steps`` / ``--grid`` are refused with one line.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..autoregressive import log_likelihood, sample_pixels, sample_tiles
from ..nets.pixelcnn import (
    GatedPixelCNN,
    PixelCNNConfig,
    TilePixelCNN,
    TilePixelCNNConfig,
)
from ..quantize import nats_to_bits_per_dim, to_model
from ..train.config import ConfigError
from .base import Capabilities, Family, register

__all__ = ["PIXELCNN_NETS", "PixelCNNFamily", "PixelCNNFamilyConfig"]

PIXELCNN_NETS = ("gated", "tiles")
SET_BY_DATA = ("in_channels", "image_size", "num_classes")  # net fields the data sets


@dataclass
class PixelCNNFamilyConfig:
    family: str = "pixelcnn"  # registry name of this family
    net: str = "gated"  # gated (GatedPixelCNN, per-pixel; van den Oord et al. 2016) or tiles (TilePixelCNN, the seed's k x k tiles)
    net_options: dict = field(default_factory=dict)  # PixelCNNConfig (gated) or TilePixelCNNConfig (tiles) fields; the data sets channels, size, classes
    temperature: float = 1.0  # default sampling temperature: softmax(logits / T) (0: the most likely value)

    def __post_init__(self):
        if self.net not in PIXELCNN_NETS:
            raise ConfigError(f"model.net {self.net!r} is unknown: expected one of {', '.join(PIXELCNN_NETS)}")
        if not isinstance(self.net_options, dict):
            raise ConfigError(f"model.net_options must be a mapping, got {self.net_options!r}")
        taken = [k for k in SET_BY_DATA if k in self.net_options]
        if taken:
            raise ConfigError(f"model.net_options.{taken[0]} is set by the data, not here")
        if self.net == "gated" and "cond_channels" in self.net_options:
            raise ConfigError("model.net_options.cond_channels is the tile model's context map: the gated net takes none")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"model.temperature must be a number >= 0, got {self.temperature}")


@register
class PixelCNNFamily(Family):
    """A causal network over subpixels (per-pixel gated or tiles); exact likelihood; sequential sampling."""

    name = "pixelcnn"
    Config = PixelCNNFamilyConfig
    declared = Capabilities(generate=True, sample_options=("temperature", "callback"), nll=("exact",), nll_exact=("exact",))

    def build(self) -> None:
        d, c = self.data, self.cfg
        if not d.images:
            raise ConfigError(f"model.family 'pixelcnn' needs 8-bit images (C, H, W), got shape {d.shape}")
        C, H, W = d.shape
        try:
            if c.net == "gated":
                self.net = GatedPixelCNN(PixelCNNConfig(in_channels=C, num_classes=d.conditional_classes, **c.net_options))
            else:
                self.net = TilePixelCNN(TilePixelCNNConfig(in_channels=C, image_size=(H, W), num_classes=d.conditional_classes,
                                                           **c.net_options))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.net_options: {e}") from None

    @property
    def num_classes(self) -> int:
        """Classes the model is conditioned on (0: unconditional)."""
        return self.data.conditional_classes

    def preview_count(self) -> int:
        """16 samples in the training grid: sequential sampling costs one network call per subpixel (or tile)."""
        return 16

    def capabilities(self) -> Capabilities:
        return dataclasses.replace(self.declared, conditional=bool(self.num_classes))

    # --- the trainer's interface --------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def _labels(self, batch: dict) -> Tensor | None:
        return batch["y"] if self.num_classes else None

    def training_step(self, modules, batch: dict, ctx) -> dict:
        """``loss = -log p(x) / N`` (nats per subpixel, batch mean). Metrics: ``bpd`` (train bits/dim,
        first: the progress bar), ``loss``, ``grad_norm``."""
        x = batch["x"]
        with ctx.autocast():
            logits = modules["net"](x, self._labels(batch))
        nll = -log_likelihood(logits.float(), x)  # (B,) nats, exact chain rule
        loss = nll.mean() / self.data.dim
        gn = ctx.optimize(loss, "main")
        return {"bpd": loss.detach() / math.log(2), "loss": loss.detach(), "grad_norm": gn}

    # --- likelihood ---------------------------------------------------------------------
    def nll(self, modules, x: Tensor, *, method: str = "exact", seed: int = 0, y: Tensor | None = None,
            batch_size: int = 64, progress=None, **opts) -> dict:
        """Exact ``-log2 p(x) / N`` of raw uint8 images ``x: (B, C, H, W)`` (bits/dim) and ``nats`` =
        ``-log p(x)`` per image, both (B,); ``y: (B,)`` labels of a conditional model (None: the null
        label). No randomness (``seed`` is unused). ``progress(n)`` after every ``n`` images."""
        if method != "exact":
            raise ValueError(f"nll method must be 'exact' for pixelcnn runs, got {method!r}")
        self.check_options("nll", opts, ())
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"nll needs raw uint8 images (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        net, dev = modules["net"], self.device_of(modules)
        out = []
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(dev)
            yb = y[i : i + batch_size].to(dev) if (self.num_classes and y is not None) else None
            with torch.no_grad():
                out.append(-log_likelihood(net(to_model(xb), yb).float(), xb).double().cpu())  # float32 logits: no bf16 rounding
            if progress is not None:
                progress(xb.shape[0])
        nats = torch.cat(out)
        return {"total": nats_to_bits_per_dim(nats, self.data.dim), "nats": nats, "units": "bits/dim"}

    # --- sampling -----------------------------------------------------------------------
    def sampling_evaluations(self) -> dict:
        """Sequential network calls to draw one batch of images: ``{"network": C H W}`` (gated) or
        ``{"context": T, "head": C k^2 T or T}`` (tiles, ``T = H W / k^2`` tiles)."""
        C, H, W = self.data.shape
        if self.cfg.net == "gated":
            return {"network": C * H * W}
        cfg = self.net.config
        T = cfg.num_tiles
        return {"context": T, "head": T * (C * cfg.tile_size ** 2 if cfg.head == "autoregressive" else 1)}

    @torch.no_grad()
    def sample_batch(self, modules, generators, y, temperature: float | None = None, callback=None) -> Tensor:
        """Raster-order (gated) or tile-order (tiles) ancestral sampling; (n, C, H, W) model space.

        Example ``i`` draws, from its own generator: a uniform label (conditional model, no ``y``),
        then one uniform per subpixel. ``callback`` goes to the sampler (:mod:`scorelab.autoregressive`)."""
        T = self.cfg.temperature if temperature is None else float(temperature)
        if not (math.isfinite(T) and T >= 0):
            raise ValueError(f"--temperature must be >= 0, got {T}")
        net, dev = modules["net"], self.device_of(modules)
        n = len(generators)
        labels = self.sample_labels(n, generators, y, dev)
        bar = sys.stderr.isatty()
        with self.autocast(dev):
            if self.cfg.net == "gated":
                s = sample_pixels(net, n, self.data.shape, y=labels, generator=generators, temperature=T, callback=callback,
                                  progress=bar, device=dev, dtype=torch.float32)
            else:
                s = sample_tiles(net, n, y=labels, generator=generators, temperature=T, callback=callback, progress=bar,
                                 device=dev, dtype=torch.float32)
        return to_model(s.images).cpu()

    def evaluate(self, modules, ev) -> dict:
        """The sequential network evaluations one sample costs (the tile model's point)."""
        return {"net": self.cfg.net, "sampling_evaluations": self.sampling_evaluations()}
