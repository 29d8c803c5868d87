"""Feature metrics against closed forms and limiting cases; the shipped domain classifier."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from scorelab.metrics import (
    DomainMetrics,
    class_accuracy,
    evaluate_images,
    fid_from_features,
    frechet_distance,
    kid_from_features,
    precision_recall,
    sqrtm_psd,
)
from scorelab.nets.classifier import LeNet, load_domain_classifier

F64 = torch.float64
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _random_spd(d: int, gen: torch.Generator, cond: float = 10.0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    evals = torch.logspace(0, math.log10(cond), d, dtype=F64)
    return (q * evals) @ q.T


# ------------------------------------------------------------------ matrix function, exact


def test_sqrtm_psd_squares_back_and_handles_singular():
    gen = torch.Generator().manual_seed(0)
    a = _random_spd(6, gen)
    r = sqrtm_psd(a)
    torch.testing.assert_close(r @ r, a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(r, r.T)
    # rank-2 PSD matrix: round-off gives tiny negative eigenvalues; the root stays real and exact
    v = torch.randn(6, 2, generator=gen, dtype=F64)
    s = v @ v.T
    rs = sqrtm_psd(s)
    assert torch.isfinite(rs).all()
    torch.testing.assert_close(rs @ rs, s, rtol=1e-8, atol=1e-8)


def test_frechet_distance_closed_forms():
    gen = torch.Generator().manual_seed(1)
    d = 5
    mu1, mu2 = torch.randn(d, generator=gen, dtype=F64), torch.randn(d, generator=gen, dtype=F64)
    # commuting covariances (same eigenvectors): tr((S1 S2)^1/2) = sum sqrt(l1 l2)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    l1, l2 = torch.rand(d, generator=gen, dtype=F64) + 0.1, torch.rand(d, generator=gen, dtype=F64) + 0.1
    s1, s2 = (q * l1) @ q.T, (q * l2) @ q.T
    exact = float((mu1 - mu2).square().sum() + (l1.sqrt() - l2.sqrt()).square().sum())
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-10, abs=1e-12)
    # S2 = c^2 S1 (c = 2), any S1: the distance is (1 - c)^2 tr(S1) = tr(S1)
    s = _random_spd(d, gen)
    assert frechet_distance(mu1, s, mu1, 4.0 * s) == pytest.approx(float(torch.trace(s)), rel=1e-10)
    # general non-commuting pair vs the definition through an independent route:
    # tr((S1 S2)^1/2) = sum sqrt(eig(S1 S2)) (eigenvalues real and >= 0)
    a, b = _random_spd(d, gen), _random_spd(d, gen)
    tr_sqrt = torch.linalg.eigvals(a @ b).real.clamp_min(0).sqrt().sum()
    ref = float((mu1 - mu2).square().sum() + torch.trace(a) + torch.trace(b) - 2 * tr_sqrt)
    assert frechet_distance(mu1, a, mu2, b) == pytest.approx(ref, rel=1e-10)
    # symmetric, zero on identical arguments
    assert frechet_distance(mu1, a, mu2, b) == pytest.approx(frechet_distance(mu2, b, mu1, a), rel=1e-10)
    assert frechet_distance(mu1, a, mu1, a) == pytest.approx(0.0, abs=1e-10)


def test_fid_of_gaussian_samples_matches_closed_form():
    """FID of samples from N(mu_i, S_i) -> closed form; the tolerance is the estimator's own spread."""
    gen = torch.Generator().manual_seed(2)
    d, n = 4, 20000
    mu1, mu2 = torch.zeros(d, dtype=F64), torch.tensor([1.0, -0.5, 0.0, 0.25], dtype=F64)
    s1, s2 = _random_spd(d, gen, cond=4.0), _random_spd(d, gen, cond=4.0)
    exact = frechet_distance(mu1, s1, mu2, s2)
    c1, c2 = torch.linalg.cholesky(s1), torch.linalg.cholesky(s2)
    reps = 8
    dmu = mu2 - mu1
    vals = []
    for _ in range(reps):
        x = mu1 + torch.randn(n, d, generator=gen, dtype=F64) @ c1.T
        y = mu2 + torch.randn(n, d, generator=gen, dtype=F64) @ c2.T
        vals.append(fid_from_features(x, y))
    vals = torch.tensor(vals, dtype=F64)
    # tolerance from the replicates' own spread (bias is O(d/n) ~ 1e-3, far below it)
    tol = 5 * float(vals.std()) / math.sqrt(reps)
    assert abs(float(vals.mean()) - exact) < tol
    assert float(dmu.square().sum()) > 10 * tol  # dropping the mean term would fail
    assert exact > 20 * tol


def test_fid_of_identical_sets_is_zero_and_shift_adds_squared_norm():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(500, 16, generator=gen, dtype=F64)
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-8)
    shift = torch.full((16,), 0.5, dtype=F64)
    assert fid_from_features(x, x + shift) == pytest.approx(float(shift.square().sum()), rel=1e-8)
    with pytest.raises(ValueError, match="feature dimension"):
        fid_from_features(x, x[:, :3])


