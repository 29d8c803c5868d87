"""The trainer's own parts, one at a time: the divergence guard's rule, the metrics truncation of a
resume, one learning rate per optimizer, frozen modules in ``prepare``, the dry step that changes
nothing, deferred signals, stale temporaries, atomic writes that fail, optimizer-state checks."""

from __future__ import annotations

import errno
import json
import os
import signal
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from scorelab.cli import build, load_data
from scorelab.families.base import Capabilities, Family
from scorelab.runs import data_spec
from scorelab.train.checkpoint import (
    CheckpointError,
    StorageError,
    atomic_write,
    atomic_write_text,
    check_optimizer_state,
    load_checkpoint,
    stale_temporaries,
)
from scorelab.train.config import RunConfig
from scorelab.train.trainer import DivergenceGuard, GracefulStop, Interrupted, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = {
    "name": "t", "seed": 2, "data": {"name": "8gaussians", "options": {"n": 96}},
    "model": {"family": "diffusion", "net": "mlp", "net_options": {"width": 8, "depth": 1, "dropout": 0.1},
              "sampler": "euler", "sampling_steps": 2},
    "train": {"steps": 6, "batch_size": 32, "warmup": 2, "log_every": 2, "ckpt_every": 0, "sample_every": 0,
              "precision": "fp32", "device": "cpu", "threads": 1},
}


def trainer(tmp_path, cfg=CFG, family=None, **kw) -> Trainer:
    rc = RunConfig.from_dict(cfg if family is None else {**cfg, "model": {"family": family.name}})
    ds = load_data(rc)
    if family is None:
        fam = build(rc, ds)
    else:
        torch.manual_seed(rc.seed)
        fam = family(rc.model, data_spec(rc, ds))
    return Trainer(rc, tmp_path / "run", fam, ds, progress=False, **kw)


# --------------------------------------------------------------------------------------
# The divergence guard's rule
# --------------------------------------------------------------------------------------
def test_guard_flags_losses_far_above_the_running_median_and_keeps_them_out_of_it():
    g = DivergenceGuard(factor=1000.0)
    assert g.observe("main", 1.0) is False  # the first loss is never judged
    for v in (1.2, 0.8, 1.1, 0.9):
        assert g.observe("main", v) is False
    # median 1.0, MAD 0.1: the threshold is 1 + 1000 * max(|1|, 0.1) = 1001
    assert g.observe("main", 1000.0) is False and g.history["main"][-1] == 1000.0
    g.history["main"].pop()
    assert g.observe("main", 1002.0) is True and 1002.0 not in g.history["main"]
    assert g.step_explosion == ("main", 1002.0, 1.0)
    # each optimizer has its own history; negative losses use |median|
    for v in (-5.0, -4.0, -6.0):
        g.observe("critic", v)
    assert g.observe("critic", 4990.0) is False and g.observe("critic", 5100.0) is True  # -5 + 1000 * 5 = 4995
    # factor 0: no check
    g0 = DivergenceGuard(factor=0.0)
    g0.observe("main", 1.0)
    assert g0.observe("main", 1e30) is False


def test_guard_history_is_bounded_and_round_trips_through_json():
    g = DivergenceGuard(factor=10.0)
    for i in range(DivergenceGuard.WINDOW + 50):
        g.observe("main", 1.0 + 1e-3 * i)
    assert len(g.history["main"]) == DivergenceGuard.WINDOW and g.history["main"][0] == 1.0 + 1e-3 * 50
    g.skipped_in_a_row, g.exploding_in_a_row, g.exploding_since = 2, 1, 17
    h = DivergenceGuard(factor=10.0)
    h.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert h.state_dict() == g.state_dict() and h.alarm
    with pytest.raises(CheckpointError, match="corrupt divergence-guard"):
        h.load_state_dict({"history": {"main": ["x"]}})


# --------------------------------------------------------------------------------------
# Metrics truncation, the dry step, learning rates, frozen modules
# --------------------------------------------------------------------------------------
def test_resume_truncation_keeps_the_rows_up_to_the_checkpoint_step(tmp_path):
    tr = trainer(tmp_path)
    tr.run_dir.mkdir()
    rows = [{"step": 2, "loss": 1.0}, {"step": 4, "fid": 3.0}, {"step": 5, "loss": 0.5}, {"step": 6, "loss": 0.4},
            [1, 2], {"step": "7"}]
    p = tr.run_dir / "metrics.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo')
    tr.step = 5
    tr._truncate_metrics()
    assert [json.loads(r) for r in p.read_text().splitlines()] == rows[:3]
    mtime = p.stat().st_mtime_ns
    tr._truncate_metrics()  # nothing to drop: the file is not rewritten
    assert p.stat().st_mtime_ns == mtime


def test_the_dry_step_changes_no_state(tmp_path, monkeypatch):
    a = trainer(tmp_path / "a")
    monkeypatch.setattr(Trainer, "_dry_run", lambda self: None)
    b = trainer(tmp_path / "b")
    ta, tb = a.state_tensors()[0], b.state_tensors()[0]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert all(p.grad is None for m in a.modules.values() for p in m.parameters())


@dataclass
class FrozenCfg:
    family: str = "frozen_test"  # name of this test family


