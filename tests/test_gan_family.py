"""The GAN family on the shared trainer and command line: train, checkpoint, bit-exact resume, two
optimizers with their own learning rates, monitor rows, sample / interpolate / eval, bad input."""

import copy
import json

import numpy as np
import pytest
import torch
import yaml

from scorelab.cli import main
from scorelab.families import make_family
from scorelab.runs import open_run
from scorelab.train.checkpoint import load_checkpoint
from scorelab.train.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = {"batch_size": 32, "warmup": 0, "grad_clip": 0, "ema_decay": 0.9, "log_every": 2, "sample_every": 0,
         "ckpt_every": 0, "precision": "fp32"}

# 2-D: MLP G and D, n_critic 2, lazy R1 every 2nd D step, TTUR (own lr, betas, warm-up per optimizer)
TOY = {
    "name": "toy",
    "seed": 1,
    "data": {"name": "8gaussians", "options": {"n": 512}},
    "model": {"family": "gan", "generator": "mlp", "generator_options": {"width": 32, "depth": 2}, "z_dim": 4,
              "discriminator": "mlp", "discriminator_options": {"width": 32, "depth": 2}, "loss": "non_saturating",
              "n_critic": 2, "r1_gamma": 0.1, "r1_interval": 2,
              "optim_g": {"lr": 1.0e-3, "betas": [0.5, 0.9]},
              "optim_d": {"lr": 3.0e-3, "betas": [0.0, 0.9], "warmup": 10},
              "monitor_every": 2, "monitor_samples": 64},
    "train": dict(TRAIN, steps=6),
}

# images: a tiny StyleGAN generator (mapping, constant, AdaIN, noise, style mixing) and DCGAN discriminator
STYLE = {
    "name": "style",
    "seed": 0,
    "data": {"name": "fmnist-embedded"},
    "model": {"family": "gan", "generator": "stylegan", "z_dim": 16,
              "generator_options": {"w_dim": 16, "mapping_layers": 2, "channels": [8, 8, 8], "w_avg_samples": 64},
              "discriminator": "dcgan", "discriminator_options": {"channels": [8, 16]},
              "loss": "hinge", "r1_gamma": 1.0, "r1_interval": 2, "style_mixing": 0.5, "n_critic": 2,
              "monitor_every": 2, "monitor_samples": 32},
    "train": dict(TRAIN, steps=6, batch_size=8),
}

# class-conditional DCGAN (label embedding in G, projection D)
COND = {
    "name": "cond",
    "seed": 0,
    "data": {"name": "fmnist-embedded", "class_conditional": True},
    "model": {"family": "gan", "generator": "dcgan", "z_dim": 8, "generator_options": {"channels": [16, 8], "groups": 4},
              "discriminator": "dcgan", "discriminator_options": {"channels": [8, 16]}, "loss": "minimax"},
    "train": dict(TRAIN, steps=2, batch_size=8),
}


def write_cfg(path, cfg, name):
    p = path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    base = tmp_path_factory.mktemp("gan_runs")
    for cfg in (TOY, STYLE, COND):
        assert main(["train", write_cfg(base, cfg, cfg["name"]), "--runs", str(base), "--no-progress"]) == 0
    return {c["name"]: base / c["name"] for c in (TOY, STYLE, COND)}


def test_training_metrics_and_monitor_rows(runs):
    for name in ("toy", "style"):
        rd = runs[name]
        for f in ("config.yaml", "checkpoint.safetensors", "metrics.jsonl", "loss.png", "samples.png"):
            assert (rd / f).is_file(), (name, f)
        recs = records(rd)
        train = [r for r in recs if "loss_d" in r]
        assert [r["step"] for r in train] == [2, 4, 6]
        for r in train:
            assert list(r)[1] == "loss_d"  # the first metric: progress bar and the trainer's NaN check
            # n_critic = 2: one G step per window of two D steps; lazy R1 on D steps 0, 2, 4
            for k in ("loss_g", "d_real", "d_fake", "r1", "grad_norm_d", "grad_norm_g"):
                assert np.isfinite(r[k]), (name, k)
            assert 0 < r["d_real"] < 1 and 0 < r["d_fake"] < 1
        monitor = [r for r in recs if "loss_d" not in r]
        assert [r["step"] for r in monitor] == [2, 4, 6]
        if name == "style":
            assert all(r["fid"] > 0 for r in monitor)
        else:
            # 8gaussians: mode coverage against the analytic mixture, and sliced W2 against the data
            assert all(0 <= r["modes"] <= 8 and 0 <= r["high_quality"] <= 1 and r["sliced_w2"] > 0 for r in monitor)


