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
from ..quantize import to_uint8
from ..train.config import ConfigError
from ..vdm import LearnedLogSNR, LearnedVPPath, continuous_elbo_terms
from .base import register
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


@register
class VDMFamily(DiffusionFamily):
    """Network + learned schedule; ``training_step`` does one step on the negative ELBO."""

    name = "vdm"
    Config = VDMConfig

    def build(self) -> None:
        self.schedule = LearnedLogSNR(self.cfg.gamma_min, self.cfg.gamma_max, self.cfg.schedule_hidden)
        if not self.cfg.learn_schedule:
            self.schedule.requires_grad_(False)
        self.path = LearnedVPPath(self.schedule)
        try:
            self.net = build_net(self.cfg.net, self.cfg.net_options, self.data.shape, self.data.conditional_classes)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.net_options: {e}") from None

    # --- the trainer's interface --------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net, "schedule": self.schedule}

    def path_of(self, modules: dict) -> LearnedVPPath:
        """The learned path of ``modules["schedule"]`` (e.g. its EMA copy): samplers and likelihoods use it."""
        return LearnedVPPath(modules["schedule"])

    def preconditioning(self) -> tuple[str, float]:
        return "none", 0.5  # VDM's network sees z_t as is

    def _data(self, x: Tensor) -> Tensor:
        """Model-space images back to their uint8 values (the ELBO is over pixel values); points unchanged."""
        if self.data.images and x.dtype != torch.uint8:
            return to_uint8(x)
        return x

    def training_step(self, modules, batch: dict, ctx) -> dict:
        x = self._data(batch["x"])
        den = self.denoiser(modules, net_dtype=torch.float32, autocast=ctx.autocast_dtype)
        terms = continuous_elbo_terms(den, x, ctx.generator, low_discrepancy=self.cfg.low_discrepancy,
                                      target=self.cfg.prediction, cond=self._cond(batch, ctx))
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

    # --- likelihood ---------------------------------------------------------------------
    def _nll_batch(self, den, xb: Tensor, gen, method: str, n_t: int, cond: dict, opts: dict) -> dict:
        """``elbo``: the VDM continuous-time ELBO on the learned path (``n_t`` times per example, in the
        target the model was trained with); ``pf_ode`` as the diffusion family's."""
        if method != "elbo":
            return super()._nll_batch(den, xb, gen, method, n_t, cond, opts)
        xb = self._data(xb)
        if xb.is_floating_point():
            xb = xb.to(next(den.net.parameters()).dtype)
        terms = continuous_elbo_terms(den, xb, gen, n_t=n_t, target=self.cfg.prediction, cond=cond)
        return {k: terms[k] for k in ("prior", "reconstruction", "diffusion", "total")}
