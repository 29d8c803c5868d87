"""Networks: shapes, time and label embeddings, config validation, gradients, determinism (tiny configs)."""

import math

import pytest
import torch
from torch.testing import assert_close

from scorelab.nets import (
    MLP,
    GaussianFourierEmbedding,
    LabelEmbedding,
    MLPConfig,
    TimeEmbedding,
    UNet,
    UNetConfig,
    sinusoidal_embedding,
)
from scorelab.paths import EDM, DDPMDiscrete, RectifiedFlow

TINY = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), groups=4, head_dim=8)


def tiny_unet(**kw) -> UNet:
    return UNet(UNetConfig(**{**TINY, **kw}))


# ---------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mlp_shape_and_dtype(dtype):
    net = MLP(MLPConfig(dim=2, width=32, depth=2)).to(dtype)
    x = torch.randn(5, 2, dtype=dtype)
    out = net(x, torch.rand(5, dtype=dtype))
    assert out.shape == (5, 2) and out.dtype == dtype


@pytest.mark.parametrize("size", [28, 32, 8])
@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("classes", [0, 10])
def test_unet_shapes(size, attention, classes):
    att = dict(attention_levels=(1,), mid_attention=True) if attention else dict(attention_levels=(), mid_attention=False)
    net = tiny_unet(num_classes=classes, **att)
    x = torch.randn(2, 1, size, size)
    y = torch.tensor([3, classes]) if classes else None  # a real label and the null label
    out = net(x, torch.rand(2), y)
    assert out.shape == x.shape and out.dtype == x.dtype


@pytest.mark.parametrize("size", [28, 32, 8])
def test_unet_odd_grids_patchify_and_three_levels(size):
    # 28 -> 14 -> 7 -> 4 and back; patch 2: 14 -> 7 -> 4; RGB in, different channels out
    for kw in (dict(channel_mult=(1, 2, 2), patch_size=1),
               dict(patch_size=2, channel_mult=(1, 2, 2), num_res_blocks=(1, 2, 1), pixel_channels=0),
               dict(patch_size=2, pixel_channels=4)):
        net = tiny_unet(in_channels=3, out_channels=2, **kw)
        out = net(torch.randn(2, 3, size, size), torch.rand(2))
        assert out.shape == (2, 2, size, size)


def test_unet_fast_options_match_shapes_and_float32_reference():
    torch.manual_seed(0)
    ref = tiny_unet(zero_init=False, patch_size=2)
    x, t = torch.randn(4, 1, 28, 28), torch.rand(4)
    out = ref(x, t)
    for kw in (dict(bf16=True), dict(channels_last=True), dict(norm="layer", channels_last=True, bf16=True)):
        net = tiny_unet(zero_init=False, patch_size=2, **{k: v for k, v in kw.items() if k != "bf16"})
        net.load_state_dict(ref.state_dict()) if "norm" not in kw else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kw.get("bf16", False)):  # precision is the caller's
            o = net(x, t)
        assert o.shape == x.shape and o.dtype == torch.float32 and torch.isfinite(o).all()
        if "norm" not in kw:
            # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per op); a few dozen layers stay within 5%
            rel = (o - out).norm() / out.norm()
            assert rel < (0.05 if kw.get("bf16") else 1e-5), (kw, float(rel))


def test_zero_init_outputs_zero():
    x = torch.randn(2, 1, 8, 8)
    assert torch.count_nonzero(tiny_unet()(x, torch.rand(2))) == 0
    assert torch.count_nonzero(MLP(MLPConfig(width=16, depth=2))(torch.randn(3, 2), torch.rand(3))) == 0


# ---------------------------------------------------------------------------------- time embedding
def test_sinusoidal_matches_formula():
    pos = torch.tensor([0.0, 1.0, 37.5], dtype=torch.float64)
    emb = sinusoidal_embedding(pos, 6, max_period=100.0)
    f = torch.tensor([100.0 ** (-k / 3) for k in range(3)], dtype=torch.float64)
    assert_close(emb, torch.cat([torch.cos(pos[:, None] * f), torch.sin(pos[:, None] * f)], dim=1))
    assert sinusoidal_embedding(pos, 7).shape == (3, 7)


