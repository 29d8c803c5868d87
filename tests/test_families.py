"""The family contract: a family written in this file (two optimizers, a frozen module used in
``prepare``) trains, checkpoints, resumes bit-exactly and samples through the unchanged CLI; and a
table test that every registered family's declared capabilities are exactly what the CLI lets a
user ask for."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from scorelab.cli import main
from scorelab.families import FAMILIES
from scorelab.families.base import Capabilities, Family, OptimizerSpec, register
from scorelab.random import randn
from scorelab.train.checkpoint import load_checkpoint


# --------------------------------------------------------------------------------------
# A family defined here: a diagonal Gaussian fitted in a frozen rotated frame
# --------------------------------------------------------------------------------------
@dataclass
class TwoOptConfig:
    family: str = "two_opt"  # registry name
    lr_mean: float = 0.05  # learning rate of the mean's optimizer
    lr_scale: float = 0.01  # learning rate of the log-scale's optimizer
    jitter: float = 0.01  # noise added to each batch from the run's stream (exercises RNG checkpoints)


class Vector(nn.Module):
    def __init__(self, dim: int, value: float = 0.0):
        super().__init__()
        self.v = nn.Parameter(torch.full((dim,), value))


@register
class TwoOptFamily(Family):
    """x ~ R^T N(mu, diag(s^2)): ``mu`` and ``log s`` by two optimizers, R a frozen rotation."""

    name = "two_opt"
    Config = TwoOptConfig
    declared = Capabilities(generate=True, sample_options=("temperature",))

    def build(self):
        d = self.data.shape[0]
        self.mean, self.log_scale = Vector(d), Vector(d)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(3)))
        self.rotation = nn.Linear(d, d, bias=False)
        self.rotation.weight.data.copy_(q)

    def modules(self):
        return {"mean": self.mean, "log_scale": self.log_scale}

    def frozen(self):
        return {"rotation": self.rotation}

    def optimizers(self, train):
        return {"m": self.optimizer_from_train(train, ("mean",), lr=self.cfg.lr_mean),
                "s": self.optimizer_from_train(train, ("log_scale",), lr=self.cfg.lr_scale)}

    def prepare(self, batch, modules):
        out = super().prepare(batch, modules)
        with torch.no_grad():
            out["x"] = modules["rotation"](out["x"])  # the frozen module is on the device, in eval mode
        return out

    def training_step(self, modules, batch, ctx):
        x = batch["x"] + self.cfg.jitter * randn(batch["x"].shape, generator=ctx.generator)
        mu, ls = modules["mean"].v, modules["log_scale"].v
        nll_m = (0.5 * ((x - mu) / ls.detach().exp()) ** 2).sum(1).mean()
        gm = ctx.optimize(nll_m, "m")
        nll_s = (0.5 * ((x - mu.detach()) / ls.exp()) ** 2 + ls).sum(1).mean()
        gs = ctx.optimize(nll_s, "s")
        return {"nll": nll_s.detach(), "grad_mean": gm, "grad_scale": gs}  # no "loss" key: any metrics

    def sample_batch(self, modules, generators, y, temperature: float = 1.0):
        z = randn((len(generators), self.data.shape[0]), generator=generators)
        x = modules["mean"].v + temperature * modules["log_scale"].v.exp() * z
        return x @ self.rotation.weight  # back to the data frame: R^T applied to rows


def _write(tmp_path: Path, name: str, d: dict) -> str:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def _cfg(steps: int, **train) -> dict:
    return {"name": "two", "seed": 3, "data": {"name": "8gaussians", "options": {"n": 512}},
            "model": {"family": "two_opt"},
            "train": {"steps": steps, "batch_size": 64, "warmup": 2, "log_every": 5, "ckpt_every": 0,
                      "sample_every": 0, "ema_decay": 0.9, "device": "cpu", "threads": 1, "precision": "fp32", **train}}


def test_a_family_from_a_test_file_trains_resumes_bit_exactly_and_samples(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["train", _write(tmp_path, "straight", _cfg(20)), "--runs", str(runs / "a"), "--no-progress"]) == 0
    assert main(["train", _write(tmp_path, "half", _cfg(10)), "--runs", str(runs / "b"), "--no-progress"]) == 0
    assert main(["train", "--resume", str(runs / "b" / "two"), "--train.steps", "20", "--no-progress"]) == 0
    ta, ma = load_checkpoint(runs / "a" / "two" / "checkpoint.safetensors")
    tb, mb = load_checkpoint(runs / "b" / "two" / "checkpoint.safetensors")
    assert ma["step"] == mb["step"] == 20 and set(ta) == set(tb)
    assert any(k.startswith("opt.m.") for k in ta) and any(k.startswith("opt.s.") for k in ta)
    for k in ta:  # weights, EMA, both optimizers' moments, RNG states
        assert torch.equal(ta[k], tb[k]), k
    assert not any(k.startswith(("model.rotation", "ema.rotation")) for k in ta)  # frozen: never checkpointed
    # each optimizer ran at its own learning rate
    lrs = {n: m["param_groups"][0]["lr"] for n, m in ma["optimizers"].items()}
    assert lrs == {"m": pytest.approx(0.05), "s": pytest.approx(0.01)}
    # the fitted model is the data's mean in the rotated frame (8 Gaussians: mean 0)
    capsys.readouterr()
    out = tmp_path / "s.npz"
    assert main(["sample", str(runs / "a" / "two"), "--n", "8", "--temperature", "0.5", "--out", str(out)]) == 0
    import numpy as np

    x = np.load(out)["samples"]
    assert x.shape == (8, 2) and np.isfinite(x).all()
    assert json.loads(capsys.readouterr().out)["temperature"] == 0.5
    # a flag the family does not declare: one line, exit 2
    assert main(["sample", str(runs / "a" / "two"), "--sampler", "heun"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sampler does not apply to two_opt runs" in err[0] and "--temperature" in err[0]
    # the metrics file has the family's own keys, and the last step is logged
    rows = [json.loads(r) for r in (runs / "a" / "two" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 20 and {"nll", "grad_mean", "grad_scale"} <= set(rows[-1])


# --------------------------------------------------------------------------------------
# The table: declared capabilities == what the CLI accepts
# --------------------------------------------------------------------------------------
# a tiny config for every registered family (data config, model config); a new family adds its row
TINY = {
    "diffusion": ({"name": "8gaussians", "options": {"n": 256}},
                  {"net": "mlp", "net_options": {"width": 16, "depth": 1}, "sampler": "euler", "sampling_steps": 2}),
    "vdm": ({"name": "8gaussians", "options": {"n": 256}},
            {"net": "mlp", "net_options": {"width": 16, "depth": 1}, "schedule_hidden": 8, "sampler": "euler", "sampling_steps": 2}),
    "score_matching": ({"name": "moons", "options": {"n": 256}}, {"net_options": {"width": 16, "depth": 1}, "sampling_steps": 3}),
    "noisy_classifier": ({"name": "8gaussians", "options": {"n": 256}}, {"path": "vp", "net_options": {"width": 16, "depth": 1}}),
    "two_opt": ({"name": "8gaussians", "options": {"n": 256}}, {}),
    "gan": ({"name": "8gaussians", "options": {"n": 256}}, {"generator": "mlp", "discriminator": "mlp"}),
    "vae": ({"name": "digits"}, {"latent_dim": 8, "net_options": {"channels": [8], "hidden": 16}}),
    "pixelcnn": ({"name": "digits"}, {"net_options": {"channels": 4, "layers": 1, "kernel_size": 3}}),
    # students: "@diffusion" is the folder of the tiny diffusion run above (trained first)
    "progressive": ({"name": "8gaussians", "options": {"n": 256}}, {"teacher": "@diffusion", "start_steps": 4, "final_steps": 2}),
    "consistency": ({"name": "8gaussians", "options": {"n": 256}}, {"teacher": "@diffusion", "n_steps": 4, "solver": "ddim"}),
    "consistency_training": ({"name": "8gaussians", "options": {"n": 256}},
                             {"net": "mlp", "net_options": {"width": 16, "depth": 1}, "n_start": 2}),
    # latent diffusion on the tiny autoencoder above (8x8 digits -> 4x4x4 latents)
    "autoencoder": ({"name": "digits"}, {"net_options": {"factor": 2, "base_channels": 8, "groups": 4}, "disc_start": 1,
                                         "disc_options": {"channels": 8, "layers": 1, "groups": 4}}),
    "latent_diffusion": ({"name": "digits"}, {"autoencoder": "@autoencoder", "net_options": {
        "base_channels": 8, "channel_mult": [1], "attention_levels": [], "mid_attention": False, "groups": 4, "patch_size": 1},
        "sampler": "euler", "sampling_steps": 2}),
}

# a value for every family-specific flag of `scorelab sample` that needs no other context
FLAG_VALUES = {"sampler": None, "steps": "2", "grid": "uniform", "step_size": "0.001", "init_std": "1.0",
               "temperature": "1.0", "truncation": "0.7"}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("table")
    missing = sorted(set(FAMILIES) - set(TINY))
    assert not missing, f"add a tiny config for family {missing} to TINY in tests/test_families.py"
    out = {}
    for name, (data, model) in TINY.items():
        model = {k: str(out[v[1:]]) if isinstance(v, str) and v.startswith("@") else v for k, v in model.items()}
        cfg = {"name": name, "data": data, "model": {"family": name, **model},
               "train": {"steps": 2, "batch_size": 32, "log_every": 1, "ckpt_every": 0, "sample_every": 0,
                         "device": "cpu", "threads": 1, "precision": "fp32"}}
        assert main(["train", _write(root, name, cfg), "--runs", str(root / "runs"), "--no-progress"]) == 0, name
        out[name] = root / "runs" / name
    return out


@pytest.mark.parametrize("name", sorted(TINY))
def test_declared_capabilities_are_what_the_cli_accepts(tiny_runs, name, capsys, tmp_path):
    from scorelab.runs import open_run

    run = str(tiny_runs[name])
    fam = open_run(run).family
    caps = fam.capabilities()
    out = str(tmp_path / "o.png")
    for flag, value in FLAG_VALUES.items():
        if value is None:  # the family's own sampler name, when it has one
            value = getattr(fam.cfg, "sampler", "euler")
        code = main(["sample", run, "--n", "2", f"--{flag.replace('_', '-')}", value, "--out", out])
        err = capsys.readouterr().err
        want = 0 if (caps.generate and flag in caps.sample_options) else 2
        assert code == want, (name, flag, err)
        if code == 2:
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for verb, ok in (("interpolate", bool(caps.interpolate)), ("traverse", caps.traverse)):
        code = main([verb, run, "--n", "3", "--out", out] + (["--steps", "2"] if verb == "interpolate" and caps.denoiser else []))
        err = capsys.readouterr().err
        assert code == (0 if ok else 2), (name, verb, err)
        if not ok:
            assert f"{name} runs cannot {verb}" in err and len(err.strip().splitlines()) == 1
    code = main(["eval", run, "--nll", "--nll-n", "2", "--nll-t", "1"] if "n_t" in caps.nll_options else
                ["eval", run, "--nll", "--nll-n", "2"])
    err = capsys.readouterr().err
    assert code == (0 if caps.nll else 2), (name, err)


def test_energy_model_samples_with_its_own_langevin_sampler(tiny_runs, capsys, tmp_path):
    """The issue's example: `sample --sampler langevin` on an energy model was refused."""
    code = main(["sample", str(tiny_runs["score_matching"]), "--sampler", "langevin", "--steps", "3", "--n", "4",
                 "--out", str(tmp_path / "e.png")])
    assert code == 0, capsys.readouterr().err


