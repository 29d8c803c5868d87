"""The command line's guidance, interpolation, likelihood and classifier paths on tiny runs."""

import copy
import json

import numpy as np
import pytest
import torch
import yaml

from scorelab.cli import main, preset_names, resolve_config
from scorelab.train.config import RunConfig

IMG = {
    "name": "img",
    "seed": 0,
    "data": {"name": "fmnist-embedded", "class_conditional": True},
    "model": {"family": "diffusion", "path": "rf", "prediction": "velocity", "net": "unet", "label_dropout": 0.2,
              "net_options": {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                              "mid_attention": False, "groups": 4, "head_dim": 8},
              "sampler": "euler", "sampling_steps": 3},
    "train": {"steps": 2, "batch_size": 8, "log_every": 1, "sample_every": 0, "ckpt_every": 0, "precision": "fp32"},
}
CLF = {
    "name": "clf",
    "seed": 0,
    "data": {"name": "fmnist-embedded"},
    "model": {"family": "noisy_classifier", "path": "rf", "net_options": {"channels": [8, 8], "groups": 4}},
    "train": {"steps": 2, "batch_size": 8, "log_every": 1, "sample_every": 1, "ckpt_every": 0, "precision": "fp32"},
}


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for cfg in (IMG, CLF, dict(copy.deepcopy(IMG), name="img_ddpm", model={**IMG["model"], "path": "ddpm", "path_options": {"T": 50},
                                                                       "prediction": "eps"})):
        p = base / f"{cfg['name']}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        assert main(["train", str(p), "--runs", str(base), "--no-progress"]) == 0
        out[cfg["name"]] = str(base / cfg["name"])
    return out


def test_every_preset_builds():
    for name in preset_names():
        cfg = RunConfig.from_dict(resolve_config(name))
        assert cfg.name and cfg.model.get("family", "diffusion")


def test_cfg_and_classifier_guidance_from_the_cli(runs, tmp_path, capsys):
    base = ["sample", runs["img"], "--n", "4", "--steps", "2", "--class", "3"]
    code, out, err = run(base + ["--out", str(tmp_path / "a.npz")], capsys)
    assert code == 0, err
    plain = np.load(tmp_path / "a.npz")["samples"]
    code, out, err = run(base + ["--cfg", "0", "--out", str(tmp_path / "b.npz")], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "b.npz")["samples"], plain)  # w = 0 is the conditional model
    code, out, err = run(base + ["--cfg", "3", "--out", str(tmp_path / "c.npz")], capsys)
    assert code == 0, err
    guided = np.load(tmp_path / "c.npz")["samples"]
    # after two steps the label embedding barely matters, but w = 3 must change the result
    assert np.isfinite(guided).all() and np.abs(guided - plain).max() > 0
    code, out, err = run(base + ["--classifier", runs["clf"], "--classifier-scale", "2", "--out", str(tmp_path / "d.npz")], capsys)
    assert code == 0, err
    assert np.abs(np.load(tmp_path / "d.npz")["samples"] - plain).max() > 0
    # bad input: guidance without a class, a classifier on another path, sampling from a classifier
    code, _, err = run(["sample", runs["img"], "--n", "2", "--cfg", "2"], capsys)
    assert code == 2 and "--class" in err
    code, _, err = run(["sample", runs["img_ddpm"], "--n", "2", "--class", "1", "--classifier", runs["clf"]], capsys)
    assert code == 2 and "same x_t" in err
    code, _, err = run(["sample", runs["clf"], "--n", "2"], capsys)
    assert code == 2 and "draws no samples" in err


def test_classifier_run_evaluates_accuracy(runs, capsys):
    code, out, err = run(["eval", runs["clf"], "--n", "64"], capsys)
    assert code == 0, err
    acc = json.loads(out)["accuracy"]
    assert len(acc) == 5 and all(0 <= a <= 1 for a in acc.values())


def test_interpolation_strip(runs, tmp_path, capsys):
    out_png = tmp_path / "strip.png"
    code, out, err = run(["interpolate", runs["img"], "--n", "5", "--steps", "2", "--class", "2", "--out", str(out_png)], capsys)
    assert code == 0, err
    assert json.loads(out)["modes"] == ["linear", "spherical"] and out_png.stat().st_size > 0
    code, _, err = run(["interpolate", runs["img"], "--sampler", "euler_maruyama"], capsys)
    assert code == 2 and "deterministic" in err


@pytest.mark.parametrize("name", ["img", "img_ddpm"])
def test_eval_nll_reports_bits_per_dim(runs, name, capsys):
    code, out, err = run(["eval", runs[name], "--nll", "--nll-n", "4", "--nll-n-slow", "1", "--nll-t", "2", "--nll-batch", "2"],
                         capsys)
    assert code == 0, err
    res = json.loads(out)
    for m in ("elbo", "pf_ode"):
        r = res[m]
        assert r["units"] == "bits/dim" and r["seconds"] >= 0
        # an untrained model is a poor one, but any density on [-1, 1] pixels is a finite, positive bound
        assert 0 < r["mean"] < 100, r
    assert {"prior", "diffusion", "reconstruction"} <= set(res["elbo"])
    assert abs(res["elbo"]["prior"] + res["elbo"]["diffusion"] + res["elbo"]["reconstruction"] - res["elbo"]["mean"]) < 1e-3


def test_preset_sampler_options_stay_with_their_sampler():
    """An NCSN-style config's annealed-Langevin options must not leak into another sampler."""
    from scorelab.families import make_family

    fam = make_family({"path": "ve", "path_options": {"sigma_max": 5.0}, "prediction": "eps", "net": "mlp",
                       "net_options": {"width": 16, "depth": 1}, "sampler": "annealed_langevin", "sampling_steps": 3,
                       "sampler_options": {"n_steps_each": 2}}, (2,))
    mods = fam.modules()
    a = fam.sample(mods, 8, seed=0)
    b = fam.sample(mods, 8, seed=0, sampler="dpmpp_2m", steps=3, grid="karras")
    assert a.shape == b.shape == (8, 2) and torch.isfinite(a).all() and torch.isfinite(b).all()


def test_eval_of_a_guided_conditional_run_is_class_balanced_or_the_given_classes(runs, capsys, monkeypatch):
    """`eval --cfg W` on a class-conditional run samples every class evenly (it needed a --class
    that eval did not have); `--class` splits the samples between the given classes."""
    import scorelab.families.base as base

    seen = []
    real = base.Family.sample

    def spy(self, modules, n, *, seed=0, y=None, **options):
        seen.append((None if y is None else y.tolist(), options.get("cfg")))
        return real(self, modules, n, seed=seed, y=y, **options)

    monkeypatch.setattr(base.Family, "sample", spy)
    code, out, err = run(["eval", runs["img"], "--n", "20", "--steps", "1", "--cfg", "2"], capsys)
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["labels"] == "class-balanced over 10 classes" and res["cfg"] == 2
    ys = [v for y, w in seen for v in y]
    assert ys == [i % 10 for i in range(20)] and {w for _, w in seen} == {2.0}
    seen.clear()
    code, out, err = run(["eval", runs["img"], "--n", "6", "--steps", "1", "--class", "Trouser", "7"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["labels"] == [1, 7]
    assert [v for y, _ in seen for v in y] == [1, 1, 1, 7, 7, 7]