def test_fourier_features_fixed_and_independent_of_global_seed():
    torch.manual_seed(1)
    a = GaussianFourierEmbedding(16, scale=16.0)
    torch.manual_seed(2)
    b = GaussianFourierEmbedding(16, scale=16.0)
    assert_close(a.w, b.w)
    assert "w" in a.state_dict() and not any(p.requires_grad for p in a.parameters())
    tau = torch.rand(5)
    e = a(tau)
    assert_close(e[:, :8] ** 2 + e[:, 8:] ** 2, torch.ones(5, 8))  # sin^2 + cos^2


@pytest.mark.parametrize("kind", ["sinusoidal", "fourier"])
def test_time_embedding_integer_and_edm_scales(kind):
    # DDPM step indices 0..999 (tau = t / 1000) and EDM sigmas (tau = ln(sigma) / 4, sigma = 0 allowed):
    # the path's c_noise is the net's time input
    for opts, t in (
        (DDPMDiscrete(T=1000), torch.arange(0, 1000, dtype=torch.float32)),
        (EDM(), torch.cat([torch.zeros(1), torch.logspace(math.log10(0.002), math.log10(80.0), 999)])),
        (RectifiedFlow(), torch.linspace(0, 1, 1000)),
    ):
        emb = TimeEmbedding(32, 64, kind)
        tau = opts.c_noise(t).float()
        feats = emb.freq(tau)
        out = emb(tau)
        assert out.shape == (1000, 32) and torch.isfinite(out).all()
        # neighbouring times get distinct features: the smallest gap is far above float32 rounding
        gaps = (feats[1:] - feats[:-1]).norm(dim=1)
        assert gaps.min() > 1e-3, (opts, kind, float(gaps.min()))
    k = torch.arange(0, 1000, dtype=torch.float64)
    torch.testing.assert_close(DDPMDiscrete(T=1000).c_noise(k), k / 1000)
    assert DDPMDiscrete(T=100).c_noise(torch.tensor(99.0)) < 1  # tau in [0, 1) whatever T
    sig = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(EDM().c_noise(sig), 0.25 * sig.log())


def test_scalar_t_is_broadcast():
    net = tiny_unet(zero_init=False)
    x = torch.randn(3, 1, 8, 8)
    assert_close(net(x, torch.tensor(0.3)), net(x, torch.full((3,), 0.3)))


# ---------------------------------------------------------------------------------- labels
def test_null_label_row_and_default():
    net = tiny_unet(num_classes=10, zero_init=False)
    table = net.label_embed.table
    assert table.num_embeddings == 11 and net.label_embed.null_index == 10
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    assert_close(net(x, t), net(x, t, torch.full((2,), 10)))  # y=None is the null label
    assert not torch.allclose(net(x, t, torch.tensor([0, 1])), net(x, t))
    with pytest.raises(ValueError, match="labels must lie"):
        net(x, t, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="unconditional"):
        tiny_unet()(x, t, torch.tensor([0, 1]))
    mlp = MLP(MLPConfig(num_classes=3, width=16, depth=1))
    assert mlp.label_embed.table.num_embeddings == 4
    with pytest.raises(ValueError, match="num_classes"):
        LabelEmbedding(0, 4)


