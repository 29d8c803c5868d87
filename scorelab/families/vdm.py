"""The VDM family (Kingma et al. 2021; seed 002 §2.2): a denoising network and a learned noise
schedule trained together on the continuous-time ELBO (bits/dim for images).

The schedule is a :class:`~scorelab.vdm.LearnedLogSNR`; its path
:class:`~scorelab.vdm.LearnedVPPath` is rebuilt from the ``schedule`` module wherever it is needed,
so the checkpointed (EMA) schedule is the one used by the samplers. Everything else (samplers,
grids, class conditioning) is the diffusion family's.

Training, as in VDM: the network and the schedule's end points ``gamma_0, gamma_1`` minimise the
negative ELBO. The continuous diffusion loss depends on the schedule only through its end points,
so the gradient of the ELBO with respect to the shape parameters is zero in expectation; with
``schedule_variance`` they instead minimise the variance of the diffusion-loss estimate, i.e.
their gradient is that of ``mean(L_diff^2)`` (VDM §5.2, App. I.2). This costs one extra backward
pass per step (computed with ``torch.autograd.grad`` and installed through gradient hooks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..nets.registry import build_net
from ..targets import Denoiser
from ..train.config import ConfigError, from_dict
from ..vdm import LearnedLogSNR, LearnedVPPath, continuous_elbo_terms
from .diffusion import DiffusionFamily, check_model_fields

__all__ = ["VDMConfig", "VDMFamily"]


@dataclass
class VDMConfig:
    family: str = "vdm"  # registry name of this family
    prediction: str = "eps"  # what the network outputs: eps x0 score (VDM: eps)
    gamma_min: float = -13.3  # initial gamma(0) = -log SNR_max (VDM's init)
    gamma_max: float = 5.0  # initial gamma(1) = -log SNR_min
    schedule_hidden: int = 1024  # width of the schedule's monotone sigmoid layer (VDM: 1024)
    learn_schedule: bool = True  # train the schedule (False: keep its initial gamma)
    schedule_variance: bool = True  # shape parameters minimise the diffusion-loss variance (VDM), not the ELBO
    low_discrepancy: bool = True  # stratified times across the batch (VDM's variance reduction)
    net: str = "unet"  # network registry name: unet mlp (time input t in [0, 1], as for path "vp")
    net_options: dict = field(default_factory=dict)  # the net's config fields
    sampler: str = "dpmpp_2m"  # default sampler for grids, `scorelab sample` and `eval`
    sampling_steps: int = 20  # default number of sampler steps
    grid: str = "logsnr"  # default time grid: uniform karras logsnr shift
    grid_options: dict = field(default_factory=dict)  # e.g. {rho: 7}
    sampler_options: dict = field(default_factory=dict)  # default keyword options of the sampler
    label_dropout: float = 0.0  # probability of replacing a label by the null label in training

    def __post_init__(self):
        if self.prediction not in ("eps", "x0", "score"):
            raise ConfigError(f"model.prediction {self.prediction!r} is not supported by vdm: expected eps, x0 or score")
        if not self.gamma_max > self.gamma_min:
            raise ConfigError(f"model.gamma_max ({self.gamma_max}) must be larger than model.gamma_min ({self.gamma_min})")
        if self.schedule_hidden < 1:
            raise ConfigError(f"model.schedule_hidden must be >= 1, got {self.schedule_hidden}")
        check_model_fields(self)


class VDMFamily(DiffusionFamily):
    """Network + learned schedule; ``training_step`` does one step on the negative ELBO."""

    config_cls = VDMConfig
    preferred_cpu_precision = "fp32"

    def __init__(self, model_cfg: dict, data_shape: tuple, num_classes: int = 0, class_conditional: bool = False):
        self.cfg: VDMConfig = from_dict(VDMConfig, model_cfg, "model")
        self.data_shape = tuple(data_shape)  # (C, H, W) images (discrete ELBO) or (D,) points (continuous)
        self.num_classes = num_classes if class_conditional else 0
        self.schedule = LearnedLogSNR(self.cfg.gamma_min, self.cfg.gamma_max, self.cfg.schedule_hidden)
        if not self.cfg.learn_schedule:
            self.schedule.requires_grad_(False)
        self.path = LearnedVPPath(self.schedule)
        try:
            self.net = build_net(self.cfg.net, self.cfg.net_options, self.data_shape, self.num_classes)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.net_options: {e}") from None

    # --- the trainer's interface --------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net, "schedule": self.schedule}

    def optimizer_groups(self) -> dict[str, list[str]]:
        return {"main": ["net", "schedule"]}

    def denoiser(self, modules: dict[str, nn.Module] | None = None, net_dtype=None) -> Denoiser:
        m = modules or self.modules()
        return Denoiser(m["net"], LearnedVPPath(m["schedule"]), self.cfg.prediction, net_dtype=net_dtype)

    def _data(self, x: Tensor) -> Tensor:
        """Model-space images back to their uint8 values (the ELBO is over pixel values); points unchanged."""
        if len(self.data_shape) == 3 and x.dtype != torch.uint8:
            return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return x

    def training_step(self, modules, batch: dict, ctx) -> dict:
        x = self._data(batch["x"])
        den = self.denoiser(modules, net_dtype=torch.float32)
        with ctx.autocast():
            terms = continuous_elbo_terms(den, x, ctx.generator, low_discrepancy=self.cfg.low_discrepancy,
                                          parameterization=self.cfg.prediction, cond=self._cond(batch, ctx))
        loss = terms["total"].mean()
        hooks = []
        if self.cfg.learn_schedule and self.cfg.schedule_variance:
            # gradient of mean(L_diff^2) for the shape parameters (VDM's variance minimisation)
            sched = modules["schedule"]
            shape = [sched.w1_raw, sched.b1, sched.w2_raw, sched.b2, sched.w3_raw]
            ld = terms["diffusion"]
            grads = torch.autograd.grad(ld, shape, grad_outputs=2 * ld.detach() / ld.numel(), retain_graph=True, allow_unused=True)
            for p, g in zip(shape, grads):
                g = torch.zeros_like(p) if g is None else g
                hooks.append(p.register_hook(lambda _, g=g: g))
        try:
            gn = ctx.optimize(loss, "main")
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            s = modules["schedule"]
            out = {"loss": loss.detach(), "grad_norm": gn, "prior": terms["prior"].mean(), "recon": terms["reconstruction"].mean(),
                   "diffusion": terms["diffusion"].mean(), "gamma_0": s.gamma_0.detach(), "gamma_1": s.gamma_1.detach()}
        return out

    # --- sampling and likelihood ----------------------------------------------------------
    @torch.no_grad()
    def sample(self, modules, n: int, generator=None, sampler: str | None = None, steps: int | None = None,
               grid: str | None = None, grid_options: dict | None = None, y: Tensor | None = None,
               device=None, batch_size: int = 256, **sampler_opts) -> Tensor:
        """As :meth:`DiffusionFamily.sample`, on the path of ``modules["schedule"]`` (e.g. its EMA copy)."""
        own = self.path
        self.path = LearnedVPPath(modules["schedule"])
        try:
            return super().sample(modules, n, generator=generator, sampler=sampler, steps=steps, grid=grid,
                                  grid_options=grid_options, y=y, device=device, batch_size=batch_size, **sampler_opts)
        finally:
            self.path = own

    NLL_METHODS = ("elbo", "pf_ode")

    @torch.no_grad()
    def nll(self, modules, x: Tensor, method: str = "elbo", generator=None, y: Tensor | None = None,
            batch_size: int = 128, n_t: int = 16, **opts) -> dict:
        """Per-example negative log-likelihood bound of data ``x`` on the learned path of ``modules``.

        ``x``: raw uint8 images (B, C, H, W) -> **bits/dim** (model-space floats are mapped back to
        pixel values), or points (B, D) -> **nats** per example. ``method="elbo"``: the VDM
        continuous-time ELBO (:func:`~scorelab.vdm.continuous_elbo_terms`, ``n_t`` times per
        example); other methods (``pf_ode``) are the diffusion family's, run on the learned path.
        ``generator``: a seed (example ``i`` uses seed + i, so results do not depend on
        ``batch_size``), a generator or a list. Returns ``{"prior", "reconstruction", "diffusion",
        "total": (B,), "units": str}``.
        """
        from ..random import generators_for_seeds

        if method not in self.NLL_METHODS:
            raise ValueError(f"nll method must be one of {', '.join(self.NLL_METHODS)}, got {method!r}")
        if method != "elbo":
            parent = getattr(super(), "nll", None)
            if parent is None:
                raise ValueError(f"nll method {method!r} needs the diffusion family's nll, which this version lacks")
            return parent(modules, x, method=method, generator=generator, y=y, batch_size=batch_size, n_t=n_t, **opts)
        x = self._data(x)
        if isinstance(generator, int):
            generator = generators_for_seeds(range(generator, generator + x.shape[0]))
        net = modules["net"]
        dev = next(net.parameters()).device
        den = self.denoiser(modules)
        parts = []
        for i in range(0, x.shape[0], batch_size):
            j = min(x.shape[0], i + batch_size)
            gen = generator[i:j] if isinstance(generator, (list, tuple)) else generator
            cond = {"y": (y[i:j] if y is not None else torch.full((j - i,), self.num_classes, dtype=torch.long)).to(dev)} if self.num_classes else {}
            xb = x[i:j].to(dev)
            if xb.is_floating_point():
                xb = xb.to(next(net.parameters()).dtype)
            parts.append(continuous_elbo_terms(den, xb, gen, n_t=n_t, parameterization=self.cfg.prediction, cond=cond))
        out = {k: torch.cat([p[k].detach().double().cpu() for p in parts]) for k in ("prior", "reconstruction", "diffusion", "total")}
        out["units"] = parts[0]["units"]
        return out
