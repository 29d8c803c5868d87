"""Generative adversarial networks: the game, its losses, R1, the optimal discriminator, mode coverage.

Seed 001, "Generative Adversarial Networks". A generator maps a latent ``z ~ p(z)`` to
``x = G(z) ~ p_G``; a discriminator outputs ``D(x) = P(x is real)``. The two play

    min_G max_D  V(D, G) = E_{x ~ p_data} log D(x) + E_{z ~ p(z)} log(1 - D(G(z)))

by alternating gradient steps (the family orchestrates them; this module has the maths).

**Logits, not probabilities.** Every function takes the discriminator's *logit*
``l = log D - log(1 - D)``, so ``D = sigmoid(l)`` and

    log D(x)     = log sigmoid(l)  = -softplus(-l)
    log(1 - D(x)) = log sigmoid(-l) = -softplus(l)

``softplus(u) = log(1 + e^u)`` is evaluated as ``max(u, 0) + log1p(e^{-|u|})``, finite for every
float. The naive ``log(sigmoid(l))`` is ``log 0 = -inf`` in float32 for ``l < -88`` and
``1 - sigmoid(l)`` rounds to 0 for ``l > 16.6``: exactly the confident-discriminator regime
(``D(G(z)) -> 0``) the seed warns about.

Losses, per example ``(B,)``, to *minimise* (:data:`GAN_LOSSES`):

============================== ============================================= =========================
kind                           discriminator                                 generator
============================== ============================================= =========================
``minimax`` (the seed;         ``softplus(-l_r) + softplus(l_f)``            ``-softplus(l_f)``
Goodfellow et al. 2014)        ``= -log D(x) - log(1 - D(G(z)))``            ``= log(1 - D(G(z)))``
``non_saturating`` (the        as minimax                                    ``softplus(-l_f)``
seed's fix; Goodfellow §3)                                                   ``= -log D(G(z))``
``hinge`` (Lim & Ye 2017;      ``relu(1 - l_r) + relu(1 + l_f)``             ``-l_f``
Miyato et al. 2018)
============================== ============================================= =========================

(``l_r = l(x)`` on real data, ``l_f = l(G(z))`` on generated data.) The discriminator's minimax
loss is ``-V`` per example pair; the generator's minimax loss is ``V`` minus the term that does not
depend on G.

**Vanishing gradient** (the seed's "问题: G 的梯度接近 0"). ``d/dl log(1 - sigmoid(l)) = -sigmoid(l)
= -D(G(z))`` while ``d/dl [-log sigmoid(l)] = -(1 - D(G(z)))``: when D confidently rejects the
fakes, the minimax generator gradient is ``D(G(z)) ~ 0`` times the signal that reaches a
non-saturating generator. Per example the two gradients differ by exactly the factor
``D / (1 - D) = e^{l_f}`` (``tests/test_gan.py`` measures it, ``benchmarks/gan_seed.py`` prints it).

**Optimal discriminator** (the seed's "内在目标"; Goodfellow et al. 2014, Prop. 1 and Thm. 1).
For fixed G, ``p log D + q log(1 - D)`` is maximised pointwise by
``D*(x) = p_data(x) / (p_data(x) + p_G(x))``, logit ``l* = log p_data - log p_G``, and

    V(D*, G) = -log 4 + 2 JSD(p_data || p_G),

minimal (``-log 4``) iff ``p_G = p_data`` (the "外在目标"). :func:`optimal_game` evaluates both
sides by quadrature for 1-D / 2-D densities.

**R1** (Mescheder et al. 2018): ``R1(x) = gamma / 2 ||grad_x l(x)||^2`` on real data, penalising
the discriminator's slope where the data is. StyleGAN2 (Karras et al. 2020) applies it *lazily*:
every ``k`` discriminator steps, multiplied by ``k`` (:func:`lazy_r1_scale`), with Adam's
hyper-parameters corrected for the extra steps (:func:`lazy_adam_hyperparameters`).

**Mode coverage** (for 2-D mixtures; Metz et al. 2017, Srivastava et al. 2017): a sample is *high
quality* when it lies within ``k`` standard deviations of its nearest mode; a mode is *covered*
when enough high-quality samples are nearest to it (:func:`mode_coverage`). Mode collapse shows
as few covered modes with many high-quality samples.

The family's D step and G step are :func:`discriminator_terms` and :func:`generator_terms`: pure
functions over the discriminator callable and a batch of real and generated examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from .data.mixture import GaussianMixture

__all__ = [
    "GAN_LOSSES",
    "as_logits",
    "log_d",
    "log_one_minus_d",
    "game_value",
    "discriminator_loss",
    "generator_loss",
    "r1_penalty",
    "lazy_r1_scale",
    "lazy_adam_hyperparameters",
    "DiscriminatorTerms",
    "GeneratorTerms",
    "discriminator_terms",
    "generator_terms",
    "gradient_norm",
    "optimal_logit",
    "optimal_discriminator",
    "quadrature_grid",
    "OptimalGame",
    "optimal_game",
    "ModeCoverage",
    "mode_coverage",
]

GAN_LOSSES = ("minimax", "non_saturating", "hinge")


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"GAN loss kind must be one of {', '.join(GAN_LOSSES)}, got {kind!r}")


def as_logits(logits: Tensor, name: str = "logits") -> Tensor:
    """Discriminator output ``(B,)`` or ``(B, 1)`` -> ``(B,)``; anything else is an error."""
    if logits.ndim == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.ndim != 1:
        raise ValueError(f"{name} must have shape (B,) or (B, 1) (one logit per example), got {tuple(logits.shape)}")
    return logits


def log_d(logits: Tensor) -> Tensor:
    """``log D = log sigmoid(l) = -softplus(-l)`` (finite for every ``l``)."""
    return -F.softplus(-logits)


def log_one_minus_d(logits: Tensor) -> Tensor:
    """``log(1 - D) = log sigmoid(-l) = -softplus(l)`` (finite for every ``l``)."""
    return -F.softplus(logits)


def game_value(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Per-pair value of the game ``log D(x) + log(1 - D(G(z)))``: (B,) from two (B,) logits.

    Its mean is the Monte Carlo estimate of ``V(D, G)``; with the optimal logits
    (:func:`optimal_logit`) it estimates ``-log 4 + 2 JSD(p_data || p_G)``.
    """
    lr, lf = as_logits(real_logits, "real_logits"), as_logits(fake_logits, "fake_logits")
    if lr.shape != lf.shape:
        raise ValueError(f"real_logits and fake_logits must have the same shape, got {tuple(lr.shape)} and {tuple(lf.shape)}")
    return log_d(lr) + log_one_minus_d(lf)


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = "non_saturating") -> Tensor:
    """Per-example discriminator loss (B,) to minimise, from real and fake logits (B,) each.

    ``minimax`` / ``non_saturating``: ``softplus(-l_r) + softplus(l_f) = -[log D(x) + log(1 - D(G(z)))]``
    (the seed's D maximises V; both kinds share this D loss). ``hinge``:
    ``relu(1 - l_r) + relu(1 + l_f)``. Example ``i`` pairs real ``i`` with fake ``i``.
    """
    _check_kind(kind)
    lr, lf = as_logits(real_logits, "real_logits"), as_logits(fake_logits, "fake_logits")
    if lr.shape != lf.shape:
        raise ValueError(f"real_logits and fake_logits must have the same shape, got {tuple(lr.shape)} and {tuple(lf.shape)}")
    if kind == "hinge":
        return F.relu(1 - lr) + F.relu(1 + lf)
    return F.softplus(-lr) + F.softplus(lf)


