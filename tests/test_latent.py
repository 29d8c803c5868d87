"""Latent diffusion and its autoencoder: the nets' shapes, the adaptive GAN weight against a hand
computation, latent diffusion with an exact mixture denoiser behind an orthogonal "autoencoder",
the scale factor, the encoding cache, and the CLI end to end with its refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from scorelab.cli import main
from scorelab.data.mixture import GaussianMixture
from scorelab.families.autoencoder import AutoencoderFamily, adaptive_weight, lenet_perceptual_distance
from scorelab.families.base import DataSpec
from scorelab.families.latent import LatentDiffusionFamily, LatentScale
from scorelab.metrics import sliced_wasserstein
from scorelab.nets.autoencoder import Autoencoder, PatchDiscriminator
from scorelab.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

FMNIST = DataSpec((1, 28, 28), 10, False, None, "fmnist-embedded", "fmnist")
TINY_AE = {"net_options": {"base_channels": 8, "channel_mult": [1, 1, 2], "groups": 4}, "disc_options": {"channels": 8, "groups": 4}}
TINY_UNET = {"base_channels": 8, "channel_mult": [1, 2], "attention_levels": [1], "mid_attention": False, "groups": 4,
             "head_dim": 8, "patch_size": 1}


# --------------------------------------------------------------------------------------
# Nets and the loss pieces
# --------------------------------------------------------------------------------------
def test_untrained_round_trip_shapes_and_dtypes():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    ae = Autoencoder(in_channels=1, image_size=(28, 28), z_channels=4, factor=4, base_channels=8, groups=4)
    mean, log_var = ae.encode(x)
    assert mean.shape == log_var.shape == (3, 4, 7, 7) == (3, *ae.latent_shape)
    assert mean.dtype == log_var.dtype == torch.float32
    xr = ae.decode(mean)
    assert xr.shape == x.shape and xr.dtype == torch.float32 and torch.isfinite(xr).all()
    xr2, m2, _ = ae(x)  # noise None: the deterministic reconstruction decode(mean)
    torch.testing.assert_close(xr2, xr) and torch.testing.assert_close(m2, mean)
    # another factor and latent width; RGB
    ae2 = Autoencoder(in_channels=3, image_size=(16, 8), z_channels=3, factor=2, base_channels=8, groups=4)
    m, _ = ae2.encode(torch.zeros(2, 3, 16, 8))
    assert m.shape == (2, 3, 8, 4) and ae2.decode(m).shape == (2, 3, 16, 8)
    with pytest.raises(ValueError, match="image_size"):
        Autoencoder(image_size=(30, 30), factor=4)
    with pytest.raises(ValueError, match="channel_mult"):
        Autoencoder(factor=4, channel_mult=(1, 2))
    with pytest.raises(ValueError, match="latents"):
        ae.decode(torch.zeros(1, 4, 8, 8))
    # the family's encode / decode return float32 even when the run computes in bfloat16
    fam = AutoencoderFamily(TINY_AE, FMNIST)
    fam.autocast_dtype = torch.bfloat16
    m, lv = fam.encode(fam.modules(), x)
    assert m.dtype == lv.dtype == torch.float32 and m.shape == (3, *fam.latent_shape)
    assert fam.decode(fam.modules(), m).dtype == torch.float32
    # the patch discriminator: one logit per patch, examples independent (no batch statistics)
    D = PatchDiscriminator(in_channels=1, channels=8, groups=4, layers=2)
    logits = D(x)
    assert logits.shape == (3, 1, 5, 5)
    torch.testing.assert_close(D(x[1:2]), logits[1:2])


def test_adaptive_weight_is_the_ratio_of_gradient_norms_by_hand():
    """A tiny decoder h = tanh(A z), x^ = W h + b; rec = sum |x - x^|, adv = -mean(v . x^). At W:
    d rec / dW = sum_i sign(x^_i - x_i) h_i^T and d adv / dW = -(1/B) sum_i v h_i^T (by hand)."""
    g = torch.Generator().manual_seed(0)
    B, dz, dh, dx = 5, 3, 4, 6
    z, x = torch.randn(B, dz, generator=g, dtype=torch.float64), torch.randn(B, dx, generator=g, dtype=torch.float64)
    A = torch.randn(dh, dz, generator=g, dtype=torch.float64)
    W = torch.randn(dx, dh, generator=g, dtype=torch.float64, requires_grad=True)
    b, v = torch.randn(dx, generator=g, dtype=torch.float64), torch.randn(dx, generator=g, dtype=torch.float64)
    h = torch.tanh(z @ A.T)  # (B, dh)
    xr = h @ W.T + b  # (B, dx)
    rec = (x - xr).abs().sum(1).mean()
    adv = -(xr @ v).mean()
    lam = adaptive_weight(rec, adv, W, max_weight=1e4)
    g_rec = (torch.sign(xr - x).detach().T @ h) / B  # (dx, dh)
    g_adv = -(v[:, None] * h.sum(0)[None, :]) / B
    want = g_rec.norm() / (g_adv.norm() + 1e-4)
    torch.testing.assert_close(lam, want.detach(), rtol=1e-12, atol=0)
    assert not lam.requires_grad
    # both graphs are kept for the backward pass that follows
    (rec + lam * adv).backward()
    torch.testing.assert_close(W.grad, g_rec + lam * g_adv, rtol=1e-12, atol=1e-14)
    # the clamp: an adversarial loss that does not move the last layer gets the maximum weight
    xr = h @ W.T + b
    rec, flat = (x - xr).abs().sum(1).mean(), (xr * 0).sum()
    assert float(adaptive_weight(rec, flat, W, max_weight=7.0)) == 7.0


def test_perceptual_distance_is_zero_on_equal_images_and_positive_otherwise():
    from scorelab.nets.classifier import load_domain_classifier

    lenet = load_domain_classifier("fmnist")
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    assert torch.equal(lenet_perceptual_distance(lenet, x, x), torch.zeros(2))
    y = x.clone().requires_grad_(True)
    d = lenet_perceptual_distance(lenet, x, y + 0.3 * torch.randn_like(x))
    assert (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()


# --------------------------------------------------------------------------------------
# Latent diffusion behind a fixed orthogonal "autoencoder"
# --------------------------------------------------------------------------------------
class OrthogonalAutoencoder:
    """The interface latent diffusion uses (latent_shape, encode, decode), as a fixed orthogonal
    map: encode x -> Q x (posterior std 1e-6), decode z -> Q^T z."""

    name = "autoencoder"

    def __init__(self, dim: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        self.latent_shape = (dim,)

    def encode(self, modules, x):
        mean = (x.double() @ self.Q.T).float()
        return mean, torch.full_like(mean, 2 * math.log(1e-6))

    def decode(self, modules, z):
        return (z.double() @ self.Q).float()


def _fake_ref(ae, data: DataSpec):
    return SimpleNamespace(path=Path("orthogonal-ae"), family=ae, modules={"autoencoder": nn.Identity()}, data=data)


class _Ctx:
    """The part of the trainer's StepContext a training step uses (optimize does nothing)."""

    def __init__(self, seed: int = 0):
        self.step, self.device, self.autocast_dtype = 0, torch.device("cpu"), None
        self.generator = torch.Generator().manual_seed(seed)

    def optimize(self, loss, name="main"):
        return 0.0


