"""The diffusion family: every path x every prediction kind, trained with the one regression loss.

Rectified flow, DDPM, VP/VE/sub-VP SDE models and EDM are all this family with different
``path`` / ``prediction`` / ``target`` / ``weighting`` / ``time_sampler`` settings (see the YAML
presets in ``configs/``). Sampling goes through ``scorelab.samplers`` with any sampler and grid.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..losses import WEIGHTINGS, diffusion_loss, make_time_sampler, ot_pairing
from ..nets.registry import NETS, build_net
from ..paths import PATHS, DDPMDiscrete, make_path
from ..random import rand
from ..targets import KINDS, PRECONDITIONINGS, Denoiser
from ..train.config import ConfigError
from ..train.distributed import gather_rows, own_rows
from .base import Capabilities, CapabilityError, Family, register

__all__ = ["DiffusionConfig", "DiffusionFamily"]


@dataclass
class DiffusionConfig:
    family: str = "diffusion"  # registry name of this family
    path: str = "rf"  # forward process: vp cosine subvp ddpm ve rf edm
    path_options: dict = field(default_factory=dict)  # e.g. {T: 1000} for ddpm, {sigma_max: 50} for ve
    prediction: str = "velocity"  # what the network outputs: eps x0 v score velocity
    target: str = ""  # what the loss regresses ("" = the prediction itself)
    weighting: str = "constant"  # lambda(t): constant sigma2 snr min_snr edm
    weighting_options: dict = field(default_factory=dict)  # e.g. {snr_cap: 5} for min_snr
    time_sampler: str = "uniform"  # uniform logit_normal log_normal levels
    time_sampler_options: dict = field(default_factory=dict)  # e.g. {location: 0, scale: 1}
    coupling: str = "independent"  # pairs of data and noise in a batch: independent | ot (minibatch optimal transport, losses.ot_pairing)
    net: str = "unet"  # network registry name: unet mlp
    net_options: dict = field(default_factory=dict)  # the net's config fields
    sampler: str = "auto"  # default sampler for grids, `scorelab sample` and `eval` (auto: the path's, samplers.default_sampler)
    sampling_steps: int = 20  # default number of sampler steps
    grid: str = "auto"  # default time grid: uniform karras logsnr logsnr_x0 shift (auto: the default sampler's)
    grid_options: dict = field(default_factory=dict)  # e.g. {shift: 3} or {rho: 7}
    sampler_options: dict = field(default_factory=dict)  # e.g. {n_steps_each: 100} for annealed_langevin
    label_dropout: float = 0.0  # probability of replacing a label by the null label in training
    input_sigma_data: float = 0.0  # EDM input scaling c_in = 1/sqrt(alpha^2 s_d^2 + sigma^2) with s_d this (0: off; VE needs it)
    preconditioning: str = "none"  # none | input (c_in only) | edm (c_in, c_skip, c_out: the net then learns F, the denoiser is x0)
    sigma_data: float = 0.5  # EDM's expected data std for preconditioning input / edm (Karras et al. 2022)

    def __post_init__(self):
        if self.prediction not in KINDS:
            raise ConfigError(f"model.prediction {self.prediction!r} is unknown: expected one of {', '.join(KINDS)}")
        self.target = self.target or self.prediction
        if self.target not in KINDS:
            raise ConfigError(f"model.target {self.target!r} is unknown: expected one of {', '.join(KINDS)}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"model.weighting {self.weighting!r} is unknown: expected one of {', '.join(WEIGHTINGS)}")
        try:  # options are checked now, not after training has started
            from ..losses import weighting
            from ..paths import RectifiedFlow

            weighting(self.weighting, RectifiedFlow().coefficients(torch.tensor([0.5], dtype=torch.float64)), self.target,
                      **self.weighting_options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.weighting_options: {e}") from None
        check_model_fields(self)
        if not self.input_sigma_data >= 0:
            raise ConfigError(f"model.input_sigma_data must be >= 0 (0: off), got {self.input_sigma_data}")
        if self.preconditioning not in PRECONDITIONINGS:
            raise ConfigError(f"model.preconditioning {self.preconditioning!r} is unknown: expected one of {', '.join(PRECONDITIONINGS)}")
        if self.preconditioning == "edm" and self.prediction != "x0":
            raise ConfigError("model.preconditioning 'edm' makes the denoiser an x0 estimate: set model.prediction: x0")
        if not self.sigma_data > 0:
            raise ConfigError(f"model.sigma_data must be > 0, got {self.sigma_data}")
        check_path_fields(self)
        if self.coupling not in COUPLINGS:
            raise ConfigError(f"model.coupling {self.coupling!r} is unknown: expected one of {', '.join(COUPLINGS)}")


COUPLINGS = ("independent", "ot")
AUTO = "auto"  # model.sampler / model.grid: the path's default (scorelab.samplers.default_sampler)


def resolve_sampler(cfg, path) -> None:
    """Replace ``auto`` in ``cfg.sampler`` / ``cfg.grid`` by names, so every later reader sees one:
    the path's default sampler and grid (:func:`scorelab.samplers.default_sampler`), the rule of
    :func:`scorelab.samplers.sample` called with ``sampler=None`` / ``grid=None``."""
    cfg.sampler, cfg.sampler_options, cfg.grid, cfg.grid_options = auto_sampler(
        path, cfg.sampler, cfg.sampler_options, cfg.grid, cfg.grid_options)


def auto_sampler(path, sampler, sampler_options, grid, grid_options) -> tuple:
    """``(sampler, sampler_options, grid, grid_options)`` with ``auto`` resolved (:func:`resolve_sampler`)."""
    from ..samplers import default_sampler

    d = default_sampler(path)
    if sampler == AUTO:
        sampler, sampler_options = d["sampler"], {**d["options"], **(sampler_options or {})}
    if grid == AUTO:
        grid, grid_options = d["grid"], {**d["grid_opts"], **(grid_options or {})}
    return sampler, sampler_options, grid, grid_options


def ot_coupled(x0: Tensor, eps: Tensor, ctx) -> Tensor:
    """``eps`` reordered by the minibatch OT pairing of the *global* batch (under torchrun: the
    ranks' shards gathered, paired alike on every rank, and this rank's rows taken back), so a
    2-process run trains exactly as one process does."""
    gx, ge = gather_rows(x0, ctx), gather_rows(eps, ctx)
    return own_rows(ge[ot_pairing(gx, ge)], ctx)


def check_model_fields(cfg) -> None:
    """ConfigError for a bad ``net``, ``sampler``, ``grid``, ``sampler_options``, ``sampling_steps``
    or ``label_dropout``: the fields every denoising-model config (diffusion, vdm) shares."""
    from ..paths import GRIDS
    from ..samplers import SAMPLERS

    if cfg.net not in NETS:
        raise ConfigError(f"model.net {cfg.net!r} is unknown: expected one of {', '.join(NETS)}")
    if cfg.sampler != AUTO and cfg.sampler not in SAMPLERS:
        raise ConfigError(f"model.sampler {cfg.sampler!r} is unknown: expected auto or one of {', '.join(SAMPLERS)}")
    if cfg.grid != AUTO and cfg.grid not in GRIDS:
        raise ConfigError(f"model.grid {cfg.grid!r} is unknown: expected auto or one of {', '.join(GRIDS)}")
    if not isinstance(cfg.sampler_options, dict):
        raise ConfigError(f"model.sampler_options must be a mapping, got {cfg.sampler_options!r}")
    if cfg.sampler_options and cfg.sampler == AUTO:
        raise ConfigError("model.sampler_options need a named model.sampler (auto picks the path's default sampler)")
    if cfg.sampler != AUTO:
        _check_keywords("sampler_options", cfg.sampler_options, SAMPLERS[cfg.sampler], f"sampler {cfg.sampler!r}",
                        ("denoiser", "x", "ts", "generator", "callback", "cond"))
    if not isinstance(cfg.grid_options, dict):
        raise ConfigError(f"model.grid_options must be a mapping, got {cfg.grid_options!r}")
    if cfg.grid_options and cfg.grid == AUTO:
        raise ConfigError("model.grid_options need a named model.grid (auto picks the default sampler's grid)")
    if cfg.grid != AUTO:
        _check_keywords("grid_options", cfg.grid_options, GRIDS[cfg.grid], f"grid {cfg.grid!r}", ("path", "n"))
    if cfg.sampling_steps < 1:
        raise ConfigError(f"model.sampling_steps must be >= 1, got {cfg.sampling_steps}")
    if not 0 <= cfg.label_dropout < 1:
        raise ConfigError(f"model.label_dropout must be in [0, 1), got {cfg.label_dropout}")


def _check_keywords(field: str, options: dict, fn, what: str, internal: tuple) -> None:
    """ConfigError naming ``model.<field>.<key>`` for a key that ``fn`` does not take (checked when
    the config is read, not when the first sample is drawn after training)."""
    import inspect

    takes = [p.name for p in inspect.signature(fn).parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in internal]
    for key in options:
        if key not in takes:
            raise ConfigError(f"model.{field}.{key}: the {what} takes no option {key!r} "
                              f"(it takes: {', '.join(takes) or 'none'})")


def check_path_fields(cfg) -> None:
    """ConfigError unless ``cfg.path`` with ``path_options`` and ``cfg.time_sampler`` with its
    options can be built (diffusion and noise-aware classifier configs)."""
    if cfg.path not in PATHS:
        raise ConfigError(f"model.path {cfg.path!r} is unknown: expected one of {', '.join(PATHS)}")
    for k in ("path_options", "time_sampler_options"):
        if not isinstance(getattr(cfg, k), dict):
            raise ConfigError(f"model.{k} must be a mapping, got {getattr(cfg, k)!r}")
    try:
        make_path(cfg.path, **cfg.path_options)
    except (ValueError, TypeError, RuntimeError) as e:  # e.g. {T: -5}: torch's own error
        raise ConfigError(f"model: path {cfg.path!r} with path_options {cfg.path_options}: {e}") from None
    try:
        make_time_sampler(cfg.time_sampler, **cfg.time_sampler_options)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"model: {e}") from None


SAMPLE_OPTIONS = ("sampler", "steps", "grid", "grid_options", "sampler_options", "cfg", "classifier", "classifier_scale",
                  "callback")


@register
class DiffusionFamily(Family):
    """Network + path + loss; ``training_step`` does one optimisation step of the regression loss."""

    name = "diffusion"
    Config = DiffusionConfig
    declared = Capabilities(generate=True, sample_options=SAMPLE_OPTIONS, denoiser=True, nll=("elbo", "pf_ode"),
                            nll_options=("n_t",), nll_slow=("pf_ode",), interpolate=("noise",))
    NLL_METHODS = ("elbo", "pf_ode")

    def build(self) -> None:
        self.path = make_path(self.cfg.path, **self.cfg.path_options)
        resolve_sampler(self.cfg, self.path)
        self.time_sampler = make_time_sampler(self.cfg.time_sampler, **self.cfg.time_sampler_options)
        try:
            self.net = build_net(self.cfg.net, self.cfg.net_options, self.model_shape, self.data.conditional_classes)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.net_options: {e}") from None

    @property
    def model_shape(self) -> tuple:
        """One example as the network sees it: the data's shape (latent diffusion: the latents')."""
        return self.data.shape

    @property
    def num_classes(self) -> int:
        """Classes the model is conditioned on (0: unconditional); label ``num_classes`` is the null label."""
        return self.data.conditional_classes

    def capabilities(self) -> Capabilities:
        return dataclasses.replace(self.declared, conditional=bool(self.num_classes))

    # --- the trainer's interface --------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def path_of(self, modules: dict) -> "object":
        """The forward process (fixed here; VDM's is learned and lives in its modules)."""
        return self.path

    def denoiser(self, modules: dict | None = None, net_dtype: torch.dtype | None = None, autocast="run") -> Denoiser:
        """The trained model as a :class:`~scorelab.targets.Denoiser` (any sampler, grid, guidance, PF-ODE).

        ``autocast``: ``"run"`` (the run's precision, :attr:`autocast_dtype`), ``None`` (the net's own
        dtype) or a dtype."""
        m = modules or self.modules()
        precond, sd = self.preconditioning()
        return Denoiser(m["net"], self.path_of(m), self.cfg.prediction, net_dtype=net_dtype, precond=precond, sigma_data=sd,
                        autocast=self.autocast_dtype if autocast == "run" else autocast)

    def preconditioning(self) -> tuple[str, float]:
        """``(precond, sigma_data)`` of the :class:`~scorelab.targets.Denoiser` (``input_sigma_data > 0`` is ``input``)."""
        c = self.cfg
        return ("input", c.input_sigma_data) if c.input_sigma_data > 0 else (c.preconditioning, c.sigma_data)

    def _cond(self, batch: dict, ctx=None) -> dict:
        """``{"y": labels}`` of a class-conditional model (``{}`` otherwise); with the trainer's ``ctx``,
        each label becomes the null label with probability ``label_dropout`` (from ``ctx.generator``)."""
        if not self.num_classes:
            return {}
        y = batch["y"].clone()
        if ctx is not None and self.cfg.label_dropout > 0:
            drop = rand(y.shape, generator=ctx.generator, device=y.device) < self.cfg.label_dropout  # (B,): one draw per example
            y[drop] = self.num_classes
        return {"y": y}

    def training_step(self, modules, batch: dict, ctx) -> dict:
        den = self.denoiser(modules, net_dtype=torch.float32, autocast=ctx.autocast_dtype)
        loss = diffusion_loss(
            den, batch["x"], target=self.cfg.target, weighting_name=self.cfg.weighting,
            weighting_opts=self.cfg.weighting_options, time_sampler=self.time_sampler,
            generator=ctx.generator, cond=self._cond(batch, ctx),
            couple=(lambda x0, eps: ot_coupled(x0, eps, ctx)) if self.cfg.coupling == "ot" else None,
        ).mean()
        gn = ctx.optimize(loss, "main")
        return {"loss": loss.detach(), "grad_norm": gn}

    # --- sampling -----------------------------------------------------------------------
    def sample_batch_size(self, **options) -> int:
        return 256 if self.data.images else 4096

    def guided(self, den, y: Tensor | None, cfg: float | None = None, classifier=None, classifier_scale: float = 1.0):
        """``den`` wrapped by classifier-free guidance (weight ``cfg``: ``(1 + w) out_y - w out_null``)
        and / or classifier guidance (``classifier``: an opened noisy_classifier run on the same path)."""
        from ..guidance import ClassifierFreeGuidance, ClassifierGuidance

        if cfg is None and classifier is None:
            return den
        if y is None:
            raise CapabilityError("guidance needs the class(es) to steer toward: add --class K")
        if cfg is not None:
            if not self.num_classes:
                raise CapabilityError("--cfg needs a class-conditional run trained with label dropout (model.label_dropout > 0)")
            den = ClassifierFreeGuidance(den, cfg, form="w")
        if classifier is not None:
            clf = classifier.family
            if not clf.capabilities().classify:
                raise CapabilityError(f"--classifier {classifier.path} is a {clf.name} run, not a noisy_classifier run")
            if repr(clf.path) != repr(den.path):
                raise CapabilityError(f"--classifier {classifier.path} was trained on path {clf.path!r}, the model on "
                                      f"{den.path!r}: the classifier must see the same x_t at the same t")
            if int(y.max()) >= clf.num_classes:
                raise CapabilityError(f"--classifier {classifier.path} has {clf.num_classes} classes; "
                                      f"--class {int(y.max())} is out of its range")
            den = ClassifierGuidance(den, clf.classifier(classifier.modules), classifier_scale, pass_label=bool(self.num_classes))
        return den

    def _sampler_args(self, modules, sampler, steps, grid, grid_options, sampler_options) -> dict:
        c = self.cfg
        if sampler == AUTO and grid is None:  # --sampler auto alone: the default sampler on its own grid
            grid = AUTO
        if AUTO in (sampler, grid):  # --sampler auto / --grid auto
            sampler, sampler_options, grid, grid_options = auto_sampler(
                self.path_of(modules), sampler or c.sampler, sampler_options, grid, grid_options)
        # the config's sampler_options belong to the config's sampler: another sampler starts from its defaults
        own = sampler is None or sampler == c.sampler
        return dict(sampler=sampler or c.sampler, steps=steps or c.sampling_steps, grid=grid or c.grid,
                    grid_opts=c.grid_options if grid_options is None else grid_options,
                    opts={**(c.sampler_options if own else {}), **(sampler_options or {})})

    @torch.no_grad()
    def _run_sampler(self, modules, x: Tensor, generators, y, sampler=None, steps=None, grid=None, grid_options=None,
                     sampler_options=None, cfg=None, classifier=None, classifier_scale=1.0, callback=None) -> Tensor:
        from ..samplers import sample as run_sampler

        if steps is not None and steps < 1:
            raise ValueError(f"--steps must be >= 1, got {steps}")
        a = self._sampler_args(modules, sampler, steps, grid, grid_options, sampler_options)
        dev = x.device
        den = self.guided(self.denoiser(modules), y, cfg, classifier, classifier_scale)
        cond = {}
        if self.num_classes:
            cond["y"] = (y if y is not None else self.null_labels(x.shape[0])).to(dev)
        elif classifier is not None and y is not None:  # an unconditional model steered by a classifier
            cond["y"] = y.to(dev)
        return run_sampler(den, x, a["steps"], sampler=a["sampler"], grid=a["grid"], grid_opts=a["grid_opts"],
                           generator=generators, cond=cond, callback=callback, **a["opts"])

    def sample_batch(self, modules, generators, y, **options) -> Tensor:
        """Start at the prior ``path.prior_sample`` (example ``i`` from ``generators[i]``) and run the sampler."""
        dev = self.device_of(modules)
        x = self.path_of(modules).prior_sample((len(generators), *self.model_shape), generator=generators,
                                               dtype=torch.float32).to(dev)
        return self._run_sampler(modules, x, generators, y, **options)

    # --- interpolation ------------------------------------------------------------------
    def latents(self, modules, seeds, space: str = "noise", y=None) -> Tensor:
        """The start noises of ``seeds`` (what :meth:`sample` would draw for them): (k, *shape)."""
        from ..random import generators_for_seeds

        if space != "noise":
            raise CapabilityError(f"{self.name} runs interpolate in 'noise' space, not {space!r}")
        gens = generators_for_seeds(list(seeds))
        return self.path_of(modules).prior_sample((len(gens), *self.model_shape), generator=gens, dtype=torch.float32)

    def deterministic_samples(self, modules, z: Tensor, y=None, **options) -> Tensor:
        """The model-space samples of start noises ``z`` under a deterministic sampler (ddim runs
        with eta = 0); a stochastic one is a CapabilityError naming ``--sampler``."""
        from ..samplers import DETERMINISTIC

        self.check_options("interpolate", options, ("sampler", "steps", "grid"))
        # resolved once (auto included), by the rule every sampling call follows
        a = self._sampler_args(modules, options.get("sampler"), options.get("steps"), options.get("grid"), None, None)
        sampler = a["sampler"]
        if sampler not in DETERMINISTIC:
            raise CapabilityError(f"sampler {sampler!r} is stochastic: interpolation needs a deterministic one "
                                  f"({', '.join(DETERMINISTIC)}); pass --sampler")
        opts = {"eta": 0.0} if sampler == "ddim" else {}
        return self._run_sampler(modules, z.to(self.device_of(modules), torch.float32), None, y, sampler=sampler,
                                 steps=a["steps"], grid=a["grid"], grid_options=a["grid_opts"], sampler_options=opts)

    def generate_from(self, modules, z: Tensor, space: str = "noise", y=None, **options) -> Tensor:
        """Samples from given start noises ``z`` with a deterministic sampler (:meth:`deterministic_samples`)."""
        x = self.deterministic_samples(modules, z, y, **options).float().cpu()
        return x.clamp(-1, 1) if self.data.images else x

    # --- likelihood ---------------------------------------------------------------------
    def nll(self, modules, x: Tensor, *, method: str = "elbo", seed: int = 0, y: Tensor | None = None,
            batch_size: int = 128, n_t: int = 16, progress=None, **opts) -> dict:
        """Per-example negative log-likelihood bound / estimate of raw data ``x``.

        ``x``: uint8 images (B, C, H, W) -> **bits/dim**, or points (B, D) -> **nats** per example.
        ``method``:

        * ``elbo``: the discrete DDPM ELBO (:func:`scorelab.likelihood.ddpm_elbo_terms`, ``n_t``
          sampled steps) on the ``ddpm`` path, the continuous-time ELBO
          (:func:`scorelab.vdm.continuous_elbo_terms`, ``n_t`` log-SNR-uniform times) on every other path;
        * ``pf_ode``: the probability-flow ODE (:mod:`scorelab.likelihood`; Hutchinson trace with
          uniform dequantization for images, exact trace for points).

        Example ``i`` uses a generator seeded ``seed + i``, so results do not depend on the batch
        size. ``progress(k)`` is called after each batch of ``k`` examples. Returns
        ``{"total": (B,), <terms>: (B,), "units": str}``.
        """
        from ..random import generators_for_seeds

        if method not in self.NLL_METHODS:
            raise ValueError(f"nll method must be one of {', '.join(self.NLL_METHODS)}, got {method!r}")
        if self.data.images and x.dtype != torch.uint8:
            raise ValueError(f"nll needs raw uint8 images, got {x.dtype}")
        if n_t < 1:
            raise ValueError(f"--nll-t must be >= 1, got {n_t}")
        gens = generators_for_seeds(range(seed, seed + x.shape[0]))
        den = self.denoiser(modules, autocast=None)  # likelihoods in float32: bf16 rounding would bias them
        dev = self.device_of(modules)
        parts = []
        for i in range(0, x.shape[0], batch_size):
            j = min(x.shape[0], i + batch_size)
            cond = {}
            if self.num_classes:
                cond["y"] = (y[i:j] if y is not None else self.null_labels(j - i)).to(dev)
            with torch.no_grad():
                parts.append(self._nll_batch(den, x[i:j].to(dev), gens[i:j], method, n_t, cond, opts))
            if progress is not None:
                progress(j - i)
        out = {k: torch.cat([p[k].detach().double().cpu() for p in parts]) for k in parts[0]}
        if not self.data.images and method == "elbo" and isinstance(den.path, DDPMDiscrete):
            # ddpm_elbo_terms reports continuous data per dimension in bits: bring it to nats per example
            for k in ("prior", "diffusion", "reconstruction", "total"):
                out[k] = out[k] * self.data.shape[0] * math.log(2)
        out["units"] = "bits/dim" if self.data.images else "nats"
        return out

    def _nll_batch(self, den, xb: Tensor, gen, method: str, n_t: int, cond: dict, opts: dict) -> dict:
        from ..likelihood import ddpm_elbo_terms, pf_ode_bits_per_dim, pf_ode_log_likelihood
        from ..vdm import continuous_elbo_terms

        images = self.data.images
        if method == "pf_ode":
            if images:
                bpd, stats = pf_ode_bits_per_dim(den, xb, gen, trace="hutchinson", dtype=torch.float32, cond=cond, **opts)
                return {"total": bpd, "nfe": torch.full_like(bpd, float(stats["nfe"]))}
            lp, stats = pf_ode_log_likelihood(den, xb.double(), trace="exact", cond=cond, **opts)
            return {"total": -lp, "nfe": torch.full_like(lp, float(stats["nfe"]))}
        xin = xb if images else xb.double()
        if isinstance(den.path, DDPMDiscrete):
            terms = ddpm_elbo_terms(den, xin, gen, n_t=n_t, cond=cond)
        else:
            lo, hi = self._elbo_range(den.path)
            terms = continuous_elbo_terms(den, xin, gen, t_min=lo, t_max=hi, n_t=n_t, cond=cond, time_sampling="log_snr")
        return {k: terms[k] for k in ("prior", "diffusion", "reconstruction", "total")}

    @staticmethod
    def _elbo_range(path) -> tuple[float, float]:
        """Ends of the continuous ELBO's log-SNR integral: the path's ``t_min`` / ``t_max``, except
        where the log-SNR is infinite there (rectified flow: clean data at t = 0, pure noise at
        t = 1); those ends move to ``sigma / alpha = 1e-3`` and ``1e3``. The prior and
        reconstruction terms then account for the rest (both are tiny at these ends)."""
        lam = path.log_snr(torch.tensor([path.t_min, path.t_max], dtype=torch.float64))
        lo, hi = float(path.t_min), float(path.t_max)
        if not math.isfinite(float(lam[0])):
            lo = float(path.t_from_log_snr(torch.tensor(2 * math.log(1e3), dtype=torch.float64)))
        if not math.isfinite(float(lam[1])):
            hi = float(path.t_from_log_snr(torch.tensor(-2 * math.log(1e3), dtype=torch.float64)))
        return lo, hi