# ------------------------------------------------------------------ KID


def test_kid_zero_for_same_distribution_positive_for_shift():
    gen = torch.Generator().manual_seed(4)
    d = 8
    x = torch.randn(2000, d, generator=gen, dtype=F64)
    y = torch.randn(2000, d, generator=gen, dtype=F64)
    g = torch.Generator().manual_seed(0)
    kid, std = kid_from_features(x, y, subsets=20, subset_size=500, generator=g)
    # per-subset estimates are unbiased with spread std; their mean is within a few std/sqrt(S) of 0
    # (subsets overlap, so allow the single-subset std itself)
    assert abs(kid) < 2 * std
    kid_s, std_s = kid_from_features(x, y + 0.5, subsets=20, subset_size=500, generator=torch.Generator().manual_seed(0))
    assert kid_s > 10 * std_s and kid_s > 10 * abs(kid)


def test_kid_single_subset_equals_unbiased_formula():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(30, 3, generator=gen, dtype=F64)
    y = torch.randn(30, 3, generator=gen, dtype=F64) + 1.0
    k = lambda a, b: (a @ b.T / 3 + 1) ** 3  # noqa: E731
    m = 30
    ref = (
        (k(x, x).sum() - k(x, x).trace()) / (m * (m - 1))
        + (k(y, y).sum() - k(y, y).trace()) / (m * (m - 1))
        - 2 * k(x, y).mean()
    )
    kid, std = kid_from_features(x, y, subsets=1, subset_size=m)  # whole sets: permutation-invariant
    assert kid == pytest.approx(float(ref), rel=1e-12)
    assert std == 0.0


# ------------------------------------------------------------------ precision / recall


def test_precision_recall_identical_disjoint_and_mode_dropping():
    gen = torch.Generator().manual_seed(6)
    d = 4
    x = torch.randn(600, d, generator=gen, dtype=F64)
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    # far-apart disjoint sets
    p, r = precision_recall(x, x + 100.0, k=3)
    assert p == 0.0 and r == 0.0
    # real: two modes; fake: covers only one -> precision high, recall about one half
    centres = torch.zeros(2, d, dtype=F64)
    centres[1, 0] = 20.0
    real = torch.randn(1000, d, generator=gen, dtype=F64) + centres[torch.arange(1000) % 2]
    fake = torch.randn(500, d, generator=gen, dtype=F64)
    p, r = precision_recall(real, fake, k=3, chunk_size=128)  # chunking must not change anything
    assert p > 0.9
    assert 0.35 < r < 0.55
    assert (p, r) == precision_recall(real, fake, k=3, chunk_size=5000)


# ------------------------------------------------------------------ the shipped classifier


def _fmnist_test_slice(n: int):
    """The first ``n`` test images (float in [-1, 1]) and labels of the installed Fashion-MNIST."""
    from scorelab.data.images import load_fashion_mnist

    ds = load_fashion_mnist(FMNIST, split="test").subset(torch.arange(n))
    return ds.float_images(), ds.targets()


def test_shipped_classifier_loads_and_is_frozen():
    model = load_domain_classifier("fmnist")
    assert isinstance(model, LeNet) and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert model.metadata["feature_dim"] == model.config.feature_dim
    assert model.metadata["test_accuracy"] >= 0.9
    x = torch.zeros(3, 1, 28, 28)
    assert model.features(x).shape == (3, model.config.feature_dim)
    assert model(x).shape == (3, 10)
    with pytest.raises(ValueError, match="unknown domain classifier"):
        load_domain_classifier("cifar")


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST files not installed")
def test_shipped_classifier_accuracy_and_metrics_on_real_data():
    x, y = _fmnist_test_slice(1000)
    model = load_domain_classifier("fmnist")
    acc = class_accuracy(x, y, model)
    assert acc > 0.85
    # class_accuracy sanity: permuted labels (each class mapped to another) score near 0
    assert class_accuracy(x, (y + 1) % 10, model) < 0.1
    with pytest.raises(ValueError, match="in \\[-1, 1\\]"):
        class_accuracy(x * 127.5 + 127.5, y, model)  # [0, 255] scaling is rejected
    # domain metrics: two halves of the real test slice agree; noise images are far
    dm = DomainMetrics(model, kid_subsets=10, kid_subset_size=200).set_real(x[:500])
    same = dm.evaluate(x[500:])
    noise = dm.evaluate(torch.rand(500, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert set(same) == {"fid", "kid", "kid_std", "precision", "recall"}
    assert noise["fid"] > 10 * same["fid"]
    assert noise["kid"] > 10 * max(same["kid"], same["kid_std"])
    assert same["precision"] > 0.6 and same["recall"] > 0.6
    assert noise["precision"] < 0.05
    # mode dropping on real data: a fake set of only classes 0-4 keeps precision, loses recall
    half = dm.evaluate(x[500:][y[500:] < 5])
    assert half["precision"] > 0.7 and half["recall"] < same["recall"] - 0.2
    assert half["fid"] > 5 * same["fid"]
    assert evaluate_images(x[500:], x[:500], model, kid_subsets=10, kid_subset_size=200) == same
