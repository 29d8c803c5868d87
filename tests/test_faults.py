"""Faults, the fast form (benchmarks/faults.py is the long one): signals sent at chosen points
through the trainer's test hook, kill -9 leftovers, NaN and exploding losses, errors inside a
step, and full disks (a real per-file size limit, ``RLIMIT_FSIZE``, so every writer fails in the
kernel, and a patched writer for ENOSPC). Every comparison of tensors is bit for bit.

The exactness claim under test: a run stopped by a signal saves the state a straight run has
after the same step (weights, EMA, optimizer moments, both random streams), and resuming it
ends bit-identical to the straight run, also for a family that calls ``ctx.optimize`` twice per
step (the signal arrives between the two updates).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import scorelab.train.checkpoint as ckpt_mod
import scorelab.train.trainer as trainer_mod
from scorelab.cli import build, load_data, main
from scorelab.families.base import Capabilities, Family
from scorelab.random import randn
from scorelab.runs import data_spec
from scorelab.train.checkpoint import load_checkpoint
from scorelab.train.config import RunConfig
from scorelab.train.trainer import DivergedError, Trainer, TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = {
    "name": "toy",
    "seed": 5,
    "data": {"name": "moons", "options": {"n": 128}},
    "model": {"family": "diffusion", "path": "rf", "prediction": "velocity", "net": "mlp",
              "net_options": {"width": 16, "depth": 1, "dropout": 0.1}, "sampler": "euler", "sampling_steps": 2},
    "train": {"steps": 12, "batch_size": 32, "warmup": 2, "log_every": 2, "ckpt_every": 5, "sample_every": 0,
              "ema_decay": 0.9, "precision": "fp32", "device": "cpu", "threads": 1},
}


def with_train(**kw) -> dict:
    return {**TOY, "train": {**TOY["train"], **kw}}


# --------------------------------------------------------------------------------------
# A family with two optimizers per step (the GAN pattern), not registered
# --------------------------------------------------------------------------------------
@dataclass
class TwoStepConfig:
    family: str = "two_step"  # name of this test family
    jitter: float = 0.05  # noise from the run's stream added to each batch


class TwoStep(Family):
    """Two linear maps trained by two optimizers in one step, with noise and dropout."""

    name = "two_step"
    Config = TwoStepConfig
    declared = Capabilities()

    def build(self):
        d = self.data.shape[0]
        self.a = nn.Sequential(nn.Linear(d, 8), nn.Dropout(0.2), nn.Linear(8, d))
        self.b = nn.Linear(d, d)

    def modules(self):
        return {"a": self.a, "b": self.b}

    def optimizers(self, train):
        return {"first": self.optimizer_from_train(train, ("a",)), "second": self.optimizer_from_train(train, ("b",), lr=3e-3)}

    def training_step(self, modules, batch, ctx):
        x = batch["x"] + self.cfg.jitter * randn(batch["x"].shape, generator=ctx.generator)
        la = ((modules["a"](x) - x) ** 2).mean()
        ga = ctx.optimize(la, "first")
        lb = ((modules["b"](x) - x.flip(1)) ** 2).mean()
        gb = ctx.optimize(lb, "second")
        return {"la": la.detach(), "lb": lb.detach(), "ga": ga, "gb": gb}


def make(cfg: dict, run_dir: Path, *, resume: bool = False, family: str = "diffusion") -> Trainer:
    rc = RunConfig.from_dict(cfg if family == "diffusion" else {**cfg, "model": {"family": family}})
    ds = load_data(rc)
    if family == "diffusion":
        fam = build(rc, ds)
    else:
        torch.manual_seed(rc.seed)  # the weights' initialisation, as build_family seeds it
        fam = TwoStep(rc.model, data_spec(rc, ds))
    return Trainer(rc, run_dir, fam, ds, resume=resume, progress=False)


def tensors(path: Path) -> dict:
    return load_checkpoint(path)[0]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@contextlib.contextmanager
def hook(fn):
    old = trainer_mod.EVENT_HOOK
    trainer_mod.EVENT_HOOK = fn
    try:
        yield
    finally:
        trainer_mod.EVENT_HOOK = old


def snapshot_at(step: int, store: dict):
    """A hook that stores the full state after ``step`` (a straight run's reference)."""
    def fn(event, tr):
        if event == "step_done" and tr.step == step:
            store.update({k: v.clone() for k, v in tr.state_tensors()[0].items()})
    return fn


def signal_at(event: str, step: int, sig: int, then=None):
    """A hook that sends ``sig`` to this process at the first ``event`` with ``trainer.step == step``."""
    fired = []

    def fn(ev, tr):
        if ev == event and tr.step == step and not fired:
            fired.append(ev)
            os.kill(os.getpid(), sig)
        if then is not None:
            then(ev, tr)
    return fn


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Straight 12-step runs of both families, with their full states after steps 3 and 8."""
    out = {}
    for fam in ("diffusion", "two_step"):
        d = tmp_path_factory.mktemp(f"straight-{fam}") / "run"
        states = {3: {}, 8: {}}
        hooks = [snapshot_at(s, st) for s, st in states.items()]
        tr = make(TOY, d, family=fam)
        with hook(lambda e, t, hooks=hooks: [h(e, t) for h in hooks]):
            assert tr.fit()["status"] == "done"
        out[fam] = {"final": tensors(d / "checkpoint.safetensors"), **states}
    return out


# --------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam, event, sig", [
    ("two_step", "optimize", signal.SIGTERM),  # between the two updates of a step
    ("two_step", "step", signal.SIGINT),  # before the step starts
    ("diffusion", "optimize", signal.SIGINT),  # after the update, before the EMA / end of step
    ("diffusion", "step_done", signal.SIGTERM),  # between steps
])
def test_signal_saves_exactly_the_straight_state_and_resumes_bit_exactly(straight, tmp_path, fam, event, sig):
    d = tmp_path / "run"
    tr = make(TOY, d, family=fam)
    at = 7 if event != "step_done" else 8  # trainer.step during step 8 is 7; after it, 8
    with hook(signal_at(event, at, sig)):
        summary = tr.fit()
    assert summary["status"] == "interrupted" and summary["step"] == 8 and tr.stop_signal == sig
    saved = tensors(d / "checkpoint.safetensors")
    assert_same(saved, straight[fam][8])  # weights, EMA, moments, RNG: the straight run's after step 8
    tr2 = make(TOY, d, family=fam, resume=True)
    assert tr2.fit()["status"] == "done"
    assert_same(tensors(d / "checkpoint.safetensors"), straight[fam]["final"])
    steps = [json.loads(r)["step"] for r in (d / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no duplicated row


def test_second_signal_during_the_save_is_ignored_with_a_message(straight, tmp_path, capfd):
    d = tmp_path / "run"
    tr = make(TOY, d)

    def again(ev, t):
        if ev == "save" and t.step == 3:  # the checkpoint written on the first signal
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)

    with hook(signal_at("step_done", 3, signal.SIGINT, then=again)):
        summary = tr.fit()
    err = capfd.readouterr().err
    assert summary["step"] == 3 and tr.stop_signal == signal.SIGINT
    assert "SIGINT received: stopping after step 3" in err
    assert err.count("ignored: already stopping (writing the checkpoint of step 3)") == 2 and "Traceback" not in err
    assert_same(tensors(d / "checkpoint.safetensors"), straight["diffusion"][3])


def test_cli_exit_codes_for_signals_and_start_up(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(with_train(steps=6)))
    with hook(signal_at("step_done", 2, signal.SIGTERM)):
        code = main(["train", str(cfg), "--runs", str(tmp_path / "runs"), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 143 and json.loads(out.splitlines()[-1])["status"] == "interrupted", err
    assert main(["train", "--resume", str(tmp_path / "runs" / "toy"), "--no-progress"]) == 0
    # a signal during start-up: exit 128 + signal, one line, nothing written
    import scorelab.cli.train as cli_train

    real = cli_train.build

    def build_then_signal(*a):
        fam = real(*a)
        os.kill(os.getpid(), signal.SIGINT)
        return fam

    monkeypatch.setattr(cli_train, "build", build_then_signal)
    capsys.readouterr()
    code = main(["train", str(cfg), "--runs", str(tmp_path / "other"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and err == ["scorelab train: interrupted by SIGINT during start-up: nothing was written"]
    assert not (tmp_path / "other").exists()


def test_keyboard_interrupt_inside_a_step_rolls_the_random_streams_back(straight, tmp_path):
    """An interrupt raised by code in a step (not a signal): before any update the step is undone."""
    d = tmp_path / "run"
    tr = make(TOY, d)
    real = tr.family.training_step

    def step(mods, batch, ctx):
        if ctx.step == 3:
            torch.rand(7)  # consumes the global stream, then stops: must be rolled back
            randn((3,), generator=ctx.generator)
            raise KeyboardInterrupt
        return real(mods, batch, ctx)

    tr.family.training_step = step
    assert tr.fit()["step"] == 3
    assert_same(tensors(d / "checkpoint.safetensors"), straight["diffusion"][3])


# --------------------------------------------------------------------------------------
# kill -9 leftovers, runs killed before their first checkpoint, errors inside a step
# --------------------------------------------------------------------------------------
def test_resume_cleans_kill_9_leftovers_and_truncates_metrics(straight, tmp_path):
    d = tmp_path / "run"
    with hook(signal_at("step_done", 5, signal.SIGTERM)):
        make(TOY, d).fit()  # checkpoint at step 5, as a kill -9 at step 7 would leave it
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = [d / f".checkpoint.safetensors.{dead}.ab12cd34.tmp", d / f".config.yaml.{dead}.0f0f0f0f.tmp",
             d / f".metrics.jsonl.{dead}.99999999.tmp"]
    for p in stale:
        p.write_bytes(b"half-written")
    live = d / f".eval.{os.getpid()}.tmp.json"  # a temporary of a process that still runs: kept
    live.write_text("{}")
    with open(d / "metrics.jsonl", "a") as f:  # rows written after the checkpoint, and one cut in half
        f.write(json.dumps({"step": 6, "loss": 1.0}) + "\n" + json.dumps({"step": 7, "loss": 1.0}) + "\n" + '{"step": 8, "lo')
    tr = make(TOY, d, resume=True)
    assert tr.fit()["status"] == "done"
    assert not any(p.exists() for p in stale) and live.exists()
    rows = [json.loads(r) for r in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5, 6, 8, 10, 12]  # each step once; a row at every checkpoint
    assert_same(tensors(d / "checkpoint.safetensors"), straight["diffusion"]["final"])


def test_a_run_folder_exists_only_with_a_checkpoint_and_resumes_from_step_0(straight, tmp_path, capsys):
    """The folder is created with a step-0 checkpoint (a crash before the first periodic one leaves
    a resumable run); an error inside a step is one line and leaves the run resumable."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TOY))
    created = []

    def boom(ev, tr):
        if ev == "step" and tr.step == 0:
            created.append(sorted(p.name for p in tr.run_dir.iterdir()))
        if ev == "step" and tr.step == 3:
            raise RuntimeError("simulated failure inside a step\nsecond line")

    with hook(boom):
        code = main(["train", str(cfg), "--runs", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    d = tmp_path / "runs" / "toy"
    assert created == [[".lock", "checkpoint.safetensors", "config.yaml", "metrics.jsonl"]]
    assert code == 2 and len(err) == 2 and err[0].startswith("training toy")  # the start line, then one error line
    assert "step 4: RuntimeError: simulated failure inside a step; the checkpoint at step 0 is kept" in err[1]
    assert load_checkpoint(d / "checkpoint.safetensors")[1]["step"] == 0
    assert sorted(p.name for p in tmp_path.joinpath("runs").iterdir()) == ["toy"]  # no staging folder left
    assert main(["train", "--resume", str(d), "--no-progress"]) == 0
    assert_same(tensors(d / "checkpoint.safetensors"), straight["diffusion"]["final"])
    # a folder with a config but no checkpoint (an older scorelab's crash) resumes from step 0
    (d / "checkpoint.safetensors").unlink()
    (d / "metrics.jsonl").write_text('{"step": 4, "loss": 1}\n')
    capsys.readouterr()
    assert main(["train", "--resume", str(d), "--no-progress"]) == 0
    assert "starts from step 0" in capsys.readouterr().err
    assert_same(tensors(d / "checkpoint.safetensors"), straight["diffusion"]["final"])


def test_a_run_in_training_is_locked(tmp_path, capsys):
    import fcntl

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TOY))
    with hook(signal_at("step_done", 2, signal.SIGINT)):
        assert main(["train", str(cfg), "--runs", str(tmp_path), "--no-progress"]) == 130
    d = tmp_path / "toy"
    fd = os.open(d / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another trainer holds it
    before = sha(d / "checkpoint.safetensors")
    try:
        assert main(["train", "--resume", str(d), "--no-progress"]) == 2
    finally:
        os.close(fd)
    assert "is being trained by another process" in capsys.readouterr().err
    assert sha(d / "checkpoint.safetensors") == before


# --------------------------------------------------------------------------------------
# NaN and divergence
# --------------------------------------------------------------------------------------
def nan_loss_at(steps, optimizer="main"):
    """Wrap a trainer's _optimize so that the loss of ``optimizer`` is NaN at the given steps."""
    def install(tr):
        real = tr._optimize

        def opt(loss, name):
            if name == optimizer and tr.step in steps:
                loss = loss * float("nan")
            return real(loss, name)
        tr._optimize = opt
        return tr
    return install


def test_nan_loss_skips_the_update_up_to_k_times(tmp_path):
    d = tmp_path / "run"
    tr = nan_loss_at({3, 4}, "first")(make(with_train(nonfinite_skips=2), d, family="two_step"))
    seen = {}

    def grab(ev, t):
        if ev == "step_done" and t.step in (3, 5):
            seen[t.step] = {k: v.clone() for k, v in t.modules["a"].state_dict().items()}

    with hook(grab):
        assert tr.fit()["status"] == "done"
    for k in seen[3]:  # steps 4 and 5 (indices 3, 4) skipped optimizer 'first': its weights did not move
        assert torch.equal(seen[3][k], seen[5][k]), k
    rows = [json.loads(r) for r in (d / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped", 0) for r in rows) == 2 and all(torch.isfinite(torch.tensor(r["la"])) for r in rows)
    assert all(torch.isfinite(v).all() for k, v in tensors(d / "checkpoint.safetensors").items() if v.is_floating_point())


@pytest.mark.parametrize("fam", ["diffusion", "two_step"])
def test_persistent_nan_stops_and_keeps_the_good_checkpoint_byte_for_byte(tmp_path, fam):
    d = tmp_path / "run"
    opt = "main" if fam == "diffusion" else "second"
    tr = nan_loss_at(set(range(6, 100)), opt)(make(with_train(nonfinite_skips=3), d, family=fam))
    good = {}

    def keep(ev, t):
        if ev == "saved" and t.step == 5:
            good["sha"] = sha(d / "checkpoint.safetensors")

    with hook(keep), pytest.raises(DivergedError) as e:
        tr.fit()
    msg = str(e.value)
    assert "step 10: the loss of optimizer" in msg and "is nan" in msg and "4 steps in a row" in msg
    assert "the checkpoint at step 5 is kept" in msg and "try a lower" in msg.replace("try lower", "try a lower")
    assert "\n" not in msg
    assert sha(d / "checkpoint.safetensors") == good["sha"]


def test_a_persisting_explosion_stops_after_the_patience(tmp_path):
    """A finite loss 1e8 x its usual size from step 7 on (Adam's update barely changes: it is scale
    free): reported once, checkpoints wait, the run stops after divergence_patience steps."""
    d = tmp_path / "run"
    tr = make(with_train(steps=40, divergence_patience=6), d)
    real = tr._optimize
    tr._optimize = lambda loss, name: real(loss * (1e8 if tr.step >= 6 else 1.0), name)
    good = {}
    keep = lambda ev, t: good.update(sha=sha(d / "checkpoint.safetensors")) if ev == "saved" and t.step else None
    with hook(keep), pytest.raises(DivergedError) as e:
        tr.fit()
    msg = str(e.value)
    assert msg.startswith("step 12: loss ") and "more than 1000x its running median" in msg and "for 6 steps" in msg
    assert "the checkpoint at step 5 is kept" in msg  # the one at step 10 waited
    assert sha(d / "checkpoint.safetensors") == good["sha"] and load_checkpoint(d / "checkpoint.safetensors")[1]["step"] == 5


def test_divergence_from_the_command_line_exit_3_good_checkpoint_kept(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(with_train(steps=10, warmup=0)))
    runs = tmp_path / "runs"
    assert main(["train", str(cfg), "--runs", str(runs), "--no-progress"]) == 0
    d = runs / "toy"
    before = {p.name: sha(p) for p in d.iterdir() if p.is_file() and p.name != "metrics.jsonl"}
    capsys.readouterr()
    for lr, what in (("1e2", "far above its running median"), ("1e30", "of optimizer 'main' is ")):
        code = main(["train", "--resume", str(d), "--train.steps", "40", "--train.lr", lr, "--no-progress"])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert code == 3 and last.startswith("scorelab train: stopped: step ") and "Traceback" not in err, err
        assert "training diverged; the checkpoint at step 10 is kept" in last and "try a lower train.lr" in last
        assert what in err
        after = {p.name: sha(p) for p in d.iterdir() if p.is_file() and p.name != "metrics.jsonl"}
        assert after == before  # the good checkpoint byte for byte, and the config it was trained with


def test_a_non_finite_checkpoint_is_never_written(tmp_path):
    d = tmp_path / "run"
    tr = make(TOY, d)
    good = {}

    def poison(ev, t):
        if ev == "step" and t.step == 0:
            good["sha"] = sha(d / "checkpoint.safetensors")
        if ev == "optimize" and t.step == 4:  # after the update of step 5, just before its checkpoint
            with torch.no_grad():
                next(t.modules["net"].parameters()).fill_(float("inf"))

    with hook(poison), pytest.raises(DivergedError, match="holds non-finite values, so no checkpoint is written"):
        tr.fit()
    assert sha(d / "checkpoint.safetensors") == good["sha"]  # still the step-0 checkpoint
    assert load_checkpoint(d / "checkpoint.safetensors")[1]["step"] == 0


class SqrtAtZero(nn.Module):
    """Adds ``sqrt(0 * w)`` to the loss: forward 0, backward 0 / 0 = NaN (a NaN born in backward)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *a, **kw):
        out = self.inner(*a, **kw)
        w = next(self.inner.parameters())
        return out + (0 * w.sum()).sqrt()


@pytest.mark.parametrize("anomaly", [False, True])
def test_detect_anomaly_names_the_operation(tmp_path, anomaly):
    import warnings

    tr = make(with_train(detect_anomaly=anomaly, nonfinite_skips=0), tmp_path / "run")
    tr._step_fns = {"net": SqrtAtZero(tr.modules["net"])}
    with pytest.raises(DivergedError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomaly mode warns with the forward trace: that is its point
        tr.fit()
    msg = str(e.value)
    if anomaly:
        assert msg.startswith("step 1: autograd anomaly (train.detect_anomaly): Function '") and "Backward" in msg
        assert "returned nan values" in msg and "the checkpoint at step 0 is kept" in msg
    else:
        assert msg.startswith("step 1: the gradient norm of optimizer 'main' is nan") and "train.detect_anomaly true" in msg


# --------------------------------------------------------------------------------------
# Full disks, read-only files
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Every write past ``nbytes`` in one file fails with EFBIG in the kernel (RLIMIT_FSIZE)."""
    import resource

    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_sig)


def no_temporaries(folder: Path) -> bool:
    return not [p for p in Path(folder).rglob(".*") if ".tmp" in p.name]


def test_full_disk_during_training_is_one_line_and_resumes(straight, tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TOY))
    d = tmp_path / "runs" / "toy"
    real = ckpt_mod.save_file

    def full_disk_at_step_5(tensors, path, metadata=None):
        if json.loads(metadata["scorelab"])["step"] == 5:
            Path(path).write_bytes(b"\0" * 1000)  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", full_disk_at_step_5)
    code = main(["train", str(cfg), "--runs", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2 and "Traceback" not in "".join(err)
    assert err[1] == (f"scorelab train: error: cannot write {d}/checkpoint.safetensors: No space left on device (the "
                      f"checkpoint at step 0 is intact; free space and resume with --resume {d})")
    assert no_temporaries(d) and load_checkpoint(d / "checkpoint.safetensors")[1]["step"] == 0
    monkeypatch.setattr(ckpt_mod, "save_file", real)  # space freed
    assert main(["train", "--resume", str(d), "--no-progress"]) == 0
    assert_same(tensors(d / "checkpoint.safetensors"), straight["diffusion"]["final"])


def test_full_disk_at_start_up_and_on_sigterm_and_for_outputs(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(with_train(steps=6)))
    runs = tmp_path / "runs"
    # start-up: the step-0 checkpoint cannot be written -> no run folder at all
    with file_size_limit(4096):
        code = main(["train", str(cfg), "--runs", str(runs), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "cannot write" in err[-1] and "checkpoint.safetensors: File too large" in err[-1]
    assert runs.is_dir() and not any(runs.iterdir())
    # SIGTERM, then the disk is full for the checkpoint written on it
    d = runs / "toy"

    def term_then_full(ev, tr):
        if ev == "step_done" and tr.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        if ev == "save" and tr.step == 2:
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    import resource

    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_sig = signal.getsignal(signal.SIGXFSZ)
    try:
        with hook(term_then_full):
            code = main(["train", str(cfg), "--runs", str(runs), "--no-progress"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, old_sig)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "File too large (the checkpoint at step 0 is intact" in err
    assert no_temporaries(d) and load_checkpoint(d / "checkpoint.safetensors")[1]["step"] == 0
    assert main(["train", "--resume", str(d), "--no-progress"]) == 0
    # outputs of sample and eval: one line naming the file, nothing half-written, old files intact
    capsys.readouterr()
    (d / "eval.json").write_text('{"old": 1}')
    for argv, name in ((["sample", str(d), "--n", "2000", "--out", str(tmp_path / "s.npz")], "s.npz"),
                       (["sample", str(d), "--n", "2000", "--out", str(tmp_path / "s.png")], "s.png"),
                       (["eval", str(d), "--n", "2000"], "eval.json")):
        with file_size_limit(8 if name == "eval.json" else 2048):
            code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and name in err[0] and "File too large" in err[0], err
        assert no_temporaries(tmp_path)
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "s.png").exists()
    assert (d / "eval.json").read_text() == '{"old": 1}'


def test_a_family_error_inside_a_step_is_one_line_naming_the_kept_checkpoint(tmp_path):
    """The GAN family raises TrainingError itself on a non-finite generator loss, after its D update."""
    d = tmp_path / "run"
    tr = make(TOY, d, family="two_step")
    real = tr.family.training_step

    def step(mods, batch, ctx):
        if ctx.step == 7:
            ctx.optimize(((mods["a"](batch["x"]) - batch["x"]) ** 2).mean(), "first")  # half a step, then the error
            raise TrainingError("loss_g became nan at step 7; lower model.optim_g.lr")
        return real(mods, batch, ctx)

    tr.family.training_step = step
    with pytest.raises(TrainingError) as e:
        tr.fit()
    assert str(e.value) == (f"loss_g became nan at step 7; lower model.optim_g.lr; the checkpoint at step 5 is kept "
                            f"(resume with --resume {d})")
    assert load_checkpoint(d / "checkpoint.safetensors")[1]["step"] == 5


def test_read_only_and_permission_denied_run_folders_are_one_line(tmp_path, capsys, monkeypatch):
    """As root chmod does not deny, so the kernel's answers are patched in where the run folder is
    written: the lock (resume), eval.json and sample's default output (a real read-only bind
    mount is in benchmarks/faults.py)."""
    import pathlib

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(with_train(steps=4)))
    assert main(["train", str(cfg), "--runs", str(tmp_path), "--no-progress"]) == 0
    d = tmp_path / "toy"
    before = {p.name: sha(p) for p in d.rglob("*") if p.is_file()}
    real_open, real_write = os.open, pathlib.Path.write_text

    for code_, text in ((errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")):
        def deny_open(path, *a, **kw):
            if str(path).startswith(str(d)):
                raise OSError(code_, os.strerror(code_), str(path))
            return real_open(path, *a, **kw)

        def deny_write(self, *a, **kw):
            if str(self).startswith(str(d)):
                raise OSError(code_, os.strerror(code_), str(self))
            return real_write(self, *a, **kw)

        monkeypatch.setattr(os, "open", deny_open)
        monkeypatch.setattr(pathlib.Path, "write_text", deny_write)
        capsys.readouterr()
        for argv, name in ((["train", "--resume", str(d), "--train.steps", "8", "--no-progress"], f"{d}/.lock"),
                           (["eval", str(d), "--n", "50"], f"{d}/eval.json")):
            code = main(argv)
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and err[-1].endswith(f"cannot write {name}: {text}"), err
            assert "Traceback" not in "".join(err) and len([e for e in err if "error:" in e]) == 1
        monkeypatch.undo()
        assert {p.name: sha(p) for p in d.rglob("*") if p.is_file()} == before
