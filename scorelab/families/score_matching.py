"""The score-matching family: an energy model or a time-free score net, fit by score matching
(seed 000 §2-3) and sampled with Langevin dynamics.

``model.model`` picks the network: ``energy`` (:class:`~scorelab.nets.energy.EnergyNet`,
``s = -grad_x f``) or ``score`` (:class:`~scorelab.nets.energy.ScoreNet`, ``s`` directly).
``model.loss`` picks the objective of :mod:`scorelab.score_matching`:

    esm_exact       0.5 ||s||^2 + tr(grad s)                 (exact trace, D backward passes)
    esm_hutchinson  0.5 ||s||^2 + v^T (grad s) v             (``n_probes`` Rademacher/Gaussian probes)
    ssm             v^T (grad s) v + 0.5 (v^T s)^2           (Gaussian projections)
    ssm_vr          v^T (grad s) v + 0.5 ||s||^2             (Gaussian projections)
    dsm             0.5 ||s(x + sigma z) + z / sigma||^2     (``dsm_sigma``; fits the sigma-noised data)

Flat data only (2-D toys, mixtures): images raise a ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..nets.energy import EnergyNet, EnergyNetConfig, ScoreNet
from ..score_matching import PROBES, denoising_score_matching, explicit_score_matching, sliced_score_matching
from ..train.config import ConfigError
from .base import Capabilities, CapabilityError, Family, register

__all__ = ["ScoreMatchingConfig", "ScoreMatchingFamily", "SM_MODELS", "SM_LOSSES"]

SM_MODELS = ("energy", "score")
SM_LOSSES = ("esm_exact", "esm_hutchinson", "ssm", "ssm_vr", "dsm")


@dataclass
class ScoreMatchingConfig:
    family: str = "score_matching"  # registry name of this family
    model: str = "energy"  # energy (EnergyNet, s = -grad f) or score (ScoreNet, s directly)
    net_options: dict = field(default_factory=dict)  # EnergyNetConfig fields: width depth activation
    loss: str = "ssm_vr"  # esm_exact esm_hutchinson ssm ssm_vr dsm
    n_probes: int = 1  # probes (esm_hutchinson) or projections (ssm, ssm_vr) per example
    probe: str = "rademacher"  # esm_hutchinson probe distribution: rademacher gaussian (ssm uses gaussian)
    dsm_sigma: float = 0.1  # noise level of the dsm loss (the model then fits the sigma-noised data)
    sampler: str = "langevin"  # the only sampler: unadjusted Langevin dynamics
    sampling_steps: int = 500  # Langevin steps
    step_size: float = 1e-3  # Langevin step eps: x <- x + eps/2 s(x) + sqrt(eps) z
    init_std: float = 1.0  # Langevin chains start from N(0, init_std^2 I)

    def __post_init__(self):
        if self.model not in SM_MODELS:
            raise ConfigError(f"model.model {self.model!r} is unknown: expected one of {', '.join(SM_MODELS)}")
        if self.loss not in SM_LOSSES:
            raise ConfigError(f"model.loss {self.loss!r} is unknown: expected one of {', '.join(SM_LOSSES)}")
        if self.n_probes < 1:
            raise ConfigError(f"model.n_probes must be >= 1, got {self.n_probes}")
        if self.probe not in PROBES:
            raise ConfigError(f"model.probe {self.probe!r} is unknown: expected one of {', '.join(PROBES)}")
        if not self.dsm_sigma > 0:
            raise ConfigError(f"model.dsm_sigma must be > 0, got {self.dsm_sigma}")
        if self.sampler != "langevin":
            raise ConfigError(f"model.sampler {self.sampler!r} is unknown: the score_matching family samples with 'langevin'")
        if self.sampling_steps < 1:
            raise ConfigError(f"model.sampling_steps must be >= 1, got {self.sampling_steps}")
        if not self.step_size > 0:
            raise ConfigError(f"model.step_size must be > 0, got {self.step_size}")
        if not self.init_std > 0:
            raise ConfigError(f"model.init_std must be > 0, got {self.init_std}")


@register
class ScoreMatchingFamily(Family):
    """Energy model or score net + a score-matching loss; Langevin sampling."""

    name = "score_matching"
    Config = ScoreMatchingConfig
    declared = Capabilities(generate=True, sample_options=("sampler", "steps", "step_size", "init_std", "callback"))

    def build(self) -> None:
        if len(self.data.shape) != 1:
            raise ConfigError(f"model.family 'score_matching' needs flat data (D,), got shape {self.data.shape} "
                              "(images: use the diffusion family)")
        if self.data.class_conditional:
            raise ConfigError("data.class_conditional is not supported by the score_matching family")
        try:
            net_cfg = EnergyNetConfig(dim=self.data.shape[0], **self.cfg.net_options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.net_options: {e}") from None
        self.net = EnergyNet(net_cfg) if self.cfg.model == "energy" else ScoreNet(net_cfg)

    num_classes = 0  # unconditional

    # --- the trainer's interface --------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def score_fn(self, modules: dict[str, nn.Module] | None = None):
        """``x: (B, D) -> s(x): (B, D)``: ``-grad f`` for an energy model, the net itself otherwise."""
        net = (modules or self.modules())["net"]
        if self.cfg.model == "energy":
            from ..nets.energy import energy_score

            return lambda x: energy_score(net, x)
        return net

    def loss(self, modules, x: Tensor, generator=None) -> Tensor:
        """Per-example loss ``model.loss`` at data ``x: (B, D)``: (B,)."""
        s = self.score_fn(modules)
        c = self.cfg
        if c.loss == "esm_exact":
            return explicit_score_matching(s, x, "exact")
        if c.loss == "esm_hutchinson":
            return explicit_score_matching(s, x, "hutchinson", n_probes=c.n_probes, probe=c.probe, generator=generator)
        if c.loss in ("ssm", "ssm_vr"):
            return sliced_score_matching(s, x, n_projections=c.n_probes, variance_reduced=c.loss == "ssm_vr", generator=generator)
        return denoising_score_matching(lambda xt, sigma: s(xt), x, c.dsm_sigma, generator=generator)

    def training_step(self, modules, batch: dict, ctx) -> dict:
        loss = self.loss(modules, batch["x"], generator=ctx.generator).mean()
        gn = ctx.optimize(loss, "main")
        return {"loss": loss.detach(), "grad_norm": gn}

    # --- sampling -----------------------------------------------------------------------
    def sample_batch(self, modules, generators, y, sampler: str | None = None, steps: int | None = None,
                     step_size: float | None = None, init_std: float | None = None, callback=None) -> Tensor:
        """Unadjusted Langevin dynamics on the model score, one generator per chain:

            x_0 ~ N(0, init_std^2 I),   x <- x + (eps / 2) s(x) + sqrt(eps) z   (``steps`` times)

        ``steps``, ``step_size``, ``init_std`` default to the config's ``sampling_steps``,
        ``step_size``, ``init_std``; ``sampler`` may only be "langevin". ``callback`` goes to
        :func:`scorelab.samplers.langevin`.
        """
        from ..random import randn
        from ..samplers import langevin

        if sampler not in (None, "langevin"):
            raise CapabilityError(f"sampler {sampler!r} is unknown: the score_matching family samples with 'langevin'")
        if y is not None:
            raise CapabilityError("--class given but the score_matching family is unconditional")
        steps = self.cfg.sampling_steps if steps is None else steps
        if steps < 1:
            raise ValueError(f"--steps must be >= 1, got {steps}")
        eps = self.cfg.step_size if step_size is None else step_size
        std = self.cfg.init_std if init_std is None else init_std
        if not std > 0:
            raise ValueError(f"init_std must be > 0, got {std}")
        net = modules["net"]
        dev = self.device_of(modules)
        dtype = next(net.parameters()).dtype
        x = std * randn((len(generators), *self.data.shape), generator=generators, dtype=dtype).to(dev)
        with torch.no_grad():
            return langevin(self.score_fn(modules), x, eps, steps, generator=generators, callback=callback)
