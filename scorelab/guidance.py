"""Guidance: steer a denoiser toward a class label at sampling time.

Both wrappers here are :class:`~scorelab.targets.DenoiserLike` (``.path``, ``.predict(x, t, y=...,
**cond) -> Prediction``, ``__call__``), so every sampler in :mod:`scorelab.samplers` runs them
unchanged; the label goes in through the sampler's ``cond={"y": labels}``.

Classifier-free guidance (Ho & Salimans 2022; seed 001, seed 002 section 4.2)
----------------------------------------------------------------------------
One network trained with label dropout answers both ``D(x_t, t, y)`` and the unconditional
``D(x_t, t, null)``. The guided prediction is the affine combination

    form "w":      out = (1 + w) out_y - w out_null                      (seed 001)
    form "gamma":  out = gamma out_y + (1 - gamma) out_null              (seed 002 section 4.2)

the same family with ``gamma = 1 + w``: ``w = 0`` (``gamma = 1``) is the plain conditional model,
``gamma = 0`` (``w = -1``) the unconditional one, ``w > 0`` extrapolates away from the
unconditional prediction. In score form, ``score = score_null + gamma (score_y - score_null)``,
i.e. the unconditional score plus ``gamma`` times an implicit classifier gradient
``grad log p(y | x_t) = score_y - score_null``.

*Why the kind does not matter.* At a fixed ``(x_t, t)`` every prediction kind (eps, x0, v,
score, velocity) is ``a x_0 + b eps`` with ``a, b`` depending on ``t`` only
(:func:`scorelab.targets.from_x0_eps`), and ``x_t = alpha x_0 + sigma eps`` holds for both
branches. An affine combination whose weights sum to one (``(1 + w) - w = 1``) therefore commutes
with every conversion: combining the ``(x_0, eps)`` pairs — which is what we do — gives the same
guided eps, score, v and velocity as combining any of those directly, and the combined pair still
satisfies ``x_t = alpha x0 + sigma eps``.

Both branches run as ONE batched forward pass on ``[x, x]`` with labels ``[y, null]``; when the
unconditional weight vanishes (``w = 0`` / ``gamma = 1``) only the conditional pass runs.

Classifier guidance (Dhariwal & Nichol 2021; seed 002 section 4.1)
-------------------------------------------------------------------
With an unconditional denoiser and a noise-aware classifier ``p_phi(y | x_t, t)``,

    score'(x_t, t, y) = score(x_t, t) + gamma grad_x log p_phi(y | x_t, t)

which, with ``score = -eps / sigma`` and ``x_t = alpha x0 + sigma eps``, is the prediction

    eps' = eps - sigma gamma g,      x0' = x0 + (sigma^2 / alpha) gamma g,      g = grad_x log p_phi(y | x_t, t).

With the exact Bayes classifier (:func:`bayes_classifier`) and ``gamma = 1`` this is exactly the
conditional score ``grad log p_t(x_t | y)``; ``gamma = 0`` is the unconditional score.
The classifier must be trained on the same path (same time units) as the denoiser
(:mod:`scorelab.families.classifier`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from .paths import Path
from .targets import DenoiserLike, Prediction, as_time_batch

__all__ = ["ClassifierFreeGuidance", "ClassifierGuidance", "bayes_classifier", "default_null_label", "FORMS"]

FORMS = ("w", "gamma")


def default_null_label(denoiser) -> int:
    """The label meaning "no condition" for ``denoiser``, when it can be told.

    A mixture :class:`~scorelab.data.mixture.ExactDenoiser` uses ``-1``; a
    :class:`~scorelab.targets.Denoiser` whose net holds a :class:`~scorelab.nets.embeddings.LabelEmbedding`
    (every class-conditional scorelab net) uses its null row, ``num_classes``.
    """
    from .data.mixture import ExactDenoiser

    if isinstance(denoiser, ExactDenoiser):
        return -1
    net = getattr(denoiser, "net", None)
    if isinstance(net, nn.Module):
        from .nets.embeddings import LabelEmbedding

        for m in net.modules():
            if isinstance(m, LabelEmbedding):
                return m.null_index
    raise ValueError("null_label: cannot infer the unconditional label of this denoiser; pass null_label= "
                     "(num_classes for a scorelab net, -1 for a mixture ExactDenoiser)")


def _labels(y, B: int, device) -> Tensor:
    if y is None:
        raise ValueError("guidance needs labels: pass y= (a (B,) tensor or an int), e.g. sample(..., cond={'y': y})")
    y = torch.as_tensor(y, dtype=torch.long, device=device)
    if y.ndim == 0:
        y = y.expand(B)
    if y.shape != (B,):
        raise ValueError(f"y must have shape ({B},) or be a scalar, got {tuple(y.shape)}")
    return y


class ClassifierFreeGuidance:
    """Classifier-free guidance around a label-conditional denoiser (see module docstring).

    Args:
        denoiser: a DenoiserLike whose ``predict`` takes ``y=`` labels (B,), trained with label
            dropout so that ``y = null_label`` is the unconditional model.
        scale: ``w`` (form "w") or ``gamma`` (form "gamma"); ``gamma = 1 + w``.
        form: "w": ``(1 + w) out_y - w out_null`` (seed 001); "gamma": ``gamma out_y + (1 - gamma)
            out_null`` (seed 002 section 4.2).
        null_label: the label of the unconditional branch (``num_classes`` for a scorelab net,
            ``-1`` for a mixture ExactDenoiser); inferred by :func:`default_null_label` when None.
    """

    def __init__(self, denoiser: DenoiserLike, scale: float, form: str = "w", null_label: int | None = None):
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
        self.denoiser = denoiser  # the conditional model (also answers the null label)
        self.form = form  # how scale is read: "w" or "gamma"
        self.scale = scale  # w or gamma as given
        self.gamma = scale + 1.0 if form == "w" else scale  # weight of the conditional branch
        self.null_label = default_null_label(denoiser) if null_label is None else int(null_label)
        self.path: Path = denoiser.path

    @property
    def w(self) -> float:
        """The guidance weight in form "w": ``w = gamma - 1``."""
        return self.gamma - 1.0

    def predict(self, x: Tensor, t, y=None, **cond) -> Prediction:
        """Guided ``(x0, eps)`` at ``x: (B, ...)``, ``t`` scalar or (B,), labels ``y: (B,)``."""
        B = x.shape[0]
        t = as_time_batch(t, x)
        y = _labels(y, B, x.device)
        if self.gamma == 1.0:  # the unconditional branch has weight 0: one ordinary pass
            return self.denoiser.predict(x, t, y=y, **cond)
        null = torch.full_like(y, self.null_label)
        # per-example conditioning tensors are doubled along with x; anything else is passed as is
        cond2 = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.ndim and v.shape[0] == B else v for k, v in cond.items()}
        both = self.denoiser.predict(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]), **cond2)  # (2B, ...)
        g = self.gamma
        x0 = g * both.x0[:B] + (1 - g) * both.x0[B:]
        eps = g * both.eps[:B] + (1 - g) * both.eps[B:]
        c = self.path.coefficients(t).to(x)
        return Prediction(x, c, x0, eps)

    def __call__(self, x: Tensor, t, kind: str = "x0", **cond) -> Tensor:
        return self.predict(x, t, **cond).get(kind)

    def __repr__(self) -> str:
        return f"ClassifierFreeGuidance(form={self.form!r}, scale={self.scale}, gamma={self.gamma}, null_label={self.null_label})"


def _module_dtype(f) -> torch.dtype | None:
    if isinstance(f, nn.Module):
        p = next(iter(f.parameters()), None)
        return None if p is None else p.dtype
    return None


class ClassifierGuidance:
    """Classifier guidance: ``score + gamma grad_x log p(y | x_t, t)`` as a Prediction.

    Args:
        denoiser: a DenoiserLike for the *unconditional* model; it gets ``**cond`` but not ``y``
            unless ``pass_label`` (a conditional model, as Dhariwal & Nichol 2021 also guide, or a
            :class:`ClassifierFreeGuidance` wrapper: the two guidances then add up).
        classifier: ``classifier(x_t, t) -> logits (B, num_classes)``, noise-aware, on the
            denoiser's path (``t`` in the path's units, shape (B,)); an nn.Module runs in its own
            dtype and its gradient is cast back to that of ``x``.
        scale: ``gamma``, the weight of the classifier gradient (seed 002 section 4.1);
            ``gamma = 1`` is Bayes' rule, ``gamma = 0`` the unconditional model.

    The gradient is taken with autograd under ``torch.enable_grad()``, so it works inside a
    sampler running under ``torch.no_grad()``; the classifier's parameters get no gradient.
    At ``alpha = 0`` (pure noise, e.g. rectified flow at ``t = 1``) ``x0`` is left unchanged:
    ``x_t`` then carries no information about ``y`` and the exact gradient is zero.
    """

    def __init__(self, denoiser: DenoiserLike, classifier: Callable[[Tensor, Tensor], Tensor], scale: float = 1.0,
                 pass_label: bool = False):
        self.denoiser = denoiser  # the unconditional model (or a conditional one with pass_label)
        self.classifier = classifier  # (x_t, t) -> logits (B, K)
        self.scale = float(scale)  # gamma
        self.pass_label = pass_label  # also give y to the denoiser (a conditional or CFG-guided model)
        self.path: Path = denoiser.path

    def log_prob_grad(self, x: Tensor, t, y) -> Tensor:
        """``grad_x log p(y | x, t)``: (B, ...) in the dtype of ``x``."""
        t = as_time_batch(t, x)
        y = _labels(y, x.shape[0], x.device)
        dt = _module_dtype(self.classifier) or x.dtype
        with torch.enable_grad():
            xi = x.detach().to(dt).requires_grad_(True)
            logits = self.classifier(xi, t.to(dt) if dt.is_floating_point else t)  # (B, K)
            if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(f"classifier must return logits (B, K) = ({x.shape[0]}, K), got {tuple(logits.shape)}")
            logp = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
            chosen = logp.gather(1, y[:, None]).sum()
            (grad,) = torch.autograd.grad(chosen, xi)
        return grad.to(x.dtype)

    def predict(self, x: Tensor, t, y=None, **cond) -> Prediction:
        """Guided ``(x0, eps)`` at ``x: (B, ...)``: ``eps - sigma gamma g``, ``x0 + sigma^2/alpha gamma g``."""
        t = as_time_batch(t, x)
        y = _labels(y, x.shape[0], x.device)
        pred = self.denoiser.predict(x, t, **({"y": y} if self.pass_label else {}), **cond)
        if self.scale == 0.0:
            return pred
        g = self.scale * self.log_prob_grad(x, t, y)  # gamma grad log p(y | x_t): (B, ...)
        c = pred.coefficients
        eps = pred.eps - c.sigma * g
        safe_alpha = torch.where(c.alpha > 0, c.alpha, torch.ones_like(c.alpha))
        x0 = pred.x0 + torch.where(c.alpha > 0, c.sigma**2 / safe_alpha, torch.zeros_like(c.alpha)) * g
        return Prediction(x, c, x0, eps)

    def __call__(self, x: Tensor, t, kind: str = "x0", **cond) -> Tensor:
        return self.predict(x, t, **cond).get(kind)

    def __repr__(self) -> str:
        return f"ClassifierGuidance(scale={self.scale})"


def bayes_classifier(mixture, path: Path) -> Callable[[Tensor, Tensor], Tensor]:
    """The exact noisy classifier of a labelled Gaussian mixture on ``path``.

    Returns ``f(x_t, t) -> log p(y | x_t) (B, C)`` (normalised log-probabilities, valid as logits),
    from :meth:`~scorelab.data.mixture.GaussianMixture.class_log_posterior`; differentiable in
    ``x_t``. ``t`` in the path's units, scalar or (B,).
    """
    if mixture.labels is None:
        raise ValueError("bayes_classifier needs a mixture with labels")

    def classifier(x: Tensor, t) -> Tensor:
        c = path.coefficients(as_time_batch(t, x))
        return mixture.class_log_posterior(x.reshape(x.shape[0], -1), c.alpha, c.sigma)

    return classifier