def test_two_optimizers_have_their_own_hyperparameters(runs):
    _, meta = load_checkpoint(runs["toy"] / "checkpoint.safetensors")
    g = meta["optimizers"]["generator"]["param_groups"][0]
    d = meta["optimizers"]["discriminator"]["param_groups"][0]
    # the last D step is step 5: warm-up 10 gives 3e-3 * 6 / 10; G has no warm-up (train.warmup = 0)
    assert g["lr"] == pytest.approx(1e-3, rel=1e-12) and list(g["betas"]) == [0.5, 0.9]
    assert d["lr"] == pytest.approx(3e-3 * 6 / 10, rel=1e-12) and list(d["betas"]) == [0.0, 0.9]
    # and each optimizer holds only its own network's parameters
    fam = open_run(runs["toy"]).family
    n_g = len(list(fam.generator.parameters()))
    n_d = len(list(fam.discriminator.parameters()))
    assert len(g["params"]) == n_g and len(d["params"]) == n_d


def test_resume_is_bit_exact(tmp_path):
    """3 steps + resume + 3 steps == 6 steps straight: weights, both EMAs, both optimizers' moments, RNG."""
    full = write_cfg(tmp_path, STYLE, "full")
    assert main(["train", full, "--runs", str(tmp_path / "a"), "--no-progress"]) == 0
    half = write_cfg(tmp_path, dict(STYLE, train=dict(STYLE["train"], steps=3)), "half")
    assert main(["train", half, "--runs", str(tmp_path / "b"), "--no-progress"]) == 0
    assert main(["train", "--resume", str(tmp_path / "b" / "style"), "--train.steps", "6", "--no-progress"]) == 0
    ta, ma = load_checkpoint(tmp_path / "a" / "style" / "checkpoint.safetensors")
    tb, mb = load_checkpoint(tmp_path / "b" / "style" / "checkpoint.safetensors")
    assert ta.keys() == tb.keys()
    for prefix in ("model.generator.", "model.discriminator.", "ema.generator.", "ema.discriminator.",
                   "opt.generator.", "opt.discriminator.", "rng."):
        assert any(k.startswith(prefix) for k in ta), prefix
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, msg=k)
    assert ma["optimizers"] == mb["optimizers"] and ma["step"] == mb["step"] == 6


