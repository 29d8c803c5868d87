"""The command line and the trainer end to end on tiny configs: train, sample, eval, resume, bad input."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from scorelab.cli import main
from scorelab.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from scorelab.train.config import RunConfig
from scorelab.train.trainer import Trainer

TOY = {
    "name": "toy",
    "seed": 3,
    "data": {"name": "moons", "options": {"n": 256}},
    "model": {"family": "diffusion", "path": "rf", "prediction": "velocity", "time_sampler": "logit_normal",
              "net": "mlp", "net_options": {"width": 32, "depth": 2, "dropout": 0.1},
              "sampler": "euler", "sampling_steps": 4},
    "train": {"steps": 6, "batch_size": 32, "lr": 1e-3, "warmup": 2, "ema_decay": 0.9, "log_every": 2,
              "sample_every": 0, "ckpt_every": 0, "precision": "fp32"},
}

IMG = {
    "name": "img",
    "seed": 0,
    "data": {"name": "fmnist-embedded", "class_conditional": True},
    "model": {"family": "diffusion", "path": "ddpm", "path_options": {"T": 100}, "prediction": "eps",
              "net": "unet", "label_dropout": 0.2,
              "net_options": {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                              "mid_attention": False, "groups": 4, "head_dim": 8},
              "sampler": "ddim", "sampling_steps": 3},
    "train": {"steps": 2, "batch_size": 8, "log_every": 1, "sample_every": 0, "ckpt_every": 0, "precision": "fp32"},
}


def write_cfg(tmp_path, cfg, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_train_sample_eval_on_toy(tmp_path, capsys):
    cfg = write_cfg(tmp_path, TOY)
    runs = tmp_path / "runs"
    code, out, err = run(["train", cfg, "--runs", str(runs), "--no-progress"], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["step"] == 6 and summary["status"] == "done"
    rd = runs / "toy"
    for f in ["config.yaml", "checkpoint.safetensors", "metrics.jsonl", "loss.png", "samples.png"]:
        assert (rd / f).is_file(), f
    recs = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4, 6] and all(np.isfinite(r["loss"]) for r in recs)
    code, out, err = run(["sample", str(rd), "--n", "50", "--steps", "3", "--sampler", "heun", "--out", str(tmp_path / "s.npz")], capsys)
    assert code == 0, err
    s = np.load(tmp_path / "s.npz")["samples"]
    assert s.shape == (50, 2) and np.isfinite(s).all()
    # the same seed gives the same first samples whatever n
    run(["sample", str(rd), "--n", "5", "--steps", "3", "--sampler", "heun", "--out", str(tmp_path / "t.npz")], capsys)
    np.testing.assert_array_equal(np.load(tmp_path / "t.npz")["samples"], s[:5])
    code, out, err = run(["eval", str(rd), "--n", "100"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["sliced_w2"] > 0 and res["sampling_seconds"] >= 0
    assert json.loads((rd / "eval.json").read_text())["sliced_w2"] == res["sliced_w2"]


def test_image_run_class_conditional(tmp_path, capsys):
    cfg = write_cfg(tmp_path, IMG)
    code, out, err = run(["train", cfg, "--runs", str(tmp_path), "--no-progress"], capsys)
    assert code == 0, err
    rd = tmp_path / "img"
    code, out, err = run(["sample", str(rd), "--n", "6", "--class", "1", "7", "--out", str(tmp_path / "g.png")], capsys)
    assert code == 0, err
    from PIL import Image

    im = Image.open(tmp_path / "g.png")
    assert im.size[0] > 28 * 2 and im.size[1] > 28 * 2  # 2 rows of 3, padded and upscaled
    code, out, err = run(["eval", str(rd), "--n", "16", "--n-real", "64"], capsys)
    assert code == 0, err
    res = json.loads(out)
    for k in ("fid", "kid", "precision", "recall"):
        assert k in res and np.isfinite(res[k])


def _weights(path):
    t, _ = load_checkpoint(path)
    return {k: v for k, v in t.items() if k.startswith(("model.", "ema.", "opt."))}


def test_resume_gives_identical_weights(tmp_path, capsys):
    """N steps + resume + N steps == 2N steps (weights, EMA and optimizer moments, bit for bit)."""
    cfg = dict(TOY, train=dict(TOY["train"], steps=10))
    c = write_cfg(tmp_path, cfg)
    assert main(["train", c, "--runs", str(tmp_path / "a"), "--no-progress"]) == 0
    half = dict(cfg, train=dict(cfg["train"], steps=5))
    assert main(["train", write_cfg(tmp_path, half, "half.yaml"), "--runs", str(tmp_path / "b"), "--no-progress"]) == 0
    assert main(["train", "--resume", str(tmp_path / "b" / "toy"), "--train.steps", "10", "--no-progress"]) == 0
    capsys.readouterr()
    wa = _weights(tmp_path / "a" / "toy" / "checkpoint.safetensors")
    wb = _weights(tmp_path / "b" / "toy" / "checkpoint.safetensors")
    assert wa.keys() == wb.keys() and any(k.startswith("opt.") for k in wa)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)
    # and the uninterrupted run's metrics continue in the same file
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "toy" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 5, 6, 8, 10]


def test_checkpoint_round_trip_and_atomicity(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.tensor([True, False])}
    p = tmp_path / "x.safetensors"
    save_checkpoint(p, t, {"step": 7, "note": "hi"})
    t2, meta = load_checkpoint(p)
    assert meta == {"step": 7, "note": "hi"}
    for k in t:
        torch.testing.assert_close(t2[k], t[k], rtol=0, atol=0)
    assert [f.name for f in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary left behind
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(p)


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    from scorelab.cli import build, load_data

    cfg = RunConfig.from_dict(dict(TOY, train=dict(TOY["train"], steps=50)))
    ds = load_data(cfg)
    fam = build(cfg, ds)
    tr = Trainer(cfg, tmp_path / "r", fam, ds, progress=False)
    real_step = fam.training_step

    def step(mods, batch, ctx):
        if ctx.step == 3:
            raise KeyboardInterrupt
        return real_step(mods, batch, ctx)

    fam.training_step = step
    summary = tr.fit()
    assert summary == {"step": 3, "status": "interrupted", "elapsed": summary["elapsed"], "steps_this_run": 3}
    _, meta = load_checkpoint(tmp_path / "r" / "checkpoint.safetensors")
    assert meta["step"] == 3


# --------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing damaged
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        (("train.stepz", 5), "unknown key train.stepz"),
        (("train.steps", "many"), "train.steps must be int"),
        (("model.path", "warp"), "model.path 'warp' is unknown"),
        (("model.sampler", "magic"), "model.sampler 'magic' is unknown"),
        (("model.net_options.width", -3), "width"),
        (("data.name", "nope"), "nope"),
        (("seed", "x"), "seed must be an integer"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, override, message):
    from scorelab.train.config import apply_overrides

    cfg = apply_overrides(TOY, [override])
    code, out, err = run(["train", write_cfg(tmp_path, cfg), "--runs", str(tmp_path / "runs"), "--no-progress"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_bad_inputs_exit_2(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("train: {steps: [1,\n")
    code, _, err = run(["train", str(tmp_path / "broken.yaml")], capsys)
    assert code == 2 and "not valid YAML" in err
    code, _, err = run(["train", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run(["sample", str(tmp_path / "no-run")], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run(["train", "no-such-preset"], capsys)
    assert code == 2 and "neither a file nor a preset" in err
    # a finished run: unknown sampler, corrupt checkpoint, refusing to overwrite
    c = write_cfg(tmp_path, TOY)
    assert main(["train", c, "--runs", str(tmp_path / "runs"), "--no-progress"]) == 0
    rd = tmp_path / "runs" / "toy"
    capsys.readouterr()
    code, _, err = run(["sample", str(rd), "--sampler", "magic"], capsys)
    assert code == 2 and "unknown sampler 'magic'" in err
    before = {p.name: p.read_bytes() for p in rd.iterdir() if p.is_file()}
    code, _, err = run(["train", c, "--runs", str(tmp_path / "runs"), "--no-progress"], capsys)
    assert code == 2 and "already exists" in err
    assert {p.name: p.read_bytes() for p in rd.iterdir() if p.is_file()} == before
    ck = rd / "checkpoint.safetensors"
    ck.write_bytes(ck.read_bytes()[:100])
    code, _, err = run(["sample", str(rd)], capsys)
    assert code == 2 and "corrupt" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["train", "--resume", str(rd), "--no-progress"], capsys)
    assert code == 2 and "corrupt" in err


def test_wrong_image_shape(tmp_path, capsys):
    # images that are not (N, H, W[, C]) uint8
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 5), dtype=np.uint8))
    cfg = dict(IMG, data={"name": "npz", "options": {"path": str(tmp_path / "bad.npz")}})
    code, _, err = run(["train", write_cfg(tmp_path, cfg), "--runs", str(tmp_path / "r"), "--no-progress"], capsys)
    assert code == 2 and "bad.npz" in err and len(err.strip().splitlines()) == 1
    # a run trained on 28x28 cannot be resumed on 8x8 digits
    code, _, err = run(["train", write_cfg(tmp_path, IMG), "--runs", str(tmp_path / "r"), "--no-progress"], capsys)
    assert code == 0, err
    code, _, err = run(["train", "--resume", str(tmp_path / "r" / "img"), "--data.name", "digits",
                        "--data.class_conditional", "false", "--no-progress"], capsys)
    assert code == 2 and "do not match" in err, err
