"""The learning-rate schedule of a time-limited run spans the steps that fit in its budget
(scorelab.train.horizon): the rule with an injected clock, its checkpoint round trip, and a run."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from scorelab.families.base import OptimizerSpec
from scorelab.train.horizon import BudgetHorizon

pytestmark = pytest.mark.usefixtures("one_thread")


def tc(**kw):
    d = dict(steps=10_000, max_minutes=1.0, schedule_length="budget")
    d.update(kw)
    return SimpleNamespace(**d)


COS = {"main": OptimizerSpec(modules=("net",), schedule="cosine", warmup=2)}


def drive(h: BudgetHorizon, seconds_per_step: float, start_step: int = 0, start_elapsed: float = 0.0) -> int:
    """Feed ``observe`` a clock of constant step time until it decides; returns the deciding step."""
    step, t = start_step, start_elapsed
    while True:
        step, t = step + 1, t + seconds_per_step
        if h.observe(step, t):
            return step


def test_the_schedule_spans_the_steps_that_fit_in_the_time_left():
    h = BudgetHorizon(tc(), COS)
    assert h.active and h.steps == 10_000
    at = drive(h, 0.5)
    assert at == BudgetHorizon.SKIP + BudgetHorizon.MEASURE and h.seconds_per_step == pytest.approx(0.5)
    left = 60.0 - 0.5 * at  # seconds of the 1-minute budget after the deciding step
    assert h.steps == at + math.floor(BudgetHorizon.MARGIN * left / 0.5)  # 25 + 68 = 93
    assert not h.observe(at + 1, 0.5 * (at + 1))  # decided once


def test_a_fast_machine_is_capped_by_train_steps_and_a_slow_one_still_steps():
    fast = BudgetHorizon(tc(steps=50), COS)
    drive(fast, 0.001)
    assert fast.steps == 50
    slow = BudgetHorizon(tc(max_minutes=0.001), COS)  # 0.06 s budget, already spent when measured
    at = drive(slow, 0.5)
    assert slow.steps == at + 1


@pytest.mark.parametrize("kw, specs", [({"max_minutes": 0.0}, COS), ({"schedule_length": "steps"}, COS),
                                       ({}, {"main": OptimizerSpec(modules=("net",))})])
def test_no_budget_no_decay_or_steps_asked_for_keeps_train_steps(kw, specs):
    h = BudgetHorizon(tc(**kw), specs)
    assert not h.active
    for s in range(1, 100):
        assert not h.observe(s, 0.5 * s)
    assert h.steps == 10_000


def test_the_decision_is_kept_by_a_resume_with_the_same_budget_and_remade_with_another():
    h = BudgetHorizon(tc(), COS)
    drive(h, 0.5)
    d = json.loads(json.dumps(h.state_dict()))  # it travels in the checkpoint's JSON meta
    same = BudgetHorizon(tc(), COS)
    same.load_state_dict(d)
    assert same.planned and same.steps == h.steps and not same.observe(40, 20.0)
    more = BudgetHorizon(tc(max_minutes=2.0), COS)
    more.load_state_dict(d)
    assert not more.planned and more.steps == 10_000
    at = drive(more, 0.5, start_step=30, start_elapsed=15.0)
    assert more.steps == at + math.floor(BudgetHorizon.MARGIN * (120.0 - (15.0 + 0.5 * (at - 30))) / 0.5)


def test_a_time_limited_run_ends_its_cosine_at_the_planned_step(tmp_path):
    from scorelab.cli import main

    cfg = {"name": "h", "seed": 0, "data": {"name": "8gaussians", "options": {"n": 256}},
           "model": {"family": "diffusion", "net": "mlp", "net_options": {"width": 8, "depth": 1}, "sampler": "euler",
                     "sampling_steps": 2},
           "train": {"steps": 1_000_000, "batch_size": 32, "warmup": 2, "schedule": "cosine", "min_lr_ratio": 0.1,
                     "max_minutes": 0.03, "log_every": 10, "ckpt_every": 0, "sample_every": 0, "precision": "fp32",
                     "device": "cpu", "threads": 1}}
    p = tmp_path / "h.yaml"
    p.write_text(json.dumps(cfg))
    assert main(["train", str(p), "--runs", str(tmp_path / "runs"), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "runs" / "h" / "metrics.jsonl").read_text().splitlines()]
    plan = [r for r in rows if "horizon" in r]
    assert len(plan) == 1 and plan[0]["step"] == BudgetHorizon.SKIP + BudgetHorizon.MEASURE
    horizon = plan[0]["horizon"]
    last = [r for r in rows if "lr" in r][-1]
    assert 25 < horizon < 1_000_000 and last["step"] <= horizon
    if last["step"] == horizon:  # it ran to its plan (a machine slower than measured stops on the clock first)
        spec = OptimizerSpec(modules=("net",), lr=2e-3, warmup=2, schedule="cosine", min_lr_ratio=0.1)
        assert last["lr"] == pytest.approx(spec.lr_at(horizon - 1, horizon), rel=1e-9)  # the schedule of `horizon` steps
        assert last["lr"] < 2e-3 * 0.1 * 1.05  # near its end, min_lr_ratio * lr (the last step sits 1/horizon before it)
