"""Sample-quality metrics.

``sliced_wasserstein`` compares two point clouds in any dimension (used with the analytic
mixtures); FID / KID / precision-recall use the features of the domain classifier shipped in
``scorelab/assets`` (see ``scorelab.nets.classifier``). No Inception network exists offline, so
our FID is a *domain* FID: its numbers compare models on one dataset, not with papers.

Feature metrics (``f1: (N, F)``, ``f2: (M, F)``, computed in float64):

- ``fid_from_features``: Fréchet distance of the Gaussians fitted to the two feature sets,
  ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})`` (Heusel et al. 2017).
- ``kid_from_features``: unbiased MMD^2 with the kernel ``k(x, y) = (x.y / F + 1)^3``, mean and
  std over random subsets (Bińkowski et al. 2018).
- ``precision_recall``: k-NN manifold precision and recall (Kynkäänniemi et al. 2019).

``evaluate_images`` / :class:`DomainMetrics` push images through the classifier's features;
``class_accuracy`` scores label-conditioned samples with the classifier's predictions.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from .random import Generator, randn

__all__ = [
    "sliced_wasserstein",
    "sqrtm_psd",
    "frechet_distance",
    "fid_from_features",
    "kid_from_features",
    "precision_recall",
    "DomainMetrics",
    "evaluate_images",
    "class_accuracy",
]


def sliced_wasserstein(x: Tensor, y: Tensor, n_proj: int = 256, generator: Generator = None) -> Tensor:
    """Sliced Wasserstein-2 distance between point clouds ``x: (N, D)`` and ``y: (M, D)``.

    ``SW2 = sqrt(E_theta W2^2(theta^T x, theta^T y))`` over ``n_proj`` random unit directions;
    each 1-D W2 compares quantiles (sorted projections, interpolated when ``N != M``).
    """
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    y = y.reshape(y.shape[0], -1).to(torch.float64)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    theta = randn((x.shape[1], n_proj), generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta, dim=0)
    py, _ = torch.sort(y @ theta, dim=0)
    if px.shape[0] != py.shape[0]:
        q = (torch.arange(px.shape[0], dtype=torch.float64) + 0.5) / px.shape[0]
        py = _quantiles(py, q)
    return ((px - py) ** 2).mean().sqrt()


def _quantiles(sorted_vals: Tensor, q: Tensor) -> Tensor:
    """Linear interpolation of sorted columns ``(M, P)`` at probabilities ``q: (N,)``."""
    M = sorted_vals.shape[0]
    pos = (q * M - 0.5).clamp(0, M - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=M - 1)
    w = (pos - lo)[:, None]
    return sorted_vals[lo] * (1 - w) + sorted_vals[hi] * w


# --------------------------------------------------------------------------------------------
# Feature-space metrics: FID, KID, precision / recall
# --------------------------------------------------------------------------------------------

_F64 = torch.float64


def _as_features(f, name: str) -> Tensor:
    f = torch.as_tensor(f)
    if f.ndim != 2:
        raise ValueError(f"{name} must be (N, F) features, got shape {tuple(f.shape)}")
    f = f.detach().to(device="cpu", dtype=_F64)
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} contains non-finite values")
    return f


def _check_pair(f1: Tensor, f2: Tensor, names=("f1", "f2"), min_n: int = 2) -> None:
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dimension mismatch: {names[0]} has {f1.shape[1]}, {names[1]} has {f2.shape[1]}")
    for f, name in zip((f1, f2), names):
        if f.shape[0] < min_n:
            raise ValueError(f"{name} needs at least {min_n} rows, got {f.shape[0]}")


@contextmanager
def _one_thread():
    """Run small dense linear algebra on one thread.

    ``eigh`` of a 128x128 matrix takes milliseconds on one thread, but over a second with two
    OpenMP threads on a loaded machine (measured here: 3 ms vs 1.4 s); the feature covariances are
    far too small to gain anything from threads.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def sqrtm_psd(a: Tensor) -> Tensor:
    """Principal square root of a symmetric positive semi-definite matrix ``a: (D, D)``.

    ``a = U diag(l) U^T  ->  a^{1/2} = U diag(sqrt(max(l, 0))) U^T`` (float64; the tiny negative
    eigenvalues that round-off gives a singular covariance are clipped to 0).
    """
    a = torch.as_tensor(a, dtype=_F64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"a must be a square (D, D) matrix, got shape {tuple(a.shape)}")
    a = 0.5 * (a + a.T)
    with _one_thread():
        evals, evecs = torch.linalg.eigh(a)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Fréchet (Wasserstein-2²) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``.

    ``d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})``.

    ``S1 S2`` is not symmetric, and ``scipy.linalg.sqrtm`` of it returns small spurious imaginary
    parts. Instead we use that ``S1 S2 = S1^{1/2} (S1^{1/2} S2 S1^{1/2}) S1^{-1/2}`` is similar to
    the symmetric PSD matrix ``M = S1^{1/2} S2 S1^{1/2}`` (by continuity also for singular S1), so
    ``tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(M))`` with real eigenvalues from ``eigvalsh``, all
    in float64. Shapes: ``mu: (D,)``, ``cov: (D, D)``.
    """
    mu1, mu2 = torch.as_tensor(mu1, dtype=_F64), torch.as_tensor(mu2, dtype=_F64)
    cov1, cov2 = torch.as_tensor(cov1, dtype=_F64), torch.as_tensor(cov2, dtype=_F64)
    D = mu1.shape[0]
    if mu1.shape != (D,) or mu2.shape != (D,) or cov1.shape != (D, D) or cov2.shape != (D, D):
        raise ValueError(
            f"expected mu1, mu2: (D,) and cov1, cov2: (D, D); got {tuple(mu1.shape)}, {tuple(mu2.shape)}, "
            f"{tuple(cov1.shape)}, {tuple(cov2.shape)}"
        )
    s1 = sqrtm_psd(cov1)
    m = s1 @ (0.5 * (cov2 + cov2.T)) @ s1
    with _one_thread():
        tr_sqrt = torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp_min(0).sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt
    return float(d2.clamp_min(0))


def _mean_cov(f: Tensor) -> tuple[Tensor, Tensor]:
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)  # unbiased covariance, (F, F)


def fid_from_features(f1: Tensor, f2: Tensor) -> float:
    """FID between feature sets ``f1: (N, F)`` and ``f2: (M, F)``.

    The Fréchet distance (:func:`frechet_distance`) between Gaussians with the sample means and
    unbiased sample covariances of the two sets. It is biased upwards at finite N (compare models
    only at equal sample sizes).
    """
    f1, f2 = _as_features(f1, "f1"), _as_features(f2, "f2")
    _check_pair(f1, f2)
    return frechet_distance(*_mean_cov(f1), *_mean_cov(f2))


def _poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    """Cubic polynomial kernel ``k(x, y) = (x.y / F + 1)^3``: ``(n, F), (m, F) -> (n, m)``."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def kid_from_features(
    f1: Tensor,
    f2: Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Kernel Inception Distance: ``(mean, std)`` of unbiased MMD² estimates over random subsets.

    For each of ``subsets`` draws, ``m = min(subset_size, N, M)`` rows are taken without
    replacement from each of ``f1: (N, F)`` and ``f2: (M, F)``, and with ``K = k(x, x')``,
    ``k(x, y) = (x.y / F + 1)^3``::

        MMD²_u = sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
                 - 2 sum_{i, j} k(x_i, y_j) / m²

    Each estimate is unbiased, so it can be negative when the distributions agree. ``std`` is
    the standard deviation over subsets (the spread of one subset's estimate).
    """
    f1, f2 = _as_features(f1, "f1"), _as_features(f2, "f2")
    _check_pair(f1, f2)
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    m = min(subset_size, f1.shape[0], f2.shape[0])
    est = torch.empty(subsets, dtype=_F64)
    for s in range(subsets):
        x = f1[torch.randperm(f1.shape[0], generator=generator)[:m]]  # (m, F)
        y = f2[torch.randperm(f2.shape[0], generator=generator)[:m]]  # (m, F)
        kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)  # (m, m) each
        off = m * (m - 1)
        est[s] = (kxx.sum() - kxx.diagonal().sum()) / off + (kyy.sum() - kyy.diagonal().sum()) / off - 2 * kxy.mean()
    std = float(est.std()) if subsets > 1 else 0.0
    return float(est.mean()), std


def _knn_radii(x: Tensor, k: int, chunk_size: int) -> Tensor:
    """Distance of each row of ``x: (N, F)`` to its k-th nearest other row: ``(N,)``."""
    out = []
    for i in range(0, x.shape[0], chunk_size):
        d = torch.cdist(x[i : i + chunk_size], x)  # (c, N), includes the zero self-distance
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def _inside_manifold(query: Tensor, ref: Tensor, radii: Tensor, chunk_size: int) -> Tensor:
    """For each row of ``query: (Q, F)``: is it inside some ball ``B(ref_j, radii_j)``? ``(Q,)`` bool."""
    out = []
    for i in range(0, query.shape[0], chunk_size):
        d = torch.cdist(query[i : i + chunk_size], ref)  # (c, R)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real_feats: Tensor, fake_feats: Tensor, k: int = 3, chunk_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): ``(precision, recall)``.

    The manifold of a set is the union of balls around its points, each with radius the distance
    to the point's k-th nearest neighbour within the set.

    - precision = fraction of fake samples inside the real manifold (fidelity);
    - recall    = fraction of real samples inside the fake manifold (coverage).

    ``real_feats: (N, F)``, ``fake_feats: (M, F)``; distances are computed ``chunk_size`` rows
    at a time, so memory is ``O(chunk_size * max(N, M))``.
    """
    real, fake = _as_features(real_feats, "real_feats"), _as_features(fake_feats, "fake_feats")
    _check_pair(real, fake, names=("real_feats", "fake_feats"), min_n=k + 1)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    r_real = _knn_radii(real, k, chunk_size)
    r_fake = _knn_radii(fake, k, chunk_size)
    precision = _inside_manifold(fake, real, r_real, chunk_size).to(_F64).mean()
    recall = _inside_manifold(real, fake, r_fake, chunk_size).to(_F64).mean()
    return float(precision), float(recall)


# --------------------------------------------------------------------------------------------
# Images -> domain-classifier features
# --------------------------------------------------------------------------------------------

_DEFAULT_CLASSIFIERS: dict = {}


def _default_classifier(name: str = "fmnist"):
    """The shipped classifier ``name``, loaded once per process (it is frozen, so sharing is safe)."""
    if name not in _DEFAULT_CLASSIFIERS:
        from .nets.classifier import load_domain_classifier

        _DEFAULT_CLASSIFIERS[name] = load_domain_classifier(name)
    return _DEFAULT_CLASSIFIERS[name]


def _check_images(images: Tensor, name: str) -> Tensor:
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f"{name} must be (N, C, H, W) images in [-1, 1], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating point in [-1, 1], got dtype {images.dtype}")
    if images.numel() and (not torch.isfinite(images).all() or images.abs().max() > 2):
        raise ValueError(f"{name} must be finite and in [-1, 1] (got values outside [-2, 2]: wrong scaling?)")
    return images.clamp(-1, 1)


@torch.no_grad()
def _batched(fn, images: Tensor, batch_size: int, device) -> Tensor:
    outs = [fn(images[i : i + batch_size].to(device=device, dtype=torch.float32)).cpu() for i in range(0, images.shape[0], batch_size)]
    return torch.cat(outs)


class DomainMetrics:
    """FID / KID / precision-recall of images in a domain classifier's feature space.

    Images are ``(N, 1, 28, 28)`` floats in ``[-1, 1]`` (clamped to it, as when saving to 8 bits;
    values beyond ``[-2, 2]`` raise, since they mean a wrong scaling). Real features can be
    cached with :meth:`set_real` and reused across :meth:`evaluate` calls.

    Args:
        classifier: a module with ``features(x) -> (B, F)``; ``None`` loads the shipped
            Fashion-MNIST LeNet (``scorelab.nets.classifier.load_domain_classifier("fmnist")``).
        batch_size: images per classifier forward pass.
        kid_subsets: number of random subsets for KID.
        kid_subset_size: rows per KID subset (capped by the sample sizes).
        k: neighbour index of the precision / recall radii (Kynkäänniemi et al. use 3).
        seed: seed of the KID subset draws (a fresh generator per :meth:`evaluate`, so the
            metrics are deterministic).
        device: where the classifier runs.
    """

    def __init__(
        self,
        classifier=None,
        batch_size: int = 500,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        k: int = 3,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.classifier = (classifier if classifier is not None else _default_classifier()).to(device)
        self.batch_size = batch_size
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.k = k
        self.seed = seed
        self.device = device
        self.real_features: Tensor | None = None

    def features(self, images: Tensor, name: str = "images") -> Tensor:
        """Classifier features ``(N, F)`` (float64, CPU) of images ``(N, 1, 28, 28)`` in [-1, 1]."""
        images = _check_images(images, name)
        was_training = self.classifier.training
        self.classifier.eval()
        try:
            f = _batched(self.classifier.features, images, self.batch_size, self.device)
        finally:
            self.classifier.train(was_training)
        return f.to(_F64)

    def set_real(self, real_images: Tensor) -> "DomainMetrics":
        """Compute and cache the reference (real) features."""
        self.real_features = self.features(real_images, "real_images")
        return self

    def evaluate(self, fake_images: Tensor, real_images: Tensor | None = None) -> dict:
        """``dict(fid, kid, kid_std, precision, recall)`` of ``fake_images`` against the real set.

        ``real_images=None`` uses the features cached by :meth:`set_real`.
        """
        if real_images is not None:
            real = self.features(real_images, "real_images")
        elif self.real_features is not None:
            real = self.real_features
        else:
            raise ValueError("real_images is None and no real features are cached (call set_real first)")
        fake = self.features(fake_images, "fake_images")
        return self.evaluate_features(fake, real)

    def evaluate_features(self, fake: Tensor, real: Tensor) -> dict:
        """The same metrics from precomputed features ``fake: (M, F)``, ``real: (N, F)``."""
        gen = torch.Generator().manual_seed(self.seed)
        kid, kid_std = kid_from_features(real, fake, self.kid_subsets, self.kid_subset_size, generator=gen)
        precision, recall = precision_recall(real, fake, k=self.k)
        return dict(fid=fid_from_features(real, fake), kid=kid, kid_std=kid_std, precision=precision, recall=recall)


def evaluate_images(fake_images: Tensor, real_images: Tensor, classifier=None, **kwargs) -> dict:
    """``dict(fid, kid, kid_std, precision, recall)`` of ``fake_images`` vs ``real_images``.

    Both ``(N, 1, 28, 28)`` in [-1, 1]; ``classifier=None`` uses the shipped Fashion-MNIST
    LeNet; ``kwargs`` go to :class:`DomainMetrics` (batch_size, kid_subsets, kid_subset_size,
    k, seed, device).
    """
    return DomainMetrics(classifier, **kwargs).evaluate(fake_images, real_images)


def class_accuracy(images: Tensor, labels: Tensor, classifier=None, batch_size: int = 500) -> float:
    """Fraction of ``images: (N, 1, 28, 28)`` in [-1, 1] that the classifier assigns to ``labels: (N,)``.

    ``mean_i [argmax_c logits(x_i)_c == y_i]``; used to score label-conditioned (guided) samples.
    ``classifier=None`` uses the shipped Fashion-MNIST LeNet.
    """
    images = _check_images(images, "images")
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must have one entry per image: {labels.shape[0]} labels for {images.shape[0]} images")
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    clf = classifier if classifier is not None else _default_classifier()
    device = next(clf.parameters()).device
    was_training = clf.training
    clf.eval()
    try:
        logits = _batched(clf, images, batch_size, device)  # (N, K)
    finally:
        clf.train(was_training)
    return float((logits.argmax(dim=1) == labels).to(_F64).mean())
