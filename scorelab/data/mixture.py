"""Gaussian mixtures: the analytic ground truth for every path.

For ``x_t = alpha x_0 + sigma eps`` and ``x_0 ~ sum_k w_k N(m_k, C_k)`` the noised marginal is
again a mixture, ``sum_k w_k N(alpha m_k, alpha^2 C_k + sigma^2 I)``, so its density, its score
and the posterior mean ``E[x_0 | x_t]`` are known in closed form. :meth:`GaussianMixture.denoiser`
turns this into an exact :class:`~scorelab.targets.Denoiser`-like object for any path, against
which samplers, losses, guidance and likelihoods are tested.

Each component is stored through the eigendecomposition ``C_k = U_k diag(l_k) U_k^T``, so the
noised covariance is ``U_k diag(alpha^2 l_k + sigma^2) U_k^T`` for every ``t`` at no extra cost.
All computations run in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..paths import Coefficients, Path, broadcast_to
from ..random import Generator, rand, randn
from ..targets import Prediction, as_time_batch

__all__ = ["GaussianMixture", "ExactDenoiser", "eight_gaussians_mixture", "random_mixture"]

_F = torch.float64


class GaussianMixture:
    """``p(x) = sum_k w_k N(x; m_k, C_k)`` in ``D`` dimensions.

    Args:
        weights: (K,) non-negative, normalised here.
        means: (K, D).
        covs: (K, D, D) full covariances, or (K,) / (K, D) for isotropic / diagonal ones
            given as standard deviations.
        labels: optional (K,) integer class of each component (for conditional tests).
    """

    def __init__(self, weights, means, covs, labels=None):
        w = torch.as_tensor(weights, dtype=_F)
        m = torch.as_tensor(means, dtype=_F)
        if m.ndim != 2:
            raise ValueError(f"means must be (K, D), got shape {tuple(m.shape)}")
        K, D = m.shape
        if w.shape != (K,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be (K,)=({K},) non-negative with positive sum")
        c = torch.as_tensor(covs, dtype=_F)
        if c.shape == (K,):  # isotropic std
            evals, evecs = (c[:, None] ** 2).expand(K, D).clone(), torch.eye(D, dtype=_F).expand(K, D, D).clone()
        elif c.shape == (K, D):  # diagonal std
            evals, evecs = c**2, torch.eye(D, dtype=_F).expand(K, D, D).clone()
        elif c.shape == (K, D, D):
            c = 0.5 * (c + c.transpose(1, 2))
            evals, evecs = torch.linalg.eigh(c)
            if (evals <= 0).any():
                raise ValueError("every covariance must be positive definite")
        else:
            raise ValueError(f"covs must be (K,), (K, D) or (K, D, D); got {tuple(c.shape)}")
        self.weights = w / w.sum()
        self.means = m
        self.evals = evals  # (K, D)
        self.evecs = evecs  # (K, D, D), columns are eigenvectors
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)

    # --- basic properties ---------------------------------------------------------------
    @property
    def K(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def covs(self) -> Tensor:
        """(K, D, D) full covariances."""
        return self.evecs @ torch.diag_embed(self.evals) @ self.evecs.transpose(1, 2)

    def mean(self) -> Tensor:
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Covariance of the whole mixture: (D, D)."""
        mu = self.mean()
        dm = self.means - mu
        return (self.weights[:, None, None] * (self.covs + dm[:, :, None] * dm[:, None, :])).sum(0)

    def subset(self, keep) -> "GaussianMixture":
        """The mixture of the components selected by a boolean mask or index list, renormalised."""
        keep = torch.as_tensor(keep)
        idx = keep.nonzero().flatten() if keep.dtype == torch.bool else keep
        g = GaussianMixture.__new__(GaussianMixture)
        g.weights = self.weights[idx] / self.weights[idx].sum()
        g.means, g.evals, g.evecs = self.means[idx], self.evals[idx], self.evecs[idx]
        g.labels = None if self.labels is None else self.labels[idx]
        return g

    def conditional(self, label: int) -> "GaussianMixture":
        """``p(x | y = label)``: the components of that class."""
        if self.labels is None:
            raise ValueError("this mixture has no labels")
        return self.subset(self.labels == label)

    # --- sampling and density ---------------------------------------------------------------
    def sample(self, n: int, generator: Generator = None, return_component: bool = False):
        """``n`` samples (n, D) in float64; with ``return_component`` also their component index."""
        u = rand((n,), generator=generator, dtype=_F)
        k = torch.searchsorted(torch.cumsum(self.weights, 0), u).clamp(max=self.K - 1)
        z = randn((n, self.dim), generator=generator, dtype=_F)
        x = self.means[k] + torch.einsum("nij,nj->ni", self.evecs[k], z * self.evals[k].sqrt())
        return (x, k) if return_component else x

    def _components(self, x: Tensor, alpha: Tensor, sigma: Tensor):
        """Per-component pieces of the noised marginal at ``x: (B, D)`` with per-example alpha, sigma (B,).

        Returns log N_k (B, K), projections y = U^T (x - alpha m) (B, K, D) and variances (B, K, D).
        """
        x = x.to(_F)
        a = alpha.to(_F).reshape(-1, 1, 1)
        s = sigma.to(_F).reshape(-1, 1, 1)
        diff = x[:, None, :] - a * self.means[None]  # (B, K, D)
        y = torch.einsum("kdj,bkd->bkj", self.evecs, diff)  # (B, K, D)
        var = a**2 * self.evals[None] + s**2  # (B, K, D)
        logn = -0.5 * ((y**2 / var) + torch.log(2 * math.pi * var)).sum(-1)  # (B, K)
        return logn, y, var

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density at ``x: (B, D)``: (B,)."""
        one = torch.ones(x.shape[0], dtype=_F)
        return self.marginal_log_prob(x, one, 0 * one)

    def marginal_log_prob(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Log-density of the noised marginal ``p_t`` at ``x: (B, D)``; alpha, sigma: (B,) or scalars."""
        alpha, sigma = _batch(alpha, x), _batch(sigma, x)
        logn, _, _ = self._components(x, alpha, sigma)
        return torch.logsumexp(logn + torch.log(self.weights), dim=1)

    def posterior(self, x: Tensor, alpha: Tensor, sigma: Tensor, log_prior: Tensor | None = None):
        """``(x0_mean, eps_mean, responsibilities)`` of the noised marginal at ``x: (B, D)``.

        ``x0_mean = E[x_0 | x_t]``, ``eps_mean = E[eps | x_t]`` (so ``score = -eps_mean / sigma``),
        responsibilities ``p(k | x_t)``: (B, K). ``log_prior`` (B, K) replaces ``log w_k``
        (used to condition on a class).
        """
        alpha, sigma = _batch(alpha, x), _batch(sigma, x)
        logn, y, var = self._components(x, alpha, sigma)
        lw = torch.log(self.weights)[None] if log_prior is None else log_prior
        r = torch.softmax(logn + lw, dim=1)  # (B, K)
        a = alpha.to(_F).reshape(-1, 1, 1)
        s = sigma.to(_F).reshape(-1, 1, 1)
        # E[x0 | x_t, k] = m_k + alpha C_k (alpha^2 C_k + sigma^2 I)^{-1} (x_t - alpha m_k)
        x0_k = self.means[None] + torch.einsum("kdj,bkj->bkd", self.evecs, a * self.evals[None] * y / var)
        # E[eps | x_t, k] = sigma (alpha^2 C_k + sigma^2 I)^{-1} (x_t - alpha m_k)
        eps_k = torch.einsum("kdj,bkj->bkd", self.evecs, s * y / var)
        return (r[..., None] * x0_k).sum(1), (r[..., None] * eps_k).sum(1), r

    def class_log_posterior(self, x: Tensor, alpha, sigma) -> Tensor:
        """``log p(y = c | x_t)`` of the noised marginal at ``x: (B, D)``: (B, C), C = max label + 1.

        ``p(y = c | x_t) = sum_{k: label_k = c} w_k N_k(x_t) / sum_k w_k N_k(x_t)`` with
        ``N_k = N(alpha m_k, alpha^2 C_k + sigma^2 I)``; differentiable in ``x`` (the exact
        noise-aware classifier used to test classifier guidance).
        """
        if self.labels is None:
            raise ValueError("this mixture has no labels")
        alpha, sigma = _batch(alpha, x), _batch(sigma, x)
        logn, _, _ = self._components(x, alpha, sigma)
        joint = logn + torch.log(self.weights)[None]  # (B, K): log w_k N_k(x_t)
        onehot = torch.nn.functional.one_hot(self.labels, int(self.labels.max()) + 1).to(_F)  # (K, C)
        per_class = torch.logsumexp(joint[:, :, None] + torch.log(onehot)[None], dim=1)  # (B, C)
        return per_class - torch.logsumexp(joint, dim=1, keepdim=True)

    def marginal_score(self, x: Tensor, alpha, sigma) -> Tensor:
        """``grad_x log p_t(x)`` at ``x: (B, D)``."""
        alpha, sigma = _batch(alpha, x), _batch(sigma, x)
        logn, y, var = self._components(x, alpha, sigma)
        r = torch.softmax(logn + torch.log(self.weights)[None], dim=1)
        score_k = -torch.einsum("kdj,bkj->bkd", self.evecs, y / var)
        return (r[..., None] * score_k).sum(1)

    def score(self, x: Tensor) -> Tensor:
        one = torch.ones(x.shape[0], dtype=_F)
        return self.marginal_score(x, one, 0 * one)

    def noised(self, alpha: float, sigma: float) -> "GaussianMixture":
        """The marginal at one time as a mixture: means alpha m_k, covariances alpha^2 C_k + sigma^2 I."""
        g = GaussianMixture.__new__(GaussianMixture)
        g.weights, g.labels = self.weights, self.labels
        g.means, g.evecs = alpha * self.means, self.evecs
        g.evals = alpha**2 * self.evals + sigma**2
        return g

    def denoiser(self, path: Path, label: int | None = None) -> "ExactDenoiser":
        """The exact denoiser of this mixture on ``path`` (optionally conditioned on a class)."""
        return ExactDenoiser(self, path, label)