# ---------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "cls, bad, field",
    [
        (UNetConfig, dict(base_channels=0), "base_channels"),
        (UNetConfig, dict(channel_mult=()), "channel_mult"),
        (UNetConfig, dict(channel_mult=(1, 2), num_res_blocks=(1, 2, 3)), "num_res_blocks"),
        (UNetConfig, dict(channel_mult=(1, 2), attention_levels=(2,)), "attention_levels"),
        (UNetConfig, dict(base_channels=48, groups=32), "groups"),
        (UNetConfig, dict(base_channels=48, groups=16, head_dim=64), "head_dim"),
        (UNetConfig, dict(dropout=1.0), "dropout"),
        (UNetConfig, dict(norm="batch"), "norm"),
        (UNetConfig, dict(patch_size=0), "patch_size"),
        (UNetConfig, dict(pixel_channels=-1), "pixel_channels"),
        (UNetConfig, dict(time_embedding="learned"), "time_embedding"),
        (MLPConfig, dict(width=-3), "width"),
        (MLPConfig, dict(num_classes=-1), "num_classes"),
        (MLPConfig, dict(freq_dim=7), "freq_dim"),
    ],
)
def test_config_validation_names_the_field(cls, bad, field):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}"):
        cls(**bad)


@pytest.mark.parametrize("gone", ["bf16", "time_input", "time_scale"])
def test_removed_net_fields_say_where_the_choice_lives_now(gone):
    with pytest.raises(ValueError, match=rf"{gone}.*(train\.precision|c_noise)"):
        UNetConfig.from_dict({gone: True})


def test_config_dict_round_trip_and_unknown_keys():
    cfg = UNetConfig.from_dict({**TINY, "channel_mult": [1, 2], "attention_levels": [1], "num_res_blocks": [1, 2]})
    assert cfg.channel_mult == (1, 2) and cfg.num_res_blocks == (1, 2)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    assert MLPConfig.from_dict(MLPConfig(width=8).to_dict()) == MLPConfig(width=8)
    with pytest.raises(ValueError, match="unknown field.*widht"):
        MLPConfig.from_dict({"widht": 3})
    d = UNetConfig.default_fmnist()
    assert 1e6 <= sum(p.numel() for p in UNet(d).parameters()) <= 4e6
    x = torch.randn(2, 1, 28, 28)
    assert UNet(d)(x, torch.rand(2)).shape == x.shape


# ---------------------------------------------------------------------------------- gradients, determinism
@pytest.mark.parametrize("make", [lambda: tiny_unet(zero_init=False, num_classes=3),
                                  lambda: tiny_unet(zero_init=False, patch_size=2),
                                  lambda: MLP(MLPConfig(width=16, depth=2, num_classes=3, zero_init=False))])
def test_gradients_reach_every_parameter(make):
    torch.manual_seed(0)
    net = make()
    x = torch.randn(2, 2) if isinstance(net, MLP) else torch.randn(2, 1, 8, 8)
    x.requires_grad_(True)
    y = torch.tensor([0, 2]) if net.cfg.num_classes else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=net.cfg.patch_size == 2 if hasattr(net.cfg, "patch_size") else False):
        out = net(x, torch.rand(2), y)  # the patch-2 case under the caller's bf16 autocast
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in net.named_parameters():
        if name.startswith("label_embed"):
            continue  # only the rows of the labels used get gradients
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("pixel_channels", [0, 4])
def test_zero_init_net_still_learns_its_last_layer(pixel_channels):
    net = tiny_unet(patch_size=2, pixel_channels=pixel_channels)
    net(torch.randn(2, 1, 8, 8), torch.rand(2)).sum().backward()
    last = net.pixel_head if pixel_channels else net.head[-1]
    assert last.weight.grad.abs().sum() > 0


def test_odd_size_rejected_with_patchify():
    with pytest.raises(ValueError, match="patch_size=2"):
        tiny_unet(patch_size=2)(torch.randn(1, 1, 7, 7), torch.rand(1))


def test_determinism_with_seed():
    def build_and_run():
        torch.manual_seed(123)
        net = tiny_unet(zero_init=False, num_classes=4, dropout=0.1)
        x = torch.randn(3, 1, 8, 8)
        return net.state_dict(), net(x, torch.rand(3), torch.tensor([0, 1, 4]))  # train mode: dropout active

    (s1, o1), (s2, o2) = build_and_run(), build_and_run()
    for k in s1:
        assert_close(s1[k], s2[k], rtol=0, atol=0)
    assert_close(o1, o2, rtol=0, atol=0)
