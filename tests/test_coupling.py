"""Minibatch optimal-transport coupling of data and noise (``losses.ot_pairing``, ``model.coupling: ot``)."""

import itertools

import pytest
import torch

from scorelab.families.diffusion import DiffusionConfig
from scorelab.losses import LogitNormal, diffusion_loss, ot_pairing
from scorelab.paths import RectifiedFlow
from scorelab.targets import Denoiser
from scorelab.train.config import ConfigError


def _cost(x, e, perm):
    return float((x - e[perm]).pow(2).sum())


def test_the_pairing_is_the_cheapest_of_all_permutations():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, e = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
        perm = ot_pairing(x, e)
        assert sorted(perm.tolist()) == list(range(6))  # a permutation: the noise marginal is untouched
        best = min(_cost(x, e, torch.tensor(p)) for p in itertools.permutations(range(6)))
        assert _cost(x, e, perm) == pytest.approx(best, rel=1e-12)


def test_in_one_dimension_the_pairing_is_the_monotone_one():
    """For scalars the optimal coupling matches the k-th smallest example with the k-th smallest noise."""
    g = torch.Generator().manual_seed(1)
    x, e = torch.randn(40, 1, generator=g), torch.randn(40, 1, generator=g)
    perm = ot_pairing(x, e)
    order = x[:, 0].argsort()
    assert torch.equal(e[perm][order, 0], e[:, 0].sort().values)


def test_the_loss_sees_the_reordered_noise_and_nothing_else():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    den = Denoiser(lambda x, t: net(torch.cat([x, t[:, None].float()], 1)), RectifiedFlow(), "velocity")
    x0, eps = torch.randn(16, 2), torch.randn(16, 2)
    t = LogitNormal()(16, RectifiedFlow(), torch.Generator().manual_seed(2))
    kw = dict(target="velocity", t=t)
    coupled = diffusion_loss(den, x0, eps=eps, couple=lambda a, b: b[ot_pairing(a, b)], **kw)
    by_hand = diffusion_loss(den, x0, eps=eps[ot_pairing(x0, eps)], **kw)
    assert torch.equal(coupled, by_hand)
    assert torch.equal(diffusion_loss(den, x0, eps=eps, couple=lambda a, b: b, **kw), diffusion_loss(den, x0, eps=eps, **kw))
    # the pairs are closer than independent ones (the point of the coupling)
    assert (x0 - eps[ot_pairing(x0, eps)]).pow(2).sum() < (x0 - eps).pow(2).sum()


def test_an_unknown_coupling_is_refused_by_name():
    with pytest.raises(ConfigError, match="model.coupling 'sinkhorn' is unknown: expected one of independent, ot"):
        DiffusionConfig(coupling="sinkhorn")
