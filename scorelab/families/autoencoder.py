"""The autoencoder family: the first stage of latent diffusion, trained as the seed says (VAE + GAN).

Seed 001, "Latent Diffusion Models": train an encoder and decoder (CNNs with attention) that map
images to latents; "this architecture is also a VAE, with a very small KL prior weight, so train
the encoder and decoder as a VAE. But the decoder's output is blurry; the fix is to add a
discriminator, a GAN-like architecture". The loss is that of LDM's ``LPIPSWithDiscriminator``
(Rombach et al. 2022, App. G; Esser et al. 2021, VQGAN, eq. 7), per step ``s``::

    z ~ q(z | x) = N(mean(x), diag exp(log_var(x)))              (reparameterized, ctx.generator)
    x^ = Dec(z)
    R   = mean_i sum_pixels [ d(x_i, x^_i) + perceptual_weight * P(x_i, x^_i) ]     d = |.| (l1) or (.)^2 (l2)
    KL  = mean_i KL(q(z | x_i) || N(0, I))                       (summed over the latent's dimensions)
    G   = -mean_{i, patches} D(x^_i)                             (hinge generator loss, patch logits)
    lam = disc_weight * clamp(||grad_w R|| / (||grad_w G|| + 1e-4), 0, disc_max_weight)   w = the decoder's last weight
    L_AE = R + kl_weight * KL + [s >= disc_start] * lam * G                    -> optimizer "autoencoder"
    L_D  = [s >= disc_start] * 1/2 mean_{i, patches} [relu(1 - D(x_i)) + relu(1 + D(x^_i))]   -> optimizer "discriminator"

The sums over pixels and latent dimensions (not means) are LDM's convention (its per-image
perceptual distance is added to every pixel's, hence counted C H W times): ``kl_weight = 1e-6``
(LDM's KL autoencoder configs) is relative to them, so the KL term only keeps the latents from
drifting to huge scales (latent diffusion rescales them anyway, by ``1/std``). The adaptive weight
``lam`` (VQGAN) makes the adversarial gradient at the decoder's last layer as large as the
reconstruction gradient, whatever the scales of the two losses; it is a constant in the backward
pass (``detach``). Before ``disc_start`` neither the discriminator nor ``lam`` is computed (LDM
computes and multiplies them by 0). The discriminator step uses the reconstructions of the same
forward pass (detached), taken before the autoencoder's update (LDM's second pass recomputes them
with the updated weights).

**Perceptual term** (``perceptual_weight > 0``). LDM uses LPIPS, whose VGG weights cannot be
downloaded here; on 28x28 Fashion-MNIST the shipped domain classifier (the LeNet of
:func:`scorelab.metrics._default_classifier`) stands in: ``P(x, x^) = sum_l mean_{h,w} ||n(f_l(x)) -
n(f_l(x^))||^2`` over its three convolution blocks ``f_l`` (32x14x14, 64x7x7, 128x3x3), ``n`` the
unit-normalisation over channels (LPIPS without its learned channel weights). It costs one LeNet
forward on 2B images and a backward through it: +47 % CPU time per step with the fmnist-autoencoder
nets after disc_start (0.38 -> 0.55 s per batch of 64, float32, one thread). Because eval's rFID
is measured in the same LeNet's features, it optimises a close relative of the metric that judges
it: with it, rFID is no longer an independent measurement (eval's output says so). Other data
have no perceptual network: a ConfigError.

**What each term gave** (fmnist-autoencoder nets, 450 steps of batch 64, float32, one thread;
eval on the 1000 test images, EMA weights; one run each, so differences of a few FID units are
noise): L1 + KL only: L1 0.083, PSNR 22.4 dB, rFID 42.6. With the GAN term from step 250: L1
0.106, PSNR 20.3 dB, rFID 33.9 -- sharper (the seed's point) at a cost in pixel error. GAN plus
the LeNet perceptual term (``perceptual_weight: 0.25``): L1 0.084, PSNR 22.4 dB, rFID 3.6 and
visibly sharper textures, but that rFID is measured in the features the loss matched, so it is
not comparable with the other two.

**Eval** (:meth:`AutoencoderFamily.evaluate`): on the held-out images, the reconstructions
``Dec(mean(x))`` give the per-pixel L1 and MSE (model space ``[-1, 1]``), PSNR (uint8 values, peak
255, mean over images), rFID / KID / precision / recall of the reconstructions against the same
held-out images in the domain features (the bound on what a latent model decoded by this decoder
can reach), and ``reconstructions.png`` in the run folder: rows of originals, each followed by the
row of their reconstructions. An autoencoder does not generate: ``capabilities().generate`` is
False. Latent diffusion (:mod:`scorelab.families.latent`) opens a run of this family and uses
:meth:`encode`, :meth:`decode` and :attr:`latent_shape`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..gan import discriminator_loss, generator_loss
from ..nets.autoencoder import Autoencoder, AutoencoderNetConfig, PatchDiscriminator, PatchDiscriminatorConfig
from ..quantize import to_uint8
from ..random import randn
from ..train.config import ConfigError
from ..train.distributed import mean_over_ranks
from ..vae import kl_standard_normal
from .base import Capabilities, Family, OptimizerSpec, check_optimizer_overrides, register

__all__ = ["AutoencoderConfig", "AutoencoderFamily", "adaptive_weight", "lenet_perceptual_distance", "RECONSTRUCTIONS"]

RECONSTRUCTIONS = ("l1", "l2")
PSNR_MAX_DB = 80.0  # per-image PSNR cap: a perfect reconstruction (MSE 0) counts as 80 dB
GRID_PAIRS = 32  # originals (with their reconstructions) in reconstructions.png


@dataclass
class AutoencoderConfig:
    family: str = "autoencoder"  # registry name of this family
    net_options: dict = field(default_factory=dict)  # AutoencoderNetConfig fields: z_channels factor base_channels channel_mult num_res_blocks attention groups
    reconstruction: str = "l1"  # per-pixel distance d summed over pixels: l1 |x - x^| (LDM) or l2 (x - x^)^2
    kl_weight: float = 1e-6  # weight of KL(q(z|x) || N(0, I)) summed over latent dims (LDM's KL autoencoders: 1e-6)
    perceptual_weight: float = 0.0  # weight of the LeNet perceptual distance (Fashion-MNIST 28x28 only; LDM's LPIPS: 1.0)
    disc_start: int = 0  # step from which the discriminator trains and the adversarial term is on (LDM: 50001)
    disc_weight: float = 0.5  # factor on the adaptive weight (LDM: 0.5)
    disc_max_weight: float = 1e4  # clamp of the adaptive weight (LDM: 1e4)
    disc_options: dict = field(default_factory=dict)  # PatchDiscriminatorConfig fields: channels layers norm groups spectral_norm init_std
    optim_ae: dict = field(default_factory=dict)  # the autoencoder's AdamW: lr betas weight_decay warmup schedule min_lr_ratio grad_clip (rest: train.*)
    optim_d: dict = field(default_factory=dict)  # the discriminator's AdamW, the same fields

    def __post_init__(self):
        for name in ("net_options", "disc_options", "optim_ae", "optim_d"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"model.{name} must be a mapping, got {getattr(self, name)!r}")
        for opts, names in (("net_options", ("in_channels", "image_size")), ("disc_options", ("in_channels",))):
            for name in names:
                if name in getattr(self, opts):
                    raise ConfigError(f"model.{opts}.{name} is set from the data; remove it")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ConfigError(f"model.reconstruction {self.reconstruction!r} is unknown: expected one of {', '.join(RECONSTRUCTIONS)}")
        for name in ("kl_weight", "perceptual_weight", "disc_weight", "disc_max_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"model.{name} must be a finite number >= 0, got {v}")
        if not isinstance(self.disc_start, int) or isinstance(self.disc_start, bool) or self.disc_start < 0:
            raise ConfigError(f"model.disc_start must be an integer >= 0, got {self.disc_start!r}")
        for name in ("optim_ae", "optim_d"):
            check_optimizer_overrides(getattr(self, name), f"model.{name}")

    @property
    def adversarial(self) -> bool:
        """Whether the discriminator is used at all (``disc_weight > 0``)."""
        return self.disc_weight > 0


# --------------------------------------------------------------------------------------
# The loss pieces
# --------------------------------------------------------------------------------------
def adaptive_weight(rec_loss: Tensor, adv_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4,
                    eps: float = 1e-4, reduce=None) -> Tensor:
    """``clamp(||grad_w rec_loss|| / (||grad_w adv_loss|| + eps), 0, max_weight)``, detached (VQGAN, eq. 7).

    ``rec_loss``, ``adv_loss``: scalars whose graphs reach ``last_layer`` (a weight tensor, the
    decoder's last layer); both graphs are kept for the backward pass that follows. ``reduce``:
    applied to both gradients before their norms (under torchrun the mean over ranks, so the
    weight is the global batch's, the same on every rank); None: the gradients as they are.
    """
    (g_rec,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_adv,) = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)
    if reduce is not None:
        g_rec, g_adv = reduce(g_rec), reduce(g_adv)
    return (g_rec.norm() / (g_adv.norm() + eps)).clamp(0.0, max_weight).detach()


def lenet_perceptual_distance(lenet: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``sum_l mean_{h,w} ||n(f_l(x)) - n(f_l(y))||^2`` per example (B,) over the LeNet's conv blocks.

    ``x, y``: model-space images (B, 1, 28, 28); ``f_l`` the output of block ``l`` of ``lenet.conv``
    (eval mode: BatchNorm uses its running statistics, so examples stay independent); ``n``
    divides each position's feature vector by its norm (LPIPS, Zhang et al. 2018, without the
    learned channel weights). Differentiable in ``x`` and ``y``.
    """
    B = x.shape[0]
    h = torch.cat([x, y]).to(next(lenet.parameters()).dtype)  # (2B, 1, 28, 28): one forward for both
    out = x.new_zeros(B, dtype=torch.float32)
    for block in lenet.conv:
        h = block(h)  # (2B, c_l, H_l, W_l)
        u = h.float() / (h.float().norm(dim=1, keepdim=True) + 1e-10)
        out = out + (u[:B] - u[B:]).square().sum(1).flatten(1).mean(1)
    return out


@register
class AutoencoderFamily(Family):
    """Encoder/decoder (KL-regularised, adversarial) with a patch discriminator; see the module docstring."""

    name = "autoencoder"
    Config = AutoencoderConfig
    declared = Capabilities(generate=False)

    def build(self) -> None:
        d, c = self.data, self.cfg
        if not d.images:
            raise ConfigError(f"the autoencoder family needs images (C, H, W); this data has shape {d.shape}")
        try:
            self.net_cfg = AutoencoderNetConfig.from_dict({**c.net_options, "in_channels": d.shape[0], "image_size": d.shape[1:]})
            self.autoencoder = Autoencoder(self.net_cfg)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.net_options: {e}") from None
        try:
            self.discriminator = PatchDiscriminator(PatchDiscriminatorConfig.from_dict({**c.disc_options, "in_channels": d.shape[0]}))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.disc_options: {e}") from None
        self.perceptual = None
        if c.perceptual_weight > 0:
            if not (d.domain == "fmnist" and d.shape == (1, 28, 28)):
                raise ConfigError("model.perceptual_weight needs 28x28 Fashion-MNIST (its perceptual network is the shipped "
                                  f"Fashion-MNIST LeNet); this data is {d.name or d.domain} {d.shape}")
            from ..nets.classifier import load_domain_classifier

            self.perceptual = load_domain_classifier("fmnist")  # a private copy: eval's shared one is not moved or touched

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(z_channels, H/f, W/f)``: what :meth:`encode` gives and :meth:`decode` takes."""
        return self.net_cfg.latent_shape

    # --- the trainer's interface --------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        """``autoencoder``, and ``discriminator`` unless ``disc_weight`` is 0 (a plain KL autoencoder)."""
        return {"autoencoder": self.autoencoder, **({"discriminator": self.discriminator} if self.cfg.adversarial else {})}

    def frozen(self) -> dict[str, nn.Module]:
        return {"perceptual": self.perceptual} if self.perceptual is not None else {}

    def optimizers(self, train) -> dict[str, OptimizerSpec]:
        """``autoencoder`` (``model.optim_ae``) and ``discriminator`` (``model.optim_d``), each field
        defaulting to ``train.*``."""
        out = {"autoencoder": self.optimizer_from_train(train, ("autoencoder",), **self.cfg.optim_ae)}
        if self.cfg.adversarial:
            out["discriminator"] = self.optimizer_from_train(train, ("discriminator",), **self.cfg.optim_d)
        return out

    def reconstruction_terms(self, x: Tensor, xr: Tensor) -> Tensor:
        """Per-example reconstruction loss (B,): ``sum_pixels [d(x, x^) + perceptual_weight * P(x, x^)]``."""
        diff = (x.float() - xr.float()).flatten(1)
        rec = diff.abs().sum(1) if self.cfg.reconstruction == "l1" else diff.square().sum(1)
        if self.perceptual is not None:  # added to every pixel's distance before the sum, as LDM adds LPIPS
            rec = rec + self.cfg.perceptual_weight * diff.shape[1] * lenet_perceptual_distance(self.perceptual, x, xr)
        return rec

    def training_step(self, modules, batch: dict, ctx) -> dict:
        c = self.cfg
        ae, D = modules["autoencoder"], modules.get("discriminator")
        x = batch["x"]  # (B, C, H, W) in [-1, 1]
        adversarial = c.adversarial and ctx.step >= c.disc_start
        eps = randn((x.shape[0], *self.latent_shape), generator=ctx.generator, device=x.device)  # z = mean + std eps
        with ctx.autocast():
            xr, mean, log_var = ae(x, eps)  # (B, C, H, W); (B, z, h, w) twice
        xr = xr.float()
        rec = self.reconstruction_terms(x, xr).mean()
        kl = kl_standard_normal(mean.float(), log_var.float()).mean()
        loss = rec + c.kl_weight * kl
        out = {"loss": None, "rec_l1": (x - xr).abs().mean().detach(), "kl": kl.detach()}
        if adversarial:
            D.requires_grad_(False)  # the autoencoder's backward needs D's input gradient, not its weights'
            try:
                with ctx.autocast():
                    g = generator_loss(D(xr).float().flatten(), "hinge").mean()  # -mean D(x^) over patches
                lam = c.disc_weight * adaptive_weight(rec, g, _unwrap(ae).last_layer, c.disc_max_weight,
                                                      reduce=lambda t: mean_over_ranks(t, ctx))
                loss = loss + lam * g
            finally:
                D.requires_grad_(True)
            out.update(g_loss=g.detach(), d_weight=lam)
        out["loss"] = loss.detach()
        out["grad_norm"] = ctx.optimize(loss, "autoencoder")
        if adversarial:
            with ctx.autocast():
                logits = D(torch.cat([x, xr.detach()])).float()  # (2B, 1, h, w): real and fake in one forward
            lr, lf = logits.chunk(2)
            d_loss = 0.5 * discriminator_loss(lr.flatten(), lf.flatten(), "hinge").mean()
            out.update(d_loss=d_loss.detach(), logit_real=lr.mean().detach(), logit_fake=lf.mean().detach(),
                       d_grad_norm=ctx.optimize(d_loss, "discriminator"))
        return out

    # --- what the latent family uses ------------------------------------------------------
    @torch.no_grad()
    def encode(self, modules: dict, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior ``(mean, log_var)`` of model-space images ``x: (B, C, H, W)``: two float32
        ``(B, *latent_shape)``, at the run's precision inside the network."""
        ae = modules["autoencoder"]
        with self.autocast(x.device):
            mean, log_var = ae.encode(x)
        return mean.float(), log_var.float()

    @torch.no_grad()
    def decode(self, modules: dict, z: Tensor) -> Tensor:
        """Model-space images ``(B, C, H, W)`` float32 (not clamped) from latents ``z: (B, *latent_shape)``."""
        ae = modules["autoencoder"]
        with self.autocast(z.device):
            return ae.decode(z.to(torch.float32)).float()

    def reconstruct(self, modules: dict, x: Tensor, batch_size: int = 256) -> Tensor:
        """``Dec(mean(x))`` of model-space images, clamped to ``[-1, 1]``, in batches: (N, C, H, W) on CPU."""
        dev = self.device_of(modules)
        parts = []
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(dev, torch.float32)
            parts.append(self.decode(modules, self.encode(modules, xb)[0]).clamp(-1, 1).cpu())
        return torch.cat(parts)

    # --- eval -------------------------------------------------------------------------------
    def evaluate(self, modules, ev) -> dict:
        """Reconstruction L1 / MSE (model space), PSNR (uint8, mean over images), rFID / KID /
        precision / recall of the reconstructions of the held-out images against them, and
        ``reconstructions.png`` (see the module docstring)."""
        from ..quantize import to_model
        from ..viz import save_image_grid

        raw = ev.reference()  # (N, C, H, W) uint8
        x = to_model(raw)
        with ev.bar(1, "reconstructing", unit="set") as bar:
            xr = self.reconstruct(modules, x)
            bar.update(1)
        diff = (xr - x).flatten(1)
        err = (to_uint8(xr).double() - raw.double()).flatten(1)  # in 0..255 units
        mse_u8 = err.square().mean(1).clamp_min(255.0**2 * 10 ** (-PSNR_MAX_DB / 10))
        psnr = 10 * torch.log10(255.0**2 / mse_u8)  # (N,)
        out = {"reconstruction_n": int(x.shape[0]), "l1": round(float(diff.abs().mean()), 5),
               "mse": round(float(diff.square().mean()), 6), "psnr": round(float(psnr.mean()), 3),
               "psnr_stderr": round(float(psnr.std() / math.sqrt(max(len(psnr), 2))), 3)}
        metrics = ev.image_metrics(xr)
        out.update({f"r{k}": v for k, v in metrics.items() if k in ("fid", "kid", "precision", "recall")})
        if metrics and ev.features is not None:
            out["rfid_features"] = ev.features.name + (" (also the perceptual loss's network: not an independent measurement)"
                                                       if self.cfg.perceptual_weight > 0 else "")
        k = min(GRID_PAIRS, x.shape[0])
        rows = [torch.cat([x[i : i + 8], xr[i : i + 8]]) for i in range(0, k, 8)]  # originals row, reconstructions row
        path = save_image_grid(torch.cat(rows), ev.run.path / "reconstructions.png", nrow=8)
        out["grid"] = str(path)
        return out


def _unwrap(m: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / compiled wrapper."""
    for attr in ("module", "_orig_mod"):
        while hasattr(m, attr) and isinstance(getattr(m, attr), nn.Module):
            m = getattr(m, attr)
    return m
