"""The divergence guard: per-optimizer loss history and the counters behind the trainer's stop
decisions (exploding losses, skipped non-finite updates), checkpointed as JSON."""

from __future__ import annotations


from .checkpoint import CheckpointError

__all__ = ["DivergenceGuard"]


class DivergenceGuard:
    """Per-optimizer loss history and the counters behind the trainer's stop decisions.

    ``observe(name, loss)`` flags a finite loss as *exploding* when ``loss > m + factor * max(|m|,
    MAD, 1e-8)``, with ``m`` the median and MAD the median absolute deviation of the last
    :attr:`WINDOW` ordinary (non-exploding) losses of that optimizer; exploding values do not enter
    the history, so a persisting explosion stays flagged. ``nonfinite(...)`` records a skipped
    update. The trainer turns the per-step flags into warnings, deferred checkpoints and stops; the
    history and counters are checkpointed (JSON) so a resumed run judges as a straight one.
    """

    WINDOW = 200  # losses kept per optimizer

    def __init__(self, factor: float):
        self.factor = factor  # 0: no explosion check
        self.history: dict[str, list[float]] = {}
        self.skipped_in_a_row = 0  # steps in a row with a skipped update
        self.exploding_in_a_row = 0  # steps in a row with an exploding loss
        self.exploding_since: int | None = None  # first step of the current explosion
        self.step_skips: list[str] = []  # this step's non-finite reasons
        self.step_explosion: tuple | None = None  # this step's first (optimizer, loss, median)

    @staticmethod
    def _median(v: list[float]) -> float:
        s = sorted(v)
        n = len(s)
        return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])

    def begin_step(self) -> None:
        self.step_skips, self.step_explosion = [], None

    def nonfinite(self, optimizer: str, what: str, value: float) -> None:
        self.step_skips.append(f"{what} of optimizer {optimizer!r} is {value}")

    def observe(self, optimizer: str, loss: float) -> bool:
        """Record a finite ``loss``; True if it is exploding (then it is not added to the history)."""
        h = self.history.setdefault(optimizer, [])
        if self.factor > 0 and h:
            m = self._median(h)
            mad = self._median([abs(v - m) for v in h])
            if loss > m + self.factor * max(abs(m), mad, 1e-8):
                if self.step_explosion is None:
                    self.step_explosion = (optimizer, loss, m)
                return True
        h.append(loss)
        if len(h) > self.WINDOW:
            del h[0]
        return False

    @property
    def alarm(self) -> bool:
        """The loss is exploding, or the last step's update was skipped: checkpoints wait."""
        return self.exploding_in_a_row > 0 or self.skipped_in_a_row > 0

    def state_dict(self) -> dict:
        return {"history": self.history, "skipped_in_a_row": self.skipped_in_a_row,
                "exploding_in_a_row": self.exploding_in_a_row, "exploding_since": self.exploding_since}

    def load_state_dict(self, d: dict | None) -> None:
        if not d:
            return
        try:
            hist = {str(k): [float(x) for x in v][-self.WINDOW :] for k, v in dict(d.get("history", {})).items()}
            counts = int(d.get("skipped_in_a_row", 0)), int(d.get("exploding_in_a_row", 0))
            since = d.get("exploding_since")
            since = None if since is None else int(since)
        except (TypeError, ValueError, AttributeError):
            raise CheckpointError("checkpoint: corrupt divergence-guard metadata") from None
        self.history = hist
        self.skipped_in_a_row, self.exploding_in_a_row = counts
        self.exploding_since = since
