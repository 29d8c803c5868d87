"""Data-parallel training (torchrun, DistributedDataParallel, gloo on CPU): 2 processes with a
global batch B train the same run as 1 process with B; resume under torchrun is bit-exact and a
checkpoint moves between world sizes; a lost rank stops the other within the timeout with the
last checkpoint intact. Plus the pure parts (environment, device choice, shards, sharded draws)
without processes.

Tolerance. Two processes compute the same step as one except for the order of float32 sums: each
rank's mean over its half of the batch, then DDP's all-reduce of the two gradients, instead of one
mean over the whole batch. Rounding differences of ~1e-7 relative per step, carried through Adam
(which divides by sqrt(v): a parameter with a near-zero gradient amplifies them) for 30 steps,
stay below ``ATOL = 1e-5`` on weights and EMA (measured on this toy: 1.2e-7); Adam's moments are
compared relative to their own size (``MOMENT_RTOL = 1e-4``; measured 9e-7), the random streams and
step counters exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from scorelab.cli import main
from scorelab.random import ShardedGenerator, rand, rand_whole, randn
from scorelab.train.checkpoint import load_checkpoint
from scorelab.train.distributed import Launch, choose_device, launch_from_env, shard_of, timeout_seconds

dist = torch.distributed
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available in this build of torch", allow_module_level=True)
try:  # the processes talk over the loopback interface
    with socket.socket() as _s:
        _s.bind(("127.0.0.1", 0))
except OSError as _e:
    pytest.skip(f"no loopback TCP for the 2-process tests: {_e}", allow_module_level=True)

ATOL = 1e-5  # weights and EMA after 30 steps, 2 processes vs 1 (float summation order; module docstring)
MOMENT_RTOL = 1e-4  # Adam's exp_avg / exp_avg_sq, relative to the largest |value| of the tensor
STEPS = 30
ROOT = Path(__file__).resolve().parents[1]
# moons-rf, small: 650 examples = 10 batches of 64 per epoch (10 left out of each permutation), 3 epochs
TOY = ["moons-rf", "--train.batch_size", "64", "--train.warmup", "5", "--train.ckpt_every", "15", "--train.sample_every", "0",
       "--train.log_every", "5", "--train.precision", "fp32", "--train.threads", "1", "--data.options.n", "650",
       "--model.net_options.width", "64", "--model.net_options.depth", "2", "--no-progress"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # all processes on this machine: not the interface the host name resolves to
    return env


def torchrun(*args: str, timeout: float = 120, nproc_flag: bool = False) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m scorelab train ARGS``, or with ``nproc_flag``
    ``scorelab train ARGS --nproc 2`` (which runs the same torchrun); exit code checked."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "scorelab",
           "train", *args]
    if nproc_flag:
        cmd = [sys.executable, "-m", "scorelab", "train", *args, "--nproc", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def train1(*args: str) -> None:
    """One process, in this one."""
    assert main(["train", *args]) == 0


def state(run: Path) -> tuple[dict, dict]:
    return load_checkpoint(run / "checkpoint.safetensors")


def assert_same_run(a: dict, b: dict, exact: bool = False) -> None:
    """Every tensor of two checkpoints: bit for bit (``exact``), else weights / EMA within ATOL,
    optimizer moments within MOMENT_RTOL of their scale, RNG states and counters exactly."""
    assert set(a) == set(b)
    for k in sorted(a):
        x, y = a[k], b[k]
        if exact or not x.is_floating_point() or k.startswith("rng.") or k.endswith(".step"):
            assert torch.equal(x, y), k
        elif k.startswith("opt."):
            scale = float(x.abs().max()) or 1.0
            torch.testing.assert_close(y, x, rtol=0, atol=MOMENT_RTOL * scale, msg=k)
        else:
            torch.testing.assert_close(y, x, rtol=0, atol=ATOL, msg=k)


# --------------------------------------------------------------------------------------
# Without processes: environment, device choice, shards, sharded draws
# --------------------------------------------------------------------------------------
def test_torchrun_environment_device_choice_and_shards():
    assert launch_from_env({}) is None and launch_from_env({"WORLD_SIZE": "1"}) is None
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h0", "MASTER_PORT": "29400"}
    launch = launch_from_env(env)
    assert launch == Launch(3, 4, 1, 2, "h0", 29400)
    with pytest.raises(ValueError, match="RANK"):
        launch_from_env({"WORLD_SIZE": "2"})
    # the one device choice: one GPU per process (LOCAL_RANK), refused when the node has too few
    assert choose_device("auto", launch, cuda_count=2) == torch.device("cuda", 1)
    assert choose_device("cuda", launch, cuda_count=2) == torch.device("cuda", 1)
    assert choose_device("auto", launch, cuda_count=0) == torch.device("cpu")
    with pytest.raises(ValueError, match="at most 1 processes per machine"):
        choose_device("cuda", launch, cuda_count=1)
    with pytest.raises(ValueError, match="names one GPU"):
        choose_device("cuda:0", launch, cuda_count=2)
    with pytest.raises(ValueError, match="CUDA is not available"):
        choose_device("cuda", None, cuda_count=0)
    # equal shards of the global batch, or one line
    assert [shard_of(64, r, 4) for r in range(4)] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    with pytest.raises(ValueError, match="not a multiple of the 4 processes.*64 or 68"):
        shard_of(66, 0, 4)
    assert timeout_seconds(None, {}) == 600 and timeout_seconds(None, {"SCORELAB_DIST_TIMEOUT": "7"}) == 7
    with pytest.raises(ValueError, match="positive"):
        timeout_seconds("0")


def test_sharded_draws_are_the_rows_of_the_global_draw():
    B = 12
    whole = torch.Generator().manual_seed(5)
    full = [randn((B, 3), whole), rand((2 * B,), whole), randn((), whole), rand((B, 4), whole)]
    parts = []
    for lo, hi in ((0, 6), (6, 12)):
        g = torch.Generator().manual_seed(5)
        s = ShardedGenerator(g, lo, hi, B)
        parts.append([randn((6, 3), s), rand((12,), s), randn((), s), rand_whole((6, 4), s)])
        assert torch.equal(g.get_state(), whole.get_state())  # the stream advanced as for the global batch
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), full[0], rtol=0, atol=0)  # one row per example
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), full[1], rtol=0, atol=0)  # k = 2 rows per example
    for p in parts:
        assert torch.equal(p[2], full[2]) and torch.equal(p[3], full[3])  # shared draw; whole draw on every rank
    with pytest.raises(TypeError):
        torch.rand(3, generator=ShardedGenerator(torch.Generator(), 0, 1, 2))  # the loud failure


# --------------------------------------------------------------------------------------
# 2 processes vs 1, resume, world size changes (moons-rf)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Straight 30-step runs: ``one`` (1 process) and ``two`` (torchrun, 2 processes)."""
    root = tmp_path_factory.mktemp("ddp")
    train1(*TOY, "--train.steps", str(STEPS), "--runs", str(root / "one"))
    res = torchrun(*TOY, "--train.steps", str(STEPS), "--runs", str(root / "two"))
    return {"root": root, "one": root / "one" / "moons-rf", "two": root / "two" / "moons-rf", "stderr": res.stderr,
            "stdout": res.stdout}