def generator_loss(fake_logits: Tensor, kind: str = "non_saturating") -> Tensor:
    """Per-example generator loss (B,) to minimise, from the logits ``l_f = l(G(z))`` (B,).

    ``minimax``: ``log(1 - D(G(z))) = -softplus(l_f)`` (the seed's G objective; saturates when
    ``D(G(z)) -> 0``). ``non_saturating``: ``-log D(G(z)) = softplus(-l_f)``. ``hinge``: ``-l_f``.
    """
    _check_kind(kind)
    lf = as_logits(fake_logits, "fake_logits")
    if kind == "minimax":
        return -F.softplus(lf)
    if kind == "non_saturating":
        return F.softplus(-lf)
    return -lf


# --------------------------------------------------------------------------------------
# R1 gradient penalty (Mescheder et al. 2018), lazy as in StyleGAN2
# --------------------------------------------------------------------------------------
def r1_penalty(real_logits: Tensor, x_real: Tensor, gamma: float) -> Tensor:
    """``gamma / 2 * ||grad_x l(x)||^2`` per example (B,), differentiable in D's parameters.

    ``x_real: (B, ...)`` must require grad and ``real_logits: (B,)`` must be computed from it
    (``x = x.detach().requires_grad_(True); l = D(x)``), so one forward serves the loss and the
    penalty. The gradient is taken of ``sum_i l_i``: with a discriminator that treats examples
    independently (every net in :mod:`scorelab.nets.gan`), its row ``i`` is ``grad_{x_i} l(x_i)``.
    The graph is kept (``create_graph=True``) so the penalty back-propagates into D.
    """
    if gamma < 0 or not math.isfinite(gamma):
        raise ValueError(f"r1 gamma must be a non-negative number, got {gamma!r}")
    if not x_real.requires_grad:
        raise ValueError("r1_penalty: x_real must require grad and real_logits must be computed from it")
    lr = as_logits(real_logits, "real_logits")
    (g,) = torch.autograd.grad(lr.sum(), x_real, create_graph=True)
    return 0.5 * gamma * g.pow(2).flatten(1).sum(1)


