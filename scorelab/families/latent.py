"""Latent diffusion (Rombach et al. 2022; seed 001 "Latent Diffusion Models"): the diffusion family
run on the latents of a frozen autoencoder, its samples decoded to images.

The seed's recipe: train an encoder and decoder (``scorelab train fmnist-autoencoder``, the
:mod:`~scorelab.families.autoencoder` family), freeze the encoder, train a diffusion model to
remove noise from the latents (``scorelab train fmnist-ldm``), then sample random latents, denoise
them iteratively and run the decoder. ``model.autoencoder: RUN`` names the autoencoder's run
folder; :func:`scorelab.runs.build_family` opens it with :func:`scorelab.runs.open_run` (its own
config, safetensors weights, EMA, frozen), as every cross-run reference, and hands it over as
``self.refs["autoencoder"]``. The run must be an ``autoencoder`` run trained on data of this run's
shape and feature domain; anything else is one ConfigError line.

Everything else is the diffusion family's (:class:`~scorelab.families.diffusion.DiffusionFamily`,
whose fields this config has): any path, prediction, loss weighting, net (U-Net or DiT) and
sampler; class conditioning, label dropout and classifier-free guidance (``--cfg``) work as in
pixel space, because the label enters the denoiser, not the data. The network is built for
:attr:`model_shape`, the latent shape ``(z_channels, H/f, W/f)``, while ``self.data`` stays the
image :class:`~scorelab.families.base.DataSpec` (eval, the CLI and the checkpoint see images).

**Data -> latents** (:meth:`prepare`, :meth:`training_step`). Each image ``x`` (model space) is
encoded to its posterior ``q(z | x) = N(mean, diag exp(log_var))``; a training step draws
``z = mean + exp(log_var / 2) eps`` from the run's noise stream (``posterior: sample``, LDM) or
takes ``z = mean`` (``posterior: mean``), and the diffusion loss sees ``scale * z``.
``encoding: cache`` (the default) keeps each image's posterior by its dataset row (the batch's
``index``), so the encoder runs once per training image; a batch with any row not yet cached is
encoded whole (always ``train.batch_size`` rows, so an image's latent has the same bits whichever
batch computed it and a resumed run matches an uninterrupted one). ``on_the_fly`` encodes every
batch. The cache is not checkpointed (it is a function of the frozen encoder). Measured with the
fmnist-ldm / fmnist-autoencoder nets (batch 128, float32, one thread, CPU time, medians of
interleaved steps): 0.141 s per step once every image is cached against 0.204 s encoding on the
fly (1.44x; under bfloat16 0.115 vs 0.160 s). The first epoch costs the same either way; the cache
holds 2 x 4 x 7 x 7 floats per image (1.6 kB, 9.4 MB for the 6000 embedded images).

**Scale** (LDM's ``scale_by_std``). ``scale_factor: 0`` measures ``scale = 1 / std(z)`` on the
first training batch (the std of all its latent values, as LDM) and keeps it in the ``latent``
module (:class:`LatentScale`), so it is checkpointed with the run and the EMA copy that sampling
uses holds the same value; ``scale_factor > 0`` fixes it (Stable Diffusion's 0.18215 is such a
constant). Sampling draws ``z_T`` from the path's prior in the scaled space, runs the sampler and
decodes ``Dec(z_0 / scale)``.

**Likelihood.** None: the ELBO of the scaled latents bounds ``log p(scale z)``, not the
likelihood of images (the decoder has no likelihood and the encoder is not invertible), so
``capabilities().nll`` is empty rather than a number in pixel bits/dim that would not be one.
**Classifier guidance** is not offered: a noise-aware classifier of images does not see latents.
**Interpolation**: in the latent start noise (``space: noise``), decoded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..random import randn
from ..train.config import ConfigError
from ..train.distributed import gather_rows
from .base import CapabilityError, register
from .autoencoder import _unwrap
from .diffusion import SAMPLE_OPTIONS, DiffusionConfig, DiffusionFamily

__all__ = ["LatentDiffusionConfig", "LatentDiffusionFamily", "LatentScale", "ENCODINGS", "POSTERIORS"]

ENCODINGS = ("cache", "on_the_fly")
POSTERIORS = ("sample", "mean")
GENERIC_DOMAINS = ("images", "points")  # feature domains that do not say which data they are (npz, folder, toys)
LATENT_SAMPLE_OPTIONS = tuple(o for o in SAMPLE_OPTIONS if o not in ("classifier", "classifier_scale"))


@dataclass
class LatentDiffusionConfig(DiffusionConfig):
    family: str = "latent_diffusion"  # registry name of this family
    autoencoder: str = ""  # folder of a trained autoencoder run (opened frozen, EMA weights; required)
    scale_factor: float = 0.0  # latents are multiplied by this; 0: 1 / std of the first training batch's latents (LDM scale_by_std)
    encoding: str = "cache"  # cache: each training image encoded once and kept by its row; on_the_fly: every batch
    posterior: str = "sample"  # sample: z ~ q(z | x) at every step (LDM); mean: z = the posterior mean
    sigma_data: float = 1.0  # EDM's data std for preconditioning input / edm: the scaled latents have std 1

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.autoencoder, str):
            raise ConfigError(f"model.autoencoder must be a run folder, got {self.autoencoder!r}")
        if not (self.scale_factor >= 0 and self.scale_factor < float("inf")):
            raise ConfigError(f"model.scale_factor must be >= 0 (0: measured), got {self.scale_factor}")
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"model.encoding {self.encoding!r} is unknown: expected one of {', '.join(ENCODINGS)}")
        if self.posterior not in POSTERIORS:
            raise ConfigError(f"model.posterior {self.posterior!r} is unknown: expected one of {', '.join(POSTERIORS)}")


class LatentScale(nn.Module):
    """The factor the latents are multiplied by (``z_model = scale * z``), checkpointed with the run.

    Stored as the bit pattern of a float64 in an int64 buffer (``bits``, shape (1,)): the trainer's
    EMA averages floating-point state and copies integer state, and this is a measured constant,
    not a weight, so the EMA copy (the one sampling uses) holds exactly the measured value from the
    step it is measured on. ``bits == 0``: not measured yet (:attr:`value` is then 1).
    """

    def __init__(self, value: float = 0.0):
        super().__init__()
        self.register_buffer("bits", torch.zeros(1, dtype=torch.int64))
        if value:
            self.set(value)

    @property
    def measured(self) -> bool:
        return bool(self.bits.item() != 0)

    @property
    def value(self) -> float:
        """The scale (1.0 until measured)."""
        return float(self.bits.view(torch.float64).item()) if self.measured else 1.0

    def set(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"the latent scale must be > 0, got {value}")
        self.bits.copy_(torch.tensor([float(value)], dtype=torch.float64).view(torch.int64))

    def extra_repr(self) -> str:
        return f"scale={self.value:.6g}" + ("" if self.measured else " (not measured yet)")


@register
class LatentDiffusionFamily(DiffusionFamily):
    """Diffusion on the scaled latents of a frozen autoencoder run (see the module docstring)."""

    name = "latent_diffusion"
    Config = LatentDiffusionConfig
    references = {"autoencoder": ("autoencoder",)}
    declared = dataclasses.replace(DiffusionFamily.declared, sample_options=LATENT_SAMPLE_OPTIONS, nll=(), nll_options=(),
                                   nll_slow=(), nll_exact=())

    def build(self) -> None:
        ref = self.refs.get("autoencoder")
        if ref is None:
            raise ConfigError("model.autoencoder is required: the folder of a trained autoencoder run")
        where = f"model.autoencoder: {ref.path}"
        theirs, ours = ref.data, self.data
        if tuple(theirs.shape) != tuple(ours.shape):
            raise ConfigError(f"{where} was trained on data of shape {tuple(theirs.shape)}, this run's data has shape "
                              f"{tuple(ours.shape)}")
        if theirs.domain != ours.domain or (ours.domain in GENERIC_DOMAINS and theirs.name != ours.name):
            raise ConfigError(f"{where} was trained on {theirs.name or '?'} (domain {theirs.domain or '?'}), this run's data "
                              f"is {ours.name or '?'} (domain {ours.domain or '?'}): use an autoencoder of the same data")
        self.ae_family = ref.family  # the autoencoder run's family: encode(), decode(), latent_shape
        self.ae_modules = {"autoencoder": ref.modules["autoencoder"]}  # frozen, EMA weights
        self._latent_shape = tuple(int(s) for s in self.ae_family.latent_shape)
        self.latent_scale = LatentScale(self.cfg.scale_factor)
        self._cache: dict | None = None  # encoding: cache -> {"mean", "log_var": (N, *L), "filled": (N,) bool}
        super().build()  # path, time sampler and the net, for model_shape

    @property
    def model_shape(self) -> tuple:
        """The latent shape ``(z_channels, H/f, W/f)``: what the network, the prior and the sampler see."""
        return self._latent_shape

    # --- the trainer's interface --------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net, "latent": self.latent_scale}  # the default optimizer lists both (LatentScale has no parameters)

    def frozen(self) -> dict[str, nn.Module]:
        return dict(self.ae_modules)

    def prepare(self, batch: dict, modules: dict) -> dict:
        """Images -> their posterior: ``x`` the mean and ``log_var``, each (B, *latent_shape), unscaled
        (:meth:`training_step` draws ``z`` and scales it)."""
        out = super().prepare(batch, modules)
        x = out["x"]
        ae = {"autoencoder": modules.get("autoencoder", self.ae_modules["autoencoder"])}
        idx = batch.get("index")
        if self.cfg.encoding == "cache" and idx is not None:
            mean, log_var = self._cached(ae, x, idx)
        else:
            mean, log_var = self.ae_family.encode(ae, x)
        out["x"], out["log_var"] = mean, log_var
        return out

    def _cached(self, ae: dict, x: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """The posteriors of dataset rows ``idx`` from the cache; the whole batch is encoded when any row is missing."""
        idx = idx.to(torch.long)
        need = int(idx.max()) + 1
        c = self._cache
        if c is None or c["filled"].shape[0] < need or c["mean"].device != x.device:
            size = max(need, 2 * c["filled"].shape[0] if c is not None else 0)
            new = {"mean": x.new_zeros((size, *self._latent_shape)), "log_var": x.new_zeros((size, *self._latent_shape)),
                   "filled": torch.zeros(size, dtype=torch.bool, device=x.device)}
            if c is not None and c["mean"].device == x.device:
                n = c["filled"].shape[0]
                for k in new:
                    new[k][:n] = c[k]
            self._cache = c = new
        idx = idx.to(x.device)
        miss = ~c["filled"][idx]
        if bool(miss.any()):
            mean, log_var = self.ae_family.encode(ae, x)  # every row: an image's latent never depends on the others' count
            c["mean"][idx[miss]], c["log_var"][idx[miss]] = mean[miss], log_var[miss]
            c["filled"][idx[miss]] = True
        return c["mean"][idx], c["log_var"][idx]

    def latents_of(self, batch: dict, generator) -> Tensor:
        """Unscaled training latents ``z`` (B, *latent_shape) of a prepared batch: a posterior draw
        from ``generator`` (``posterior: sample``) or the posterior mean."""
        mean = batch["x"]
        if self.cfg.posterior == "mean":
            return mean
        eps = randn(mean.shape, generator=generator, device=mean.device)
        return mean + torch.exp(0.5 * batch["log_var"]) * eps

    def training_step(self, modules, batch: dict, ctx) -> dict:
        z = self.latents_of(batch, ctx.generator)
        scale = _unwrap(modules["latent"])
        if not scale.measured:
            # LDM's scale_by_std, on the first training batch (the global batch under torchrun: one scale on every rank)
            scale.set(1.0 / float(gather_rows(z, ctx).double().std()))
        out = super().training_step(modules, {**batch, "x": z * scale.value}, ctx)
        out["scale"] = scale.value
        return out

    # --- sampling: the diffusion family's, in latent space, then the decoder --------------
    def scale_of(self, modules: dict) -> float:
        return _unwrap(modules["latent"]).value

    def decode_latents(self, modules: dict, z: Tensor) -> Tensor:
        """Images (B, C, H, W) in model space from scaled latents ``z``: ``Dec(z / scale)``."""
        return self.ae_family.decode(self.ae_modules, z / self.scale_of(modules))

    def sample_batch(self, modules, generators, y, **options) -> Tensor:
        """Scaled latents from the diffusion sampler (prior, sampler, grid, guidance as in pixel space), decoded."""
        return self.decode_latents(modules, super().sample_batch(modules, generators, y, **options))

    def generate_from(self, modules, z: Tensor, space: str = "noise", y=None, **options) -> Tensor:
        """Images from latent start noises ``z: (k, *latent_shape)`` with a deterministic sampler, decoded."""
        lat = self.deterministic_samples(modules, z, y, **options)
        x = self.decode_latents(modules, lat).float().cpu()
        return x.clamp(-1, 1) if self.data.images else x

    def nll(self, modules, x, *, method: str = "elbo", **options) -> dict:
        raise CapabilityError(f"{self.name} runs have no likelihood of the data: an ELBO of the scaled latents is not one "
                              "of the images (the decoder has no likelihood, the encoder is not invertible)")

    def evaluate(self, modules, ev) -> dict:
        """Which autoencoder and scale the samples were decoded with (its own eval gives the rFID bound)."""
        return {"autoencoder": str(self.refs["autoencoder"].path), "latent_shape": list(self._latent_shape),
                "scale_factor": round(self.scale_of(modules), 6)}