def _mixture(dim: int = 4) -> GaussianMixture:
    g = torch.Generator().manual_seed(1)
    K = 3
    means = 3.0 * torch.randn(K, dim, generator=g, dtype=torch.float64)  # overall std ~3: the scale ~1/3, far from 1
    A = torch.randn(K, dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    covs = 0.3 * A @ A.transpose(1, 2) + 0.1 * torch.eye(dim, dtype=torch.float64)
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), means, covs)


def _latent_family(dim: int, **cfg):
    data = DataSpec((dim,), 0, False, None, "mixture", "points")
    ae = OrthogonalAutoencoder(dim)
    model = {"autoencoder": "orthogonal-ae", "net": "mlp", "net_options": {"width": 8, "depth": 1}, **cfg}
    return LatentDiffusionFamily(model, data, {"autoencoder": _fake_ref(ae, data)}), ae


def test_latent_diffusion_with_the_exact_latent_denoiser_reproduces_the_data_mixture():
    """The image of a mixture under z = s Q x is the mixture with means s Q m_k and covariances
    s^2 Q C_k Q^T. Its exact denoiser, run by the family's sampler from the latent prior and decoded
    with Q^T z / s, must give the data mixture: sliced W2 to fresh data within the Monte Carlo floor
    (the spread of SW2 between two independent data samples of the same size). Decoding without the
    1/s (a scale that does not commute with the map) must fail the same check."""
    dim, n = 4, 2000
    mix = _mixture(dim)
    fam, ae = _latent_family(dim, path="rf", prediction="velocity", sampler="heun", grid="uniform", sampling_steps=30)
    mods = fam.modules()
    # the scale: measured on the first training batch by the family's own training step
    x_train = mix.sample(512, torch.Generator().manual_seed(2)).float()
    batch = fam.prepare({"x": x_train, "index": torch.arange(512)}, {**mods, **fam.frozen()})
    fam.training_step(mods, batch, _Ctx())
    s = fam.scale_of(mods)
    Q = ae.Q
    latent_mix = GaussianMixture(mix.weights, s * mix.means @ Q.T, s**2 * Q @ mix.covs @ Q.T)
    fam.denoiser = lambda modules=None, **kw: latent_mix.denoiser(fam.path)  # the exact denoiser in latent space
    x = fam.sample(mods, n, seed=0)
    assert x.shape == (n, dim)

    def sw(a, b):
        return float(sliced_wasserstein(a, b, n_proj=128, generator=torch.Generator().manual_seed(0)))

    floor = torch.tensor([sw(mix.sample(n, torch.Generator().manual_seed(10 + 2 * r)),
                             mix.sample(n, torch.Generator().manual_seed(11 + 2 * r))) for r in range(8)])
    fresh = mix.sample(n, torch.Generator().manual_seed(99))
    d = sw(x, fresh)
    # SW2 of two independent samples has this mean and spread: 4 standard deviations above its mean
    # (from 8 replicates) is the Monte Carlo floor a correct sampler stays under
    limit = float(floor.mean() + 4 * floor.std())
    assert d < limit, (d, floor)
    # control: decoding Q^T z without the 1/s lands far from the data
    wrong = s * x  # Q^T (s Q x): what a decoder that ignores the scale gives
    assert sw(wrong, fresh) > 2 * limit