def lazy_r1_scale(step: int, interval: int) -> float:
    """Weight of R1 at discriminator step ``step`` (0-based) under lazy regularisation (StyleGAN2).

    ``interval`` on steps ``0, k, 2k, ...`` and 0 elsewhere (``k = interval``), so the penalty's
    average weight stays 1 while it costs a double backward only every ``k`` steps. ``interval=1``
    is the plain penalty (weight 1 on every step). StyleGAN2 uses ``k = 16``.
    """
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"r1 interval must be a positive integer, got {interval!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return float(interval) if step % interval == 0 else 0.0


def lazy_adam_hyperparameters(lr: float, betas: tuple[float, float], interval: int) -> tuple[float, tuple[float, float]]:
    """Adam ``(lr, betas)`` corrected for lazy regularisation (StyleGAN2, ``training_loop.py``).

    When the regulariser takes its own optimiser step every ``k = interval`` steps, the optimiser
    makes ``k + 1`` steps per ``k`` minibatches; with ``c = k / (k + 1)`` StyleGAN2 uses
    ``lr' = c lr`` and ``betas' = (beta1^c, beta2^c)``, keeping the decay per minibatch. ``k = 1``
    (no lazy regularisation) returns the arguments unchanged.
    """
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"r1 interval must be a positive integer, got {interval!r}")
    if interval == 1:
        return lr, tuple(betas)
    c = interval / (interval + 1)
    return lr * c, (betas[0] ** c, betas[1] ** c)


# --------------------------------------------------------------------------------------
# The two steps of the alternating game
# --------------------------------------------------------------------------------------
@dataclass
class DiscriminatorTerms:
    """What :func:`discriminator_terms` computes; every tensor is per example (B,)."""

    loss: Tensor  # adversarial + r1_scale * r1: reduce (mean) and back-propagate into D
    adversarial: Tensor  # discriminator_loss(l_r, l_f, kind)
    r1: Tensor | None  # gamma/2 ||grad_x l(x)||^2 before the lazy scale; None when not computed
    real_logits: Tensor  # l(x), detached
    fake_logits: Tensor  # l(G(z)), detached

    def metrics(self) -> dict:
        """Floats for logging: ``d_loss``, ``d_real`` = mean D(x), ``d_fake`` = mean D(G(z)), ``value`` = V, ``r1``."""
        out = {
            "d_loss": float(self.loss.detach().mean()),
            "d_real": float(torch.sigmoid(self.real_logits).mean()),
            "d_fake": float(torch.sigmoid(self.fake_logits).mean()),
            "value": float(game_value(self.real_logits, self.fake_logits).mean()),
        }
        if self.r1 is not None:
            out["r1"] = float(self.r1.detach().mean())
        return out