def test_sample_interpolate_eval_through_the_cli(runs, tmp_path, capsys):
    sd = str(runs["style"])
    code, out, err = run(["sample", sd, "--n", "6", "--truncation", "0.7", "--out", str(tmp_path / "a.npz")], capsys)
    assert code == 0, err
    a = np.load(tmp_path / "a.npz")["samples"]
    assert a.shape == (6, 1, 28, 28) and np.abs(a).max() <= 1
    # seed s -> sample i uses seed s + i (latent, then StyleGAN's noise maps), whatever n
    run(["sample", sd, "--n", "2", "--seed", "3", "--truncation", "0.7", "--out", str(tmp_path / "b.npz")], capsys)
    np.testing.assert_allclose(np.load(tmp_path / "b.npz")["samples"], a[3:5], rtol=0, atol=1e-6)
    for space in ("z", "w"):
        png = tmp_path / f"strip_{space}.png"
        code, out, err = run(["interpolate", sd, "--n", "4", "--space", space, "--out", str(png)], capsys)
        assert code == 0, err
        assert json.loads(out)["space"] == space and png.stat().st_size > 0
    code, out, err = run(["eval", sd, "--n", "32", "--n-real", "64"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert np.isfinite(res["fid"]) and res["family"] == "gan"
    code, out, err = run(["eval", str(runs["toy"]), "--n", "200"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["sliced_w2"] > 0 and res["num_modes"] == 8 and 0 <= res["modes"] <= 8 and len(res["mode_counts"]) == 8


def test_interpolation_ends_are_the_seeds_samples(runs):
    """In z, the path's ends map to exactly the images sample() draws for the two seeds (no noise)."""
    r = open_run(runs["toy"])
    fam = r.family
    z = fam.latents(r.modules, [3, 8], "z")
    ends = fam.generate_from(r.modules, z, "z")
    torch.testing.assert_close(ends[0], fam.sample(r.modules, 1, seed=3)[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ends[1], fam.sample(r.modules, 1, seed=8)[0], rtol=0, atol=1e-6)


def test_conditional_gan(runs, tmp_path, capsys):
    cd = str(runs["cond"])
    code, out, err = run(["sample", cd, "--n", "4", "--class", "1", "7", "--out", str(tmp_path / "c.npz")], capsys)
    assert code == 0, err
    code, out, err = run(["interpolate", cd, "--n", "3", "--class", "2", "--out", str(tmp_path / "c.png")], capsys)
    assert code == 0, err
    code, _, err = run(["interpolate", cd, "--n", "3"], capsys)
    assert code == 2 and "--class" in err


@pytest.mark.parametrize("args, says", [
    (["sample", "{style}", "--sampler", "euler"], "--sampler does not apply to gan runs"),
    (["sample", "{style}", "--cfg", "2", "--n", "2"], "--cfg does not apply to gan runs"),
    (["eval", "{style}", "--n", "4", "--sampler", "heun"], "--sampler does not apply to gan runs"),
    (["interpolate", "{style}", "--sampler", "heun"], "--sampler does not apply to gan runs"),
    (["interpolate", "{toy}", "--space", "w"], "--space 'w'"),
    (["eval", "{toy}", "--nll"], "gan runs cannot nll"),
    (["sample", "{toy}", "--truncation", "1.5"], "--truncation must be in [0, 1]"),
])
def test_bad_requests_are_one_line_exit_2(runs, capsys, args, says):
    args = [a.format(**{k: str(v) for k, v in runs.items()}) for a in args]
    code, out, err = run(args, capsys)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_config_errors_name_the_field():
    pts = (2,)
    base = {"family": "gan", "generator": "mlp", "discriminator": "mlp"}
    cases = [({"optim_g": {"momentum": 0.9}}, "model.optim_g.momentum"),
             ({"optim_d": {"lr": -1.0}}, "model.optim_d"),
             ({"loss": "wasserstein"}, "model.loss"),
             ({"n_critic": 0}, "model.n_critic"),
             ({"generator": "dcgan"}, "model.generator"),
             ({"style_mixing": 0.5}, "model.style_mixing"),
             ({"generator_options": {"z_dim": 3}}, "model.z_dim")]
    for extra, says in cases:
        with pytest.raises(ConfigError, match=says.replace(".", r"\.")):
            make_family({**base, **extra}, pts)


def test_non_finite_game_stops_naming_the_step_and_keeps_a_good_checkpoint(tmp_path, capsys, monkeypatch):
    """A generator that produces NaN from step 3 on ends training with one line naming a step; the
    checkpoint left in the folder is from before it and finite."""
    import re

    from scorelab.families.gan import GANFamily
    from scorelab.nets.gan import MLPGenerator

    state = {"step": 0}
    step, forward = GANFamily.training_step, MLPGenerator.forward

    def tracking(self, modules, batch, ctx):
        state["step"] = ctx.step
        return step(self, modules, batch, ctx)

    def failing(self, z, y=None):
        x = forward(self, z, y)
        return x * float("nan") if state["step"] >= 3 else x

    monkeypatch.setattr(GANFamily, "training_step", tracking)
    monkeypatch.setattr(MLPGenerator, "forward", failing)
    cfg = copy.deepcopy(TOY)
    cfg["model"].update(n_critic=1, monitor_every=0)
    cfg["train"].update(steps=12, ckpt_every=2)
    code, out, err = run(["train", write_cfg(tmp_path, cfg, "nan"), "--runs", str(tmp_path), "--no-progress"], capsys)
    last = err.strip().splitlines()[-1]
    # the trainer's own message and exit code (2 for an error, or its own code for a stopped run)
    assert code != 0 and last.startswith("scorelab train:") and "nan" in last, err
    named = int(re.search(r"step (\d+)", last).group(1))
    assert named >= 3
    tensors, meta = load_checkpoint(tmp_path / "toy" / "checkpoint.safetensors")
    assert 2 <= meta["step"] <= named
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith(("model.", "ema.", "opt.")))