def test_scale_makes_the_training_latents_std_one():
    """LDM's scale_by_std on the first batch of B images: 1/std of that batch's latent values. Over
    all training images the scaled latents then have std 1 within the error of a B-image estimate:
    with m_i the mean square (about the mean) of image i's latent values, the batch's variance is
    their average, SE(s^2)/s^2 = sd(m_i) / (sqrt(B) mean(m_i)), and SE(s)/s is half that (images
    are the independent units; values within one image are not). 4 standard errors."""
    from scorelab.data import load_split
    from scorelab.quantize import to_model

    torch.manual_seed(0)
    fam = LatentDiffusionFamily({"autoencoder": "ae", "net_options": TINY_UNET},
                                FMNIST, {"autoencoder": _tiny_ae_ref()})
    mods = fam.modules()
    x = torch.as_tensor(load_split("fmnist-embedded", "train").images[:1024])
    B = 128
    batch = fam.prepare({"x": x[:B], "index": torch.arange(B)}, {**mods, **fam.frozen()})
    assert not mods["latent"].measured
    fam.training_step(mods, batch, _Ctx())
    s = fam.scale_of(mods)
    assert mods["latent"].measured and s > 0
    mean_all, log_var_all = fam.ae_family.encode(fam.ae_modules, to_model(x))
    z = fam.latents_of({"x": mean_all, "log_var": log_var_all}, torch.Generator().manual_seed(5)).double()
    m = (z - z.mean()).flatten(1).square().mean(1)  # (N,) per-image mean squares
    se = float(m.std() / (math.sqrt(B) * m.mean())) / 2
    assert abs(float((s * z).std()) - 1) < 4 * se, (float((s * z).std()), se)
    # the unscaled latents are not at std 1 (the check above has power)
    assert abs(float(z.std()) - 1) > 4 * se