@dataclass
class GeneratorTerms:
    """What :func:`generator_terms` computes (per example, (B,))."""

    loss: Tensor  # generator_loss(l_f, kind): reduce and back-propagate into G
    fake_logits: Tensor  # l(G(z)), detached

    def metrics(self) -> dict:
        """Floats for logging: ``g_loss`` and ``d_fake`` = mean D(G(z)) as the generator saw it."""
        return {"g_loss": float(self.loss.detach().mean()), "d_fake": float(torch.sigmoid(self.fake_logits).mean())}


def _call(D: Callable, x: Tensor, y: Tensor | None) -> Tensor:
    return as_logits(D(x) if y is None else D(x, y))


def discriminator_terms(
    D: Callable,
    x_real: Tensor,
    x_fake: Tensor,
    kind: str = "non_saturating",
    r1_gamma: float = 0.0,
    r1_scale: float = 1.0,
    y_real: Tensor | None = None,
    y_fake: Tensor | None = None,
) -> DiscriminatorTerms:
    """The discriminator step's loss on a real batch ``x_real: (B, ...)`` and fakes ``x_fake: (B, ...)``.

    ``x_fake`` is detached here (generate it under ``torch.no_grad()``: the D step needs no G
    graph). Real and fake go through D in **one** forward, ``D(cat(x_real, x_fake))`` (one
    spectral-norm power iteration and one DDP forward per step), which requires a D that treats
    examples independently (no BatchNorm, no minibatch statistics: true of every net in
    :mod:`scorelab.nets.gan`). R1 is computed when ``r1_gamma * r1_scale > 0``; pass
    ``r1_scale = lazy_r1_scale(step, k)`` for the lazy form. ``y_real`` / ``y_fake`` (B,) are the
    labels of a conditional D (called ``D(x, y)``); both or neither.

    Returns per-example ``loss = discriminator_loss(l_r, l_f, kind) + r1_scale * r1``.
    """
    _check_kind(kind)
    if x_real.shape != x_fake.shape:
        raise ValueError(f"x_real and x_fake must have the same shape, got {tuple(x_real.shape)} and {tuple(x_fake.shape)}")
    if (y_real is None) != (y_fake is None):
        raise ValueError("give labels for both the real and the fake batch (y_real, y_fake) or for neither")
    B = x_real.shape[0]
    use_r1 = r1_gamma * r1_scale > 0
    xr = x_real.detach().requires_grad_(use_r1)
    y = None if y_real is None else torch.cat([y_real, y_fake])
    logits = _call(D, torch.cat([xr, x_fake.detach()]), y)  # (2B,)
    lr, lf = logits[:B], logits[B:]
    adv = discriminator_loss(lr, lf, kind)
    r1 = r1_penalty(lr, xr, r1_gamma) if use_r1 else None
    loss = adv if r1 is None else adv + r1_scale * r1
    return DiscriminatorTerms(loss=loss, adversarial=adv, r1=r1, real_logits=lr.detach(), fake_logits=lf.detach())


def generator_terms(D: Callable, x_fake: Tensor, kind: str = "non_saturating", y: Tensor | None = None) -> GeneratorTerms:
    """The generator step's per-example loss (B,) on fakes ``x_fake = G(z)`` (with G's graph).

    The backward pass also reaches D's parameters: zero D's gradients before its next step (the
    usual ``optimizer.zero_grad()``), or freeze them for this step.
    """
    lf = _call(D, x_fake, y)
    return GeneratorTerms(loss=generator_loss(lf, kind), fake_logits=lf.detach())


def gradient_norm(loss: Tensor, params: Iterable[Tensor]) -> Tensor:
    """``sqrt(sum_p ||d loss / d p||^2)`` over ``params`` (a scalar tensor), without touching ``.grad``.

    The diagnostic of the seed's vanishing-gradient argument: evaluate it on the generator's
    parameters for the minimax and the non-saturating generator losses. Parameters the loss does
    not reach count as zero. Keeps the graph (``retain_graph=True``).
    """
    params = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    sq = [g.pow(2).sum() for g in grads if g is not None]
    return torch.stack(sq).sum().sqrt() if sq else loss.new_zeros(())


# --------------------------------------------------------------------------------------
# Optimal discriminator and the value of the game (Goodfellow et al. 2014)
# --------------------------------------------------------------------------------------
def optimal_logit(log_p_data: Tensor, log_p_g: Tensor) -> Tensor:
    """``l*(x) = log p_data(x) - log p_G(x)``, the logit of the optimal discriminator (same shape)."""
    return log_p_data - log_p_g


