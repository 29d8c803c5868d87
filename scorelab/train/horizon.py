"""How many steps a time-limited run's learning-rate schedule spans.

A run with ``train.max_minutes`` stops on the clock, so on a slower CPU it stops earlier in its
schedule: a cosine decay sized for ``train.steps`` (what a fast machine does in the budget) is
cut while the learning rate is still high, and the weights are never annealed. With
``train.schedule_length: budget`` (the default) and a decaying schedule, the trainer times
``MEASURE`` steps after ``SKIP`` warm-up steps of its process and sets the schedule's length to
the steps that fit in ``MARGIN`` of the time left (at most ``train.steps``); the run then ends
there, its learning rate at the schedule's end. The decision is written to every checkpoint, so a
resumed run keeps it (unless its ``max_minutes`` changed: then it measures again). Constant
schedules, runs without ``max_minutes`` and ``schedule_length: steps`` use ``train.steps``.
"""

from __future__ import annotations

import math

__all__ = ["BudgetHorizon"]


class BudgetHorizon:
    """The schedule length of one run: :attr:`steps` (``train.steps`` until measured)."""

    SKIP = 5  # steps of this process not timed (allocator and kernel warm-up)
    MEASURE = 20  # steps timed
    MARGIN = 0.95  # share of the time left planned for steps (the rest: sample grids, checkpoints)

    def __init__(self, tc, specs: dict):
        self.cap = int(tc.steps)
        self.budget = 60.0 * float(tc.max_minutes)  # seconds; 0: none
        self.schedule = next((s.schedule for s in specs.values() if s.schedule != "constant"), "constant")
        self.active = tc.schedule_length == "budget" and self.budget > 0 and self.schedule != "constant"
        self.steps = self.cap
        self.planned = False
        self.seconds_per_step: float | None = None
        self.window: tuple[int, int] | None = None  # the steps timed
        self._seen = 0
        self._start: tuple[int, float] | None = None

    def observe(self, step: int, elapsed: float) -> bool:
        """Called after each step with the run's step and elapsed seconds; True once, when the
        schedule length has just been decided."""
        if not self.active or self.planned:
            return False
        self._seen += 1
        if self._seen == self.SKIP:
            self._start = (step, elapsed)
        if self._seen < self.SKIP + self.MEASURE or self._start is None:
            return False
        s0, e0 = self._start
        self.seconds_per_step = (elapsed - e0) / max(1, step - s0)
        left = self.budget - elapsed
        fit = math.floor(self.MARGIN * left / self.seconds_per_step) if self.seconds_per_step > 0 else self.cap
        self.steps = max(step + 1, min(self.cap, step + fit))
        self.window, self.planned = (s0, step), True
        return True

    def describe(self) -> str:
        if not self.planned:
            return f"{self.steps} steps (train.steps)"
        a, b = self.window
        fits = "at most train.steps" if self.steps == self.cap else f"train.steps is {self.cap}"
        return (f"{self.steps} steps fit in the {self.budget / 60:g}-minute budget at {self.seconds_per_step:.3f} s/step "
                f"(timed over steps {a}-{b}; {self.MARGIN:.0%} of the time left, {fits}): the {self.schedule} learning "
                f"rate ends there (train.schedule_length: steps to span train.steps instead)")

    def state_dict(self) -> dict:
        return {"steps": self.steps, "planned": self.planned, "budget": self.budget,
                "seconds_per_step": self.seconds_per_step, "window": list(self.window) if self.window else None}

    def load_state_dict(self, d: dict | None) -> None:
        """A checkpoint's decision, kept if it was made for this budget (else measured again)."""
        if not d or not d.get("planned") or not self.active or float(d.get("budget", -1)) != self.budget:
            return
        self.steps = min(int(d["steps"]), self.cap)
        self.planned = True
        self.seconds_per_step = d.get("seconds_per_step")
        self.window = tuple(d["window"]) if d.get("window") else (0, 0)