def test_scale_is_copied_exactly_by_the_trainers_ema():
    from scorelab.train.trainer import EMA

    scale = LatentScale()
    assert not scale.measured and scale.value == 1.0
    ema = EMA({"latent": scale}, decay=0.999)
    scale.set(0.123456789012345)
    for step in range(3):
        ema.update({"latent": scale}, step)
    copy = LatentScale()
    ema.copy_to({"latent": copy})
    assert copy.value == scale.value == 0.123456789012345
    with pytest.raises(ValueError):
        scale.set(0.0)


def _tiny_ae_ref(data: DataSpec = FMNIST):
    torch.manual_seed(1)
    fam = AutoencoderFamily(TINY_AE, data)
    mods = {k: m.eval().requires_grad_(False) for k, m in fam.modules().items()}
    return SimpleNamespace(path=Path("tiny-ae"), family=fam, modules=mods, data=data)


def test_cached_encoding_equals_on_the_fly_bit_for_bit():
    """Any order of batches (the cache encodes whole batches, so every image's latent is computed in
    a batch of the same size) gives the same prepared latents as encoding every batch."""
    from scorelab.data import load_split

    x = torch.as_tensor(load_split("fmnist-embedded", "train").images[:96])
    ref = _tiny_ae_ref()
    cached = LatentDiffusionFamily({"autoencoder": "ae", "net_options": TINY_UNET}, FMNIST, {"autoencoder": ref})
    fly = LatentDiffusionFamily({"autoencoder": "ae", "net_options": TINY_UNET, "encoding": "on_the_fly"}, FMNIST,
                                {"autoencoder": ref})
    g = torch.Generator().manual_seed(0)
    for _ in range(6):  # overlapping batches: hits, misses and mixed
        idx = torch.randperm(96, generator=g)[:32]
        b = {"x": x[idx], "index": idx}
        p1 = cached.prepare(b, {**cached.modules(), **cached.frozen()})
        p2 = fly.prepare(b, {**fly.modules(), **fly.frozen()})
        assert torch.equal(p1["x"], p2["x"]) and torch.equal(p1["log_var"], p2["log_var"])
    assert int(cached._cache["filled"].sum()) <= 96


def test_a_dit_works_on_latents_unchanged():
    """Any net of the diffusion family: a DiT with 1x1 patches on the 7x7 latent grid, class-conditional."""
    from scorelab.data import load_split

    data = DataSpec((1, 28, 28), 10, True, None, "fmnist-embedded", "fmnist")
    fam = LatentDiffusionFamily({"autoencoder": "ae", "net": "dit", "net_options": {"patch_size": 1, "hidden": 16, "depth": 1,
                                 "heads": 2}, "path": "edm", "prediction": "x0", "preconditioning": "edm",
                                 "sampler": "heun", "sampling_steps": 2, "grid": "karras"}, data, {"autoencoder": _tiny_ae_ref(data)})
    assert fam.net.cfg.image_size == 7 and fam.preconditioning() == ("edm", 1.0)  # the scaled latents' sigma_data
    mods = fam.modules()
    ds = load_split("fmnist-embedded", "train")
    b = {"x": torch.as_tensor(ds.images[:8]), "index": torch.arange(8), "y": torch.as_tensor(ds.labels[:8]).long()}
    out = fam.training_step(mods, fam.prepare(b, {**mods, **fam.frozen()}), _Ctx())
    assert math.isfinite(float(out["loss"]))
    x = fam.sample(mods, 3, seed=0, y=torch.tensor([1, 2, 3]), cfg=1.0)
    assert x.shape == (3, 1, 28, 28) and torch.isfinite(x).all()