def optimal_discriminator(log_p_data: Tensor, log_p_g: Tensor) -> Tensor:
    """``D*(x) = p_data / (p_data + p_G) = sigmoid(log p_data - log p_G)`` from two log-densities."""
    return torch.sigmoid(optimal_logit(log_p_data, log_p_g))


def quadrature_grid(lo: float, hi: float, n: int, dim: int = 1, dtype=torch.float64) -> tuple[Tensor, Tensor]:
    """Trapezoid rule on ``[lo, hi]^dim`` (``dim`` 1 or 2): points ``(n^dim, dim)`` and weights ``(n^dim,)``.

    For smooth integrands that are negligible at the box's edges (densities with Gaussian tails
    on a box covering their mass) the trapezoid rule converges exponentially fast in ``n``
    (Trefethen & Weideman 2014), so a few hundred points per axis give float64 accuracy.
    """
    if dim not in (1, 2):
        raise ValueError(f"quadrature_grid: dim must be 1 or 2, got {dim}")
    if not (n >= 2 and hi > lo):
        raise ValueError(f"quadrature_grid needs n >= 2 and hi > lo, got n={n}, lo={lo}, hi={hi}")
    x = torch.linspace(lo, hi, n, dtype=dtype)
    w = torch.full((n,), (hi - lo) / (n - 1), dtype=dtype)
    w[0] = w[-1] = w[0] / 2
    if dim == 1:
        return x[:, None], w
    xx, yy = torch.meshgrid(x, x, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], 1), (w[:, None] * w[None, :]).flatten()


@dataclass
class OptimalGame:
    """The game at the optimal discriminator, by quadrature (all values in nats)."""

    value: float  # V(D*, G) = int p log D* + q log(1 - D*), computed directly
    jsd: float  # JSD(p_data || p_G) = KL(p || m)/2 + KL(q || m)/2, m = (p + q)/2
    mass_data: float  # int p_data over the box (~1: the box covers the mass)
    mass_g: float  # int p_G over the box

    @property
    def bound(self) -> float:
        """``-log 4 + 2 JSD``: equals :attr:`value` when both masses are 1 (Goodfellow et al. Thm. 1)."""
        return -math.log(4.0) + 2.0 * self.jsd


def optimal_game(
    log_p_data: Callable[[Tensor], Tensor],
    log_p_g: Callable[[Tensor], Tensor],
    lo: float,
    hi: float,
    n: int = 2001,
    dim: int = 1,
) -> OptimalGame:
    """``V(D*, G)`` and ``JSD(p_data || p_G)`` on the trapezoid grid of :func:`quadrature_grid`.

    ``log_p_data``, ``log_p_g``: callables ``(N, dim) float64 -> (N,)`` log-densities (e.g.
    ``GaussianMixture.log_prob``). ``value`` integrates ``p log D* + q log(1 - D*)`` with
    ``log D* = -softplus(-(log p - log q))``; ``jsd`` integrates the two KL terms against the
    mixture ``m``. They are computed independently, so ``value == bound`` checks the identity of
    Theorem 1 on the grid, and a Monte Carlo estimate of ``game_value`` at the analytic ``D*``
    checks both.
    """
    x, w = quadrature_grid(lo, hi, n, dim)
    lp, lq = log_p_data(x).to(torch.float64), log_p_g(x).to(torch.float64)
    p, q = lp.exp(), lq.exp()
    lstar = optimal_logit(lp, lq)
    value = (w * (p * log_d(lstar) + q * log_one_minus_d(lstar))).sum()
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    kl_p = torch.where(p > 0, p * (lp - lm), torch.zeros_like(p))
    kl_q = torch.where(q > 0, q * (lq - lm), torch.zeros_like(q))
    jsd = 0.5 * (w * (kl_p + kl_q)).sum()
    return OptimalGame(value=float(value), jsd=float(jsd), mass_data=float((w * p).sum()), mass_g=float((w * q).sum()))


