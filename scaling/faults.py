"""A test-only knob: kill this process at a named point, to test kill-and-resume.

`SCALING_FAULT=POINT:COUNT` makes the COUNT-th call of `point(POINT)` in
this process send SIGKILL to the process itself, as a preempted machine
would: no exception, no cleanup, no flush. `POINT:COUNT:SIGNAL` sends that
signal instead (SIGTERM: a preemption notice, which the trainer answers), and
`POINT:COUNT:SIGNAL:SECONDS` then holds the process that long, as a slow host
would (so a notice reaches the other processes of a run before it ends).
The points are

    train_step       after a train step is dispatched, before its result is used
    checkpoint_save  while an orbax save is in flight, before it is committed
    store_write      inside an eval-row transaction of the store, before COMMIT

Unset (the normal case) it costs one dictionary lookup per call. It lives
in `scaling/` because the store, which may not import `launch/`, holds one
of the points. Never set it outside tests.
"""

from __future__ import annotations

import os
import signal
import time

POINTS = ("train_step", "checkpoint_save", "store_write")
_calls: dict[str, int] = {}


def _armed() -> tuple[str, int, signal.Signals, float] | None:
    spec = os.environ.get("SCALING_FAULT", "")
    if not spec:
        return None
    name, _, rest = spec.partition(":")
    count, _, rest = rest.partition(":")
    signame, _, pause = rest.partition(":")
    signum = getattr(signal.Signals, signame or "SIGKILL", None)
    if (
        name not in POINTS
        or not count.isdigit()
        or int(count) < 1
        or signum is None
        or not (pause or "0").replace(".", "", 1).isdigit()
    ):
        raise ValueError(
            f"SCALING_FAULT={spec!r}: expected POINT:COUNT[:SIGNAL[:SECONDS]] with POINT one "
            f"of {', '.join(POINTS)}, COUNT >= 1, SIGNAL a name such as SIGTERM and SECONDS "
            "a pause after it"
        )
    return name, int(count), signum, float(pause or 0)


def point(name: str) -> None:
    """Count a call of point `name`; signal this process if SCALING_FAULT names this call."""
    armed = _armed()
    if armed is None or armed[0] != name:
        return
    _calls[name] = _calls.get(name, 0) + 1
    if _calls[name] == armed[1]:
        os.kill(os.getpid(), armed[2])
        time.sleep(armed[3])