def test_refuses_an_autoencoder_of_another_shape_or_domain():
    from scorelab.train.config import ConfigError

    other = DataSpec((1, 16, 16), 0, False, None, "npz", "images")
    with pytest.raises(ConfigError) as e:
        LatentDiffusionFamily({"autoencoder": "ae", "net_options": TINY_UNET}, FMNIST, {"autoencoder": _tiny_ae_ref(other)})
    msg = str(e.value)
    assert "\n" not in msg and "shape (1, 16, 16)" in msg and "(1, 28, 28)" in msg
    same_shape = DataSpec((1, 28, 28), 0, False, None, "npz", "images")
    with pytest.raises(ConfigError, match="domain images.*domain fmnist"):
        LatentDiffusionFamily({"autoencoder": "ae", "net_options": TINY_UNET}, FMNIST,
                              {"autoencoder": _tiny_ae_ref(same_shape)})


# --------------------------------------------------------------------------------------
# The command line end to end
# --------------------------------------------------------------------------------------
AE_CFG = {"name": "ae", "seed": 0, "data": {"name": "fmnist-embedded"},
          "model": {"family": "autoencoder", "disc_start": 2, **TINY_AE},
          "train": {"steps": 4, "batch_size": 16, "log_every": 1, "sample_every": 0, "ckpt_every": 0, "precision": "fp32",
                    "ema_decay": 0.9}}
LDM_CFG = {"name": "ldm", "seed": 0, "data": {"name": "fmnist-embedded", "class_conditional": True},
           "model": {"family": "latent_diffusion", "path": "rf", "prediction": "velocity", "net": "unet", "label_dropout": 0.2,
                     "net_options": TINY_UNET, "sampler": "euler", "sampling_steps": 2},
           "train": {"steps": 4, "batch_size": 16, "log_every": 1, "sample_every": 0, "ckpt_every": 0, "precision": "fp32",
                     "ema_decay": 0.9}}


def _write(tmp: Path, cfg: dict, name: str) -> str:
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    assert main(["train", _write(root, AE_CFG, "ae"), "--runs", str(root / "runs"), "--no-progress"]) == 0
    return root / "runs" / "ae"


