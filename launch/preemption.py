"""Preemption notices: finish the step, save a checkpoint, mark the run preempted, exit 143.

A spot TPU slice, GKE and Slurm send SIGTERM some seconds before they take a machine away
(Slurm also a chosen signal earlier, `--signal=B:USR1@120`; give its name as
`train.preemption_signal`). Without an answer every preemption throws away the steps since
the last checkpoint. With one, the loop stops after the step in progress, saves at that step
(batches are a pure function of seed and step, so the step is the data position), and the run
is `preempted`: resumable, not failed, and the relaunch loses no step.

One process reads its own flag. Several must stop at the same step, or their collective save
would hang: JAX's preemption sync manager (started by `jax.distributed.initialize`) listens for
SIGTERM on every host, agrees on the first step that all can still reach and answers
`reached_preemption_sync_point(step)` with True there, on all of them. So with several
processes SIGTERM is left to it, and the chosen signal is passed on to it as a SIGTERM.
"""

from __future__ import annotations

import os
import signal

import jax
from jax.experimental import multihost_utils

from scaling.errors import UserError

# Signals that cannot be caught, or that mean something else here (Ctrl-C: interrupted).
_NOT_NOTICES = {"SIGKILL", "SIGSTOP", "SIGINT"}


def signal_of(name: str) -> signal.Signals | None:
    """The signal called `name` ("" -> None); UserError for one that cannot be a notice."""
    if not name:
        return None
    full = name if name.startswith("SIG") else f"SIG{name}"
    if full in _NOT_NOTICES or not hasattr(signal.Signals, full):
        raise UserError(
            f"train.preemption_signal={name!r} is not a signal a scheduler can give notice "
            "with; use a name such as SIGUSR1 or SIGUSR2 (SIGTERM is always a notice)"
        )
    return signal.Signals[full]


class Notice:
    """`with Notice(extra) as notice:` ... `if notice.reached(step):` save and stop.

    Inside the block SIGTERM (and `extra`) are a notice; outside, their handlers are as before.
    """

    def __init__(self, extra: signal.Signals | None = None):
        self.extra = extra
        self.received = False
        self.several = jax.process_count() > 1
        self._previous = {}

    def _flag(self, signum, frame):
        self.received = True

    def _to_jax(self, signum, frame):
        os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier owns SIGTERM

    def __enter__(self) -> Notice:
        handlers = {} if self.several else {signal.SIGTERM: self._flag}
        if self.extra is not None and self.extra != signal.SIGTERM:
            handlers[self.extra] = self._to_jax if self.several else self._flag
        for signum, handler in handlers.items():
            self._previous[signum] = signal.signal(signum, handler)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def reached(self, step: int) -> bool:
        """True at the step where this process (all processes, if several) stops and saves."""
        if self.several:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received
