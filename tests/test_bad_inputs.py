"""Bad input, table-driven: every case must exit 2 with ONE stderr line naming the problem, no
traceback, and leave every file of every existing run byte for byte as it was (and create no run).

The cases cover the config (file and overrides), the command-line options of every verb, run
folders, checkpoints (damaged copies of a finished run: wrong shapes, dtypes, NaN weights, corrupt
random-generator states and metadata, a pickle in place of safetensors) and datasets (npz files
of the wrong kind or shape, images the net cannot take). Checkpoints are safetensors: the pickle
baits below must be refused without being unpickled (a pickle that ran would create a file).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from scorelab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {
    "name": "base",
    "seed": 1,
    "data": {"name": "moons", "options": {"n": 128}},
    "model": {"family": "diffusion", "path": "rf", "prediction": "velocity", "net": "mlp",
              "net_options": {"width": 16, "depth": 1}, "sampler": "euler", "sampling_steps": 2},
    "train": {"steps": 4, "batch_size": 32, "warmup": 1, "log_every": 2, "ckpt_every": 2, "sample_every": 0,
              "ema_decay": 0.9, "precision": "fp32", "device": "cpu", "threads": 1},
}
IMG_NET = {"net": "unet", "net_options": {"base_channels": 8, "channel_mult": [1], "attention_levels": [], "groups": 4,
                                          "mid_attention": False, "patch_size": 2}}


def _hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


class Ctx:
    """Paths and helpers for one case: ``base`` (a finished run, shared), ``tmp`` (this case's),
    ``runs`` (where new runs would go: must stay empty), ``protected`` (run folders to hash)."""

    def __init__(self, base: Path, tmp: Path):
        self.base, self.tmp = base, tmp
        self.runs = tmp / "runs"
        self.protected = [base]

    def cfg(self, d: dict | None = None, text: str | None = None, name: str = "c.yaml") -> str:
        p = self.tmp / name
        p.write_text(text if text is not None else yaml.safe_dump(d))
        return str(p)

    def train(self, *over: str, cfg: dict | None = None) -> list[str]:
        return ["train", self.cfg(cfg or BASE), "--runs", str(self.runs), "--no-progress", *over]

    def image_cfg(self, images: np.ndarray, model: dict | None = None, **npz) -> dict:
        path = self.tmp / "d.npz"
        np.savez(path, images=images, **npz)
        return {**BASE, "name": "img", "data": {"name": "npz", "options": {"path": str(path)}},
                "model": {**BASE["model"], **(model or IMG_NET)}, "train": {**BASE["train"], "batch_size": 4}}

    def copy(self) -> Path:
        d = self.tmp / "copy"
        shutil.copytree(self.base, d)
        self.protected.append(d)
        return d

    def damaged(self, fn) -> str:
        """A copy of the base run whose checkpoint is rewritten by ``fn(tensors, meta) -> (tensors, meta)``."""
        d = self.tmp / "damaged"
        shutil.copytree(self.base, d)
        ck = d / "checkpoint.safetensors"
        from safetensors import safe_open

        with safe_open(str(ck), framework="pt") as f:
            meta = json.loads(f.metadata()["scorelab"])
        tensors, meta = fn(load_file(str(ck)), meta)
        save_file(tensors, str(ck), metadata={"scorelab": json.dumps(meta)})
        self.protected.append(d)
        return str(d)


def _first(tensors, prefix):
    return next(k for k in sorted(tensors) if k.startswith(prefix))


def _set(key_prefix, make):
    def fn(t, m):
        k = _first(t, key_prefix)
        t[k] = make(t[k])
        return t, m
    return fn


def _meta(**kw):
    def fn(t, m):
        m.update(kw)
        return t, m
    return fn


def _drop(prefix):
    def fn(t, m):
        del t[_first(t, prefix)]
        return t, m
    return fn


def _pickle_checkpoint(ctx):
    d = ctx.copy()
    bait = ctx.tmp / "PWNED"
    import pickle

    class Bait:
        def __reduce__(self):
            return (open, (str(bait), "w"))

    (d / "checkpoint.safetensors").write_bytes(pickle.dumps({"step": 1, "x": Bait()}))
    ctx.protected[-1] = d
    ctx.bait = bait
    return str(d)


def _pickle_bytes(ctx) -> bytes:
    import pickle

    class Bait:
        def __reduce__(self):
            return (open, (str(ctx.tmp / "PWNED"), "w"))

    return pickle.dumps({"x": Bait()})


def _idx_pickles(ctx) -> list[str]:
    root = ctx.tmp / "mnist"
    root.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (root / name).write_bytes(_pickle_bytes(ctx))
    return ctx.train(cfg={**BASE, "data": {"name": "mnist", "options": {"root": str(root)}}, "model": {**BASE["model"], **IMG_NET}})


def _npz_pickle(ctx) -> list[str]:
    p = ctx.tmp / "d.npz"
    p.write_bytes(_pickle_bytes(ctx))
    return ctx.train(cfg={**BASE, "data": {"name": "npz", "options": {"path": str(p)}}, "model": {**BASE["model"], **IMG_NET}})


def _torch_save_checkpoint(ctx):
    d = ctx.copy()
    torch.save({"model": {"w": torch.zeros(2)}, "step": 3}, d / "checkpoint.safetensors")
    return str(d)


def _yaml_tag_config(ctx):
    bait = ctx.tmp / "PWNED"
    ctx.bait = bait
    return ctx.train(cfg=None)[:1] + [ctx.cfg(text=f"name: !!python/object/apply:os.system ['touch {bait}']\n")] + \
        ["--runs", str(ctx.runs), "--no-progress"]


def _edit_config(text_fn):
    def build(ctx):
        d = ctx.copy()
        p = d / "config.yaml"
        p.write_text(text_fn(p.read_text()))
        ctx.protected[-1] = d
        return ["train", "--resume", str(d), "--no-progress"]
    return build


def _folder_data(ctx, sizes):
    from PIL import Image

    root = ctx.tmp / "imgs"
    root.mkdir()
    for i, s in enumerate(sizes):
        Image.fromarray(np.zeros((s, s), np.uint8)).save(root / f"{i}.png")
    cfg = {**BASE, "name": "fold", "data": {"name": "folder", "options": {"root": str(root)}},
           "model": {**BASE["model"], **IMG_NET}, "train": {**BASE["train"], "batch_size": 2}}
    return ctx.train(cfg=cfg)


def R(ctx) -> str:  # the finished run (one letter: it reads as "the run" in the table)
    return str(ctx.base)

# (id, argv builder, a substring the one stderr line must contain)
CASES = [
    # --- config files -----------------------------------------------------------------
    ("empty config file", lambda c: ["train", c.cfg(text=""), "--runs", str(c.runs)], "is empty"),
    ("config is a list", lambda c: ["train", c.cfg(text="- 1\n- 2\n"), "--runs", str(c.runs)], "must hold a mapping"),
    ("invalid yaml", lambda c: ["train", c.cfg(text="train: {steps: [1,\n"), "--runs", str(c.runs)], "not valid YAML"),
    ("binary config", lambda c: ["train", _binary(c), "--runs", str(c.runs)], "not a text"),
    ("missing config", lambda c: ["train", str(c.tmp / "nope.yaml"), "--runs", str(c.runs)], "does not exist"),
    ("unknown preset", lambda c: ["train", "no-such-preset", "--runs", str(c.runs)], "neither a file nor a preset"),
    ("yaml python tag", _yaml_tag_config, "YAML tag !!python/object/apply:os.system is not allowed"),
    ("unknown top-level key", lambda c: c.train("--trian.steps", "3"), "unknown top-level key 'trian'"),
    ("unknown train key", lambda c: c.train("--train.stepz", "3"), "unknown key train.stepz"),
    ("steps not int", lambda c: c.train("--train.steps", "many"), "train.steps must be int"),
    ("steps 0", lambda c: c.train("--train.steps", "0"), "train.steps must be >= 1"),
    ("batch 0", lambda c: c.train("--train.batch_size", "0"), "train.batch_size must be >= 1"),
    ("batch > data", lambda c: c.train("--train.batch_size", "1000"), "larger than the dataset"),
    ("lr 0", lambda c: c.train("--train.lr", "0"), "train.lr must be > 0"),
    ("lr negative", lambda c: c.train("--train.lr", "-1e-3"), "train.lr must be > 0"),
    ("lr nan", lambda c: c.train("--train.lr", ".nan"), "train.lr must be a finite number"),
    ("lr word", lambda c: c.train("--train.lr", "fast"), "train.lr must be float"),
    ("max_minutes -1", lambda c: c.train("--train.max_minutes", "-1"), "train.max_minutes must be >= 0"),
    ("ckpt_every -5", lambda c: c.train("--train.ckpt_every", "-5"), "train.ckpt_every must be >= 0"),
    ("sample_every -1", lambda c: c.train("--train.sample_every", "-1"), "train.sample_every must be >= 0"),
    ("grad_clip -1", lambda c: c.train("--train.grad_clip", "-1"), "train.grad_clip must be >= 0"),
    ("log_every 0", lambda c: c.train("--train.log_every", "0"), "train.log_every must be >= 1"),
    ("warmup -3", lambda c: c.train("--train.warmup", "-3"), "train.warmup must be >= 0"),
    ("ema_decay 1", lambda c: c.train("--train.ema_decay", "1.0"), "train.ema_decay must be in [0, 1)"),
    ("precision fp16", lambda c: c.train("--train.precision", "fp16"), "train.precision must be fp32, bf16 or auto"),
    ("schedule exp", lambda c: c.train("--train.schedule", "exp"), "train.schedule must be"),
    ("betas one", lambda c: c.train("--train.betas", "[0.9]"), "train.betas must be two numbers"),
    ("betas 1.5", lambda c: c.train("--train.betas", "[0.9, 1.5]"), "train.betas must be two numbers"),
    ("device tpu", lambda c: c.train("--train.device", "tpu"), "train.device"),
    ("device cuda", lambda c: c.train("--train.device", "cuda:3"), "train.device"),
    ("threads -1", lambda c: c.train("--train.threads", "-1"), "train.threads must be >= 0"),
    ("weight_decay -0.1", lambda c: c.train("--train.weight_decay", "-0.1"), "train.weight_decay must be >= 0"),
    ("min_lr_ratio 2", lambda c: c.train("--train.min_lr_ratio", "2"), "train.min_lr_ratio must be in [0, 1]"),
    ("nonfinite_skips -1", lambda c: c.train("--train.nonfinite_skips", "-1"), "train.nonfinite_skips must be >= 0"),
    ("patience 0", lambda c: c.train("--train.divergence_patience", "0"), "train.divergence_patience must be >= 1"),
    ("detect_anomaly word", lambda c: c.train("--train.detect_anomaly", "maybe"), "train.detect_anomaly must be bool"),
    ("seed word", lambda c: c.train("--seed", "x"), "seed must be an integer"),
    ("seed float", lambda c: c.train("--seed", "1.5"), "seed must be an integer"),
    ("seed negative", lambda c: c.train("--seed", "-1"), "seed must be in"),
    ("name empty", lambda c: c.train("--name="), "name must not be empty"),
    ("name slash", lambda c: c.train("--name", "a/b"), "name must be a plain folder name"),
    ("name hidden", lambda c: c.train("--name", ".x"), "name must be a plain folder name"),
    ("resolved override", lambda c: c.train("--resolved.precision", "bf16"), "'resolved' is written by the trainer"),
    ("model not mapping", lambda c: c.train("--model", "diffusion"), "model must be a mapping"),
    ("family unknown", lambda c: c.train("--model.family", "nope"), "model.family 'nope' is unknown"),
    ("path unknown", lambda c: c.train("--model.path", "warp"), "model.path 'warp' is unknown"),
    ("path_options T -5", lambda c: c.train("--model.path", "ddpm", "--model.prediction", "eps",
                                             "--model.path_options", "{T: -5}"), "model:"),
    ("path_options bogus", lambda c: c.train("--model.path_options", "{bogus: 1}"), "bogus"),
    ("prediction unknown", lambda c: c.train("--model.prediction", "magic"), "model.prediction 'magic' is unknown"),
    ("sampler unknown", lambda c: c.train("--model.sampler", "magic"), "model.sampler 'magic' is unknown"),
    ("sampler_options bogus", lambda c: c.train("--model.sampler_options", "{bogus: 1}"), "model.sampler_options.bogus"),
    ("grid unknown", lambda c: c.train("--model.grid", "weird"), "model.grid 'weird' is unknown"),
    ("grid_options bogus", lambda c: c.train("--model.grid", "karras", "--model.grid_options", "{rh: 7}"),
     "model.grid_options.rh"),
    ("sampling_steps 0", lambda c: c.train("--model.sampling_steps", "0"), "model.sampling_steps must be >= 1"),
    ("label_dropout 1.5", lambda c: c.train("--model.label_dropout", "1.5"), "model.label_dropout must be in [0, 1)"),
    ("net unknown", lambda c: c.train("--model.net", "transformer9"), "model.net 'transformer9' is unknown"),
    ("net width -3", lambda c: c.train("--model.net_options.width", "-3"), "width"),
    ("net option bogus", lambda c: c.train("--model.net_options.bogus", "1"), "bogus"),
    ("weighting unknown", lambda c: c.train("--model.weighting", "exotic"), "model.weighting 'exotic' is unknown"),
    ("model key unknown", lambda c: c.train("--model.colour", "red"), "unknown key model.colour"),
    ("mlp on images", lambda c: c.train(cfg={**BASE, "data": {"name": "digits"}}), "net 'mlp' needs flat data"),
    # --- data -----------------------------------------------------------------------------
    ("data unknown", lambda c: c.train("--data.name", "nope"), "unknown dataset 'nope'"),
    ("data n word", lambda c: c.train("--data.options.n", "many"), "data.options.n must be int"),
    ("data n 0", lambda c: c.train("--data.options.n", "0"), "data.options.n must be >= 1"),
    ("data n -5", lambda c: c.train("--data.options.n", "-5"), "data.options.n must be >= 1"),
    ("data option bogus", lambda c: c.train("--data.options.colour", "red"), "takes no option"),
    ("data options not mapping", lambda c: c.train("--data.options", "[1]"), "data.options must be"),
    ("holdout 1.5", lambda c: c.train("--data.holdout", "1.5"), "data.holdout must be in (0, 1)"),
    ("conditional without labels", lambda c: c.train("--data.name", "swissroll", "--data.class_conditional", "true"),
     "has no labels"),
    ("npz missing", lambda c: c.train(cfg={**c.image_cfg(np.zeros((8, 8, 8), np.uint8)),
                                           "data": {"name": "npz", "options": {"path": str(c.tmp / "none.npz")}}}),
     "npz file not found"),
    ("npz is npy", lambda c: c.train(cfg={**c.image_cfg(np.zeros((8, 8, 8), np.uint8)),
                                          "data": {"name": "npz", "options": {"path": _npy(c)}}}), "not a readable npz"),
    ("npz path is folder", lambda c: c.train(cfg={**c.image_cfg(np.zeros((8, 8, 8), np.uint8)),
                                                  "data": {"name": "npz", "options": {"path": str(c.tmp)}}}),
     "npz file not found"),
    ("npz without path", lambda c: c.train(cfg={**BASE, "data": {"name": "npz"}}), "needs data.options.path"),
    ("npz 2-d array", lambda c: c.train(cfg=c.image_cfg(np.zeros((4, 5), np.uint8))), "images must be"),
    ("npz float images", lambda c: c.train(cfg=c.image_cfg(np.zeros((8, 8, 8), np.float32))), "must be uint8"),
    ("npz object array", lambda c: c.train(cfg=c.image_cfg(np.array([None] * 8, dtype=object))), "not a readable npz"),
    ("npz bad labels", lambda c: c.train(cfg=c.image_cfg(np.zeros((8, 8, 8), np.uint8), labels=np.zeros(3))), "labels"),
    ("27x27 with patch 2", lambda c: c.train(cfg=c.image_cfg(np.zeros((8, 27, 27), np.uint8))),
     "--model.net_options.patch_size 1"),
    ("folder mixed sizes", lambda c: _folder_data(c, [8, 8, 9]), "differs"),
    ("folder missing", lambda c: c.train(cfg={**BASE, "data": {"name": "folder", "options": {"root": str(c.tmp / "x")}}}),
     "image folder not found"),
    # --- command line ------------------------------------------------------------------------
    ("no verb", lambda c: [], "required"),
    ("unknown verb", lambda c: ["bogus"], "invalid choice"),
    ("sample without run", lambda c: ["sample"], "required"),
    ("sample n word", lambda c: ["sample", R(c), "--n", "abc"], "invalid int value"),
    ("interpolate bad mode", lambda c: ["interpolate", R(c), "--mode", "zigzag"], "invalid choice"),
    ("override without value", lambda c: c.train("--train.steps"), "needs a value"),
    ("stray argument", lambda c: c.train("extra"), "unexpected argument"),
    ("bad override key", lambda c: c.train("--train..steps", "3"), "bad override key"),
    ("config and resume", lambda c: ["train", c.cfg(BASE), "--resume", R(c)], "not both"),
    ("runs is a file", lambda c: ["train", c.cfg(BASE), "--runs", _file(c), "--no-progress"], "is a file"),
    ("run exists", lambda c: ["train", c.cfg(BASE), "--runs", str(c.base.parent), "--no-progress"], "already exists"),
    # --- resume: run folders and checkpoints -----------------------------------------------------
    ("resume missing", lambda c: ["train", "--resume", str(c.tmp / "none")], "not a run folder"),
    ("resume a file", lambda c: ["train", "--resume", _file(c)], "is a file"),
    ("resume no config", lambda c: ["train", "--resume", str(c.tmp)], "no config.yaml"),
    ("resume truncated", lambda c: ["train", "--resume", _truncated(c)], "corrupt"),
    ("resume pickle", lambda c: ["train", "--resume", _pickle_checkpoint(c)], "corrupt or not a scorelab checkpoint"),
    ("resume torch.save zip", lambda c: ["train", "--resume", _torch_save_checkpoint(c)], "corrupt or not a scorelab"),
    ("classifier pickle", lambda c: ["sample", R(c), "--class", "0", "--classifier", _pickle_checkpoint(c)],
     "corrupt or not a scorelab checkpoint"),
    ("eval pickle", lambda c: ["eval", _pickle_checkpoint(c)], "corrupt or not a scorelab checkpoint"),
    ("interpolate pickle", lambda c: ["interpolate", _pickle_checkpoint(c)], "corrupt or not a scorelab checkpoint"),
    ("idx files are pickles", _idx_pickles, "not an idx file"),
    ("npz is a pickle", _npz_pickle, "not a readable npz"),
    ("resume moment shape", lambda c: ["train", "--resume", c.damaged(_set("opt.main.0.exp_avg", lambda v: torch.zeros(3, 3)))],
     "has shape (3, 3)"),
    ("resume moment dtype", lambda c: ["train", "--resume", c.damaged(_set("opt.main.0.exp_avg_sq", lambda v: v.double()))],
     "dtype torch.float64"),
    ("resume moment nan", lambda c: ["train", "--resume", c.damaged(_set("opt.main.0.exp_avg", lambda v: v * float("nan")))],
     "non-finite"),
    ("resume adam step nan", lambda c: ["train", "--resume", c.damaged(_set("opt.main.0.step", lambda v: v * float("nan")))],
     "not a finite count"),
    ("resume extra moment", lambda c: ["train", "--resume", c.damaged(lambda t, m: ({**t, "opt.main.99.exp_avg": torch.zeros(1)}, m))],
     "names no parameter"),
    ("resume nan weights", lambda c: ["train", "--resume", c.damaged(_set("model.net.", lambda v: v * float("nan")))],
     "non-finite"),
    ("resume int32 weights", lambda c: ["train", "--resume", c.damaged(_set("model.net.", lambda v: v.to(torch.int32)))],
     "dtype torch.int32"),
    ("resume missing ema", lambda c: ["train", "--resume", c.damaged(_drop("ema."))], "lacks tensor ema."),
    ("resume extra weight", lambda c: ["train", "--resume", c.damaged(lambda t, m: ({**t, "model.net.extra": torch.zeros(1)}, m))],
     "which the model lacks"),
    ("resume rng truncated", lambda c: ["train", "--resume", c.damaged(_set("rng.torch", lambda v: v[:100].clone()))],
     "random-generator state rng.torch is corrupt"),
    ("resume rng garbage", lambda c: ["train", "--resume", c.damaged(_set("rng.noise", lambda v: torch.full_like(v, 255)))],
     "random-generator state rng.noise is corrupt"),
    ("resume step abc", lambda c: ["train", "--resume", c.damaged(_meta(step="abc"))], "step 'abc' is not a non-negative"),
    ("resume step -3", lambda c: ["train", "--resume", c.damaged(_meta(step=-3))], "not a non-negative integer"),
    ("resume no metadata", lambda c: ["train", "--resume", c.damaged(lambda t, m: (t, {"note": 1}))], "no scorelab metadata"),
    ("resume other family", lambda c: ["train", "--resume", c.damaged(_meta(family="vdm"))], "is a vdm run"),
    ("resume other data shape", lambda c: ["train", "--resume", c.damaged(_meta(data={**_base_meta(c)["data"], "shape": [3]}))],
     "do not match"),
    ("resume bad optimizer meta", lambda c: ["train", "--resume", c.damaged(_meta(optimizers={"main": {"param_groups": 3}}))],
     "no param_groups"),
    ("resume steps below", lambda c: ["train", "--resume", R(c), "--train.steps", "2"], "nothing to train"),
    ("resume finished", lambda c: ["train", "--resume", R(c)], "nothing to train"),
    ("resume wider net", lambda c: ["train", "--resume", R(c), "--train.steps", "8", "--model.net_options.width", "32"],
     "do not match"),
    ("resume rename", lambda c: ["train", "--resume", R(c), "--train.steps", "8", "--name", "other"], "--name cannot change"),
    ("resume config empty", _edit_config(lambda t: ""), "is empty"),
    ("resume config broken", _edit_config(lambda t: t + "\n  : [\n"), "not valid YAML"),
    ("resume config bad value", _edit_config(lambda t: t.replace("steps: 4", "steps: -4")), "train.steps must be >= 1"),
    # --- sample ----------------------------------------------------------------------------
    ("sample missing run", lambda c: ["sample", str(c.tmp / "none")], "does not exist"),
    ("sample run is file", lambda c: ["sample", _file(c)], "is not a folder"),
    ("sample n 0", lambda c: ["sample", R(c), "--n", "0"], "--n must be >= 1"),
    ("sample n -3", lambda c: ["sample", R(c), "--n", "-3"], "--n must be >= 1"),
    ("sample steps 0", lambda c: ["sample", R(c), "--steps", "0"], "--steps must be >= 1"),
    ("sample steps -1", lambda c: ["sample", R(c), "--steps", "-1"], "--steps must be >= 1"),
    ("sample out folder missing", lambda c: ["sample", R(c), "--out", str(c.tmp / "no" / "s.png")], "does not exist"),
    ("sample out is folder", lambda c: ["sample", R(c), "--out", _folder(c, "x.png")], "is a folder"),
    ("sample out suffix", lambda c: ["sample", R(c), "--out", str(c.tmp / "s.txt")], "must end in"),
    ("sample sampler unknown", lambda c: ["sample", R(c), "--sampler", "magic"], "unknown sampler 'magic'"),
    ("sample grid unknown", lambda c: ["sample", R(c), "--grid", "weird"], "unknown time grid 'weird'"),
    ("sample class unconditional", lambda c: ["sample", R(c), "--class", "1"], "--class needs a class-conditional run"),
    ("sample cfg unconditional", lambda c: ["sample", R(c), "--cfg", "2"], "guidance needs"),
    ("sample temperature on diffusion", lambda c: ["sample", R(c), "--temperature", "0.5"], "does not apply to diffusion runs"),
    ("sample step size 0", lambda c: ["sample", R(c), "--step-size", "0"], "--step-size must be > 0"),
    ("sample cfg nan", lambda c: ["sample", R(c), "--cfg", "nan"], "--cfg must be a finite number"),
    ("sample classifier not a run", lambda c: ["sample", R(c), "--classifier", str(c.tmp)], "no config.yaml"),
    ("sample nan weights", lambda c: ["sample", c.damaged(_set("ema.net.", lambda v: v * float("nan")))],
     "holds non-finite values: the run diverged"),
    ("sample inf weights", lambda c: ["sample", c.damaged(_set("ema.net.", lambda v: v * float("inf")))], "non-finite"),
    ("sample int32 weights", lambda c: ["sample", c.damaged(_set("ema.net.", lambda v: v.to(torch.int32)))], "dtype torch.int32"),
    ("sample pickle", lambda c: ["sample", _pickle_checkpoint(c)], "corrupt or not a scorelab checkpoint"),
    ("sample no checkpoint", lambda c: ["sample", _no_checkpoint(c)], "does not exist"),
    ("sample huge weights", lambda c: ["sample", c.damaged(_set("ema.net.", lambda v: v * 1e38))], "non-finite"),
    # --- eval ---------------------------------------------------------------------------
    ("eval n-real -5", lambda c: ["eval", R(c), "--n-real", "-5"], "--n-real must be >= 0, got -5"),
    ("eval n 0", lambda c: ["eval", R(c), "--n", "0"], "--n must be >= 1, got 0"),
    ("eval nll-t 0", lambda c: ["eval", R(c), "--nll", "--nll-t", "0"], "--nll-t must be >= 1"),
    ("eval nll-k 0", lambda c: ["eval", R(c), "--nll", "--nll-k", "0"], "--nll-k must be >= 1"),
    ("eval nll-k on diffusion", lambda c: ["eval", R(c), "--nll", "--nll-k", "4"], "--nll-k does not apply"),
    ("eval nll method bogus", lambda c: ["eval", R(c), "--nll", "--nll-method", "bogus"], "--nll-method 'bogus'"),
    ("eval nll-batch 0", lambda c: ["eval", R(c), "--nll", "--nll-batch", "0"], "--nll-batch must be >= 1"),
    ("eval nll-n -1", lambda c: ["eval", R(c), "--nll", "--nll-n", "-1"], "--nll-n must be >= 0"),
    ("eval steps 0", lambda c: ["eval", R(c), "--steps", "0"], "--steps must be >= 1"),
    ("eval nan weights", lambda c: ["eval", c.damaged(_set("ema.net.", lambda v: v * float("nan")))], "non-finite"),
    ("eval stray argument", lambda c: ["eval", R(c), "--bogus"], "unexpected argument"),
    # --- interpolate / traverse ----------------------------------------------------------------
    ("interpolate n 1", lambda c: ["interpolate", R(c), "--n", "1"], "--n must be >= 2"),
    ("interpolate steps 0", lambda c: ["interpolate", R(c), "--steps", "0"], "--steps must be >= 1"),
    ("interpolate space w", lambda c: ["interpolate", R(c), "--space", "w"], "--space 'w'"),
    ("interpolate out missing", lambda c: ["interpolate", R(c), "--out", str(c.tmp / "no" / "i.png")], "does not exist"),
    ("traverse diffusion", lambda c: ["traverse", R(c)], "diffusion runs cannot traverse"),
    ("traverse range 0", lambda c: ["traverse", R(c), "--range", "0"], "--range"),
]


def _binary(c):
    p = c.tmp / "bin.yaml"
    p.write_bytes(b"\xff\xfe\x00\x81binary")
    return str(p)


def _folder(c, name):
    (c.tmp / name).mkdir()
    return str(c.tmp / name)


def _npy(c):
    p = c.tmp / "imgs.npy"
    np.save(p, np.zeros((8, 8, 8), np.uint8))
    return str(p)


def _file(c):
    p = c.tmp / "a-file"
    p.write_text("x")
    return str(p)


def _truncated(c):
    d = c.copy()
    ck = d / "checkpoint.safetensors"
    ck.write_bytes(ck.read_bytes()[:200])
    return str(d)


def _no_checkpoint(c):
    d = c.copy()
    (d / "checkpoint.safetensors").unlink()
    return str(d)


def _base_meta(c):
    from safetensors import safe_open

    with safe_open(str(c.base / "checkpoint.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["scorelab"])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    p = root / "base.yaml"
    p.write_text(yaml.safe_dump(BASE))
    assert main(["train", str(p), "--runs", str(root / "runs"), "--no-progress"]) == 0
    return root / "runs" / "base"


def test_the_table_is_large_enough():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_line_and_damages_nothing(case, base_run, tmp_path, capsys):
    _, build, expected = case
    capsys.readouterr()
    ctx = Ctx(base_run, tmp_path)
    argv = build(ctx)
    before = [_hashes(d) for d in ctx.protected]
    listing = sorted(p.name for p in tmp_path.iterdir())
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (argv, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and expected in lines[0], lines[0]
    assert [_hashes(d) for d in ctx.protected] == before  # every file of every existing run unchanged
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no run (or half-made folder) created
    assert not ctx.runs.exists() or not any(ctx.runs.iterdir())
    assert not (tmp_path / "PWNED").exists()  # no pickle / YAML tag executed