class WithFrozen(Family):
    """Two trained vectors with their own optimizers (lr and warm-up differ) and a frozen linear
    map applied in ``prepare``."""

    name = "frozen_test"
    Config = FrozenCfg
    declared = Capabilities()

    def build(self):
        d = self.data.shape[0]
        self.u, self.v = nn.Linear(d, d), nn.Linear(d, d)
        self.frozen_map = nn.Sequential(nn.Linear(d, d), nn.Dropout(0.5))
        self.seen = []

    def modules(self):
        return {"u": self.u, "v": self.v}

    def frozen(self):
        return {"map": self.frozen_map}

    def optimizers(self, train):
        return {"fast": self.optimizer_from_train(train, ("u",), lr=0.05, warmup=3),
                "slow": self.optimizer_from_train(train, ("v",), lr=0.001, warmup=0, schedule="linear")}

    def prepare(self, batch, modules):
        m = modules["map"]
        self.seen.append((m.training, any(p.requires_grad for p in m.parameters()), set(modules)))
        out = super().prepare(batch, modules)
        out["x"] = m(out["x"])  # eval mode: the dropout is off, the map deterministic
        return out

    def training_step(self, modules, batch, ctx):
        x = batch["x"]
        lu = ((modules["u"](x) - x) ** 2).mean()
        ctx.optimize(lu, "fast")
        lv = ((modules["v"](x) + x) ** 2).mean()
        ctx.optimize(lv, "slow")
        return {"lu": lu.detach(), "lv": lv.detach()}


def test_each_optimizer_follows_its_own_schedule_and_frozen_modules_stay_frozen(tmp_path):
    tr = trainer(tmp_path, family=WithFrozen)
    frozen_before = {k: v.clone() for k, v in tr.frozen["map"].state_dict().items()}
    seen_lr = []

    import scorelab.train.trainer as tm

    def spy(event, t):
        if event == "optimize":
            seen_lr.append((t.step, {n: o.param_groups[0]["lr"] for n, o in t.optimizers.items()}))

    tm.EVENT_HOOK = spy
    try:
        assert tr.fit()["status"] == "done"
    finally:
        tm.EVENT_HOOK = None
    for step, lrs in seen_lr[1::2]:  # after the second update of each step both lrs are set for it
        assert lrs == {n: pytest.approx(tr.specs[n].lr_at(step, 6)) for n in ("fast", "slow")}
    assert seen_lr[1][1]["fast"] == pytest.approx(0.05 / 3) and seen_lr[-1][1]["slow"] == pytest.approx(0.001 / 6)
    assert all(s == (False, False, {"u", "v", "map"}) for s in tr.family.seen)
    for k, v in tr.frozen["map"].state_dict().items():
        assert torch.equal(v, frozen_before[k])
    t, meta = load_checkpoint(tr.run_dir / "checkpoint.safetensors")
    assert not any(".map." in k for k in t) and set(meta["optimizers"]) == {"fast", "slow"}
    assert meta["optimizers"]["slow"]["param_groups"][0]["lr"] == pytest.approx(0.001 / 6)


# --------------------------------------------------------------------------------------
# Signals, temporaries, atomic writes, optimizer states
# --------------------------------------------------------------------------------------
def test_graceful_stop_raises_at_start_up_and_defers_later(capfd):
    old = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as e, GracefulStop(defer=False):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler runs between bytecodes
            pass
    assert e.value.signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is old
    with GracefulStop(defer=True, describe=lambda: "step 9") as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        x = sum(range(100))  # still running: nothing was raised
    assert x == 4950 and stop.signum == signal.SIGINT
    err = capfd.readouterr().err
    assert "SIGINT received: stopping after step 9" in err and "SIGTERM ignored: already stopping (step 9)" in err


def test_stale_temporaries_are_those_of_dead_processes(tmp_path):
    dead = 2**22 + 7  # above any pid_max
    names = {f".checkpoint.safetensors.{dead}.0a1b2c3d.tmp": True, f".loss.{dead}.tmp.png": True,
             f".config.yaml.{os.getpid()}.ffff0000.tmp": False, ".checkpoint.safetensors.k2j_x9.tmp": True,
             "checkpoint.safetensors": False, ".lock": False, f".notes.{dead}.txt": False}
    for n in names:
        (tmp_path / n).write_text("x")
    assert {p.name for p in stale_temporaries(tmp_path)} == {n for n, stale in names.items() if stale}


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    p = tmp_path / "eval.json"
    p.write_text("old")

    def half_then_full(tmp):
        tmp.write_text("hal")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(StorageError) as e:
        atomic_write(p, half_then_full)
    assert str(e.value) == f"cannot write {p}: No space left on device" and e.value.errno == errno.ENOSPC
    assert p.read_text() == "old" and sorted(q.name for q in tmp_path.iterdir()) == ["eval.json"]
    with pytest.raises(StorageError, match="cannot write .*: (Not a directory|No such file)"):
        atomic_write_text(tmp_path / "eval.json" / "x.json", "{}")


def test_optimizer_state_checks():
    p = nn.Parameter(torch.zeros(3, 2))
    q = nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([p, q])
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    opt.step()
    from scorelab.train.checkpoint import optimizer_to_flat

    t, meta = optimizer_to_flat(opt, "opt.main")
    check_optimizer_state(opt, "opt.main", t, meta)  # its own state passes
    bad = [({**t, "opt.main.1.exp_avg": torch.zeros(3, 2)}, meta, "has shape"),
           ({**t, "opt.main.2.exp_avg": torch.zeros(1)}, meta, "names no parameter"),
           ({**t, "opt.main.0.step": torch.tensor(-1.0)}, meta, "not a finite count"),
           (t, {**meta, "param_groups": [{"params": [0]}]}, "parameter groups of sizes")]
    for tensors, m, msg in bad:
        with pytest.raises(CheckpointError, match=msg):
            check_optimizer_state(opt, "opt.main", tensors, m)