def test_ddpm_with_100_steps_feeds_the_net_tau_in_unit_interval():
    from scorelab.paths import make_path
    from scorelab.targets import Denoiser

    seen = []

    def net(x, tau):
        seen.append(tau.clone())
        return torch.zeros_like(x)

    path = make_path("ddpm", T=100)
    den = Denoiser(net, path, "eps")
    t = torch.arange(0, 100, dtype=torch.float64)
    den.predict(torch.zeros(100, 2, dtype=torch.float64), t)
    tau = seen[0]
    assert tau.min() == 0 and 0.98 < tau.max() < 1 and torch.all(tau[1:] > tau[:-1])


def test_eval_on_npz_uses_its_held_out_split_and_names_the_features(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(60, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 3, size=60)
    np.savez(tmp_path / "d.npz", images=imgs, labels=labels)
    cfg = {"name": "npzrun", "data": {"name": "npz", "options": {"path": str(tmp_path / "d.npz")}, "holdout": 0.2},
           "model": {"net": "unet", "net_options": {"base_channels": 8, "channel_mult": [1], "attention_levels": [],
                                                   "groups": 4, "patch_size": 1, "mid_attention": False},
                     "sampler": "euler", "sampling_steps": 2},
           "train": {"steps": 2, "batch_size": 16, "ckpt_every": 0, "sample_every": 0, "device": "cpu", "threads": 1,
                     "precision": "fp32"}}
    assert main(["train", _write(tmp_path, "npz", cfg), "--runs", str(tmp_path / "runs"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "runs" / "npzrun"), "--n", "16"]) == 0  # conftest: a private cache
    res = json.loads(capsys.readouterr().out)
    assert res["compared_with"] == "12 images of the held-out 20% of npz (seeded, never trained on)"
    assert "LeNet trained on this data's training split (48 images" in res["features"]
    assert math.isfinite(res["fid"])
    # the held-out rows are disjoint from the training rows
    from scorelab.data import load_split

    tr = load_split("npz", "train", holdout=0.2, path=str(tmp_path / "d.npz"))
    te = load_split("npz", "test", holdout=0.2, path=str(tmp_path / "d.npz"))
    assert len(tr) + len(te) == 60
    both = {bytes(a) for a in tr.images.numpy()} & {bytes(b) for b in te.images.numpy()}
    assert not both


def test_optimizer_spec_schedules():
    spec = OptimizerSpec(modules=("a",), lr=1.0, warmup=10, schedule="cosine", min_lr_ratio=0.1)
    assert spec.lr_at(0, 110) == pytest.approx(0.1)  # warm-up: (step + 1) / warmup
    assert spec.lr_at(9, 110) == pytest.approx(1.0)
    assert spec.lr_at(60, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert spec.lr_at(110, 110) == pytest.approx(0.1)
    lin = OptimizerSpec(modules=("a",), lr=2.0, warmup=0, schedule="linear")
    assert lin.lr_at(50, 100) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="schedule"):
        OptimizerSpec(modules=("a",), schedule="step")
    with pytest.raises(ValueError, match="at least one module"):
        OptimizerSpec(modules=())


def test_sampler_auto_is_the_paths_default_and_equal_to_naming_it(tiny_runs, tmp_path):
    """A diffusion config that names no sampler resolves to samplers.default_sampler (recorded in
    the run's config); ``--sampler auto`` draws exactly what naming unipc on logsnr_x0 draws."""
    from scorelab.families.diffusion import DiffusionConfig, resolve_sampler
    from scorelab.paths import make_path
    from scorelab.runs import open_run
    from scorelab.samplers import default_sampler

    cfg = DiffusionConfig(path="vp")
    assert (cfg.sampler, cfg.grid) == ("auto", "auto")
    resolve_sampler(cfg, make_path("vp"))
    d = default_sampler(make_path("vp"))
    assert (cfg.sampler, cfg.grid) == (d["sampler"], d["grid"]) == ("unipc", "logsnr_x0")

    run = open_run(str(tiny_runs["diffusion"]))
    fam, mods = run.family, run.modules
    auto = fam.sample(mods, 6, seed=3, sampler="auto", grid="auto", steps=4)
    named = fam.sample(mods, 6, seed=3, sampler="unipc", grid="logsnr_x0", steps=4)
    assert torch.equal(auto, named)
    for grid in ("auto", None):
        a = fam._sampler_args(mods, "auto", None, grid, None, None)
        assert (a["sampler"], a["grid"], a["steps"]) == ("unipc", "logsnr_x0", fam.cfg.sampling_steps)
    ddim = DiffusionConfig(path="vp", sampler="ddim")  # grid auto: the default grid, as samplers.sample(grid=None)
    resolve_sampler(ddim, make_path("vp"))
    assert (ddim.sampler, ddim.grid) == ("ddim", "logsnr_x0")
    assert fam._sampler_args(mods, None, None, None, None, None)["sampler"] == fam.cfg.sampler == "euler"  # the run's own
