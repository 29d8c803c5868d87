"""``scorelab serve``: the JSON API on tiny runs (starlette's TestClient), its safety rules, and the
page driven in a real headless Chromium (skipped, with the reason, where no browser is installed).

The tiny runs are trained through ``scorelab.cli.main`` once per module: a class-conditional
rectified-flow UNet on the embedded Fashion-MNIST subset (``img``), a 2-D rectified flow (``toy``),
an energy model sampled by Langevin dynamics (``sm``)."""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx (the serve extra)")

from starlette.testclient import TestClient

from scorelab.cli import main
from scorelab.families import FAMILIES
from scorelab.serve import Limits, create_app
from scorelab.serve.app import Jobs
from scorelab.serve.store import ApiError, RunStore

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = {"batch_size": 8, "log_every": 1, "sample_every": 0, "ckpt_every": 0, "precision": "fp32", "threads": 1}
IMG = {"name": "img", "seed": 0, "data": {"name": "fmnist-embedded", "class_conditional": True},
       "model": {"family": "diffusion", "path": "rf", "prediction": "velocity", "net": "unet", "label_dropout": 0.2,
                 "net_options": {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                                 "mid_attention": False, "groups": 4, "head_dim": 8},
                 "sampler": "euler", "sampling_steps": 3},
       "train": {**TRAIN, "steps": 2}}
TOY = {"name": "toy", "seed": 3, "data": {"name": "moons", "options": {"n": 256}},
       "model": {"family": "diffusion", "path": "rf", "net": "mlp", "net_options": {"width": 16, "depth": 1},
                 "sampler": "euler", "sampling_steps": 3},
       "train": {**TRAIN, "steps": 4, "batch_size": 32}}
SM = {"name": "sm", "data": {"name": "moons", "options": {"n": 256}},
      "model": {"family": "score_matching", "net_options": {"width": 16, "depth": 1}, "sampling_steps": 3},
      "train": {**TRAIN, "steps": 2, "batch_size": 32}}
VAE = {"name": "vae", "data": {"name": "digits"},
       "model": {"family": "vae", "latent_dim": 4, "net_options": {"channels": [8], "hidden": 16}},
       "train": {**TRAIN, "steps": 2, "batch_size": 32}}
BASE = "http://127.0.0.1"  # the TestClient's Host: the server answers loopback names only


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """DIR with the three tiny runs, a nested copy, eval files, a broken config and a staging folder."""
    root = tmp_path_factory.mktemp("serve")
    d = root / "runs"
    for cfg in (IMG, TOY, SM) + ((VAE,) if "vae" in FAMILIES else ()):
        p = root / f"{cfg['name']}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        assert main(["train", str(p), "--runs", str(d), "--no-progress"]) == 0, cfg["name"]
    (d / "toy" / "eval.json").write_text(json.dumps({"run": "x", "family": "diffusion", "step": 4, "n": 100,
                                                     "sliced_w2": 0.25, "features": "data space"}))
    (d / "toy" / "eval_nll.json").write_text(json.dumps({"step": 4, "n": 8, "elbo": {"units": "nats", "n": 8, "mean": 2.5,
                                                                                      "stderr": 0.1, "exact": False}}))
    shutil.copytree(d / "toy", d / "group" / "toy2")
    shutil.copytree(d / "toy", d / "live")  # the browser test writes to it as a trainer would
    (d / "broken").mkdir()
    (d / "broken" / "config.yaml").write_text("model: [unclosed\n")
    (d / ".toy.123.abcd.tmp").mkdir()  # a trainer's staging folder: never listed
    (d / ".toy.123.abcd.tmp" / "config.yaml").write_text(yaml.safe_dump(TOY))
    return d


@pytest.fixture(scope="module")
def client(runs):
    app = create_app(runs, limits=Limits(n_images=16, n_points=512, steps=50), frame_interval=0.0)
    with TestClient(app, base_url=BASE) as c:
        yield c


