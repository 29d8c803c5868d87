"""The GAN family: a generator and a discriminator playing the game of :mod:`scorelab.gan` (seed 001).

Two networks, two optimizers (``generator`` and ``discriminator``), alternating updates. Each
trainer step (``ctx.step = s``) is::

    D step (every s):            x_f = G(z) with z ~ p(z), no G graph
                                 L_D = mean_i [ d_loss(l(x_i), l(x_f,i)) + r1_scale(s) R1(x_i) ]
                                 ctx.optimize(L_D, "discriminator")
    G step (when (s+1) % n_critic == 0), with the freshly updated D and new latents:
                                 L_G = mean_i g_loss(l(G(z_i)))
                                 ctx.optimize(L_G, "generator")

so ``train.steps`` counts discriminator steps (one data batch each) and the generator takes
``train.steps // n_critic`` steps; both learning-rate schedules (warm-up, decay) run on the
trainer's step. ``d_loss`` / ``g_loss`` are ``model.loss``: ``minimax`` (the seed's game exactly,
``min_G max_D E log D(x) + E log(1 - D(G(z)))``), ``non_saturating`` (the seed's fix, G minimises
``-log D(G(z))``) or ``hinge``. R1 (``r1_gamma / 2 ||grad_x l(x)||^2`` on real data, Mescheder et
al. 2018) is applied lazily: on D steps ``0, k, 2k, ...`` with weight ``k = r1_interval``
(StyleGAN2). It is folded into the same D step, not a separate optimizer step, so Adam's
hyper-parameters need no lazy correction (:func:`scorelab.gan.lazy_adam_hyperparameters` is for
the separate-step form).

**TTUR** (Heusel et al. 2017): ``model.optim_g`` and ``model.optim_d`` each hold any of ``lr,
betas, weight_decay, warmup, schedule, min_lr_ratio, grad_clip``; what they leave out comes from
``train.*``.

**Randomness.** Every draw of a training step (latents, StyleGAN's per-layer noise, style-mixing
crossovers) comes from ``ctx.generator``, the run's checkpointed noise stream, in a fixed order,
so ``N`` steps + resume + ``N`` steps equals ``2N`` steps bit for bit (both optimizers' moments,
both EMAs and the RNG are in the checkpoint). Sampling uses the generator's EMA weights (the
trainer keeps an EMA of every module; :func:`scorelab.runs.open_run` loads it); sample ``i`` of
seed ``s`` draws, from its own generator seeded ``s + i``: ``z`` (z_dim normals), then its label
when the model is conditional and no label is given (uniform over the classes), then StyleGAN's
noise maps.

**Truncation** ``psi`` (``--truncation``, default ``model.truncation``): StyleGAN pulls ``w``
towards the average ``w_avg = E_z f(z)`` (``w' = w_avg + psi (w - w_avg)``, Karras et al. 2019);
the other generators pull ``z`` towards the prior's mean 0 (``z' = psi z``, the reduced-temperature
prior of Kingma & Dhariwal 2018). ``psi = 1`` is the plain model.

**Interpolation** (the seed: ``z_t = t z_0 + (1 - t) z_1``, ``x_t = G(z_t)``): :meth:`latents` gives
``z`` of seeds (exactly what :meth:`sample` draws for them) or, for StyleGAN, ``w = f(z)``; the
CLI builds the linear or spherical path with :mod:`scorelab.interpolation` (``(1 - s) z_0 + s z_1``,
the seed's path with ``t = 1 - s``) and :meth:`generate_from` maps it to images. StyleGAN's noise
is held fixed along the path (one set of noise maps, seed 0), so the strip changes only with the
latent; its ends therefore differ from :meth:`sample` of the two seeds in the noise's fine detail.

**Monitoring** (the seed: "没有可参考的训练曲线", a GAN has no loss curve to watch): every
``monitor_every`` steps :meth:`monitor` scores ``monitor_samples`` images of fixed seeds
(``0..n-1``, EMA generator, ``psi = 1``) against up to 2000 training images: ``fid`` in the shipped
Fashion-MNIST LeNet's features for 28x28 Fashion-MNIST data (with few samples FID is biased
upwards, so compare it within a run and at equal ``monitor_samples``, not with eval's); for points,
``sliced_w2`` against the training points and, on ``8gaussians``, the mode coverage of
:func:`scorelab.gan.mode_coverage` (``modes`` covered, ``high_quality`` share within 3 std of a
mode, ``mode_kl`` of the per-mode histogram). A mode is covered when it holds at least a tenth of
its fair share of the samples (``n / (10 K)``): a collapsed generator that sprays a few points
near a mode does not cover it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..gan import GAN_LOSSES, discriminator_terms, generator_terms, lazy_r1_scale, mode_coverage
from ..nets.gan import DISCRIMINATORS, GENERATORS, StyleGANGenerator, build_discriminator, build_generator, random_crossover, truncate
from ..random import generators_for_seeds, randn
from ..train.config import ConfigError
from .base import Capabilities, CapabilityError, Family, OptimizerSpec, check_optimizer_overrides, register

__all__ = ["GANConfig", "GANFamily"]

MIXTURE_DATA = "8gaussians"  # the dataset whose modes monitor() and evaluate() count
COVERAGE_SAMPLES = 2000  # samples evaluate() draws for the mode coverage
COVERAGE_SHARE = 0.1  # a mode is covered with at least this fraction of its fair share of the samples


@dataclass
class GANConfig:
    family: str = "gan"  # registry name of this family
    generator: str = "dcgan"  # generator net: dcgan stylegan mlp (scorelab.nets.gan)
    generator_options: dict = field(default_factory=dict)  # its config fields (the data fixes image size / channels / dim)
    discriminator: str = "dcgan"  # discriminator net: dcgan mlp
    discriminator_options: dict = field(default_factory=dict)  # its config fields (e.g. spectral_norm, channels)
    z_dim: int = 0  # latent dimension of z ~ N(0, I) (0: the generator's default: dcgan 100, stylegan 128, mlp 8)
    loss: str = "non_saturating"  # minimax (the seed's game), non_saturating (the seed's fix), hinge
    n_critic: int = 1  # discriminator steps (trainer steps) per generator step (WGAN: 5)
    r1_gamma: float = 0.0  # R1 weight gamma: gamma/2 ||grad_x l(x)||^2 on real data (Mescheder et al. 2018); 0: off
    r1_interval: int = 1  # lazy R1: every k-th D step with weight k (StyleGAN2: 16); 1: every step
    style_mixing: float = 0.0  # StyleGAN mixing regularisation: probability of two latents per image (StyleGAN: 0.9)
    truncation: float = 1.0  # default truncation psi of sample / interpolate (1: none)
    truncation_cutoff: int = 0  # StyleGAN: truncate only the first this many layers (0: all)
    optim_g: dict = field(default_factory=dict)  # generator's AdamW: lr betas weight_decay warmup schedule min_lr_ratio grad_clip (rest: train.*)
    optim_d: dict = field(default_factory=dict)  # discriminator's AdamW, the same fields (TTUR: Heusel et al. 2017)
    monitor_every: int = 0  # steps between monitor rows (FID / mode coverage) in metrics.jsonl (0: none)
    monitor_samples: int = 500  # generated examples (seeds 0..n-1) per monitor row

    def __post_init__(self):
        if self.generator not in GENERATORS:
            raise ConfigError(f"model.generator {self.generator!r} is unknown: expected one of {', '.join(GENERATORS)}")
        if self.discriminator not in DISCRIMINATORS:
            raise ConfigError(f"model.discriminator {self.discriminator!r} is unknown: expected one of {', '.join(DISCRIMINATORS)}")
        for name in ("generator_options", "discriminator_options", "optim_g", "optim_d"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"model.{name} must be a mapping, got {getattr(self, name)!r}")
        if "z_dim" in self.generator_options:
            raise ConfigError("model.generator_options.z_dim: set the latent dimension with model.z_dim")
        if self.loss not in GAN_LOSSES:
            raise ConfigError(f"model.loss {self.loss!r} is unknown: expected one of {', '.join(GAN_LOSSES)}")
        for name in ("z_dim", "n_critic", "r1_interval", "truncation_cutoff", "monitor_every", "monitor_samples"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name in ("n_critic", "r1_interval") else 0):
                lo = 1 if name in ("n_critic", "r1_interval") else 0
                raise ConfigError(f"model.{name} must be an integer >= {lo}, got {v!r}")
        if self.monitor_every and self.monitor_samples < 2:
            raise ConfigError(f"model.monitor_samples must be >= 2 when model.monitor_every is set, got {self.monitor_samples}")
        if not (self.r1_gamma >= 0 and math.isfinite(self.r1_gamma)):
            raise ConfigError(f"model.r1_gamma must be a number >= 0, got {self.r1_gamma}")
        if not 0 <= self.style_mixing <= 1:
            raise ConfigError(f"model.style_mixing must be in [0, 1], got {self.style_mixing}")
        if not 0 <= self.truncation <= 1:
            raise ConfigError(f"model.truncation must be in [0, 1], got {self.truncation}")
        for name in ("optim_g", "optim_d"):
            check_optimizer_overrides(getattr(self, name), f"model.{name}")


@register
class GANFamily(Family):
    """Generator + discriminator, alternating AdamW steps; EMA generator for sampling."""

    name = "gan"
    Config = GANConfig
    declared = Capabilities(generate=True, sample_options=("truncation",), interpolate=("z", "w"))

    def build(self) -> None:
        c, d = self.cfg, self.data
        k = d.conditional_classes
        gopts = {**c.generator_options, **({"z_dim": c.z_dim} if c.z_dim else {})}
        try:
            self.generator = build_generator(c.generator, gopts, d.shape, k)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.generator {c.generator!r}: {e}") from None
        try:
            self.discriminator = build_discriminator(c.discriminator, c.discriminator_options, d.shape, k)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.discriminator {c.discriminator!r}: {e}") from None
        self.z_dim = self.generator.z_dim
        self.style = isinstance(self.generator, StyleGANGenerator)
        if not self.style and (c.style_mixing > 0 or c.truncation_cutoff):
            raise ConfigError("model.style_mixing and model.truncation_cutoff need model.generator: stylegan")
        self._monitor_cache: dict = {}  # reference features / mixture check of monitor(), computed once
        self._monitor_note = False  # the "nothing to monitor" note was printed

    @property
    def num_classes(self) -> int:
        """Classes the model is conditioned on (0: unconditional)."""
        return self.data.conditional_classes

    def capabilities(self) -> Capabilities:
        return dataclasses.replace(self.declared, conditional=bool(self.num_classes),
                                   interpolate=("z", "w") if self.style else ("z",))

    # --- the trainer's interface --------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def optimizers(self, train) -> dict[str, OptimizerSpec]:
        """Two AdamW optimizers (TTUR): ``discriminator`` from ``model.optim_d``, ``generator`` from
        ``model.optim_g``, each field defaulting to ``train.*``."""
        return {"discriminator": self.optimizer_from_train(train, ("discriminator",), **self.cfg.optim_d),
                "generator": self.optimizer_from_train(train, ("generator",), **self.cfg.optim_g)}

    def _latents(self, n: int, generator, device) -> Tensor:
        return randn((n, self.z_dim), generator=generator, device=device)

    def _generate_for_training(self, G, n: int, generator: torch.Generator, y: Tensor | None, device) -> Tensor:
        """``G(z)`` for ``n`` fresh latents from the training stream (StyleGAN: its noise maps and,
        with ``style_mixing``, a second latent and a crossover layer per image, all from that stream)."""
        z = self._latents(n, generator, device)
        if not self.style:
            return G(z, y)
        kw = {"generator": generator}
        if self.cfg.style_mixing > 0:
            kw["z2"] = self._latents(n, generator, device)
            kw["crossover"] = random_crossover(n, self.generator.num_ws, self.cfg.style_mixing, generator=generator, device=device)
        return G(z, y, **kw)

    def training_step(self, modules, batch: dict, ctx) -> dict:
        """One D step and, every ``n_critic``-th step, one G step (module docstring); metrics:

        ``loss_d`` (first: the progress bar and the trainer's non-finite check), ``loss_g``, ``d_real``
        = mean D(x) and ``d_fake`` = mean D(G(z)) as probabilities (the D step's, before its update),
        ``r1`` (the penalty before the lazy weight, on the steps it is applied), ``grad_norm_d`` /
        ``grad_norm_g`` (before clipping)."""
        c = self.cfg
        G, D = modules["generator"], modules["discriminator"]
        x = batch["x"]
        B, dev = x.shape[0], x.device
        y = batch["y"] if self.num_classes else None

        def D32(inp, *labels):  # logits in float32 whatever the autocast
            return D(inp, *labels).float()

        # --- discriminator step: fakes without G's graph
        with torch.no_grad(), ctx.autocast():
            fake = self._generate_for_training(G, B, ctx.generator, y, dev).float()
        r1_scale = lazy_r1_scale(ctx.step, c.r1_interval) if c.r1_gamma > 0 else 0.0
        with ctx.autocast():
            dt = discriminator_terms(D32, x, fake, c.loss, c.r1_gamma, r1_scale, y, y)
        loss_d = dt.loss.float().mean()
        out = {"loss_d": loss_d.detach()}
        gn_d = ctx.optimize(loss_d, "discriminator")
        m = dt.metrics()
        out.update(d_real=m["d_real"], d_fake=m["d_fake"])
        if "r1" in m:
            out["r1"] = m["r1"]
        out["grad_norm_d"] = gn_d

        # --- generator step against the updated discriminator
        if (ctx.step + 1) % c.n_critic == 0:
            with ctx.autocast():
                fake = self._generate_for_training(G, B, ctx.generator, y, dev)
                gt = generator_terms(D32, fake.float(), c.loss, y)
            loss_g = gt.loss.float().mean()
            gn_g = ctx.optimize(loss_g, "generator")  # a non-finite loss_g is the trainer's to handle, as loss_d
            out["loss_g"] = loss_g.detach()
            out["grad_norm_g"] = gn_g
        # loss_d first, loss_g second (losses are drawn first in loss.png)
        order = ["loss_d", "loss_g", "d_real", "d_fake", "r1", "grad_norm_d", "grad_norm_g"]
        return {k: out[k] for k in order if k in out}

    # --- sampling -----------------------------------------------------------------------
    def _psi(self, truncation: float | None) -> float:
        psi = self.cfg.truncation if truncation is None else float(truncation)
        if not 0 <= psi <= 1:
            raise ValueError(f"--truncation must be in [0, 1], got {psi}")
        return psi

    @torch.no_grad()
    def sample_batch(self, modules, generators, y, truncation: float | None = None) -> Tensor:
        """One forward pass: ``z`` from each example's generator, then its label (conditional, no
        ``y``), then StyleGAN's noise maps; truncation ``psi`` as in the module docstring."""
        G = modules["generator"]
        dev = self.device_of(modules)
        psi = self._psi(truncation)
        n = len(generators)
        z = self._latents(n, generators, dev)
        y = self.sample_labels(n, generators, y, dev)
        with self.autocast(dev):
            if self.style:
                x = G(z, y, truncation_psi=psi, truncation_cutoff=self.cfg.truncation_cutoff or None, generator=generators)
            else:
                x = G(psi * z, y)
        return x.float()

    # --- interpolation ------------------------------------------------------------------
    def _interp_labels(self, y: Tensor | None, k: int, device) -> Tensor | None:
        if not self.num_classes:
            if y is not None:
                raise CapabilityError("--class given but this GAN is unconditional")
            return None
        if y is None:
            raise CapabilityError("a class-conditional GAN interpolates within one class: add --class K")
        y = torch.as_tensor(y).long().reshape(-1).to(device)
        return y.expand(k) if y.shape[0] == 1 else y

    @torch.no_grad()
    def latents(self, modules, seeds, space: str = "z", y=None) -> Tensor:
        """``z`` of each seed, (k, z_dim): the latent :meth:`sample` draws for that seed; or, in
        ``w`` (StyleGAN), the mapped ``w = f(z, y)``, (k, w_dim), before truncation."""
        caps = self.capabilities()
        if space not in caps.interpolate:
            raise CapabilityError(f"{self.name} runs with a {self.cfg.generator} generator interpolate in "
                                  f"{' or '.join(repr(s) for s in caps.interpolate)} space, not {space!r}")
        gens = generators_for_seeds(list(seeds))
        dev = self.device_of(modules)
        z = self._latents(len(gens), gens, dev)
        if space == "z":
            return z.cpu()
        labels = self._interp_labels(y, len(gens), dev)
        return modules["generator"].mapping(z, labels).float().cpu()

    @torch.no_grad()
    def generate_from(self, modules, z: Tensor, space: str = "z", y=None, **options) -> Tensor:
        """Images / points from latents ``z: (k, z_dim)`` (space ``z``) or ``w: (k, w_dim)`` (space
        ``w``), deterministically: truncation ``model.truncation``; StyleGAN's noise maps fixed (seed 0)
        and shared by every row."""
        self.check_options("interpolate", options, ())
        caps = self.capabilities()
        if space not in caps.interpolate:
            raise CapabilityError(f"{self.name} runs with a {self.cfg.generator} generator interpolate in "
                                  f"{' or '.join(repr(s) for s in caps.interpolate)} space, not {space!r}")
        G = modules["generator"]
        dev = self.device_of(modules)
        z = z.to(dev, torch.float32)
        k = z.shape[0]
        labels = self._interp_labels(y, k, dev)
        psi = self._psi(None)
        with self.autocast(dev):
            if not self.style:
                x = G(psi * z, labels)
            else:
                w = G.mapping(z, labels) if space == "z" else z
                ws = w[:, None, :].expand(k, G.num_ws, w.shape[1])
                if psi != 1:
                    w_avg = G._w_avg_for(labels, k)
                    ws = truncate(ws, w_avg.to(ws), psi, self.cfg.truncation_cutoff or None)
                noise = [n.expand(k, -1, -1, -1) for n in G.noise_inputs(1, torch.Generator().manual_seed(0), dev)]
                x = G.synthesis(ws, noise=noise if G.cfg.noise else None)
        x = x.float().cpu()
        return x.clamp(-1, 1) if self.data.images else x

    # --- watching the game --------------------------------------------------------------
    def _monitor_kind(self) -> str:
        """``fid`` (Fashion-MNIST images), ``points`` or ``""`` (nothing to compute)."""
        d = self.data
        if d.images:
            return "fid" if d.domain == "fmnist" and d.shape == (1, 28, 28) else ""
        return "points"

    def monitor_every(self) -> int:
        if not self.cfg.monitor_every:
            return 0
        if not self._monitor_kind():
            if not self._monitor_note:
                print(f"gan: no feature classifier for {self.data.domain or 'these'} images {self.data.shape} during "
                      "training: the FID monitor is off (scorelab eval trains one)", file=sys.stderr)
                self._monitor_note = True
            return 0
        return self.cfg.monitor_every

    def _mixture_for(self, x_real: Tensor | None = None, options: dict | None = None):
        """The 8-Gaussians mixture of the data (``options``: the dataset's radius / std), or None when
        the data is not 8gaussians or when the training points do not fit the default mixture."""
        from ..data.mixture import eight_gaussians_mixture

        if self.data.name != MIXTURE_DATA:
            return None
        opts = options or {}
        mix = eight_gaussians_mixture(float(opts.get("radius", 2.0)), float(opts.get("std", 0.1)))
        if x_real is not None:
            cov = mode_coverage(x_real.double(), mix)
            if cov.modes < mix.K or cov.high_quality < 0.95:
                return None
        return mix

    @staticmethod
    def _coverage(x: Tensor, mix):
        """:func:`~scorelab.gan.mode_coverage` of ``x: (N, 2)``, a mode covered with ``>= N / (10 K)`` samples."""
        return mode_coverage(x, mix, min_count=max(1, math.ceil(COVERAGE_SHARE * x.shape[0] / mix.K)))

    @torch.no_grad()
    def monitor(self, modules, ctx) -> dict:
        """``fid`` (Fashion-MNIST) or ``modes, high_quality, mode_kl, sliced_w2`` (points) of the
        ``monitor_samples`` samples of seeds ``ctx.seed ..`` (no truncation) against ``ctx.x``."""
        from ..metrics import sliced_wasserstein

        kind = self._monitor_kind()
        if not kind:
            return {}
        n = self.cfg.monitor_samples
        fake = self.sample(modules, n, seed=ctx.seed, truncation=1.0)
        if kind == "fid":
            from ..metrics import DomainMetrics, _default_classifier, fid_from_features
            from ..quantize import to_model

            dm = DomainMetrics(_default_classifier("fmnist"))
            if "real" not in self._monitor_cache:
                self._monitor_cache["real"] = dm.features(to_model(ctx.x), "real_images")
            return {"fid": fid_from_features(self._monitor_cache["real"], dm.features(fake, "fake_images"))}
        real = ctx.x.to(torch.float32)
        out = {}
        if "mixture" not in self._monitor_cache:
            self._monitor_cache["mixture"] = self._mixture_for(real)
            if self._monitor_cache["mixture"] is None and self.data.name == MIXTURE_DATA:
                print("gan: the 8gaussians training points do not fit the default mixture (radius 2, std 0.1): mode "
                      "coverage is left to scorelab eval", file=sys.stderr)
        mix = self._monitor_cache["mixture"]
        if mix is not None:
            out.update({k: v for k, v in self._coverage(fake, mix).metrics().items() if math.isfinite(v)})  # no mode_kl without high-quality samples
        out["sliced_w2"] = float(sliced_wasserstein(fake.flatten(1), real.flatten(1), generator=torch.Generator().manual_seed(0)))
        return out

    def evaluate(self, modules, ev) -> dict:
        """Mode coverage of ``COVERAGE_SAMPLES`` samples (seeds ``ev.seed ..``) on 8gaussians data."""
        if self.data.images:
            return {}
        mix = self._mixture_for(options=ev.run.cfg.data.options)
        if mix is None:
            return {}
        x = self.sample(modules, COVERAGE_SAMPLES, seed=ev.seed)
        cov = self._coverage(x, mix)
        return {"modes": cov.modes, "num_modes": cov.num_modes, "high_quality": round(cov.high_quality, 4),
                "expected_high_quality": round(cov.expected_high_quality, 4),
                "mode_kl": round(cov.kl, 4) if math.isfinite(cov.kl) else None,
                "mode_counts": cov.counts.tolist(), "coverage_samples": COVERAGE_SAMPLES}
