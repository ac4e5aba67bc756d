"""One trainer per run: a lock on this machine, and a claim in the store across machines.

Two sweeps over one store would otherwise train the same member side by side and collide
in its checkpoint folder. On one machine the kernel's lock (`run_lock`, flock) settles it
at once and goes with its process, also when the process is killed. Sweeps on several
machines over one store (Slurm nodes on a shared disk) see each other's claims instead
(`Claim`): a row in the store's `claims` table with the trainer's host, pid and a
heartbeat that a thread renews every HEARTBEAT_S. A claim whose heartbeat stopped for
STALE_S (its process killed, its host gone) is taken over; a trainer that finds its own
claim taken over (it stalled past STALE_S) stops at its next eval without writing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import socket
import tempfile
import threading
from pathlib import Path

from launch.backends.local import BUSY_EXIT_CODE
from scaling.errors import UserError
from scaling.store import Store

HEARTBEAT_S = 30.0
# Many heartbeats: a trainer busy compiling or saving still beats (the thread runs
# beside it), so only a process that is gone, or its whole host stalled, goes stale.
STALE_S = 300.0


class RunBusy(UserError):
    """Another process is training the same run (it holds the run's lock or claim)."""

    exit_code = BUSY_EXIT_CODE


@contextlib.contextmanager
def run_lock(workdir: str, run_id: str):
    """Hold the run's lock on this machine for the block, or raise RunBusy at once.

    The lock file lives in the temporary folder, keyed by the workdir's absolute path, so
    a run refused for another reason leaves nothing in the workdir.
    """
    key = hashlib.sha256(str(Path(workdir).resolve()).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "scaling-suite-locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}-{run_id}.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusy(
                f"run {run_id} is being trained by another process on this machine "
                f"(it holds {path}); wait for it to finish, or stop it and relaunch"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def owner_name() -> str:
    """host:pid:token, unique to this process (the token tells a reused pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _gone_from_this_host(owner: str) -> bool:
    """Whether `owner` (host:pid:token) was a process of this host that no longer runs."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class Claim:
    """The run's claim in the store while the block runs (a context manager); RunBusy on
    entry when another live trainer holds it. `check()` raises RunBusy once the claim
    was taken over."""

    def __init__(self, store_path: str, run_id: str):
        self.store_path, self.run_id = str(store_path), run_id
        self.owner = owner_name()
        self._stop = threading.Event()
        self._lost: str | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self):
        with Store(self.store_path) as store:
            holder = store.claim(self.run_id, self.owner, STALE_S)
            if holder is not None and _gone_from_this_host(holder[0]):
                # Killed here a moment ago (SIGKILL, the OOM killer): no need to wait for
                # its heartbeat to go stale before resuming its run.
                holder = store.claim(self.run_id, self.owner, stale_s=0.0)
        if holder is not None:
            owner, age = holder
            raise RunBusy(
                f"run {self.run_id} is being trained by {owner} (host:pid, its last "
                f"heartbeat {age:.0f} s ago in {self.store_path}); wait for it to finish, or "
                f"stop it: a claim is taken over {STALE_S:.0f} s after its heartbeat stops"
            )
        self._thread = threading.Thread(target=self._beat, name="claim-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self):
        # Its own connection: an SQLite connection belongs to the thread that made it.
        with Store(self.store_path) as store:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    if not store.heartbeat(self.run_id, self.owner):
                        self._lost = "its claim was taken over"
                        return
                except Exception as e:  # noqa: BLE001 - the next write will say it too
                    self._lost = f"its heartbeat could not be written ({e})"
                    return

    def check(self):
        """RunBusy when this process no longer holds the run (before it writes anything)."""
        if self._lost:
            raise RunBusy(
                f"run {self.run_id}: this trainer stops, {self._lost} (no heartbeat for "
                f"{STALE_S:.0f} s: was this host stalled?); the process that holds it goes on"
            )

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(Exception), Store(self.store_path) as store:
            store.release(self.run_id, self.owner)
