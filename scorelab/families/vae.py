"""The VAE family: beta-VAE with a convolutional (images) or MLP (points) encoder and decoder (seed 001).

The maths is :mod:`scorelab.vae`, the networks :mod:`scorelab.nets.vae`; this module plugs them
into the trainer, runs, eval and the CLI. One training step, for a batch ``x: (B, *S)``::

    q = N(mu(x), diag sigma^2(x)) = encoder(x)                      (seed 001: the encoder)
    z = mu + sigma eps,  eps ~ N(0, I) from ctx.generator            (reparameterization)
    rec = log p_theta(x | z)   (model.decoder, from the decoder net's params)
    kl  = KL(q || N(0, I))     (closed form)
    loss = mean_b [ -rec + beta_t kl ] / D                           (nats per dimension)

with ``beta_t = beta * min(1, (step + 1) / kl_warmup)`` (beta-VAE, Higgins et al. 2017; KL warm-up,
Bowman et al. 2016). ``rec`` and ``kl`` are logged separately (nats per example), with the ELBO
(beta = 1 whatever ``beta``) in bits/dim for images.

**What is modelled, and the dequantization convention** (``model.decoder``):

* ``discretized_gaussian`` (the presets): ``P(k | z)`` of the 8-bit values on the bins of
  :func:`scorelab.quantize.discretized_gaussian_log_prob` (the diffusion ELBO's own decoder), so
  ``-ELBO / (D ln 2)`` and the IWAE bound are bounds on ``-log2 P(k) / D``, the same quantity the
  diffusion family's ``eval --nll`` bounds: **no dequantization**, bits/dim directly comparable.
* ``gaussian``: a density on real values. For 8-bit images it is trained and scored at uniformly
  dequantized ``y = 2 (k + u) / 256 - 1`` (:func:`scorelab.quantize.dequantize`, ``u`` from the
  run's stream in training and from each example's seeded generator in ``nll``) and converted by
  :func:`scorelab.quantize.bits_per_dim` (Theis et al. 2016; the diffusion PF-ODE's convention):
  again a bound on ``-log2 P(k) / D``. On points (flat data) it is the density itself, in nats.
* ``bernoulli``: binary images. Training binarizes each batch afresh (``b ~ Bernoulli((x+1)/2)``,
  dynamic binarization); ``nll`` binarizes each test image with its own seeded generator. Its
  bits/dim are of the *binarized* images (units ``bits/dim (binarized)``), not comparable with
  8-bit numbers.

**Likelihood.** ``nll(method="iwae", k=K)`` is the importance-weighted bound (Burda et al. 2016)
``L_K = log (1/K) sum_i p(x | z_i) p(z_i) / q(z_i | x)``, ``z_i ~ q``; ``K = 1`` is the ELBO (in
expectation: its KL is the single-sample estimate) and ``L_K`` rises with ``K`` towards
``log p(x)``. Example ``i`` draws everything (dequantization / binarization, then the ``z_i``) from
a generator seeded ``seed + i``, the ``z_i`` in chunks of :data:`IWAE_CHUNK` samples, so the bound
of an example does not depend on the batch size. Terms: ``iwae_stderr`` (the bound's Monte Carlo
standard error per example, delta method; absent for K = 1), ``ess`` (effective sample size of the
importance weights), ``kl`` (the closed-form prior term), all per example in the same units.

**Sampling** (seed 001 "Sampling"): ``z ~ N(0, T^2 I)`` (temperature ``T``, option ``temperature``,
default ``model.temperature``), then the decoder's mean ``E[x | z]`` (``model.sample_mode: mean``,
the usual, blurry VAE picture) or one draw of ``p(x | z)`` (``sample``: per-pixel noise). Example
``i`` draws from its own generator: ``z``, then (conditional model, no label given) a uniform
label, then the decoder draw. **Interpolation**: :meth:`latents` gives the ``z`` that
:meth:`sample` draws for a seed (at ``T = 1``); the CLI builds the linear / spherical path and
:meth:`generate_from` decodes it to decoder means. **Traversal** (seed 001 "Disentangling"):
:meth:`traverse` sweeps one latent at a time over ``[-span, span]`` around the posterior mean of a
held-out image. **Eval** (:meth:`evaluate`): active units (Burda et al. 2016: ``Cov_x E_q[z_u] >
0.01``; few active units = posterior collapse), the mean KL and reconstruction error of the
held-out images, FID of their reconstructions, and a picture of them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..nets.vae import ConvVAEConfig, MLPVAEConfig, build_vae_nets
from ..quantize import (
    bits_per_dim,
    dequantize,
    nats_to_bits_per_dim,
    to_model,
    to_uint8,
)
from ..random import generators_for_seeds, randn
from ..train.config import ConfigError
from ..vae import (
    ACTIVE_UNIT_THRESHOLD,
    DECODERS,
    active_units,
    binarize,
    elbo_terms,
    iwae_bound,
    kl_standard_normal,
    latent_traversal,
    make_decoder,
)
from .base import Capabilities, CapabilityError, Family, register

__all__ = ["IWAE_CHUNK", "SAMPLE_MODES", "VAEConfig", "VAEFamily"]

SAMPLE_MODES = ("mean", "sample")
IWAE_CHUNK = 64  # importance samples drawn and decoded together per example (fixed: the bound's values depend on it)
DECODE_ROWS = 1024  # latents decoded per network call in nll / evaluate (memory only, never changes a value)
SET_BY_DATA = ("in_channels", "image_size", "dim", "out_params", "num_classes", "latent_dim")  # net fields the run sets


@dataclass
class VAEConfig:
    family: str = "vae"  # registry name of this family
    latent_dim: int = 16  # dimension of z, prior p(z) = N(0, I)
    net_options: dict = field(default_factory=dict)  # ConvVAEConfig (images: channels, hidden, label_dim) or MLPVAEConfig (points: hidden, label_dim) fields
    decoder: str = "discretized_gaussian"  # p(x|z): discretized_gaussian (8-bit, bits/dim as diffusion's), gaussian, bernoulli
    decoder_options: dict = field(default_factory=dict)  # its options: gaussian {variance: fixed|global|pixel|output, std, min_std}; discretized {std, min_std, max_std}
    beta: float = 1.0  # weight of the KL (prior) term in the loss (beta-VAE, Higgins et al. 2017); the ELBO reported is always beta = 1
    kl_warmup: int = 0  # steps over which the KL weight rises linearly from 0 to beta (Bowman et al. 2016; 0: off)
    train_samples: int = 1  # reparameterized z per example in the training ELBO
    sample_mode: str = "mean"  # images of sample(): mean (E[x|z], the usual VAE picture) or sample (a draw of p(x|z))
    temperature: float = 1.0  # default prior temperature of sample(): z ~ N(0, T^2 I)
    iwae_k: int = 100  # default importance samples of nll (eval --nll; --nll-k overrides; k = 1: the ELBO)

    def __post_init__(self):
        for name in ("latent_dim", "train_samples", "iwae_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"model.{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.kl_warmup, int) or isinstance(self.kl_warmup, bool) or self.kl_warmup < 0:
            raise ConfigError(f"model.kl_warmup must be an integer >= 0, got {self.kl_warmup!r}")
        for name in ("net_options", "decoder_options"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"model.{name} must be a mapping, got {getattr(self, name)!r}")
        taken = [k for k in SET_BY_DATA if k in self.net_options]
        if taken:
            where = "model.latent_dim" if taken[0] == "latent_dim" else "the data and model.decoder"
            raise ConfigError(f"model.net_options.{taken[0]} is set by {where}, not here")
        if self.decoder not in DECODERS:
            raise ConfigError(f"model.decoder {self.decoder!r} is unknown: expected one of {', '.join(DECODERS)}")
        if "shape" in self.decoder_options:
            raise ConfigError("model.decoder_options.shape is set by the data, not here")
        try:  # the options alone (a pixel variance gets its shape from the data in build)
            extra = {"shape": (1,)} if self.decoder_options.get("variance") == "pixel" else {}
            make_decoder(self.decoder, **self.decoder_options, **extra)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.decoder_options: {e}") from None
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ConfigError(f"model.beta must be a number >= 0, got {self.beta}")
        if self.sample_mode not in SAMPLE_MODES:
            raise ConfigError(f"model.sample_mode {self.sample_mode!r} is unknown: expected one of {', '.join(SAMPLE_MODES)}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"model.temperature must be a number >= 0, got {self.temperature}")


@register
class VAEFamily(Family):
    """Encoder + decoder net + likelihood ``p(x|z)``; one AdamW over all of them (module docstring)."""

    name = "vae"
    Config = VAEConfig
    declared = Capabilities(generate=True, sample_options=("temperature",), nll=("iwae",), nll_options=("k",),
                            interpolate=("z",), traverse=True)

    def build(self) -> None:
        c, d = self.cfg, self.data
        if not d.images and c.decoder != "gaussian":
            raise ConfigError(f"model.decoder {c.decoder!r} needs 8-bit images; flat data {d.shape} takes model.decoder: gaussian")
        if d.images and len(d.shape) != 3:
            raise ConfigError(f"the vae family takes images (C, H, W) or points (D,), got shape {d.shape}")
        opts = dict(c.decoder_options)
        if opts.get("variance") == "pixel":
            opts["shape"] = d.shape
        self.likelihood = make_decoder(c.decoder, **opts)
        common = {"latent_dim": c.latent_dim, "out_params": self.likelihood.num_params, "num_classes": d.conditional_classes}
        try:
            if d.images:
                net_cfg = ConvVAEConfig(in_channels=d.shape[0], image_size=(d.shape[1], d.shape[2]), **common, **c.net_options)
            else:
                net_cfg = MLPVAEConfig(dim=d.shape[0], **common, **c.net_options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.net_options: {e}") from None
        self.encoder, self.decoder = build_vae_nets(net_cfg)

    @property
    def num_classes(self) -> int:
        """Classes the model is conditioned on (0: unconditional)."""
        return self.data.conditional_classes

    @property
    def latent_dim(self) -> int:
        return self.cfg.latent_dim

    def capabilities(self) -> Capabilities:
        # a conditional VAE's posterior needs the image's label, which `traverse` does not pass
        return dataclasses.replace(self.declared, conditional=bool(self.num_classes), traverse=not self.num_classes)

    # --- the trainer's interface --------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        mods = {"encoder": self.encoder, "decoder": self.decoder}
        if any(True for _ in self.likelihood.parameters()):  # a learned global / per-pixel variance
            mods["likelihood"] = self.likelihood
        return mods

    def _parts(self, modules: dict):
        """``(encode, decode, likelihood)`` of ``modules``; the nets' outputs in float32 (whatever the autocast)."""
        enc, dec = modules["encoder"], modules["decoder"]
        lik = modules.get("likelihood", self.likelihood)

        def encode(x, y=None):
            mean, log_var = enc(x, y)
            return mean.float(), log_var.float()

        def decode(z, y=None):
            return dec(z, y).float()

        return encode, decode, lik

    def prepare(self, batch: dict, modules: dict) -> dict:
        out = super().prepare(batch, modules)
        out["raw"] = batch["x"]  # uint8 images (the Gaussian decoder dequantizes them)
        return out

    def _targets(self, x: Tensor, raw: Tensor | None, generator) -> Tensor:
        """What ``p(x | z)`` scores: the model-space grid (discretized), dequantized images (gaussian),
        freshly binarized images (bernoulli), or the points themselves; draws from ``generator``."""
        if not self.data.images:
            return x.float()
        if self.cfg.decoder == "gaussian":
            return dequantize(raw if raw is not None else to_uint8(x), generator, dtype=torch.float32)
        if self.cfg.decoder == "bernoulli":
            return binarize(x.float(), generator)
        return x.float()

    def _labels(self, batch: dict) -> Tensor | None:
        return batch["y"] if self.num_classes else None

    def kl_weight(self, step: int) -> float:
        """``beta * min(1, (step + 1) / kl_warmup)`` (``beta`` without warm-up)."""
        w = min(1.0, (step + 1) / self.cfg.kl_warmup) if self.cfg.kl_warmup else 1.0
        return self.cfg.beta * w

    def training_step(self, modules, batch: dict, ctx) -> dict:
        """One step of the beta-weighted negative ELBO (module docstring). Metrics: ``loss`` (nats per
        dimension, the optimised beta loss), ``rec`` (-log p(x|z), nats per example), ``kl`` (nats per
        example), ``elbo_bpd`` (images) or ``nelbo`` (points, nats) at beta = 1, ``beta``, ``grad_norm``."""
        encode, decode, lik = self._parts(modules)
        target = self._targets(batch["x"], batch.get("raw"), ctx.generator)
        beta = self.kl_weight(ctx.step)
        with ctx.autocast():
            terms = elbo_terms(target, encode, decode, lik, beta=beta, n_samples=self.cfg.train_samples,
                               generator=ctx.generator, y=self._labels(batch))
        D = self.data.dim
        loss = terms.loss.float().mean() / D
        gn = ctx.optimize(loss, "main")
        out = {"loss": loss.detach(), "rec": -terms.reconstruction.detach().float().mean(), "kl": terms.kl.detach().float().mean()}
        nelbo = -terms.elbo.detach().double()
        if self.data.images:
            out["elbo_bpd"] = self._to_units(-nelbo).mean().float()
        else:
            out["nelbo"] = nelbo.mean().float()
        out["beta"] = beta
        out["grad_norm"] = gn
        return out

    # --- units --------------------------------------------------------------------------
    def _to_units(self, log_p: Tensor) -> Tensor:
        """A (lower bound on the) log probability / density per example, nats (B,) -> the nll's units:
        bits/dim of 8-bit data for discrete decoders, the dequantized bound for the Gaussian on images
        (:func:`scorelab.quantize.bits_per_dim`), ``-log p`` in nats for points."""
        if not self.data.images:
            return -log_p
        if self.cfg.decoder == "gaussian":
            return bits_per_dim(log_p, self.data.dim)
        return nats_to_bits_per_dim(-log_p, self.data.dim)

    def _units_name(self) -> str:
        if not self.data.images:
            return "nats"
        return "bits/dim (binarized)" if self.cfg.decoder == "bernoulli" else "bits/dim"

    # --- likelihood ---------------------------------------------------------------------
    def nll(self, modules, x: Tensor, *, method: str = "iwae", seed: int = 0, y: Tensor | None = None,
            batch_size: int = 64, progress=None, k: int | None = None, **opts) -> dict:
        """Per-example IWAE bound ``L_k`` of raw data ``x`` as a negative log-likelihood (module docstring).

        ``x``: uint8 images (B, C, H, W) -> bits/dim (the discretized decoder: no dequantization), or
        points (B, D) -> nats. ``k``: importance samples (default ``model.iwae_k``; 1: the ELBO).
        Example ``i`` uses a generator seeded ``seed + i``; ``batch_size`` changes memory only.
        ``progress(n)`` is called after every ``n`` examples. Returns ``{"total", "kl", "ess",
        "iwae_stderr" (k > 1): (B,), "units": str}``.
        """
        if method != "iwae":
            raise ValueError(f"nll method must be 'iwae' for vae runs, got {method!r}")
        self.check_options("nll", opts, ("k",))
        k = self.cfg.iwae_k if k is None else int(k)
        if k < 1:
            raise ValueError(f"--nll-k must be >= 1, got {k}")
        if self.data.images and x.dtype != torch.uint8:
            raise ValueError(f"nll needs raw uint8 images, got {x.dtype}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        encode, decode, lik = self._parts(modules)
        dev = self.device_of(modules)
        gens = generators_for_seeds(range(seed, seed + x.shape[0]))
        chunk = min(k, IWAE_CHUNK)
        sub = max(1, min(batch_size, DECODE_ROWS // chunk))  # examples per iwae_bound call (memory only)
        parts = []
        for i in range(0, x.shape[0], sub):
            j = min(x.shape[0], i + sub)
            xb = x[i:j].to(dev)
            xm = to_model(xb) if self.data.images else xb.float()
            target = self._targets(xm, xb if self.data.images else None, gens[i:j])
            yb = y[i:j].to(dev) if (self.num_classes and y is not None) else None  # None: the null label
            with torch.no_grad():
                res = iwae_bound(target, encode, decode, lik, k, generator=gens[i:j], chunk_size=chunk, y=yb)
                mean, log_var = encode(target) if yb is None else encode(target, yb)
                kl = kl_standard_normal(mean.double(), log_var.double())
            part = {"total": self._to_units(res.bound), "kl": self._scale(kl), "ess": res.ess}
            if k > 1:
                part["iwae_stderr"] = self._scale(res.stderr)
            parts.append(part)
            if progress is not None:
                progress(j - i)
        out = {key: torch.cat([p[key].detach().double().cpu() for p in parts]) for key in parts[0]}
        out["units"] = self._units_name()
        return out

    def _scale(self, nats: Tensor) -> Tensor:
        """A difference of log probabilities in nats (B,) in the nll's units (bits/dim or nats)."""
        return nats / (self.data.dim * math.log(2)) if self.data.images else nats

    # --- sampling -----------------------------------------------------------------------

    def _decode_images(self, modules, z: Tensor, y: Tensor | None, generators=None, mode: str = "mean") -> Tensor:
        """Decoder means (``mode="mean"``) or draws of ``p(x|z)`` of latents ``z: (n, L)``: (n, *shape)."""
        _, decode, lik = self._parts(modules)
        dev = self.device_of(modules)
        outs = []
        for i in range(0, z.shape[0], DECODE_ROWS):
            zb = z[i : i + DECODE_ROWS].to(dev, torch.float32)
            yb = None if y is None else y[i : i + DECODE_ROWS].to(dev)
            with torch.no_grad(), self.autocast(dev):
                params = decode(zb) if yb is None else decode(zb, yb)
            params = params.float()
            x = lik.mean(params) if mode == "mean" else lik.sample(params, generators[i : i + DECODE_ROWS])
            outs.append(x.float().cpu())
        x = torch.cat(outs)
        return x.clamp(-1, 1) if self.data.images else x

    @torch.no_grad()
    def sample_batch(self, modules, generators, y, temperature: float | None = None) -> Tensor:
        """``z ~ N(0, T^2 I)`` from each example's generator, then its label (conditional, none given),
        then the decoder's mean or one draw (``model.sample_mode``)."""
        T = self.cfg.temperature if temperature is None else float(temperature)
        if not (math.isfinite(T) and T >= 0):
            raise ValueError(f"--temperature must be >= 0, got {T}")
        dev = self.device_of(modules)
        n = len(generators)
        z = T * randn((n, self.latent_dim), generator=generators, device=dev)
        labels = self.sample_labels(n, generators, y, dev)
        return self._decode_images(modules, z, labels, generators, self.cfg.sample_mode)

    # --- interpolation ------------------------------------------------------------------
    def _check_space(self, space: str) -> None:
        if space != "z":
            raise CapabilityError(f"{self.name} runs interpolate in 'z' space, not {space!r}")

    def latents(self, modules, seeds, space: str = "z", y=None) -> Tensor:
        """The prior draws ``z`` that :meth:`sample` makes for ``seeds`` at temperature 1: (k, latent_dim)."""
        self._check_space(space)
        gens = generators_for_seeds(list(seeds))
        return randn((len(gens), self.latent_dim), generator=gens)

    def generate_from(self, modules, z: Tensor, space: str = "z", y=None, **options) -> Tensor:
        """Decoder means ``E[x | z]`` of latents ``z: (k, latent_dim)`` (deterministic): (k, *shape)."""
        self.check_options("interpolate", options, ())
        self._check_space(space)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (k, {self.latent_dim}), got {tuple(z.shape)}")
        labels = None
        if self.num_classes:
            if y is None:
                raise CapabilityError("a class-conditional VAE interpolates within one class: add --class K")
            labels = torch.as_tensor(y).long().reshape(-1)
            labels = labels.expand(z.shape[0]) if labels.shape[0] == 1 else labels
        elif y is not None:
            raise CapabilityError("--class given but this VAE is unconditional")
        return self._decode_images(modules, z, labels)

    # --- the latent space ---------------------------------------------------------------
    def _encoder_input(self, x: Tensor) -> Tensor:
        """Model-space raw data as the encoder saw it in training (binary images: thresholded at 0)."""
        if self.data.images and self.cfg.decoder == "bernoulli":
            return torch.where(x > 0, 1.0, -1.0).to(x.dtype)
        return x

    def posterior(self, modules, x_raw: Tensor, y: Tensor | None = None, batch_size: int = 256) -> tuple[Tensor, Tensor]:
        """``(mu, log_var)`` of ``q(z | x)`` for raw data ``x_raw: (N, ...)`` (uint8 images or points) and,
        for a conditional model, labels ``y: (N,)``: (N, L) each, float32 on CPU."""
        encode, _, _ = self._parts(modules)
        dev = self.device_of(modules)
        means, lvs = [], []
        for i in range(0, x_raw.shape[0], batch_size):
            xb = x_raw[i : i + batch_size].to(dev)
            xm = self._encoder_input(to_model(xb) if xb.dtype == torch.uint8 else xb.float())
            with torch.no_grad():
                m, lv = encode(xm) if y is None else encode(xm, y[i : i + batch_size].to(dev))
            means.append(m.cpu())
            lvs.append(lv.cpu())
        return torch.cat(means), torch.cat(lvs)

    def traverse(self, modules, reference: Tensor | None, dims: list[int] | None, span: float, n: int) -> Tensor:
        """Seed 001's "disentangling" grid: row ``d`` decodes the posterior mean of ``reference`` (1, ...)
        with latent ``dims[d]`` swept over ``n`` points of ``[-span, span]`` (the others held):
        ``(len(dims) n, *shape)``. ``dims=None``: the first ``min(8, latent_dim)``."""
        caps = self.capabilities()
        if not caps.traverse:
            raise CapabilityError("traverse needs an unconditional VAE: a class-conditional one's posterior needs the "
                                  "image's label, which traverse does not take")
        L = self.latent_dim
        dims = list(range(min(8, L))) if dims is None else [int(d) for d in dims]
        bad = [d for d in dims if not 0 <= d < L]
        if bad:
            raise CapabilityError(f"--dims {bad[0]} is out of range: this VAE has {L} latent dimensions (0..{L - 1})")
        if not dims:
            raise CapabilityError("--dims needs at least one latent dimension")
        if n < 2 or not span > 0:
            raise ValueError(f"a traversal needs n >= 2 points and span > 0, got n={n}, span={span}")
        if reference is None or reference.shape[0] != 1:
            raise ValueError("traverse needs one reference example, shape (1, ...)")
        mu, _ = self.posterior(modules, reference)
        z = latent_traversal(mu[0], dims, n=n, span=span)  # (len(dims), n, L)
        return self._decode_images(modules, z.reshape(-1, L), None)

    def evaluate(self, modules, ev) -> dict:
        """Numbers of the held-out examples' posteriors and reconstructions:

        ``active_units`` (of ``latent_dim``; Burda et al. 2016: ``Cov_x E_q[z_u] > 0.01``) with each
        unit's ``unit_variances``; ``kl_nats``, the mean prior term ``KL(q(z|x) || p(z))`` (near 0:
        posterior collapse); ``reconstruction_mse`` (model space) and, for images, the FID / KID /
        precision / recall of the reconstructions ``E[x | z = mu(x)]`` and a picture of 8 of them under
        their originals (``reconstructions.png`` in the run folder)."""
        from ..viz import save_samples

        x, y = ev.reference(labels=True)
        labels = y if self.num_classes else None
        mu, lv = self.posterior(modules, x, labels)
        au = active_units(mu)
        kl = kl_standard_normal(mu.double(), lv.double())  # (N,) closed form
        out = {"active_units": au.count, "latent_dim": self.latent_dim, "active_unit_threshold": ACTIVE_UNIT_THRESHOLD,
               "unit_variances": [round(float(v), 4) for v in au.variance], "kl_nats": round(float(kl.mean()), 4)}
        recon = self._decode_images(modules, mu, labels)
        real = to_model(x) if self.data.images else x.float()
        out["reconstruction_mse"] = round(float((recon - real).square().mean()), 6)
        if self.data.images:
            out.update({f"reconstruction_{k}": v for k, v in ev.image_metrics(recon).items()
                        if k in ("fid", "kid", "precision", "recall")})
            m = min(8, x.shape[0])
            try:
                out["reconstructions"] = str(save_samples(torch.cat([real[:m], recon[:m]]), ev.run.path / "reconstructions.png", nrow=m))
            except OSError as e:
                ev.notes.append(f"reconstructions.png not written: {e}")
        return out
