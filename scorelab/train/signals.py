"""SIGINT / SIGTERM in a training process: deferred to the end of the step (:class:`GracefulStop`),
or :class:`Interrupted` during start-up, before anything was written."""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

__all__ = ["GracefulStop", "Interrupted"]


def _say(text: str) -> None:
    """Write to stderr without Python's buffered writer (safe inside a signal handler)."""
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass


class Interrupted(KeyboardInterrupt):
    """A signal during start-up, before anything was written (``signum``: which)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class GracefulStop:
    """SIGINT / SIGTERM handling for a training process (a context manager).

    While :attr:`defer` is False (start-up: nothing written yet) a signal raises
    :class:`Interrupted` (a KeyboardInterrupt) at once. Once the trainer sets it True (before it writes anything),
    the first signal only records :attr:`signum`; the loop stops after the step in progress and
    saves. Every later signal is ignored with a message saying what is being finished
    (``describe()``). Handlers are installed only in the main thread and restored on exit, unless
    ``restore`` is False (the command line's own process, which exits right after: a signal that
    comes after the save, between the restore and the exit, would otherwise kill it or print a
    traceback).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, defer: bool = True, describe: Callable[[], str] | None = None, restore: bool = True):
        self.defer = defer  # True: record and wait for the end of the step; False: raise KeyboardInterrupt
        self.describe = describe or (lambda: "the current step")  # what is being finished (for the messages)
        self.restore = restore  # restore the old handlers on exit (False: a process about to exit keeps ignoring signals)
        self.signum: int | None = None  # the first signal received
        self._old: dict = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        if self.restore:
            for s, h in self._old.items():
                signal.signal(s, h)
        else:  # the command line's process: a late second signal must not kill it between the save and its exit
            self.defer, self.describe = True, (lambda: "exiting")
        self._old.clear()
        return False

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            if not self.defer:
                raise Interrupted(signum)
            _say(f"\nscorelab: {name} received: stopping after {self.describe()}, then saving the checkpoint "
                 f"(further signals are ignored)\n")
        else:
            _say(f"\nscorelab: {name} ignored: already stopping ({self.describe()}); the checkpoint is on its way\n")