def test_two_processes_train_the_one_process_run(toy):
    a, ma = state(toy["one"])
    b, mb = state(toy["two"])
    assert ma["step"] == mb["step"] == STEPS and (ma["world_size"], mb["world_size"]) == (1, 2)
    assert any(k.startswith("ema.") for k in a) and any(k.endswith("exp_avg_sq") for k in a)
    assert_same_run(a, b)
    # rank 0 alone speaks and writes: one header, one summary, one row per logged step
    assert toy["stderr"].count("training moons-rf") == 1 and "2 processes x 32 of the global batch 64 (gloo" in toy["stderr"]
    assert "gradients averaged: net ddp" in toy["stderr"]
    assert len(toy["stdout"].strip().splitlines()) == 1 and json.loads(toy["stdout"])["step"] == STEPS
    rows = [json.loads(r) for r in (toy["two"] / "metrics.jsonl").read_text().splitlines()]
    rows1 = [json.loads(r) for r in (toy["one"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in rows1] == [5, 10, 15, 20, 25, 30]
    for r, r1 in zip(rows, rows1):  # the logged loss is the global batch's mean
        assert r["loss"] == pytest.approx(r1["loss"], rel=1e-5)


def test_resume_under_torchrun_is_bit_exact_and_moves_between_world_sizes(toy):
    root = toy["root"]
    # 2 processes: 15 steps, then --resume to 30 under torchrun == the straight 2-process run, bit for bit
    torchrun(*TOY, "--train.steps", "15", "--runs", str(root / "half2"))
    half2 = root / "half2" / "moons-rf"
    shutil.copytree(half2, root / "half2to1")
    torchrun("--resume", str(half2), "--train.steps", str(STEPS), "--no-progress")
    assert_same_run(state(toy["two"])[0], state(half2)[0], exact=True)
    # the 2-process checkpoint of step 15 resumed in 1 process continues the same run
    train1("--resume", str(root / "half2to1"), "--train.steps", str(STEPS), "--no-progress")
    assert_same_run(state(toy["one"])[0], state(root / "half2to1")[0])
    # and back: a 1-process checkpoint of step 15 resumed with 2 processes, by `scorelab train --nproc 2`
    train1(*TOY, "--train.steps", "15", "--runs", str(root / "half1"))
    res = torchrun("--resume", str(root / "half1" / "moons-rf"), "--train.steps", str(STEPS), "--no-progress",
                   nproc_flag=True)
    assert "scorelab train: torchrun --standalone --nnodes 1 --nproc-per-node 2 -m scorelab train --resume" in res.stderr
    assert "the checkpoint was written by 1 process(es), same global batch" in res.stderr
    assert_same_run(state(toy["one"])[0], state(root / "half1" / "moons-rf")[0])


def test_nproc_exits_with_the_processes_own_code_and_line(tmp_path):
    """A batch that does not split evenly: every process refuses it in one line (exit 2), and
    ``--nproc`` exits 2 naming the first failing process."""
    cmd = [sys.executable, "-m", "scorelab", "train", *TOY, "--train.batch_size", "63", "--runs", str(tmp_path), "--nproc", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "train.batch_size 63 is not a multiple of the 2 processes" in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("scorelab train: process ")
    assert not (tmp_path / "moons-rf").exists()


# --------------------------------------------------------------------------------------
# A two-optimizer family and a frozen-module family
# --------------------------------------------------------------------------------------
def _family_cfg(root: Path, name: str, data: dict, model: dict, steps: int) -> str:
    cfg = {"name": name, "data": data, "model": model,
           "train": {"steps": steps, "batch_size": 32, "log_every": 5, "ckpt_every": 0, "sample_every": 0, "ema_decay": 0.9,
                     "device": "cpu", "threads": 1, "precision": "fp32"}}
    p = root / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


@pytest.mark.parametrize("family", ["gan", "progressive"])
def test_two_optimizers_and_a_frozen_teacher_train_as_in_one_process(tmp_path, family):
    from test_families import TINY  # the tiny configs of every family

    gauss = {"name": "8gaussians", "options": {"n": 256}}
    model = {"family": family, **TINY[family][1]}
    if family == "progressive":  # a frozen teacher (a tiny diffusion run: replicated on every rank, never wrapped), then
        # two rounds: the 4-step student of steps 1-5 is the teacher of the 2-step one in steps 6-10
        model.update(start_steps=8, final_steps=2, round_steps=5)
        train1(_family_cfg(tmp_path, "teacher", gauss, {"family": "diffusion", **TINY["diffusion"][1]}, 2),
               "--runs", str(tmp_path), "--no-progress")
        model["teacher"] = str(tmp_path / "teacher")
    cfg = _family_cfg(tmp_path, family, gauss, model, 10)
    train1(cfg, "--runs", str(tmp_path / "one"), "--no-progress")
    res = torchrun(cfg, "--runs", str(tmp_path / "two"), "--no-progress")
    wrapped = {"gan": "generator ddp, discriminator ddp", "progressive": "net_4 ddp, net_2 ddp"}[family]
    assert f"gradients averaged: {wrapped})" in res.stderr
    a, b = state(tmp_path / "one" / family)[0], state(tmp_path / "two" / family)[0]
    if family == "gan":
        assert any(k.startswith("opt.generator.") for k in a) and any(k.startswith("opt.discriminator.") for k in a)
    assert not any(".teacher." in k for k in a)
    assert_same_run(a, b)


def test_minibatch_ot_pairs_the_global_batch_so_two_processes_train_the_one_process_run(tmp_path):
    """model.coupling: ot pairs data and noise across the whole batch: the ranks gather their shards,
    pair alike and take their rows back (pairing within each 16-row shard would train another run)."""
    from test_families import TINY

    model = {"family": "diffusion", **TINY["diffusion"][1], "coupling": "ot"}
    cfg = _family_cfg(tmp_path, "ot", {"name": "8gaussians", "options": {"n": 256}}, model, 10)
    train1(cfg, "--runs", str(tmp_path / "one"), "--no-progress")
    torchrun(cfg, "--runs", str(tmp_path / "two"), "--no-progress")
    a, b = state(tmp_path / "one" / "ot")[0], state(tmp_path / "two" / "ot")[0]
    assert_same_run(a, b)


# --------------------------------------------------------------------------------------
# Faults: a rank killed, a rank that hangs
# --------------------------------------------------------------------------------------
_WORKER = """
import os, signal, sys, time
import scorelab.train.trainer as T
from scorelab.cli import main
how, at, mark = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def hook(name, tr):
    if name == "step" and tr.rank == 1 and tr.step == at:
        open(mark, "w").close()
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)
T.EVENT_HOOK = hook
sys.exit(main(sys.argv[4:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_lost_rank_stops_the_other_within_the_timeout_and_resume_continues(tmp_path, how):
    """The two ranks are started with torchrun's environment but without its agent (which would
    stop the survivor itself): the survivor must notice alone. Rank 1 is killed (its sockets
    close) or hangs before step 13; checkpoints every 5 steps."""
    timeout = 4.0
    port, mark = _free_port(), tmp_path / "lost"
    args = ["train", *TOY, "--train.steps", "40", "--train.ckpt_every", "5", "--runs", str(tmp_path), "--dist-timeout", str(timeout)]
    procs = []
    for rank in range(2):
        env = {**_env(), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, how, "12", str(mark), *args], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 90
        while not mark.exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()[1][-2000:]
            time.sleep(0.05)
        t_lost = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout + 30)
        waited = time.monotonic() - t_lost
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()
    lines = [line for line in err.strip().splitlines() if line.startswith("scorelab")]
    assert procs[0].returncode == 2, err[-2000:]
    assert len(lines) == 1 and "rank 0 of 2 lost the other processes" in lines[0] and "Traceback" not in err, err[-2000:]
    assert "the checkpoint at step 10 is kept" in lines[0] and f"{timeout:g} s (--dist-timeout)" in lines[0]
    assert waited < (timeout + 15 if how == "hang" else 15), waited  # noticed at once (kill) or after the timeout (hang)
    if how == "hang":
        assert waited >= timeout * 0.9, waited
    run = tmp_path / "moons-rf"
    assert state(run)[1]["step"] == 10  # intact
    train1("--resume", str(run), "--no-progress")  # continues to train.steps in one process
    assert state(run)[1]["step"] == 40


def test_a_budget_sized_schedule_is_rank_0s_on_both_processes(tmp_path):
    """train.schedule_length budget under torchrun: the ranks time their steps separately but adopt
    rank 0's decision, so both stop at the same planned step (a disagreement would hang the run)."""
    res = torchrun(*TOY, "--train.steps", "100000", "--train.schedule", "cosine", "--train.max_minutes", "0.05",
                   "--runs", str(tmp_path))
    run = tmp_path / "moons-rf"
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    plan = [r for r in rows if "horizon" in r]
    assert len(plan) == 1 and res.stderr.count("schedule: ") == 1
    _, meta = state(run)
    assert meta["horizon"]["planned"] and meta["horizon"]["steps"] == plan[0]["horizon"]
    assert meta["step"] <= plan[0]["horizon"] and json.loads(res.stdout)["step"] == meta["step"]