def _batch(v, x: Tensor) -> Tensor:
    v = torch.as_tensor(v, dtype=_F)
    return v.expand(x.shape[0]) if v.ndim == 0 else v


@dataclass
class ExactDenoiser:
    """``E[x_0 | x_t]`` and ``E[eps | x_t]`` of a Gaussian mixture on a path, in closed form.

    Behaves like a :class:`~scorelab.targets.Denoiser`: ``predict(x, t)`` and ``__call__(x, t, kind)``.
    Passing ``y=`` (a (B,) tensor of labels, -1 for unconditional) conditions per example.
    Counts its evaluations in ``nfe`` (one per call, whatever the batch size).
    """

    mixture: GaussianMixture
    path: Path
    label: int | None = None
    nfe: int = 0

    def predict(self, x: Tensor, t, y: Tensor | None = None, **_) -> Prediction:
        self.nfe += 1
        t = as_time_batch(t, x)
        c = self.path.coefficients(t)
        log_prior = self._log_prior(x.shape[0], y)
        x0, eps, _ = self.mixture.posterior(x.reshape(x.shape[0], -1), c.alpha, c.sigma, log_prior)
        return Prediction(x, c.to(x), x0.reshape(x.shape).to(x.dtype), eps.reshape(x.shape).to(x.dtype))

    def _log_prior(self, B: int, y) -> Tensor | None:
        lw = torch.log(self.mixture.weights)
        if y is None and self.label is None:
            return None
        labels = torch.full((B,), self.label if self.label is not None else -1, dtype=torch.long)
        if y is not None:
            labels = torch.as_tensor(y, dtype=torch.long).expand(B)
        if self.mixture.labels is None:
            raise ValueError("conditioning on a label needs a mixture with labels")
        match = self.mixture.labels[None, :] == labels[:, None]  # (B, K)
        cond = torch.where(match, lw[None], torch.full_like(match, -math.inf, dtype=_F))
        return torch.where((labels < 0)[:, None], lw[None].expand(B, -1), cond)

    def __call__(self, x: Tensor, t, kind: str = "x0", **cond) -> Tensor:
        return self.predict(x, t, **cond).get(kind)


def eight_gaussians_mixture(radius: float = 2.0, std: float = 0.1) -> GaussianMixture:
    """Eight equal isotropic Gaussians on a circle, labelled 0..7."""
    ang = torch.arange(8, dtype=_F) * (2 * math.pi / 8)
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    return GaussianMixture(torch.ones(8), means, torch.full((8,), std), labels=torch.arange(8))


def random_mixture(dim: int, K: int, seed: int = 0, full_cov: bool = True, spread: float = 2.0) -> GaussianMixture:
    """A reproducible random mixture in ``dim`` dimensions with unequal weights and full covariances."""
    g = torch.Generator().manual_seed(seed)
    w = 0.5 + torch.rand(K, generator=g, dtype=_F)
    means = spread * torch.randn(K, dim, generator=g, dtype=_F) / math.sqrt(dim) * 2
    if full_cov:
        A = torch.randn(K, dim, dim, generator=g, dtype=_F) / math.sqrt(dim)
        covs = 0.05 * (A @ A.transpose(1, 2)) + 0.02 * torch.eye(dim, dtype=_F)
    else:
        covs = 0.1 + 0.2 * torch.rand(K, generator=g, dtype=_F)
    return GaussianMixture(w, means, covs, labels=torch.arange(K) % 2)
