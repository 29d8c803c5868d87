"""The likelihood families (scorelab.families.vae, scorelab.families.pixelcnn) through the CLI.

Tiny configs on the 8x8 digits train, resume bit-exactly (N + resume + N == 2N, every tensor of the
checkpoint), sample, score, interpolate and traverse through ``scorelab.cli.main``. Known answers:

* VAE: ``nll`` at k = 1 is the single-sample ELBO, so its mean over independent seeds equals the
  closed-form-KL ELBO of :func:`scorelab.vae.elbo_terms` within Monte Carlo error, and the IWAE
  bound rises with k; the value of an example does not depend on the batch.
* PixelCNN: ``eval --nll`` equals the chain rule computed directly, one conditional at a time:
  ``-sum_s log softmax(net(x_<s, garbage after))_s[x_s]`` (each subpixel's conditional from an
  input holding only the subpixels before it in the model's order), for both variants.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from scorelab.cli import main
from scorelab.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py

TRAIN = {"batch_size": 32, "lr": 3e-3, "warmup": 5, "log_every": 5, "ckpt_every": 0, "sample_every": 0, "ema_decay": 0.9,
         "device": "cpu", "threads": 1, "precision": "fp32"}
VAE = {"family": "vae", "latent_dim": 8, "net_options": {"channels": [16], "hidden": 64}}
GATED = {"family": "pixelcnn", "net": "gated", "net_options": {"channels": 8, "layers": 2, "kernel_size": 3}}
TILES = {"family": "pixelcnn", "net": "tiles", "net_options": {"tile_size": 4, "d_model": 16, "context_layers": 1, "heads": 2,
                                                               "cond_channels": 4, "head_channels": 8, "head_layers": 3}}


def _cfg(name: str, model: dict, steps: int, conditional: bool = False) -> dict:
    return {"name": name, "seed": 1, "data": {"name": "digits", "class_conditional": conditional}, "model": model,
            "train": {**TRAIN, "steps": steps}}


def _write(tmp: Path, cfg: dict, tag: str = "") -> str:
    p = tmp / f"{cfg['name']}{tag}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def _cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _train_with_resume(tmp: Path, cfg: dict, capsys) -> Path:
    """Train ``cfg`` straight (runs/a) and as half + resume (runs/b); assert every checkpoint tensor is
    equal; return the straight run's folder."""
    steps = cfg["train"]["steps"]
    half = dict(cfg, train=dict(cfg["train"], steps=steps // 2))
    for where, c in (("a", cfg), ("b", half)):
        code, _, err = _cli(["train", _write(tmp, c, where), "--runs", tmp / where, "--no-progress"], capsys)
        assert code == 0, err
    code, _, err = _cli(["train", "--resume", tmp / "b" / cfg["name"], "--train.steps", steps, "--no-progress"], capsys)
    assert code == 0, err
    ta, ma = load_checkpoint(tmp / "a" / cfg["name"] / "checkpoint.safetensors")
    tb, mb = load_checkpoint(tmp / "b" / cfg["name"] / "checkpoint.safetensors")
    assert ma["step"] == mb["step"] == steps and set(ta) == set(tb)
    assert any(k.startswith("opt.") for k in ta) and any(k.startswith("ema.") for k in ta)
    for k in ta:  # weights, EMA, optimizer moments, random-generator states
        assert torch.equal(ta[k], tb[k]), k
    return tmp / "a" / cfg["name"]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A tiny VAE (discretized decoder) trained 300 steps (~5 s): its latents carry ~6 nats (80 steps: collapsed)."""
    tmp = tmp_path_factory.mktemp("vae")
    cfg = _cfg("vae", VAE, 300)
    assert main(["train", _write(tmp, cfg), "--runs", str(tmp), "--no-progress"]) == 0
    return tmp / "vae"


# --------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------
def test_vae_resumes_bit_exactly_and_serves_every_verb(tmp_path, capsys):
    run = _train_with_resume(tmp_path, _cfg("vae", VAE, 8), capsys)
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "rec", "kl", "elbo_bpd", "beta", "grad_norm"} <= set(rows[-1])  # reconstruction and prior apart
    assert (run / "samples.png").is_file() and (run / "loss.png").is_file()
    code, out, err = _cli(["sample", run, "--n", "6", "--temperature", "0.5", "--out", tmp_path / "s.npz"], capsys)
    assert code == 0, err
    import numpy as np

    s = np.load(tmp_path / "s.npz")["samples"]
    assert s.shape == (6, 1, 8, 8) and np.isfinite(s).all() and json.loads(out)["temperature"] == 0.5
    code, out, err = _cli(["eval", run, "--nll", "--nll-n", "8", "--nll-k", "4"], capsys)
    assert code == 0, err
    res = json.loads(out)["iwae"]
    assert res["units"] == "bits/dim" and not res["exact"] and res["n"] == 8 and 0 < res["mean"] < 16
    assert {"kl", "ess", "iwae_stderr"} <= set(res) and 1 <= res["ess"] <= 4
    code, out, err = _cli(["eval", run, "--n", "20", "--n-real", "40"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert 0 <= res["active_units"] <= res["latent_dim"] == 8 and len(res["unit_variances"]) == 8
    assert math.isfinite(res["fid"]) and math.isfinite(res["reconstruction_fid"]) and res["kl_nats"] >= 0
    assert Path(res["reconstructions"]).is_file()
    for mode in ("linear", "spherical"):
        code, out, err = _cli(["interpolate", run, "--n", "5", "--mode", mode, "--out", tmp_path / f"i_{mode}.png"], capsys)
        assert code == 0, err
        assert json.loads(out)["space"] == "z" and (tmp_path / f"i_{mode}.png").is_file()
    code, out, err = _cli(["traverse", run, "--dims", "0", "7", "--range", "2", "--n", "4", "--out", tmp_path / "t.png"], capsys)
    assert code == 0, err
    assert json.loads(out)["dims"] == [0, 7] and (tmp_path / "t.png").is_file()
    # bad input: one line, exit 2
    for args, words in ((["traverse", run, "--dims", "8"], "--dims 8 is out of range: this VAE has 8 latent dimensions"),
                        (["sample", run, "--steps", "3"], "--steps does not apply to vae runs (sample takes: --temperature)"),
                        (["interpolate", run, "--space", "noise"], "--space 'noise' is not one of vae's: z")):
        code, _, err = _cli(args, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, (args, err)


def test_vae_family_in_the_library(vae_run):
    """What the CLI builds on: the traversal grid holds the posterior mean off the swept dimension,
    interpolation ends are the seeds' samples, samples are batch-independent, and a conditional VAE
    declares it cannot traverse and interpolates within a class."""
    from scorelab.eval import reference_set
    from scorelab.families.base import CapabilityError, DataSpec
    from scorelab.families.vae import VAEFamily
    from scorelab.runs import open_run

    r = open_run(vae_run)
    fam = r.family
    a = fam.sample(r.modules, 5, seed=3)
    b = fam.sample(r.modules, 2, seed=4, batch_size=1)
    torch.testing.assert_close(a[1:3], b)
    z = fam.latents(r.modules, [3, 7], "z")
    torch.testing.assert_close(fam.generate_from(r.modules, z, "z")[:1], a[:1])  # sample_mode mean, temperature 1
    ref = reference_set(r.cfg, 1).x
    grid = fam.traverse(r.modules, ref, [2, 5], 3.0, 3)
    assert grid.shape == (6, 1, 8, 8)
    mu, _ = fam.posterior(r.modules, ref)
    mid = mu.clone()
    mid[0, 2] = 0.0  # row 0 sweeps dim 2 over (-3, 0, 3); every other dim stays at the posterior mean
    torch.testing.assert_close(grid[1], fam.generate_from(r.modules, mid, "z")[0])
    assert not torch.allclose(grid[0], grid[2])
    cond = VAEFamily({"latent_dim": 4, "net_options": {"channels": [8], "hidden": 16}}, DataSpec((1, 8, 8), 10, True))
    caps = cond.capabilities()
    assert caps.conditional and not caps.traverse and caps.interpolate == ("z",)
    with pytest.raises(CapabilityError, match="within one class"):
        cond.generate_from(cond.modules(), torch.zeros(2, 4), "z")
    x = cond.sample(cond.modules(), 4, seed=0, y=torch.tensor([0, 1, 2, 3]))
    assert x.shape == (4, 1, 8, 8)


def test_vae_nll_k1_is_the_elbo_in_expectation_and_rises_with_k(vae_run):
    """``L_1 = log p(x|z) + log p(z) - log q(z|x)`` with one ``z ~ q``: E[L_1] = E_q log p(x|z) - KL, the
    ELBO. Each of 4 test images is repeated R = 400 times (independent seeds) for L_1, and scored R
    times with elbo_terms (one z each, closed-form KL); both means carry a standard error from their
    own spread, and they must agree within 4 combined SEs. The bound in bits/dim falls as k grows:
    E[L_1] <= E[L_8] <= E[L_64] on 32 images (each bound averaged over 8 draws per image), each gap
    larger than 4 SEs of the per-image gaps (the gaps are positive in expectation; with the trained
    latents they are ~0.025 and ~0.012 bits/dim here, the SEs ~0.003)."""
    from scorelab.eval import reference_set
    from scorelab.quantize import to_model
    from scorelab.random import generators_for_seeds
    from scorelab.runs import open_run
    from scorelab.vae import elbo_terms

    r = open_run(vae_run)
    fam = r.family
    x = reference_set(r.cfg, 32).x
    R, D = 400, fam.data.dim
    xr = x[:4].repeat_interleave(R, 0)  # (4 R, 1, 8, 8)
    l1 = fam.nll(r.modules, xr, method="iwae", k=1, seed=0, batch_size=256)["total"].view(4, R)  # bits/dim
    encode, decode, lik = fam._parts(r.modules)
    with torch.no_grad():
        t = elbo_terms(to_model(xr), encode, decode, lik, generator=generators_for_seeds(range(10**6, 10**6 + 4 * R)))
    elbo = (-(t.reconstruction - t.kl).double() / (D * math.log(2))).view(4, R)
    se = (l1.var(1) / R + elbo.var(1) / R).sqrt()
    assert torch.all((l1.mean(1) - elbo.mean(1)).abs() < 4 * se), (l1.mean(1), elbo.mean(1), se)
    assert torch.all(se < 0.05)  # the check has teeth: a 0.05 bits/dim offset would be seen
    xs = x.repeat_interleave(8, 0)  # 8 independent draws of each bound per image
    bounds = {k: fam.nll(r.modules, xs, method="iwae", k=k, seed=100)["total"].view(32, 8).mean(1) for k in (1, 8, 64)}
    for lo, hi in ((1, 8), (8, 64)):
        gap = bounds[lo] - bounds[hi]  # (32,) bits/dim: positive in expectation
        assert float(gap.mean()) > 4 * float(gap.std() / math.sqrt(len(gap))), (lo, hi, gap)
    # an example's bound depends on its seed only, not on the batch it is scored in
    one = fam.nll(r.modules, x[:6], method="iwae", k=70, seed=5, batch_size=1)
    many = fam.nll(r.modules, x[:6], method="iwae", k=70, seed=5, batch_size=64)
    for key in ("total", "iwae_stderr", "ess", "kl"):
        torch.testing.assert_close(one[key], many[key], rtol=1e-5, atol=1e-6)
    assert many["units"] == "bits/dim" and torch.all(many["iwae_stderr"] > 0)


# --------------------------------------------------------------------------------------
# PixelCNN
# --------------------------------------------------------------------------------------
def _chain_rule_nats(net, x: torch.Tensor, rank: torch.Tensor, y=None) -> torch.Tensor:
    """``-sum_s log p(x_s | x_<s)`` (B,) for uint8 ``x: (B, C, H, W)``, one conditional at a time: the
    input for subpixel ``s`` holds ``x`` at the subpixels ranked before ``s`` and random values at ``s``
    and after (a causal net must not look at them)."""
    from scorelab.quantize import to_model

    g = torch.Generator().manual_seed(0)
    xm = to_model(x)
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for s in range(rank.numel()):
        before = (rank < s)[None]  # (1, C, H, W)
        inp = torch.where(before, xm, torch.rand(xm.shape, generator=g) * 2 - 1)
        c, i, j = (rank == s).nonzero()[0].tolist()  # the subpixel ranked s
        with torch.no_grad():
            logits = net(inp, y)[:, :, c, i, j].double()  # (B, 256)
        total -= logits.log_softmax(1).gather(1, x[:, c, i, j].long()[:, None])[:, 0]
    return total


def _ranks(fam):
    C, H, W = fam.data.shape
    c, i, j = torch.meshgrid(torch.arange(C), torch.arange(H), torch.arange(W), indexing="ij")
    if fam.cfg.net == "gated":
        return (i * W + j) * C + c  # raster, then channels
    k = fam.net.config.tile_size
    tile = (i // k) * (W // k) + j // k
    return (tile * k * k + (i % k) * k + j % k) * C + c  # tiles, pixels of a tile, channels


@pytest.mark.parametrize("model,conditional", [(GATED, False), (TILES, True)], ids=["gated", "tiles-conditional"])
def test_pixelcnn_resumes_samples_and_its_nll_is_the_chain_rule(tmp_path, capsys, model, conditional):
    from scorelab.eval import reference_set
    from scorelab.runs import open_run

    run = _train_with_resume(tmp_path, _cfg("pcnn", model, 6, conditional), capsys)
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert list(rows[-1])[1] == "bpd" and 0 < rows[-1]["bpd"] < 16  # the progress bar's number: train bits/dim
    # eval --nll == the chain rule, one conditional at a time
    code, out, err = _cli(["eval", run, "--nll", "--nll-n", "6"], capsys)
    assert code == 0, err
    res = json.loads(out)["exact"]
    assert res["exact"] and res["units"] == "bits/dim" and res["n"] == 6
    r = open_run(run)
    ref = reference_set(r.cfg, 6)
    y = ref.y if conditional else None
    nats = _chain_rule_nats(r.modules["net"], ref.x, _ranks(r.family), y)
    direct = nats / (r.family.data.dim * math.log(2))
    assert abs(res["mean"] - float(direct.mean())) < 1e-4, (res["mean"], direct)  # eval rounds to 5 decimals
    torch.testing.assert_close(r.family.nll(r.modules, ref.x, method="exact", y=y)["total"], direct, rtol=1e-5, atol=1e-5)
    # sampling: temperature, classes, the seed rule
    cls = ["--class", "3", "7"] if conditional else []
    code, out, err = _cli(["sample", run, "--n", "4", "--temperature", "0.7", *cls, "--out", tmp_path / "s.npz"], capsys)
    assert code == 0, err
    import numpy as np

    s = np.load(tmp_path / "s.npz")
    assert s["samples"].shape == (4, 1, 8, 8) and set(np.unique(np.round((s["samples"] + 1) * 127.5))) <= set(range(256))
    if conditional:
        assert s["labels"].tolist() == [3, 3, 7, 7]
    y3 = torch.tensor([3, 3, 3]) if conditional else None
    a = r.family.sample(r.modules, 3, seed=11, y=y3)
    b = r.family.sample(r.modules, 1, seed=12, y=None if y3 is None else y3[:1])
    torch.testing.assert_close(a[1:2], b, rtol=0, atol=0)
    assert torch.equal(r.family.sample(r.modules, 2, seed=0, y=None if y3 is None else y3[:2], temperature=0),
                       r.family.sample(r.modules, 2, seed=5, y=None if y3 is None else y3[:2], temperature=0))  # argmax
    # what does not apply: one line naming what the family takes, exit 2
    for args, words in ((["sample", run, "--sampler", "euler"], "--sampler does not apply to pixelcnn runs (sample takes: --temperature)"),
                        (["sample", run, "--steps", "10"], "--steps does not apply to pixelcnn runs (sample takes: --temperature)"),
                        (["interpolate", run], "pixelcnn runs cannot interpolate (families that can:"),
                        (["traverse", run], "pixelcnn runs cannot traverse (families that can: vae)")):
        code, _, err = _cli(args, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, (args, err)


def test_traverse_on_a_diffusion_run_names_the_families_that_can(tmp_path, capsys):
    cfg = {"name": "dif", "data": {"name": "8gaussians", "options": {"n": 128}},
           "model": {"family": "diffusion", "net": "mlp", "net_options": {"width": 8, "depth": 1}, "sampling_steps": 2},
           "train": {**TRAIN, "steps": 2}}
    assert main(["train", _write(tmp_path, cfg), "--runs", str(tmp_path), "--no-progress"]) == 0
    capsys.readouterr()
    code, _, err = _cli(["traverse", tmp_path / "dif"], capsys)
    assert code == 2 and err.strip().splitlines() == ["scorelab traverse: error: diffusion runs cannot traverse (families that can: vae)"]


@pytest.mark.parametrize("preset,family,net", [("fmnist-vae", "vae", None), ("fmnist-vae-beta4", "vae", None),
                                               ("fmnist-pixelcnn", "pixelcnn", "gated"),
                                               ("fmnist-pixelcnn-tiles", "pixelcnn", "tiles")])
def test_presets_build_and_fit_the_five_minute_budget(preset, family, net):
    from scorelab.cli.common import resolve_config
    from scorelab.families import make_family
    from scorelab.train.config import RunConfig

    cfg = RunConfig.from_dict(resolve_config(preset))
    assert cfg.name == preset and cfg.data.name == "fmnist-embedded" and cfg.train.max_minutes == 4.5
    fam = make_family(cfg.model, (1, 28, 28), 10)
    assert fam.name == family and (net is None or fam.cfg.net == net)
    if family == "vae":
        assert fam.cfg.decoder == "discretized_gaussian" and fam.capabilities().nll_options == ("k",)  # bits/dim as diffusion's
        assert fam.cfg.beta == (4.0 if preset.endswith("beta4") else 1.0)
    else:
        assert fam.capabilities().nll_exact == ("exact",)


@pytest.mark.parametrize("decoder,options,shape,units", [
    ("discretized_gaussian", {}, (1, 8, 8), "bits/dim"),
    ("gaussian", {"variance": "pixel", "std": 0.2}, (1, 8, 8), "bits/dim"),
    ("gaussian", {"variance": "output"}, (1, 8, 8), "bits/dim"),
    ("bernoulli", {}, (1, 8, 8), "bits/dim (binarized)"),
    ("gaussian", {"variance": "global"}, (2,), "nats"),
])
def test_every_decoder_trains_a_step_and_scores_in_its_units(decoder, options, shape, units):
    """One training step per decoder (a learned global / per-pixel variance is a trained module), and
    nll in the decoder's units, never below the 8 bits/dim of uniform 8-bit noise."""
    import contextlib
    from types import SimpleNamespace

    from scorelab.families.base import DataSpec
    from scorelab.families.vae import VAEFamily

    torch.manual_seed(0)
    fam = VAEFamily({"latent_dim": 3, "decoder": decoder, "decoder_options": options,
                     "net_options": {"channels": [8], "hidden": 16} if len(shape) == 3 else {"hidden": [16]}}, DataSpec(shape))
    mods = fam.modules()
    assert ("likelihood" in mods) == (options.get("variance") in ("global", "pixel"))
    opt = torch.optim.AdamW([p for m in mods.values() for p in m.parameters()], 1e-3)

    def optimize(loss, name="main"):
        opt.zero_grad()
        loss.backward()
        opt.step()
        return 0.0

    raw = torch.randint(0, 256, (16, *shape), dtype=torch.uint8) if len(shape) == 3 else torch.randn(16, *shape)
    batch = fam.prepare({"x": raw}, mods)
    ctx = SimpleNamespace(step=0, generator=torch.Generator().manual_seed(0), autocast=contextlib.nullcontext, optimize=optimize)
    out = fam.training_step(mods, batch, ctx)
    assert all(math.isfinite(float(v)) for v in out.values()) and out["kl"] >= 0
    res = fam.nll(mods, raw, method="iwae", k=3, seed=0)
    assert res["units"] == units and torch.isfinite(res["total"]).all() and res["total"].shape == (16,)
    if units == "bits/dim":
        # uniform 8-bit noise cannot be compressed: by Kraft's inequality any code (and these bounds are
        # code lengths, >= -log2 P(k)) has P(total < 8 N - t bits) <= 2^-t; with N = 16 x 64 and t = 512
        # bits, a mean below 7.5 bits/dim has probability <= 2^-512
        assert float(res["total"].mean()) > 7.5
