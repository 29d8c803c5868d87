"""Autoregressive image models (scorelab.autoregressive, scorelab.nets.pixelcnn) against known answers.

* Causality, by exact gradients: with random non-zero weights (float64), d logits(s) / d x(s') is exactly
  zero for every input subpixel s' at or after s in the model's order, and non-zero for every earlier
  one (no blind spot) in nets deep enough to cover an 8x8 image; controls with a wrong mask, a missing
  down shift and the original masked-3x3 stack show that the check catches each bug.
* Normalization: a uniform model has exactly 8 bits/dim, and the chain-rule likelihood of a random
  causal net sums to one over all 256^2 images of two subpixels.
* Sampling reproduces the model's own distribution: chi-square over the 16 binary 2x2 images (+ the rest).
"""


import pytest
import scipy.stats
import torch

import scorelab.nets.pixelcnn as pc
from scorelab.autoregressive import bits_per_dim, log_likelihood, sample_categorical, sample_pixels, sample_tiles
from scorelab.nets.pixelcnn import (
    NUM_LEVELS,
    GatedPixelCNN,
    MaskedConv2d,
    PixelCNNConfig,
    TilePixelCNN,
    TilePixelCNNConfig,
    feature_groups,
    raster_mask,
)
from scorelab.quantize import to_model
from scorelab.random import generators_for_seeds

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randomize(net, seed, scale=0.3):
    """Every parameter (biases and zero-initialised ones included) gets random non-zero values."""
    g = _gen(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


# --------------------------------------------------------------------------------------
# Causality
# --------------------------------------------------------------------------------------
def pixel_rank(C, H, W):
    """Position of subpixel (c, i, j) in raster-then-channel order: (C, H, W) long."""
    c, i, j = torch.meshgrid(torch.arange(C), torch.arange(H), torch.arange(W), indexing="ij")
    return (i * W + j) * C + c


def tile_rank(C, H, W, k):
    """Position in tile order: tiles in raster order, pixels of a tile in raster order, channels."""
    c, i, j = torch.meshgrid(torch.arange(C), torch.arange(H), torch.arange(W), indexing="ij")
    tile = (i // k) * (W // k) + j // k
    return (tile * k * k + (i % k) * k + j % k) * C + c


def dependencies(forward, C, H, W, seed=0, n_inputs=2):
    """``D[s, s']``: does any logit of output subpixel s depend on input subpixel s'? (S, S) bool, S = C H W.

    One probe per output subpixel, batched: row b of a batch of S copies of the input backpropagates a
    random projection of the 256 logits of subpixel b, so grad[b] is the dependence of that output on
    every input (examples never interact). OR over ``n_inputs`` random inputs, in case a path is exactly
    flat at one input (the nets' heads use SiLU, so no unit is dead for every input: one input sufficed
    for 30 random nets of each test's kind).
    """
    S = C * H * W
    g = _gen(seed)
    dep = torch.zeros(S, S, dtype=torch.bool)
    idx = torch.arange(S)
    c, i, j = idx // (H * W), (idx // W) % H, idx % W  # subpixel b = (c, i, j) in (C, H, W) layout
    for _ in range(n_inputs):
        x = (2 * torch.rand(1, C, H, W, generator=g, dtype=F64) - 1).expand(S, C, H, W).clone().requires_grad_(True)
        logits = forward(x)  # (S, 256, C, H, W)
        w = torch.randn(S, NUM_LEVELS, generator=g, dtype=F64)
        (logits[idx, :, c, i, j] * w).sum().backward()
        dep |= x.grad.reshape(S, S) != 0
    return dep


def assert_causal(dep, rank, full_coverage=True, strict_before=None):
    """No output depends on itself or later subpixels; with full_coverage, every earlier one is seen."""
    r = rank.flatten()
    allowed = r[None, :] < r[:, None] if strict_before is None else strict_before
    leaks = dep & ~allowed
    assert not leaks.any(), f"{int(leaks.sum())} dependencies on the present or future, e.g. {leaks.nonzero()[:3].tolist()}"
    if full_coverage:
        missing = allowed & ~dep
        assert not missing.any(), f"{int(missing.sum())} earlier subpixels never seen (blind spot), e.g. {missing.nonzero()[:3].tolist()}"
    assert dep[r.argsort()[-1]].any()  # the last subpixel sees something


@pytest.mark.parametrize("C", [1, 3])
def test_gated_pixelcnn_exact_causality_and_no_blind_spot(C):
    H = W = 8
    torch.manual_seed(C)  # default init from the global stream (which a plugin may reseed per process)
    net = _randomize(GatedPixelCNN(PixelCNNConfig(in_channels=C, channels=8 * C, layers=4, kernel_size=5, num_classes=4)).double(), C)
    y = torch.full((C * H * W,), 2)
    dep = dependencies(lambda x: net(x, y), C, H, W)
    # 4 layers of kernel 5 reach 8 columns left and, through the vertical stack, 8 columns either side
    # of every row above: the whole causal past of an 8x8 image
    assert_causal(dep, pixel_rank(C, H, W), full_coverage=True)


@pytest.mark.parametrize("C,head", [(1, "autoregressive"), (3, "autoregressive"), (1, "independent"), (3, "independent")])
def test_tile_pixelcnn_exact_causality(C, head):
    H = W = 8
    k = 4
    torch.manual_seed(C)
    cfg = TilePixelCNNConfig(in_channels=C, image_size=8, tile_size=k, d_model=16, context_layers=2, heads=2,
                             cond_channels=4, head=head, head_channels=8 * C, head_layers=3, head_kernel=3, num_classes=3)
    net = _randomize(TilePixelCNN(cfg).double(), 10 + C)
    dep = dependencies(lambda x: net(x, torch.zeros(C * H * W, dtype=torch.long)), C, H, W)
    rank = tile_rank(C, H, W, k)
    if head == "autoregressive":
        assert_causal(dep, rank)  # 3 head layers of kernel 3 cover a 4x4 tile; attention covers all earlier tiles
    else:
        tile = (rank // (k * k * C)).flatten()  # independent pixels: exactly the earlier tiles are seen
        assert_causal(dep, rank, strict_before=tile[None, :] < tile[:, None])


def test_causality_check_catches_the_usual_bugs(monkeypatch):
    """Controls: the same check fails on (a) mask B in the first layer (the current subpixel leaks),
    (b) a vertical stack linked without the down shift (the current row leaks), (c) the original
    PixelCNN's stack of masked 3x3 convolutions (a blind spot above-right of each pixel)."""
    C, H, W = 1, 6, 6
    rank = pixel_rank(C, H, W)
    torch.manual_seed(0)

    def fresh():
        return _randomize(GatedPixelCNN(PixelCNNConfig(in_channels=C, channels=4, layers=6, kernel_size=3)).double(), 3)

    net = fresh()
    net.layers[0].h_conv.mask.fill_(1.0)  # (a) mask B where mask A belongs
    with pytest.raises(AssertionError, match="present or future"):
        assert_causal(dependencies(net, C, H, W), rank)
    net = fresh()
    monkeypatch.setattr(pc, "down_shift", lambda v: v)  # (b) no shift between the stacks
    with pytest.raises(AssertionError, match="present or future"):
        assert_causal(dependencies(net, C, H, W), rank)
    monkeypatch.undo()
    assert_causal(dependencies(fresh(), C, H, W), rank)  # and the real net passes
    g = torch.arange(1)  # (c) masked 3x3 stack: causal but blind
    layers = [MaskedConv2d(1, 8, 3, (1, 1, 1, 1), raster_mask(g, feature_groups(8, 1), 3, "A"))]
    layers += [MaskedConv2d(8, 8, 3, (1, 1, 1, 1), raster_mask(feature_groups(8, 1), feature_groups(8, 1), 3, "B")) for _ in range(5)]
    layers += [MaskedConv2d(8, NUM_LEVELS, 1, mask=torch.ones(NUM_LEVELS, 8, 1, 1))]
    stack = _randomize(torch.nn.Sequential(*[m for l in layers for m in (l, torch.nn.Tanh())][:-1]).double(), 4)
    dep = dependencies(lambda x: stack(x)[:, :, None], C, H, W)
    assert_causal(dep, rank, full_coverage=False)  # no leak ...
    with pytest.raises(AssertionError, match="blind spot"):
        assert_causal(dep, rank)  # ... but a blind spot


# --------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------
def test_uniform_logits_give_exactly_8_bits_per_dim_and_probabilities_sum_to_one():
    x = torch.randint(0, 256, (3, 2, 5, 4), generator=_gen(0), dtype=torch.uint8)
    bpd = bits_per_dim(torch.zeros(3, NUM_LEVELS, 2, 5, 4, dtype=F64), x)
    torch.testing.assert_close(bpd, torch.full((3,), 8.0, dtype=F64), rtol=0, atol=1e-12)
    logits = 5 * torch.randn(4, NUM_LEVELS, 1, 3, 3, generator=_gen(1), dtype=F64)
    torch.testing.assert_close(torch.softmax(logits, 1).sum(1), torch.ones(4, 1, 3, 3, dtype=F64))
    xs = torch.randint(0, 256, (4, 1, 3, 3), generator=_gen(2), dtype=torch.uint8)
    torch.testing.assert_close(log_likelihood(logits, to_model(xs, F64)), log_likelihood(logits, xs), rtol=0, atol=0)
    with pytest.raises(ValueError, match="logits must have shape"):
        log_likelihood(logits[:, :10], xs)


def _all_pairs(shape):
    """Every image with two subpixels of the given (C, H, W) layout: (65536, C, H, W) uint8."""
    a, b = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    return torch.stack([a.flatten(), b.flatten()], 1).to(torch.uint8).view(-1, *shape)


@pytest.mark.parametrize("kind", ["pixel_1x2", "pixel_2ch", "tile_1x2"])
def test_chain_rule_likelihood_sums_to_one_over_all_images(kind):
    """sum_x p(x) = 1 over all 256^2 images of two subpixels, for a random causal net: a leak of the
    second subpixel into its own conditional would break it."""
    torch.manual_seed(0)
    if kind == "tile_1x2":
        cfg = TilePixelCNNConfig(in_channels=1, image_size=(1, 2), tile_size=1, d_model=16, heads=2, cond_channels=2,
                                 head_channels=4, head_layers=1)
        net, shape = TilePixelCNN(cfg), (1, 1, 2)
    else:
        shape = (1, 1, 2) if kind == "pixel_1x2" else (2, 1, 1)
        net = GatedPixelCNN(PixelCNNConfig(in_channels=shape[0], channels=4, layers=2, kernel_size=3))
    net = _randomize(net.double(), 5, scale=1.0)
    x = _all_pairs(shape)
    with torch.no_grad():
        lp = log_likelihood(net(to_model(x, F64)), x)
    torch.testing.assert_close(torch.logsumexp(lp, 0), torch.zeros((), dtype=F64), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------
def _binary_images():
    """The 16 binary 2x2 images (values 0 / 255): (16, 1, 2, 2) uint8, image m has bits of m."""
    bits = (torch.arange(16)[:, None] >> torch.arange(4)) & 1
    return (255 * bits).to(torch.uint8).view(16, 1, 2, 2)


def _train_toy(net, steps=60):
    """Fit the net to a fixed, correlated distribution over the 16 binary 2x2 images (a few Adam steps)."""
    g = _gen(7)
    probs = torch.softmax(2 * torch.randn(16, generator=g), 0)
    imgs = _binary_images()
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    for _ in range(steps):
        x = imgs[torch.multinomial(probs, 256, replacement=True, generator=g)]
        loss = -log_likelihood(net(to_model(x)), x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


@pytest.mark.parametrize("kind", ["pixel", "tile1", "tile2"])
def test_samples_follow_the_models_own_probabilities(kind):
    """Sample N images; compare the counts of the 16 binary images and of "anything else" with the
    model's exact probabilities (chain rule on its logits) by Pearson's chi-square: under the null it
    is chi^2 with (categories - 1) degrees of freedom; fail only above the 1 - 1e-4 quantile."""
    torch.manual_seed(0)
    if kind == "pixel":
        net = GatedPixelCNN(PixelCNNConfig(in_channels=1, channels=16, layers=2, kernel_size=3))
    else:
        k = 1 if kind == "tile1" else 2  # 4 one-pixel tiles (the transformer does all) or one tile (the head does all)
        net = TilePixelCNN(TilePixelCNNConfig(image_size=2, tile_size=k, d_model=32, heads=2, context_layers=2,
                                              cond_channels=4, head_channels=16, head_layers=2))
    net = _train_toy(net)
    imgs = _binary_images()
    with torch.no_grad():
        p = log_likelihood(net(to_model(imgs)).double(), imgs).exp()  # (16,)
    assert float(p.sum()) > 0.9, "toy model did not learn its binary data"
    N = 6000
    s = sample_pixels(net, N, (1, 2, 2), generator=_gen(8)) if kind == "pixel" else sample_tiles(net, N, generator=_gen(8))
    x = s.images
    binary = ((x == 0) | (x == 255)).flatten(1).all(1)
    code = ((x.flatten(1) == 255).long() * (1 << torch.arange(4))).sum(1)
    counts = torch.bincount(code[binary], minlength=16).double()
    observed = torch.cat([counts, torch.tensor([float((~binary).sum())], dtype=F64)])
    expected = N * torch.cat([p, (1 - p.sum()).reshape(1)])
    keep = expected >= 5  # pool the sparse categories (chi-square needs E >= 5)
    obs = torch.cat([observed[keep], observed[~keep].sum().reshape(1)])
    exp = torch.cat([expected[keep], expected[~keep].sum().reshape(1)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    assert chi2 < scipy.stats.chi2.ppf(1 - 1e-4, dof), (chi2, dof, obs.tolist(), exp.tolist())
    if kind == "pixel":
        assert s.evaluations == {"network": 4}
    else:
        assert s.evaluations == ({"context": 4, "head": 4} if kind == "tile1" else {"context": 1, "head": 4})


def test_samplers_batch_independent_cropped_and_counted():
    torch.manual_seed(1)
    net = GatedPixelCNN(PixelCNNConfig(in_channels=2, channels=8, layers=3, kernel_size=3, num_classes=3))
    y = torch.tensor([0, 1, 2])
    a = sample_pixels(net, 3, (2, 4, 3), y=y, generator=generators_for_seeds([0, 1, 2]))
    b = sample_pixels(net, 2, (2, 4, 3), y=y[:2], generator=generators_for_seeds([0, 1]), crop_rows=False)
    assert torch.equal(a.images[:2], b.images) and a.evaluations == {"network": 24}
    steps = []
    sample_pixels(net, 1, (2, 2, 2), generator=_gen(0), callback=lambda d: steps.append((d["row"], d["col"], d["channel"])))
    assert steps == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    # row-cropped logits are the full net's logits of those rows (causal, fully convolutional)
    x = torch.rand(2, 2, 5, 3) * 2 - 1
    torch.testing.assert_close(net(x[:, :, :3], y[:2]), net(x, y[:2])[:, :, :, :3])
    # temperature 0 is the argmax; the inverse CDF picks the bin holding u
    logits = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]).log_softmax(1)
    assert sample_categorical(logits, torch.tensor([0.5, 0.5]), 0).tolist() == [1, 0]
    assert sample_categorical(torch.log(torch.tensor([[0.2, 0.3, 0.5]] * 3)), torch.tensor([0.1, 0.45, 0.99])).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="temperature"):
        sample_categorical(logits, torch.tensor([0.5, 0.5]), -1.0)


@pytest.mark.parametrize("head", ["autoregressive", "independent"])
def test_tile_sampler_matches_the_parallel_forward(head):
    """The sampler's sequential pieces (context of a prefix, head on one tile) are the parallel forward's."""
    torch.manual_seed(2)
    cfg = TilePixelCNNConfig(in_channels=1, image_size=(4, 6), tile_size=2, d_model=16, heads=2, cond_channels=4,
                             head=head, head_channels=8, head_layers=2, num_classes=2)
    net = TilePixelCNN(cfg).double()
    x = torch.rand(3, 1, 4, 6, dtype=F64) * 2 - 1
    y = torch.tensor([0, 1, 2])
    full_ctx = net.tile_contexts(x, y)  # (3, 6, d)
    for t in range(cfg.num_tiles):
        torch.testing.assert_close(net.tile_contexts(x, y, n_tiles=t + 1)[:, t], full_ctx[:, t])
    tiles = net.to_tiles(x)
    torch.testing.assert_close(net.to_tiles(net(x, y)), torch.stack([net.tile_logits(tiles[:, t], full_ctx[:, t])
                                                                     for t in range(cfg.num_tiles)], 1))
    torch.testing.assert_close(net.from_tiles(tiles), x, rtol=0, atol=0)
    s = sample_tiles(net, 2, y=y[:2], generator=generators_for_seeds([5, 6]))
    s1 = sample_tiles(net, 1, y=y[:1], generator=generators_for_seeds([5]))
    assert torch.equal(s.images[:1], s1.images)
    assert s.evaluations == {"context": 6, "head": 24 if head == "autoregressive" else 6}
    assert not torch.allclose(net(x, torch.tensor([0, 0, 0])), net(x, torch.tensor([1, 1, 1])))  # labels matter


def test_pixelcnn_configs_validate_and_round_trip():
    cfg = PixelCNNConfig(in_channels=3, channels=48)
    assert PixelCNNConfig.from_dict(cfg.to_dict()) == cfg
    t = TilePixelCNNConfig(image_size=[28, 28])
    assert t.grid == (7, 7) and t.num_tiles == 49 and TilePixelCNNConfig.from_dict(t.to_dict()) == t
    for bad, field in [(dict(channels=50, in_channels=3), "channels"), (dict(kernel_size=4), "kernel_size"),
                       (dict(layers=0), "layers")]:
        with pytest.raises(ValueError, match=f"PixelCNNConfig.{field}"):
            PixelCNNConfig(**bad)
    for bad, field in [(dict(tile_size=5), "tile_size"), (dict(head="mixture"), "head"), (dict(heads=3), "heads")]:
        with pytest.raises(ValueError, match=f"TilePixelCNNConfig.{field}"):
            TilePixelCNNConfig(**bad)
    with pytest.raises(ValueError, match="unconditional"):
        GatedPixelCNN(PixelCNNConfig())(torch.zeros(1, 1, 4, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="expects x of shape"):
        TilePixelCNN(TilePixelCNNConfig())(torch.zeros(1, 1, 8, 8))