def png_array(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


# --------------------------------------------------------------------------------------
# The run list and what each run offers
# --------------------------------------------------------------------------------------
def test_run_list_shows_family_dataset_steps_status_and_eval_numbers(client):
    r = client.get("/api/runs")
    assert r.status_code == 200
    runs = {x["name"]: x for x in r.json()["runs"]}
    vae = {"vae"} if "vae" in FAMILIES else set()
    assert set(runs) == {"img", "toy", "sm", "group/toy2", "live", "broken"} | vae  # the staging folder is not a run
    assert (runs["img"]["family"], runs["img"]["dataset"], runs["img"]["step"], runs["img"]["steps"]) == \
        ("diffusion", "fmnist-embedded", 2, 2)
    assert runs["sm"]["family"] == "score_matching" and runs["img"]["status"] == "done"
    assert runs["toy"]["eval"]["sliced_w2"] == 0.25 and runs["toy"]["nll"]["elbo"]["mean"] == 2.5
    assert runs["img"]["eval"] == {} and runs["img"]["latest_picture"] == "samples.png"
    assert runs["broken"]["status"] in ("error", "no checkpoint") and "config.yaml" in runs["broken"]["error"]


def test_controls_are_the_options_the_family_declares(client):
    img = client.get("/api/run", params={"run": "img"}).json()
    names = [o["name"] for o in img["options"]]
    assert names == ["sampler", "steps", "grid", "cfg", "classifier", "classifier_scale"]
    opt = {o["name"]: o for o in img["options"]}
    assert opt["sampler"]["default"] == "euler" and "heun" in opt["sampler"]["choices"]
    assert opt["steps"]["default"] == 3 and opt["steps"]["max"] == 50  # the server's --max-steps
    assert [c["name"] for c in img["classes"]][:2] == ["T-shirt/top", "Trouser"]
    assert img["interpolation"]["spaces"] == ["noise"] and not img["capabilities"]["traverse"]
    sm = client.get("/api/run", params={"run": "sm"}).json()
    assert [o["name"] for o in sm["options"]] == ["sampler", "steps", "step_size", "init_std"]
    assert {o["name"]: o for o in sm["options"]}["sampler"]["choices"] == ["langevin"]
    assert sm["classes"] == [] and "interpolation" not in sm


def test_a_vae_offers_temperature_and_draws_traversals(client):
    if "vae" not in FAMILIES:
        pytest.skip("the vae family is not registered in this checkout")
    info = client.get("/api/run", params={"run": "vae"}).json()
    assert [o["name"] for o in info["options"]] == ["temperature"] and info["capabilities"]["traverse"]
    r = client.post("/api/traverse", json={"run": "vae", "dims": [0, 2], "n": 5, "range": 2.5, "scale": 1})
    assert r.status_code == 200, r.text
    c, h, w = info["data"]["shape"]
    assert png_array(r.content).shape[:2] == (2 * (h + 2) + 2, 5 * (w + 2) + 2)  # one row per latent dimension
    assert client.post("/api/sample", json={"run": "vae", "n": 4, "temperature": 0.5}).status_code == 200
    bad = client.post("/api/traverse", json={"run": "vae", "index": 10**6})
    assert bad.status_code == 400 and "'index'" in bad.json()["error"]
    bad = client.post("/api/sample", json={"run": "vae", "n": 4, "steps": 3})
    assert bad.status_code == 400 and "'steps' does not apply to vae runs (they take: temperature)" in bad.json()["error"]


def test_a_gan_offers_truncation_and_no_sampler():
    """The option list is read from the family (no run needed: a GAN built from its config)."""
    from types import SimpleNamespace

    from scorelab.families import make_family
    from scorelab.serve.params import option_specs

    if "gan" not in FAMILIES:
        pytest.skip("the gan family is not registered in this checkout")
    fam = make_family({"family": "gan", "generator": "mlp", "discriminator": "mlp"}, (2,))
    specs = option_specs(SimpleNamespace(family=fam), Limits(), [])
    assert [s["name"] for s in specs] == ["truncation"]
    assert specs[0]["min"] == 0.0 and specs[0]["max"] == 1.0


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------
def test_sample_png_is_the_familys_samples_on_a_grid(client, runs):
    """The served grid is image_grid(family.sample(n, seed, y, options)) upscaled: one row per class."""
    from scorelab.runs import open_run
    from scorelab.viz import image_grid

    body = {"run": "img", "n": 6, "seed": 5, "class": ["Trouser", 7], "steps": 2, "sampler": "dpmpp_2m", "scale": 2}
    r = client.post("/api/sample", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    got = png_array(r.content)
    run = open_run(runs / "img")
    y = torch.tensor([1, 1, 1, 7, 7, 7])
    x = run.family.sample(run.modules, 6, seed=5, y=y, steps=2, sampler="dpmpp_2m")
    want = image_grid(x, nrow=3).repeat(2, 0).repeat(2, 1)
    assert got.shape == want.shape == ((2 * 30 + 2) * 2, (3 * 30 + 2) * 2)
    # the same weights and noise in a separate process-free call: equal up to float rounding of to_uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert r.headers["x-n"] == "6" and r.headers["x-run-step"] == "2"
    again = client.post("/api/sample", json=body)
    assert again.content == r.content  # a seed gives the same picture


def test_points_are_drawn_as_a_scatter_over_the_data(client):
    r = client.post("/api/sample", json={"run": "toy", "n": 300, "steps": 2})
    assert r.status_code == 200
    a = png_array(r.content)
    assert a.shape == (384, 384, 3)
    blue = ((a[..., 0] == 31) & (a[..., 1] == 119) & (a[..., 2] == 180)).sum()
    grey = ((a == 200).all(-1)).sum()
    assert blue > 300 and grey > 100  # samples drawn over the held-out data


def stream_events(client, body) -> list[dict]:
    with client.stream("POST", "/api/sample/stream", json=body) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in s.iter_lines() if line.strip()]


def test_stream_sends_every_x0_prediction_then_the_final_grid(client, runs):
    """Frame i is the grid of the sampler callback's x0 after step i; the stream ends with the samples."""
    from scorelab.runs import open_run
    from scorelab.viz import image_grid

    body = {"run": "img", "n": 4, "steps": 3, "seed": 2, "class": 1}
    ev = stream_events(client, body)
    kinds = [e["event"] for e in ev]
    assert kinds == ["start", "step", "step", "step", "done"], kinds
    steps = [e for e in ev if e["event"] == "step"]
    assert [e["i"] for e in steps] == [0, 1, 2] and all(e["kind"] == "x0" and e["steps"] == 3 for e in steps)
    assert steps[0]["t"] > steps[1]["t"] > steps[2]["t"]  # from noise toward data
    import base64

    frames = [png_array(base64.b64decode(e["image"].split(",", 1)[1])) for e in steps]
    run = open_run(runs / "img")
    x0 = []
    run.family.sample(run.modules, 4, seed=2, y=torch.ones(4, dtype=torch.long), steps=3,
                      callback=lambda info: x0.append(info["x0"].clone()))
    for frame, x in zip(frames, x0, strict=True):
        want = image_grid(x.clamp(-1, 1)).repeat(2, 0).repeat(2, 1)
        assert frame.shape == want.shape and np.abs(frame.astype(int) - want.astype(int)).max() <= 1
    final = base64.b64decode(ev[-1]["image"].split(",", 1)[1])
    assert final == client.post("/api/sample", json=body).content  # the stream ends with /api/sample's grid


def test_energy_model_streams_its_langevin_chain(client):
    ev = stream_events(client, {"run": "sm", "n": 50, "steps": 3, "step_size": 0.01})
    assert [e["event"] for e in ev] == ["start", "step", "step", "step", "done"]
    assert all(e["kind"] == "x" for e in ev if e["event"] == "step")  # Langevin has no x0: its chain is shown


def test_interpolation_strip_has_one_row_per_mode(client):
    r = client.post("/api/interpolate", json={"run": "img", "n": 5, "steps": 2, "class": "Bag", "scale": 1})
    assert r.status_code == 200, r.text
    assert png_array(r.content).shape == (2 * 30 + 2, 5 * 30 + 2) and r.headers["x-modes"] == "linear,spherical"
    r = client.post("/api/interpolate", json={"run": "img", "n": 3, "mode": "linear", "steps": 2, "scale": 1})
    assert png_array(r.content).shape == (30 + 2, 3 * 30 + 2)


# --------------------------------------------------------------------------------------
# Bad input: a JSON error with a clear message and a 4xx; the server keeps serving
# --------------------------------------------------------------------------------------
BAD = [
    ({"run": "nope"}, 404, "no run named 'nope'"),
    ({"run": "../img"}, 403, "refused"),
    ({"run": "/etc"}, 403, "refused"),
    ({"run": ".toy.123.abcd.tmp"}, 403, "hidden"),
    ({"run": 3}, 400, "'run' must be the name of a run"),
    ({"run": "img", "n": 0}, 400, "'n' must be between 1 and 16"),
    ({"run": "img", "n": 17}, 400, "--max-n"),
    ({"run": "toy", "n": 513}, 400, "'n' must be between 1 and 512 for point runs"),
    ({"run": "img", "steps": 51}, 400, "'steps' must be between 1 and 50"),
    ({"run": "img", "steps": "many"}, 400, "'steps' must be an integer"),
    ({"run": "img", "seed": -1}, 400, "'seed' must be between 0"),
    ({"run": "img", "colour": "red"}, 400, "unknown field 'colour'"),
    ({"run": "img", "sampler": "rk45"}, 400, "'sampler' must be one of"),
    ({"run": "sm", "grid": "karras"}, 400, "'grid' does not apply to score_matching runs"),
    ({"run": "sm", "truncation": 0.5}, 400, "'truncation' does not apply to score_matching runs"),
    ({"run": "img", "class": "Sock"}, 400, "class names"[:5]),
    ({"run": "img", "class": 12}, 400, "out of range"),
    ({"run": "toy", "class": 1}, 400, "class-conditional"),
    ({"run": "img", "cfg": 2.0}, 400, "needs the class"),
    ({"run": "img", "cfg": 99.0, "class": 1}, 400, "'cfg' must be <= 50"),
    ({"run": "img", "classifier_scale": 2.0}, 400, "needs a 'classifier'"),
    ({"run": "img", "classifier": "toy", "class": 1}, 400, "not a classifier run"),
    ({"run": "sm", "step_size": 0}, 400, "'step_size' must be > 0"),
    ({"run": "broken"}, 409, "no checkpoint"),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[f"{b.get('run')}-{s}-{i}" for i, (b, s, _) in enumerate(BAD)])
def test_bad_sample_requests_are_json_4xx(client, body, status, words):
    for endpoint in ("/api/sample", "/api/sample/stream"):
        r = client.post(endpoint, json=body)
        assert r.status_code == status, (endpoint, r.text)
        err = r.json()
        assert err["status"] == status and words.lower() in err["error"].lower(), err
        assert "Traceback" not in err["error"] and "\n" not in err["error"]


def test_malformed_requests_and_the_server_keeps_serving(client):
    js = {"content-type": "application/json"}
    cases = [
        (client.post("/api/sample", content=b"{not json", headers=js), 400, "not valid JSON"),
        (client.post("/api/sample", content=b"", headers=js), 400, "empty"),
        (client.post("/api/sample", content=b"[1, 2]", headers=js), 400, "JSON object"),
        (client.post("/api/sample", content=b"NaN", headers=js), 400, "JSON object"),
        (client.post("/api/sample", content=b'{"run": "img", "cfg": NaN, "class": 1}', headers=js),
         400, "finite"),
        (client.post("/api/sample", content=b"run=img", headers={"content-type": "application/x-www-form-urlencoded"}), 415,
         "JSON"),
        (client.post("/api/sample", json={"run": "img", "pad": "x" * 70_000}), 413, "at most"),
        (client.get("/api/run"), 400, "?run=NAME"),
        (client.get("/api/run", params={"run": "nope"}), 404, "no run named"),
        (client.get("/api/metrics", params={"run": "img", "after": "-1"}), 400, "'after'"),
        (client.get("/api/picture", params={"run": "sm/../../x"}), 403, "refused"),
        (client.get("/api/sample"), 405, "not allowed"),
        (client.get("/api/nothing"), 404, "no such endpoint"),
        (client.post("/api/traverse", json={"run": "img"}), 400, "cannot draw latent traversals"),
        (client.post("/api/interpolate", json={"run": "sm"}), 400, "cannot interpolate"),
        (client.post("/api/interpolate", json={"run": "img", "n": 1}), 400, "'n' must be between 2"),
        (client.post("/api/interpolate", json={"run": "img", "seeds": [1]}), 400, "'seeds'"),
        (client.post("/api/interpolate", json={"run": "img", "sampler": "euler_maruyama", "steps": 2}), 400, "deterministic"),
    ]
    for r, status, words in cases:
        assert r.status_code == status, r.text
        assert words.lower() in r.json()["error"].lower(), r.json()
    assert client.get("/api/runs").status_code == 200
    assert client.post("/api/sample", json={"run": "toy", "n": 8, "steps": 2}).status_code == 200


# --------------------------------------------------------------------------------------
# Safety: containment, symlinks, runs being written, loopback names, no unpickling
# --------------------------------------------------------------------------------------
def test_symlinks_out_of_the_runs_directory_are_refused(runs, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(runs / "toy", outside / "toy")
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(runs / "toy", root / "mine")
    (root / "out").symlink_to(outside / "toy", target_is_directory=True)  # a run folder that points out
    (root / "alias").symlink_to(root / "mine", target_is_directory=True)  # a symlink that stays inside
    shutil.copytree(runs / "toy", root / "leaky")
    (root / "leaky" / "checkpoint.safetensors").unlink()
    (root / "leaky" / "checkpoint.safetensors").symlink_to(outside / "toy" / "checkpoint.safetensors")
    app = create_app(root)
    with TestClient(app, base_url=BASE) as c:
        names = {r["name"] for r in c.get("/api/runs").json()["runs"]}
        assert "out" not in names and {"mine", "alias"} <= names
        for name, status in (("out", 403), ("leaky", 403), ("alias", 200), ("mine/../../elsewhere/toy", 403)):
            r = c.post("/api/sample", json={"run": name, "n": 4, "steps": 2})
            assert r.status_code == status, (name, r.text)
        assert "outside the runs directory" in c.get("/api/run", params={"run": "out"}).json()["error"]


def test_a_run_being_written_or_trained(runs, tmp_path):
    import fcntl

    root = tmp_path / "r"
    shutil.copytree(runs / "toy", root / "live")
    (root / "new").mkdir()
    (root / "new" / "config.yaml").write_text(yaml.safe_dump(TOY))  # config written, no checkpoint yet
    store = RunStore(root)
    with pytest.raises(ApiError) as e:
        store.open("new")
    assert e.value.status == 409 and "being written" in e.value.message
    fd = os.open(root / "live" / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the trainer holds while it trains
        status = {s["name"]: s["status"] for s in store.summaries()}
        assert status == {"live": "training", "new": "no checkpoint"} or not Path("/proc/locks").exists()
        assert store.open("live").step == 4  # a run in training serves its newest checkpoint
    finally:
        os.close(fd)
    assert {s["name"]: s["status"] for s in store.summaries()}["live"] == "done"


def test_opened_runs_are_cached_and_reopened_when_the_checkpoint_changes(runs, tmp_path):
    from scorelab.train.checkpoint import load_checkpoint, save_checkpoint

    root = tmp_path / "c"
    shutil.copytree(runs / "toy", root / "toy")
    store = RunStore(root, max_open=1)
    a = store.open("toy")
    assert store.open("toy") is a  # cached
    ckpt = root / "toy" / "checkpoint.safetensors"
    tensors, meta = load_checkpoint(ckpt)
    save_checkpoint(ckpt, {k: v * 0.5 if k.startswith("ema.") else v for k, v in tensors.items()}, {**meta, "step": 5})
    b = store.open("toy")
    assert b is not a and b.step == 5  # the new checkpoint is served
    x_a = a.family.sample(a.modules, 4, steps=2)
    x_b = b.family.sample(b.modules, 4, steps=2)
    assert not torch.equal(x_a, x_b)
    shutil.copytree(runs / "sm", root / "sm")
    store.open("sm")
    assert store.cached() == ["sm"]  # max_open = 1: the least recently used run was closed


def test_only_loopback_names_are_answered(client):
    r = client.get("/api/runs", headers={"host": "evil.example:8000"})
    assert r.status_code == 403 and "not this server" in r.json()["error"]
    r = client.post("/api/sample", json={"run": "toy", "n": 2}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "Origin" in r.json()["error"]
    assert client.post("/api/sample", json={"run": "toy", "n": 2, "steps": 1},
                       headers={"origin": "http://127.0.0.1:8000"}).status_code == 200
    assert client.get("/api/runs", headers={"host": "localhost:1234"}).status_code == 200


def test_nothing_is_unpickled(runs, monkeypatch):
    import pickle

    def refuse(*a, **k):
        raise AssertionError("the server unpickled something")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    app = create_app(runs, frame_interval=0.0)  # a fresh app: every run is opened again
    with TestClient(app, base_url=BASE) as c:
        assert c.get("/api/runs").status_code == 200
        for name in ("img", "toy", "sm"):
            assert c.get("/api/run", params={"run": name}).status_code == 200
        assert c.post("/api/sample", json={"run": "img", "n": 2, "steps": 1}).status_code == 200
        assert stream_events(c, {"run": "toy", "n": 8, "steps": 2})[-1]["event"] == "done"
        assert c.get("/api/metrics", params={"run": "img"}).status_code == 200


# --------------------------------------------------------------------------------------
# Jobs: one at a time per run, the others in line
# --------------------------------------------------------------------------------------
def test_jobs_run_one_at_a_time_per_run_and_the_line_is_bounded():
    async def scenario():
        jobs = Jobs(concurrent=2, queue=1)
        order = []
        rel_a = await jobs.acquire("a")
        waiter = asyncio.ensure_future(jobs.acquire("a"))  # same run: waits
        await asyncio.sleep(0)
        assert not waiter.done() and jobs.waiting == 1 and jobs.ahead("a") == 2
        rel_b = await jobs.acquire("b")  # another run: a second slot is free
        assert jobs.running == 2
        with pytest.raises(ApiError) as e:
            await jobs.acquire("a")  # the line is full
        assert e.value.status == 429
        rel_a()
        rel_a()  # releasing twice is harmless
        rel_a2 = await waiter
        order.append("a2")
        rel_b()
        rel_a2()
        assert jobs.status() == {"running": 0, "waiting": 0, "concurrent": 2, "queue": 1}
        cancelled = Jobs(concurrent=1, queue=4)
        r = await cancelled.acquire("x")
        t = asyncio.ensure_future(cancelled.acquire("x"))
        await asyncio.sleep(0)
        t.cancel()  # a client that leaves the line frees its place
        with pytest.raises(asyncio.CancelledError):
            await t
        r()
        assert cancelled.status()["waiting"] == 0 and cancelled.ahead("x") == 0
        (await cancelled.acquire("x"))()
        return order

    assert asyncio.run(scenario()) == ["a2"]


def test_a_second_job_on_a_run_waits_in_line(client, runs):
    """While a job holds the run, a streamed request says it is queued, then runs when the slot frees."""
    key = (runs / "toy").resolve()
    jobs = client.app.state.jobs
    release = client.portal.call(jobs.acquire, key)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("ev", stream_events(client, {"run": "toy", "n": 8, "steps": 2})))
    t.start()
    deadline = time.monotonic() + 20
    while jobs.waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert jobs.waiting == 1 and t.is_alive()  # it waits for the slot
    client.portal.call(release)
    t.join(30)
    ev = out["ev"]
    assert ev[0] == {"event": "queued", "ahead": 1} and ev[1]["event"] == "start" and ev[-1]["event"] == "done"


# --------------------------------------------------------------------------------------
# The training view
# --------------------------------------------------------------------------------------
def test_metrics_are_read_incrementally_and_the_latest_picture_is_served(client, runs, tmp_path):
    r = client.get("/api/metrics", params={"run": "img"}).json()
    assert [row["step"] for row in r["rows"]] == [1, 2] and math.isfinite(r["rows"][0]["loss"])
    assert r["status"] == "done" and r["latest_picture"] == "samples.png"
    again = client.get("/api/metrics", params={"run": "img", "after": r["next"]}).json()
    assert again["rows"] == [] and again["next"] == r["next"]
    pic = client.get("/api/picture", params={"run": "img"})
    assert pic.status_code == 200 and pic.content == (runs / "img" / "samples.png").read_bytes()

    root = tmp_path / "m"
    shutil.copytree(runs / "toy", root / "toy")
    (root / "toy" / "samples.png").unlink()
    shutil.rmtree(root / "toy" / "samples")
    app = create_app(root)
    with TestClient(app, base_url=BASE) as c:
        m = root / "toy" / "metrics.jsonl"
        first = c.get("/api/metrics", params={"run": "toy"}).json()
        with open(m, "a") as f:
            f.write(json.dumps({"step": 9, "loss": 0.5}) + "\n" + '{"step": 10, "lo')  # a row being written
        more = c.get("/api/metrics", params={"run": "toy", "after": first["next"]}).json()
        assert more["rows"] == [{"step": 9, "loss": 0.5}]  # only complete lines
        m.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")  # a resume truncated the file
        reset = c.get("/api/metrics", params={"run": "toy", "after": more["next"]}).json()
        assert reset["reset"] and reset["rows"] == [{"step": 1, "loss": 1.0}]
        assert c.get("/api/picture", params={"run": "toy"}).status_code == 404
        (root / "toy" / "samples").mkdir()
        shutil.copy(runs / "img" / "samples.png", root / "toy" / "samples" / "step_000100.png")
        assert c.get("/api/picture", params={"run": "toy"}).headers["x-picture"] == "step_000100.png"


# --------------------------------------------------------------------------------------
# The command line and the page in a real browser
# --------------------------------------------------------------------------------------
def test_serve_refuses_bad_command_lines(tmp_path, capsys):
    assert main(["serve", "--runs", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such folder" in err
    assert main(["serve", "--runs", str(tmp_path), "--max-n", "0"]) == 2
    assert "--max-n must be >= 1" in capsys.readouterr().err
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert main(["serve", "--runs", str(tmp_path), "--port", str(s.getsockname()[1])]) == 2
        assert "in use" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(runs):
    """``scorelab serve --port 0`` in a subprocess; yields its URL (printed on its first line)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "scorelab", "serve", "--runs", str(runs), "--port", "0"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    line = []
    reader = threading.Thread(target=lambda: line.append(p.stdout.readline()), daemon=True)
    reader.start()
    reader.join(60)
    try:
        m = re.search(r"(http://127\.0\.0\.1:\d+/)", line[0] if line else "")
        assert m, f"scorelab serve printed {line!r}; stderr: {p.stderr.read() if p.poll() is not None else ''}"
        yield m.group(1)
    finally:
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def test_the_real_server_answers_on_loopback(server):
    with urllib.request.urlopen(server + "api/runs", timeout=30) as r:
        assert {x["name"] for x in json.loads(r.read())["runs"]} >= {"img", "toy", "sm"}
    req = urllib.request.Request(server + "api/sample", data=json.dumps({"run": "img", "n": 999}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and "between 1 and 64" in json.loads(e.value.read())["error"]


def _browser(tmp_path):
    """Headless Debian Chromium through chromedriver (selenium), or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the serve extra)")
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (chromium, driver) if not os.path.exists(p)]
    if missing:
        pytest.skip(f"no browser to test the page in ({', '.join(missing)} missing): apt-get install chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
              "--window-size=1400,900",
              f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(a)
    try:
        return webdriver.Chrome(service=Service(driver), options=opts)
    except WebDriverException as e:
        pytest.skip(f"headless chromium did not start: {str(e).strip().splitlines()[0]}")


def test_the_page_in_headless_chromium(server, runs, tmp_path):
    """Pick a run, set n, steps and a class by name, click Sample: x0 frames stream in, then the grid;
    another family's controls; the training view following a run in training."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d = _browser(tmp_path)
    try:
        d.get(server)
        wait = WebDriverWait(d, 30)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, 'tr.run[data-run="img"]'))
        d.find_element(By.CSS_SELECTOR, 'tr.run[data-run="img"]').click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#sample-fields select[name="sampler"]'))
        for name, value in (("n", "8"), ("steps", "3")):
            box = d.find_element(By.CSS_SELECTOR, f'#sample-fields input[name="{name}"]')
            box.clear()
            box.send_keys(value)
        Select(d.find_element(By.CSS_SELECTOR, '#sample-fields select[name="class"]')).select_by_visible_text("1 · Trouser")
        d.find_element(By.ID, "sample-button").click()
        wait.until(lambda d: d.find_element(By.ID, "sample-image").get_attribute("data-state") == "done")
        img = d.find_element(By.ID, "sample-image")
        w, h, frames = d.execute_script("const i = arguments[0]; return [i.naturalWidth, i.naturalHeight, i.dataset.frames]", img)
        assert (w, h) == ((3 * 30 + 2) * 2, (3 * 30 + 2) * 2)  # 8 images, 3 per row, upscaled 2x
        assert int(frames) >= 1  # the x0 predictions were shown as the sampler ran
        assert "8 samples" in d.find_element(By.ID, "sample-status").text
        # the energy model's controls are its own: Langevin options, no time grid, no guidance
        d.find_element(By.CSS_SELECTOR, 'tr.run[data-run="sm"]').click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#sample-fields input[name="step_size"]'))
        assert not d.find_elements(By.CSS_SELECTOR, '#sample-fields [name="grid"], #sample-fields [name="cfg"]')
        assert not d.find_element(By.CSS_SELECTOR, 'button[data-tab="interpolate"]').is_displayed()
        # the training view: the loss curve's last value and the trainer's sample grid
        d.find_element(By.CSS_SELECTOR, 'tr.run[data-run="img"]').click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#sample-fields select[name="class"]'))
        d.find_element(By.CSS_SELECTOR, 'button[data-tab="training"]').click()
        wait.until(lambda d: "done · checkpoint at step 2 / 2" in d.find_element(By.ID, "train-status").text)
        wait.until(lambda d: d.execute_script("return document.getElementById('latest').naturalWidth") > 0)
        assert d.find_element(By.ID, "metric").get_attribute("value") == "loss"
        # a run in training: the view follows new metrics rows and the trainer's newest grid
        live = runs / "live"
        fd = os.open(live / ".lock", os.O_RDWR | os.O_CREAT)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a trainer holds while it trains
            d.find_element(By.CSS_SELECTOR, 'tr.run[data-run="live"]').click()
            tab = 'button[data-tab="training"]'
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, tab).get_attribute("class") == "active")
            wait.until(lambda d: "checkpoint at step 4 / 4 · logged to step 4" in d.find_element(By.ID, "train-status").text)
            with open(live / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": 7, "loss": 0.125}) + "\n")
            shutil.copy(runs / "img" / "samples.png", live / "samples" / "step_000007.png")
            wait.until(lambda d: "logged to step 7 · following live" in d.find_element(By.ID, "train-status").text)
            wait.until(lambda d: "step_000007.png" in d.find_element(By.ID, "latest-caption").text)
        finally:
            os.close(fd)
        shot = tmp_path / "playground.png"
        d.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        d.quit()
