"""The diffusion family: every path x every prediction kind, trained with the one regression loss.

Rectified flow, DDPM, VP/VE/sub-VP SDE models and EDM are all this family with different
``path`` / ``prediction`` / ``target`` / ``weighting`` / ``time_sampler`` settings (see the YAML
presets in ``configs/``). Sampling goes through ``scorelab.samplers`` with any sampler and grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..data.images import ImageDataset
from ..losses import WEIGHTINGS, diffusion_loss, make_time_sampler
from ..nets.registry import NETS, build_net
from ..paths import PATHS, make_path
from ..targets import KINDS, Denoiser
from ..train.config import ConfigError, from_dict

__all__ = ["DiffusionConfig", "DiffusionFamily"]


@dataclass
class DiffusionConfig:
    family: str = "diffusion"  # registry name of this family
    path: str = "rf"  # forward process: vp cosine subvp ddpm ve rf edm
    path_options: dict = field(default_factory=dict)  # e.g. {T: 1000} for ddpm, {sigma_max: 50} for ve
    prediction: str = "velocity"  # what the network outputs: eps x0 v score velocity
    target: str = ""  # what the loss regresses ("" = the prediction itself)
    weighting: str = "constant"  # lambda(t): constant sigma2 snr min_snr edm
    weighting_options: dict = field(default_factory=dict)  # e.g. {gamma: 5} for min_snr
    time_sampler: str = "uniform"  # uniform logit_normal log_normal levels
    time_sampler_options: dict = field(default_factory=dict)  # e.g. {location: 0, scale: 1}
    net: str = "unet"  # network registry name: unet mlp
    net_options: dict = field(default_factory=dict)  # the net's config fields
    sampler: str = "euler"  # default sampler for grids, `scorelab sample` and `eval`
    sampling_steps: int = 20  # default number of sampler steps
    grid: str = "uniform"  # default time grid: uniform karras logsnr shift
    grid_options: dict = field(default_factory=dict)  # e.g. {shift: 3} or {rho: 7}
    sampler_options: dict = field(default_factory=dict)  # e.g. {n_steps_each: 100} for annealed_langevin
    label_dropout: float = 0.0  # probability of replacing a label by the null label in training
    input_sigma_data: float = 0.0  # EDM input scaling c_in = 1/sqrt(alpha^2 s_d^2 + sigma^2) with s_d this (0: off; VE needs it)

    def __post_init__(self):
        if self.prediction not in KINDS:
            raise ConfigError(f"model.prediction {self.prediction!r} is unknown: expected one of {', '.join(KINDS)}")
        self.target = self.target or self.prediction
        if self.target not in KINDS:
            raise ConfigError(f"model.target {self.target!r} is unknown: expected one of {', '.join(KINDS)}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"model.weighting {self.weighting!r} is unknown: expected one of {', '.join(WEIGHTINGS)}")
        check_model_fields(self)
        if not self.input_sigma_data >= 0:
            raise ConfigError(f"model.input_sigma_data must be >= 0 (0: off), got {self.input_sigma_data}")
        check_path_fields(self)


def check_model_fields(cfg) -> None:
    """ConfigError for a bad ``net``, ``sampler``, ``grid``, ``sampler_options``, ``sampling_steps``
    or ``label_dropout``: the fields every denoising-model config (diffusion, vdm) shares."""
    from ..paths import GRIDS
    from ..samplers import SAMPLERS

    if cfg.net not in NETS:
        raise ConfigError(f"model.net {cfg.net!r} is unknown: expected one of {', '.join(NETS)}")
    if cfg.sampler not in SAMPLERS:
        raise ConfigError(f"model.sampler {cfg.sampler!r} is unknown: expected one of {', '.join(SAMPLERS)}")
    if cfg.grid not in GRIDS:
        raise ConfigError(f"model.grid {cfg.grid!r} is unknown: expected one of {', '.join(GRIDS)}")
    if not isinstance(cfg.sampler_options, dict):
        raise ConfigError(f"model.sampler_options must be a mapping, got {cfg.sampler_options!r}")
    if cfg.sampling_steps < 1:
        raise ConfigError(f"model.sampling_steps must be >= 1, got {cfg.sampling_steps}")
    if not 0 <= cfg.label_dropout < 1:
        raise ConfigError(f"model.label_dropout must be in [0, 1), got {cfg.label_dropout}")


def check_path_fields(cfg) -> None:
    """ConfigError unless ``cfg.path`` with ``path_options`` and ``cfg.time_sampler`` with its
    options can be built (diffusion and noise-aware classifier configs)."""
    if cfg.path not in PATHS:
        raise ConfigError(f"model.path {cfg.path!r} is unknown: expected one of {', '.join(PATHS)}")
    try:
        make_path(cfg.path, **cfg.path_options)
        make_time_sampler(cfg.time_sampler, **cfg.time_sampler_options)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


class DiffusionFamily:
    """Network + path + loss; ``training_step`` does one optimisation step of the regression loss."""

    config_cls = DiffusionConfig
    preferred_cpu_precision = "fp32"

    def __init__(self, model_cfg: dict, data_shape: tuple, num_classes: int = 0, class_conditional: bool = False):
        self.cfg: DiffusionConfig = from_dict(DiffusionConfig, model_cfg, "model")
        self.data_shape = tuple(data_shape)  # (C, H, W) or (D,)
        self.num_classes = num_classes if class_conditional else 0
        self.path = make_path(self.cfg.path, **self.cfg.path_options)
        self.time_sampler = make_time_sampler(self.cfg.time_sampler, **self.cfg.time_sampler_options)
        try:
            self.net = build_net(self.cfg.net, self.cfg.net_options, self.data_shape, self.num_classes)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.net_options: {e}") from None

    # --- the trainer's interface --------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def optimizer_groups(self) -> dict[str, list[str]]:
        return {"main": ["net"]}

    @staticmethod
    def prepare(x: Tensor) -> Tensor:
        """Raw dataset tensors to model space: uint8 images -> [-1, 1], points -> float32."""
        if x.dtype == torch.uint8:
            return ImageDataset.to_float(x)
        return x.to(torch.float32)

    def denoiser(self, modules: dict[str, nn.Module] | None = None) -> Denoiser:
        net = (modules or self.modules())["net"]
        return Denoiser(net, self.path, self.cfg.prediction, input_sigma_data=self.cfg.input_sigma_data)

    def _cond(self, batch: dict, ctx=None) -> dict:
        """``{"y": labels}`` of a class-conditional model (``{}`` otherwise); with the trainer's ``ctx``,
        each label becomes the null label with probability ``label_dropout`` (from ``ctx.generator``)."""
        if not self.num_classes:
            return {}
        y = batch["y"].clone()
        if ctx is not None and self.cfg.label_dropout > 0:
            drop = torch.rand(y.shape, generator=ctx.generator, device=ctx.generator.device).to(y.device) < self.cfg.label_dropout
            y[drop] = self.num_classes
        return {"y": y}

    def training_step(self, modules, batch: dict, ctx) -> dict:
        x0 = batch["x"]
        cond = self._cond(batch, ctx)
        den = Denoiser(modules["net"], self.path, self.cfg.prediction, net_dtype=torch.float32,
                       input_sigma_data=self.cfg.input_sigma_data)
        with ctx.autocast():
            loss = diffusion_loss(
                den, x0, target=self.cfg.target, weighting_name=self.cfg.weighting,
                weighting_opts=self.cfg.weighting_options, time_sampler=self.time_sampler,
                generator=ctx.generator, cond=cond,
            ).mean()
        gn = ctx.optimize(loss, "main")
        return {"loss": loss.detach(), "grad_norm": gn}

    # --- sampling -----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, modules, n: int, generator=None, sampler: str | None = None, steps: int | None = None,
               grid: str | None = None, grid_options: dict | None = None, y: Tensor | None = None,
               device=None, batch_size: int = 256, noise: Tensor | None = None, guidance=None,
               **sampler_opts) -> Tensor:
        """``n`` samples in model space: (n, *data_shape), float32 on CPU (images clipped to [-1, 1]).

        ``generator``: a seed, a torch.Generator, or a list of per-example generators.
        ``y``: (n,) labels for a class-conditional model (``num_classes`` = unconditional).
        ``noise``: (n, *data_shape) start points at ``t_max`` instead of prior draws (interpolation).
        ``guidance``: a function ``Denoiser -> DenoiserLike`` wrapping the model (e.g.
        classifier-free or classifier guidance from :mod:`scorelab.guidance`).
        ``sampler_opts`` override the config's ``sampler_options``.
        """
        from ..random import generators_for_seeds
        from ..samplers import sample as run_sampler

        net = modules["net"]
        dev = device or next(net.parameters()).device
        den = self.denoiser(modules)
        if guidance is not None:
            den = guidance(den)
        if noise is not None and tuple(noise.shape) != (n, *self.data_shape):
            raise ValueError(f"noise must have shape {(n, *self.data_shape)}, got {tuple(noise.shape)}")
        if isinstance(generator, int):
            generator = generators_for_seeds(range(generator, generator + n), device="cpu")
        # the config's sampler_options belong to the config's sampler: another sampler starts from its defaults
        own = sampler is None or sampler == self.cfg.sampler
        opts = {**(self.cfg.sampler_options if own else {}), **sampler_opts}
        outs = []
        for i in range(0, n, batch_size):
            j = min(n, i + batch_size)
            gen = generator[i:j] if isinstance(generator, (list, tuple)) else generator
            if noise is not None:
                x = noise[i:j].to(dev, torch.float32)
            else:
                x = self.path.prior_sample((j - i, *self.data_shape), generator=gen, dtype=torch.float32).to(dev)
            cond = {}
            if self.num_classes:
                yy = y[i:j] if y is not None else torch.full((j - i,), self.num_classes, dtype=torch.long)
                cond["y"] = yy.to(dev)
            elif guidance is not None and y is not None:  # an unconditional model steered by a classifier
                cond["y"] = y[i:j].to(dev)
            out = run_sampler(den, x, steps or self.cfg.sampling_steps, sampler=sampler or self.cfg.sampler,
                              grid=grid or self.cfg.grid, grid_opts=self.cfg.grid_options if grid_options is None else grid_options,
                              generator=gen, cond=cond, **opts)
            outs.append(out.float().cpu())
        x = torch.cat(outs)
        # images live in [-1, 1]: clip as any image output would (points are left as they are)
        return x.clamp(-1, 1) if len(self.data_shape) == 3 else x

    # --- likelihood ---------------------------------------------------------------------
    NLL_METHODS = ("elbo", "pf_ode")

    def nll(self, modules, x: Tensor, method: str = "elbo", generator=None, y: Tensor | None = None,
            batch_size: int = 128, n_t: int = 16, **opts) -> dict:
        """Per-example negative log-likelihood bound / estimate of raw data ``x``.

        ``x``: uint8 images (B, C, H, W) -> **bits/dim**, or points (B, D) -> **nats** per example.
        ``method``:

        * ``elbo``: the discrete DDPM ELBO (:func:`scorelab.likelihood.ddpm_elbo_terms`, ``n_t``
          sampled steps) on the ``ddpm`` path, the continuous-time ELBO
          (:func:`scorelab.vdm.continuous_elbo_terms`, ``n_t`` times) on every other path;
        * ``pf_ode``: the probability-flow ODE (:mod:`scorelab.likelihood`; Hutchinson trace with
          uniform dequantization for images, exact trace for points).

        ``generator``: a seed (example ``i`` uses seed + i, so results do not depend on the
        batch size), a generator or a list. Returns ``{"total": (B,), <terms>: (B,), "units": str}``.
        """
        from ..likelihood import ddpm_elbo_terms, pf_ode_bits_per_dim, pf_ode_log_likelihood
        from ..paths import DDPMDiscrete
        from ..random import generators_for_seeds
        from ..vdm import continuous_elbo_terms

        if method not in self.NLL_METHODS:
            raise ValueError(f"nll method must be one of {', '.join(self.NLL_METHODS)}, got {method!r}")
        images = len(self.data_shape) == 3
        if images and x.dtype != torch.uint8:
            raise ValueError(f"nll needs raw uint8 images, got {x.dtype}")
        if isinstance(generator, int):
            generator = generators_for_seeds(range(generator, generator + x.shape[0]))
        den = self.denoiser(modules)
        dev = next(modules["net"].parameters()).device
        parts = []
        for i in range(0, x.shape[0], batch_size):
            j = min(x.shape[0], i + batch_size)
            gen = generator[i:j] if isinstance(generator, (list, tuple)) else generator
            xb = x[i:j].to(dev)
            cond = {}
            if self.num_classes:
                cond["y"] = (y[i:j] if y is not None else torch.full((j - i,), self.num_classes, dtype=torch.long)).to(dev)
            if method == "pf_ode":
                with torch.no_grad():
                    if images:
                        bpd, stats = pf_ode_bits_per_dim(den, xb, gen, trace="hutchinson", dtype=torch.float32,
                                                         cond=cond, **opts)
                        parts.append({"total": bpd, "nfe": torch.full_like(bpd, float(stats["nfe"]))})
                    else:
                        lp, stats = pf_ode_log_likelihood(den, xb.double(), trace="exact", cond=cond, **opts)
                        parts.append({"total": -lp, "nfe": torch.full_like(lp, float(stats["nfe"]))})
            elif isinstance(self.path, DDPMDiscrete):
                with torch.no_grad():
                    terms = ddpm_elbo_terms(den, xb if images else xb.double(), gen, n_t=n_t, cond=cond)
                parts.append({k: terms[k] for k in ("prior", "diffusion", "reconstruction", "total")})
            else:
                lo, hi = self._elbo_range()
                with torch.no_grad():
                    terms = continuous_elbo_terms(den, xb if images else xb.double(), gen, t_min=lo, t_max=hi,
                                                  n_t=n_t, cond=cond, time_sampling="log_snr")
                parts.append({k: terms[k] for k in ("prior", "diffusion", "reconstruction", "total")})
        out = {k: torch.cat([p[k].detach().double().cpu() for p in parts]) for k in parts[0]}
        if not images:
            # ddpm_elbo_terms reports continuous data per dimension in bits: bring it to nats per example
            if method == "elbo" and isinstance(self.path, DDPMDiscrete):
                for k in ("prior", "diffusion", "reconstruction", "total"):
                    out[k] = out[k] * self.data_shape[0] * math.log(2)
        out["units"] = "bits/dim" if images else "nats"
        return out

    def _elbo_range(self) -> tuple[float, float]:
        """Ends of the continuous ELBO's log-SNR integral: the path's ``t_min`` / ``t_max``, except
        where the log-SNR is infinite there (rectified flow: clean data at t = 0, pure noise at
        t = 1); those ends move to ``sigma / alpha = 1e-3`` and ``1e3``. The prior and
        reconstruction terms then account for the rest (both are tiny at these ends)."""
        lam = self.path.log_snr(torch.tensor([self.path.t_min, self.path.t_max], dtype=torch.float64))
        lo, hi = float(self.path.t_min), float(self.path.t_max)
        if not math.isfinite(float(lam[0])):
            lo = float(self.path.t_from_log_snr(torch.tensor(2 * math.log(1e3), dtype=torch.float64)))
        if not math.isfinite(float(lam[1])):
            hi = float(self.path.t_from_log_snr(torch.tensor(-2 * math.log(1e3), dtype=torch.float64)))
        return lo, hi
