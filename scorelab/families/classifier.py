"""The noise-aware classifier family: ``p_phi(y | x_t, t)`` for classifier guidance.

Training draws ``t`` from a scorelab time sampler on the configured path, noises the data as
``x_t = alpha(t) x_0 + sigma(t) eps`` and minimises the cross-entropy of
:class:`~scorelab.nets.noisy_classifier.NoisyClassifier` logits (optionally label-smoothed).
The trained classifier steers an unconditional diffusion model trained on the SAME path through
:class:`scorelab.guidance.ClassifierGuidance` (``family.classifier(modules)`` gives the callable).

This family draws no samples (``capabilities().classify``, nothing generated); ``scorelab eval``
reports its accuracy at five noise levels (:meth:`NoisyClassifierFamily.evaluate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..losses import make_time_sampler
from ..nets.noisy_classifier import NoisyClassifier, NoisyClassifierConfig
from ..paths import make_path
from ..random import Generator, randn_like
from ..train.config import ConfigError
from .base import Capabilities, CapabilityError, Family, register
from .diffusion import check_path_fields

__all__ = ["ClassifierConfig", "NoisyClassifierFamily"]


@dataclass
class ClassifierConfig:
    family: str = "noisy_classifier"  # registry name of this family
    path: str = "rf"  # forward process the classifier sees: vp cosine subvp ddpm ve rf edm (match the denoiser's)
    path_options: dict = field(default_factory=dict)  # e.g. {T: 1000} for ddpm
    time_sampler: str = "uniform"  # training times: uniform logit_normal log_normal
    time_sampler_options: dict = field(default_factory=dict)  # e.g. {location: 0, scale: 1}
    net_options: dict = field(default_factory=dict)  # NoisyClassifierConfig fields (num_classes comes from the data)
    label_smoothing: float = 0.0  # cross-entropy label smoothing in [0, 1)

    def __post_init__(self):
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"model.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if "num_classes" in self.net_options:
            raise ConfigError("model.net_options.num_classes is set by the dataset; remove it")
        check_path_fields(self)


@register
class NoisyClassifierFamily(Family):
    """Classifier of noised data; ``training_step`` does one cross-entropy step (modules {"net"})."""

    name = "noisy_classifier"
    Config = ClassifierConfig
    declared = Capabilities(classify=True)

    def build(self) -> None:
        num_classes = self.data.num_classes
        if num_classes < 2:
            raise ConfigError("model.family 'noisy_classifier' needs a labelled dataset with at least 2 classes "
                              f"(data has num_classes={num_classes}); pick data with labels, e.g. fmnist-embedded or 8gaussians")
        self.path = make_path(self.cfg.path, **self.cfg.path_options)
        self.time_sampler = make_time_sampler(self.cfg.time_sampler, **self.cfg.time_sampler_options)
        opts = {**self.cfg.net_options, "num_classes": num_classes}
        try:
            self.net = NoisyClassifier(NoisyClassifierConfig.from_dict(opts), self.data.shape)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.net_options: {e}") from None

    @property
    def num_classes(self) -> int:
        """Number of logits (the data's classes)."""
        return self.data.num_classes

    # --- the trainer's interface --------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def noised(self, x0: Tensor, t: Tensor, generator: Generator = None) -> Tensor:
        """``x_t = alpha(t) x_0 + sigma(t) eps`` for ``x0: (B, ...)``, ``t: (B,)``, eps from ``generator``."""
        t = torch.as_tensor(t, dtype=torch.float64, device=x0.device)
        return self.path.sample_xt(x0, t, randn_like(x0, generator)).to(x0.dtype)

    def training_step(self, modules, batch: dict, ctx) -> dict:
        if "y" not in batch:
            raise ConfigError("model.family 'noisy_classifier' needs labels, but the batch has none")
        x0, y = batch["x"], batch["y"]
        t = self.time_sampler(x0.shape[0], self.path, ctx.generator).to(x0.device)  # (B,) float64
        x_t = self.noised(x0, t, ctx.generator)
        with ctx.autocast():
            logits = modules["net"](x_t, self.path.c_noise(t).to(x0.dtype))  # (B, K)
        loss = nn.functional.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
        gn = ctx.optimize(loss, "main")
        acc = (logits.detach().argmax(-1) == y).float().mean()
        return {"loss": loss.detach(), "accuracy": acc, "grad_norm": gn}

    def sample(self, modules, n, **kwargs):
        raise CapabilityError("model.family 'noisy_classifier' is a classifier and draws no samples; "
                              "guide a diffusion run with it: scorelab sample DIFFUSION_RUN --class K --classifier THIS_RUN")

    # --- using the classifier -----------------------------------------------------------
    def classifier(self, modules: dict[str, nn.Module] | None = None):
        """``f(x_t, t) -> logits (B, K)`` for :class:`scorelab.guidance.ClassifierGuidance` (``t`` in path units)."""
        net = (modules or self.modules())["net"]

        def f(x: Tensor, t: Tensor) -> Tensor:
            t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
            if t.ndim == 0:
                t = t.expand(x.shape[0])
            dt = net.head.weight.dtype
            return net(x.to(dt), self.path.c_noise(t).to(dt))

        return f

    @torch.no_grad()
    def accuracy(self, modules, x: Tensor, y: Tensor, t, generator: Generator = None, batch_size: int = 1024) -> float:
        """Fraction of ``x_t`` (clean ``x: (N, ...)`` in model space, noised at time ``t``) classified as ``y: (N,)``.

        ``t``: a scalar time in the path's units or (N,) times.
        """
        f = self.classifier(modules)
        t = torch.as_tensor(t, dtype=torch.float64)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        hits = 0
        for i in range(0, x.shape[0], batch_size):
            xb, tb = x[i : i + batch_size], t[i : i + batch_size].to(x.device)
            hits += int((f(self.noised(xb, tb, generator), tb).argmax(-1) == y[i : i + batch_size].to(x.device)).sum())
        return hits / max(x.shape[0], 1)

    def evaluate(self, modules, ev) -> dict:
        """Test accuracy at five times from ``t_min`` to ``t_max`` (chance at ``t_max``)."""
        x, y = ev.reference(labels=True)
        if y is None:
            raise CapabilityError("the evaluation data has no labels: a classifier cannot be scored on it")
        xs = self.prepare({"x": x}, modules)["x"]
        p = self.path
        times = [p.t_min + f * (p.t_max - p.t_min) for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
        return {"accuracy": {f"t={t:.4g}": round(self.accuracy(modules, xs, y, t, torch.Generator().manual_seed(ev.seed)), 4)
                             for t in times}}