# --------------------------------------------------------------------------------------
# Mode coverage of a Gaussian mixture
# --------------------------------------------------------------------------------------
@dataclass
class ModeCoverage:
    """How a sample covers the modes of a Gaussian mixture (see :func:`mode_coverage`)."""

    modes: int  # modes with at least min_count high-quality samples nearest to them
    num_modes: int  # K, the mixture's number of components
    high_quality: float  # share of samples within k standard deviations of their nearest mode
    expected_high_quality: float  # that share for exact samples of well-separated modes: P(chi^2_D <= k^2)
    counts: Tensor  # (K,) high-quality samples nearest to each mode
    kl: float  # KL(share of high-quality samples per mode || mixture weights), 0 when balanced

    def metrics(self) -> dict:
        """Floats for logging: ``modes``, ``high_quality``, ``mode_kl``."""
        return {"modes": self.modes, "high_quality": self.high_quality, "mode_kl": self.kl}


def mode_coverage(samples: Tensor, means, stds=None, k: float = 3.0, min_count: int = 1, weights=None) -> ModeCoverage:
    """Modes covered and share of high-quality samples for ``samples: (N, D)``.

    ``means`` is a :class:`~scorelab.data.mixture.GaussianMixture` (then ``stds`` and ``weights``
    are its own) or ``(K, D)`` means with ``stds`` ``(K,)`` (isotropic) or ``(K, D)`` (diagonal)
    and optional ``weights`` (K,) (default equal). The distance of ``x`` to mode ``j`` is the
    Mahalanobis distance ``d_j(x) = sqrt((x - m_j)^T C_j^{-1} (x - m_j))`` (the Euclidean distance
    in units of ``std_j`` for an isotropic mode). Sample ``x`` is *high quality* when
    ``min_j d_j(x) <= k``; it then counts for its nearest mode ``argmin_j d_j(x)``, and mode ``j`` is
    *covered* when at least ``min_count`` high-quality samples count for it.

    For exact samples of well-separated modes the expected high-quality share is
    ``P(chi^2_D <= k^2)`` (``1 - exp(-k^2/2) = 0.9889`` for ``D = 2``, ``k = 3``); overlapping modes
    only raise it. ``kl`` compares the high-quality samples' mode histogram with the weights
    (``sum_j s_j log(s_j / w_j)``, empty modes contributing 0): ``log K`` for a generator collapsed
    onto one of ``K`` equal modes.
    """
    if isinstance(means, GaussianMixture):
        mix = means
    else:
        m = torch.as_tensor(means, dtype=torch.float64)
        if stds is None:
            raise ValueError("mode_coverage: give stds (K,) or (K, D) with the means, or a GaussianMixture")
        w = torch.ones(m.shape[0], dtype=torch.float64) if weights is None else weights
        mix = GaussianMixture(w, m, stds)
    if samples.ndim != 2 or samples.shape[1] != mix.dim:
        raise ValueError(f"samples must have shape (N, {mix.dim}), got {tuple(samples.shape)}")
    if not (k > 0):
        raise ValueError(f"mode_coverage: k must be positive, got {k}")
    if not (isinstance(min_count, int) and min_count >= 1):
        raise ValueError(f"mode_coverage: min_count must be a positive integer, got {min_count!r}")
    x = samples.detach().to(torch.float64).cpu()
    diff = x[:, None, :] - mix.means[None]  # (N, K, D)
    proj = torch.einsum("kdj,nkd->nkj", mix.evecs, diff)  # (N, K, D) in each component's eigenbasis
    d2 = (proj.pow(2) / mix.evals[None]).sum(-1)  # (N, K) squared Mahalanobis distances
    dmin2, nearest = d2.min(1)
    hq = dmin2 <= k * k
    counts = torch.bincount(nearest[hq], minlength=mix.K)
    n_hq = int(hq.sum())
    if n_hq:
        s = counts.to(torch.float64) / n_hq
        kl = float(torch.where(s > 0, s * (s.clamp_min(1e-300).log() - mix.weights.log()), torch.zeros_like(s)).sum())
    else:
        kl = float("nan")
    expected = float(torch.special.gammainc(torch.tensor(mix.dim / 2, dtype=torch.float64), torch.tensor(k * k / 2, dtype=torch.float64)))
    return ModeCoverage(
        modes=int((counts >= min_count).sum()),
        num_modes=mix.K,
        high_quality=n_hq / max(x.shape[0], 1),
        expected_high_quality=expected,
        counts=counts,
        kl=kl,
    )