def test_autoencoder_then_latent_diffusion_through_the_cli(ae_run, tmp_path, capsys):
    capsys.readouterr()
    rows = [json.loads(r) for r in (ae_run / "metrics.jsonl").read_text().splitlines()]
    assert "d_weight" not in rows[0] and {"d_weight", "d_loss", "g_loss"} <= set(rows[-1])  # the GAN term from disc_start on
    # the autoencoder's eval: reconstruction numbers, rFID and the grid; it does not sample
    assert main(["eval", str(ae_run), "--n-real", "32"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"l1", "mse", "psnr", "rfid", "rkid"} <= set(ev) and ev["reconstruction_n"] == 32 and math.isfinite(ev["rfid"])
    assert (ae_run / "reconstructions.png").is_file() and "fid" not in ev
    assert main(["sample", str(ae_run)]) == 2
    assert "autoencoder runs cannot sample" in capsys.readouterr().err
    # latent diffusion on it: train, resume bit-exactly (the encoding cache refills after the resume)
    runs = tmp_path / "runs"
    cfg = _write(tmp_path, LDM_CFG, "ldm")
    assert main(["train", cfg, "--runs", str(runs), "--model.autoencoder", str(ae_run), "--no-progress"]) == 0
    half = dict(LDM_CFG, train={**LDM_CFG["train"], "steps": 2})
    assert main(["train", _write(tmp_path, half, "half"), "--runs", str(tmp_path / "b"), "--model.autoencoder", str(ae_run),
                 "--no-progress"]) == 0
    assert main(["train", "--resume", str(tmp_path / "b" / "ldm"), "--train.steps", "4", "--no-progress"]) == 0
    full, _ = load_checkpoint(runs / "ldm" / "checkpoint.safetensors")
    resumed, _ = load_checkpoint(tmp_path / "b" / "ldm" / "checkpoint.safetensors")
    for k in full:
        if k.startswith(("model.", "ema.")):
            assert torch.equal(full[k], resumed[k]), k
    assert "ema.latent.bits" in full and torch.equal(full["ema.latent.bits"], full["model.latent.bits"])
    capsys.readouterr()
    # sample (conditional, with classifier-free guidance) and eval: decoded 28x28 images
    out = tmp_path / "s.npz"
    assert main(["sample", str(runs / "ldm"), "--n", "4", "--class", "3", "--cfg", "1.5", "--out", str(out)]) == 0
    s = np.load(out)["samples"]
    assert s.shape == (4, 1, 28, 28) and np.isfinite(s).all() and np.abs(s).max() <= 1
    assert main(["interpolate", str(runs / "ldm"), "--n", "3", "--steps", "2", "--out", str(tmp_path / "i.png")]) == 0
    capsys.readouterr()
    assert main(["eval", str(runs / "ldm"), "--n", "16", "--n-real", "32"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(ev["fid"]) and ev["autoencoder"] == str(ae_run) and ev["latent_shape"] == [4, 7, 7]
    # what it does not do: a pixel likelihood, classifier guidance
    for args, msg in ((["eval", str(runs / "ldm"), "--nll"], "latent_diffusion runs cannot nll"),
                      (["sample", str(runs / "ldm"), "--class", "1", "--classifier", str(ae_run)], "--classifier does not apply")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def test_bad_autoencoder_references_are_one_line_exit_2_and_write_nothing(ae_run, tmp_path, capsys):
    np.savez(tmp_path / "other.npz", images=np.random.default_rng(0).integers(0, 256, (64, 28, 28), dtype=np.uint8))
    np.savez(tmp_path / "small.npz", images=np.random.default_rng(0).integers(0, 256, (64, 16, 16), dtype=np.uint8))
    other = dict(AE_CFG, name="ae-npz", data={"name": "npz", "options": {"path": str(tmp_path / "other.npz")}})
    small = dict(AE_CFG, name="ae-small", data={"name": "npz", "options": {"path": str(tmp_path / "small.npz")}})
    for c in (other, small):
        assert main(["train", _write(tmp_path, c, c["name"]), "--runs", str(tmp_path / "ae"), "--no-progress"]) == 0
    (tmp_path / "plain").mkdir()
    ldm_run = tmp_path / "ldm-as-ae"
    ldm = _write(tmp_path, LDM_CFG, "ldm")
    assert main(["train", ldm, "--runs", str(tmp_path), "--name", "ldm-as-ae", "--model.autoencoder", str(ae_run),
                 "--train.steps", "1", "--no-progress"]) == 0
    capsys.readouterr()
    cases = [("", "model.autoencoder is required"),
             (str(tmp_path / "nowhere"), "does not exist"),
             (str(tmp_path / "plain"), "is not a run folder"),
             (str(ldm_run), "is a latent_diffusion run, expected autoencoder"),
             (str(tmp_path / "ae" / "ae-small"), "shape (1, 16, 16)"),
             (str(tmp_path / "ae" / "ae-npz"), "use an autoencoder of the same data")]
    runs = tmp_path / "runs"
    for target, msg in cases:
        code = main(["train", ldm, "--runs", str(runs), "--model.autoencoder", target, "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and msg in err[0], (target, err)
        assert not runs.exists()
