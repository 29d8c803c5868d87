"""Gaussian mixtures: the analytic ground truth for every path.

For ``x_t = alpha x_0 + sigma eps`` and ``x_0 ~ sum_k w_k N(m_k, C_k)`` the noised marginal is
again a mixture, ``sum_k w_k N(alpha m_k, alpha^2 C_k + sigma^2 I)``, so its density, its score
and the posterior mean ``E[x_0 | x_t]`` are known in closed form. :meth:`GaussianMixture.denoiser`
turns this into an exact :class:`~scorelab.targets.Denoiser`-like object for any path, against
which samplers, losses, guidance and likelihoods are tested.

Each component is stored through the eigendecomposition ``C_k = U_k diag(l_k) U_k^T``, so the
noised covariance is ``U_k diag(alpha^2 l_k + sigma^2) U_k^T`` for every ``t`` at no extra cost.
Isotropic and diagonal components (covariances given as (K,) or (K, D) standard deviations) have
``U_k = I`` and never touch a D x D matrix: when every example of a batch shares one time (a
sampler's step), the Gaussian log-densities and posterior means are a few (B, D) x (D, K)
products (see :meth:`GaussianMixture._diagonal_uniform`), O(B K D) with no (B, K, D) temporaries;
full covariances cost O(B K D^2). All computations run in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..paths import Path
from ..random import Generator, rand, randn
from ..targets import Prediction, as_time_batch, registered_time

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
        evecs = None  # identity for isotropic / diagonal components (not stored)
        if c.shape == (K,):  # isotropic std
            evals, structure = (c[:, None] ** 2).expand(K, D).clone(), "isotropic"
        elif c.shape == (K, D):  # diagonal std
            evals, structure = c**2, "diagonal"
        elif c.shape == (K, D, D):
            structure = "full"
            c = 0.5 * (c + c.transpose(1, 2))
            evals, evecs = torch.linalg.eigh(c)
            if (evals <= 0).any():
                raise ValueError("every covariance must be positive definite")
        else:
            raise ValueError(f"covs must be (K,), (K, D) or (K, D, D); got {tuple(c.shape)}")
        self.weights = w / w.sum()
        self.means = m
        self.evals = evals  # (K, D)
        self._evecs = evecs  # (K, D, D), columns are eigenvectors; None: every U_k = I
        self.structure = structure  # "isotropic" | "diagonal" | "full": which fast path applies
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)

    @property
    def evecs(self) -> Tensor:
        """(K, D, D) eigenvectors (columns) of each covariance; identities for isotropic / diagonal ones."""
        if self._evecs is None:
            return torch.eye(self.dim, dtype=_F).expand(self.K, self.dim, self.dim)
        return self._evecs

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
        g.means, g.evals = self.means[idx], self.evals[idx]
        g._evecs = None if self._evecs is None else self._evecs[idx]
        g.structure = self.structure
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
        if self._evecs is None:
            x = self.means[k] + z * self.evals[k].sqrt()
        else:
            x = self.means[k] + torch.einsum("nij,nj->ni", self._evecs[k], z * self.evals[k].sqrt())
        return (x, k) if return_component else x

    def _components(self, x: Tensor, alpha: Tensor, sigma: Tensor):
        """Per-component pieces of the noised marginal at ``x: (B, D)`` with per-example alpha, sigma (B,).

        Returns log N_k (B, K), projections y = U^T (x - alpha m) (B, K, D) and variances (B, K, D).
        """
        x = x.to(_F)
        a = alpha.to(_F).reshape(-1, 1, 1)
        s = sigma.to(_F).reshape(-1, 1, 1)
        diff = x[:, None, :] - a * self.means[None]  # (B, K, D)
        y = diff if self._evecs is None else torch.einsum("kdj,bkd->bkj", self._evecs, diff)  # (B, K, D)
        var = a**2 * self.evals[None] + s**2  # (B, K, D)
        logn = -0.5 * ((y**2 / var) + torch.log(2 * math.pi * var)).sum(-1)  # (B, K)
        return logn, y, var

    def _rotate_back(self, v: Tensor) -> Tensor:
        """``U_k v_k`` for ``v: (B, K, D)`` given in each component's eigenbasis."""
        return v if self._evecs is None else torch.einsum("kdj,bkj->bkd", self._evecs, v)

    @staticmethod
    def _shared(alpha: Tensor, sigma: Tensor) -> tuple[float, float] | None:
        """``(alpha, sigma)`` as floats when every example has the same ones (a sampler's step), else None."""
        if alpha.numel() == 0 or alpha.requires_grad or sigma.requires_grad:
            return None
        a0, s0 = alpha.reshape(-1)[0], sigma.reshape(-1)[0]
        if bool((alpha == a0).all()) and bool((sigma == s0).all()):
            return float(a0), float(s0)
        return None

    def _diagonal_uniform(self, x: Tensor, a: float, s: float, posterior: bool):
        """Isotropic / diagonal components at one shared ``(alpha, sigma)``, without (B, K, D) temporaries.

        With ``V_k = alpha^2 l_k + sigma^2`` (K, D) and ``x: (B, D)``:

            log N_k = -1/2 [ x^2 . (1/V_k) - 2 alpha x . (m_k / V_k) + alpha^2 m_k^2 . (1/V_k) + sum_d log(2 pi V_kd) ]
            E[x_0 | x, k] = m_k sigma^2 / V_k + alpha x l_k / V_k,     E[eps | x, k] = sigma (x - alpha m_k) / V_k

        so the mixture's ``x0 = r (M sigma^2 / V) + alpha x * (r (L / V))`` and ``eps = sigma x * (r / V) -
        sigma alpha r (M / V)`` with ``r: (B, K)`` the responsibilities: (B, D) x (D, K) products only.
        Returns ``logn (B, K)`` and, with ``posterior``, the callable ``(r) -> (x0, eps)``.
        """
        x = x.to(_F)
        M = self.means  # (K, D)
        if self.structure == "isotropic":
            V = a * a * self.evals[:, 0] + s * s  # (K,)
            iV = 1 / V
            quad = ((x * x).sum(1, keepdim=True) - 2 * a * (x @ M.T)) * iV + (a * a) * (M * M).sum(1) * iV
            logn = -0.5 * (quad + self.dim * torch.log(2 * math.pi * V))
        else:
            V = a * a * self.evals + s * s  # (K, D)
            iV = 1 / V
            quad = (x * x) @ iV.T - (2 * a) * (x @ (M * iV).T) + (a * a) * (M * M * iV).sum(1)
            logn = -0.5 * (quad + torch.log(2 * math.pi * V).sum(1))
        if not posterior:
            return logn, None

        def means(r: Tensor) -> tuple[Tensor, Tensor]:
            if self.structure == "isotropic":
                w_x0 = r @ (self.evals[:, 0] * iV)  # (B,): sum_k r_k l_k / V_k
                w_eps = r @ iV  # (B,)
                x0 = (s * s) * (r * iV) @ M + a * x * w_x0[:, None]
                eps = s * x * w_eps[:, None] - (s * a) * (r * iV) @ M
            else:
                x0 = (s * s) * (r @ (M * iV)) + a * x * (r @ (self.evals * iV))
                eps = s * x * (r @ iV) - (s * a) * (r @ (M * iV))
            return x0, eps

        return logn, means

    def _full_uniform(self, x: Tensor, a: float, s: float, lw: Tensor):
        """:meth:`posterior` for full covariances at one shared ``(alpha, sigma)``.

        With ``U = [U_1 .. U_K]`` (D, K D) and ``V_k = alpha^2 l_k + sigma^2`` (K, D), the projections
        are one product ``y = x U - alpha (U_k^T m_k)`` (B, K, D), the log-normalisers use ``V`` (K, D)
        only, and ``sum_k r_k U_k v_k`` is one product ``(r v).reshape(B, K D) U^T`` for ``v`` the
        per-component means in the eigenbases: no (B, K, D) logarithms or per-example divisions.
        """
        x = x.to(_F)
        B, K, D = x.shape[0], self.K, self.dim
        U = self._evecs.permute(1, 0, 2).reshape(D, K * D)  # columns: U_1 .. U_K
        mu = torch.einsum("kdj,kd->kj", self._evecs, self.means)  # U_k^T m_k: (K, D)
        y = (x @ U).reshape(B, K, D) - a * mu[None]  # (B, K, D)
        V = a * a * self.evals + s * s  # (K, D)
        iV = 1 / V
        logn = -0.5 * ((y * y * iV[None]).sum(-1) + torch.log(2 * math.pi * V).sum(-1)[None])  # (B, K)
        r = torch.softmax(logn + lw, dim=1)  # (B, K)
        ry = r[:, :, None] * y  # (B, K, D)
        x0 = r @ self.means + (ry * (a * self.evals * iV)[None]).reshape(B, K * D) @ U.T
        eps = (ry * (s * iV)[None]).reshape(B, K * D) @ U.T
        return x0, eps, r

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density at ``x: (B, D)``: (B,)."""
        one = torch.ones(x.shape[0], dtype=_F)
        return self.marginal_log_prob(x, one, 0 * one)

    def marginal_log_prob(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Log-density of the noised marginal ``p_t`` at ``x: (B, D)``; alpha, sigma: (B,) or scalars."""
        alpha, sigma = _batch(alpha, x), _batch(sigma, x)
        logn = self._log_normals(x, alpha, sigma)
        return torch.logsumexp(logn + torch.log(self.weights), dim=1)

    def _log_normals(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """``log N(x; alpha m_k, alpha^2 C_k + sigma^2 I)``: (B, K), by the fastest exact route."""
        shared = self._shared(alpha, sigma) if self._evecs is None else None
        if shared is not None:
            return self._diagonal_uniform(x, *shared, posterior=False)[0]
        return self._components(x, alpha, sigma)[0]

    def posterior(self, x: Tensor, alpha: Tensor, sigma: Tensor, log_prior: Tensor | None = None,
                  shared: tuple[float, float] | None = None):
        """``(x0_mean, eps_mean, responsibilities)`` of the noised marginal at ``x: (B, D)``.

        ``x0_mean = E[x_0 | x_t]``, ``eps_mean = E[eps | x_t]`` (so ``score = -eps_mean / sigma``),
        responsibilities ``p(k | x_t)``: (B, K). ``log_prior`` (B, K) replaces ``log w_k``
        (used to condition on a class). ``shared``: the ``(alpha, sigma)`` every example has, if the
        caller knows it (a sampler's step), which spares the check.
        """
        alpha, sigma = _batch(alpha, x), _batch(sigma, x)
        lw = torch.log(self.weights)[None] if log_prior is None else log_prior
        if shared is None:
            shared = self._shared(alpha, sigma)
        if shared is not None and self._evecs is None:  # isotropic / diagonal at one time: (B, D) x (D, K) products
            logn, means = self._diagonal_uniform(x, *shared, posterior=True)
            r = torch.softmax(logn + lw, dim=1)  # (B, K)
            x0, eps = means(r)
            return x0, eps, r
        if shared is not None and not x.requires_grad:  # full covariances at one time
            return self._full_uniform(x, *shared, lw)
        logn, y, var = self._components(x, alpha, sigma)
        r = torch.softmax(logn + lw, dim=1)  # (B, K)
        a = alpha.to(_F).reshape(-1, 1, 1)
        s = sigma.to(_F).reshape(-1, 1, 1)
        # E[x0 | x_t, k] = m_k + alpha C_k (alpha^2 C_k + sigma^2 I)^{-1} (x_t - alpha m_k)
        x0_k = self.means[None] + self._rotate_back(a * self.evals[None] * y / var)
        # E[eps | x_t, k] = sigma (alpha^2 C_k + sigma^2 I)^{-1} (x_t - alpha m_k)
        eps_k = self._rotate_back(s * y / var)
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
        logn = self._log_normals(x, alpha, sigma)
        joint = logn + torch.log(self.weights)[None]  # (B, K): log w_k N_k(x_t)
        onehot = torch.nn.functional.one_hot(self.labels, int(self.labels.max()) + 1).to(_F)  # (K, C)
        per_class = torch.logsumexp(joint[:, :, None] + torch.log(onehot)[None], dim=1)  # (B, C)
        return per_class - torch.logsumexp(joint, dim=1, keepdim=True)

    def marginal_score(self, x: Tensor, alpha, sigma) -> Tensor:
        """``grad_x log p_t(x)`` at ``x: (B, D)``."""
        alpha, sigma = _batch(alpha, x), _batch(sigma, x)
        shared = self._shared(alpha, sigma) if self._evecs is None else None
        if shared is not None and shared[1] > 0:  # score = -E[eps | x_t] / sigma
            return -self.posterior(x, alpha, sigma)[1] / shared[1]
        logn, y, var = self._components(x, alpha, sigma)
        r = torch.softmax(logn + torch.log(self.weights)[None], dim=1)
        score_k = -self._rotate_back(y / var)
        return (r[..., None] * score_k).sum(1)

    def score(self, x: Tensor) -> Tensor:
        one = torch.ones(x.shape[0], dtype=_F)
        return self.marginal_score(x, one, 0 * one)

    def noised(self, alpha: float, sigma: float) -> "GaussianMixture":
        """The marginal at one time as a mixture: means alpha m_k, covariances alpha^2 C_k + sigma^2 I."""
        g = GaussianMixture.__new__(GaussianMixture)
        g.weights, g.labels = self.weights, self.labels
        g.means, g._evecs, g.structure = alpha * self.means, self._evecs, self.structure
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
        log_prior = self._log_prior(x.shape[0], y)
        e = registered_time(t, self.path, x)
        if e is not None:  # a sampler's time: its coefficients are known, one (alpha, sigma) for the batch
            a, s = e.c64[0], e.c64[1]
            alpha, sigma = torch.full((x.shape[0],), a, dtype=_F), torch.full((x.shape[0],), s, dtype=_F)
            x0, eps, _ = self.mixture.posterior(x.reshape(x.shape[0], -1), alpha, sigma, log_prior, shared=(a, s))
            return Prediction.given(x, x0.reshape(x.shape).to(x.dtype), eps.reshape(x.shape).to(x.dtype), e)
        c = self.path.coefficients(t)
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
