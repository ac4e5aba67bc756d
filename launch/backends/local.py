"""This machine: members one after another (launch/sweep.run_sweep does the real work).

The commands below are what --dry-run prints: one `python -m launch.cli run`
per member. A real local launch trains in this process through
`run_sweep`, as `scaling sweep` always did, or, with `launch.parallel` > 1
(`--parallel N`), as N `run` processes at a time (`train_parallel`). The
default, `launch.parallel=0`, is one process per core on a machine whose JAX
has no accelerator: small models leave most of a core idle between XLA's
operations, so two members side by side, each pinned to its own core, train
faster together than one after another on both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from launch.backends import Launch, Member, Step
from launch.backends.commands import trainer_args
from launch.host_devices import has_accelerator, usable_cores
from scaling.errors import Preempted

# The exit code of `scaling run` when another process trains the same run
# (launch.train.RunBusy): the parallel sweep reports the member as busy, not failed.
BUSY_EXIT_CODE = 75  # EX_TEMPFAIL


def prepare(plan: Launch) -> list[Step]:
    return []


def groups(plan: Launch) -> list[list[Member]]:
    return [plan.members] if plan.members else []


def acquire(plan: Launch, slice_index: int) -> list[Step]:
    return []


def train(plan: Launch, slice_index: int, member: Member) -> list[Step]:
    return [Step(trainer_args(sys.executable, plan, member))]


def release(plan: Launch, slice_index: int) -> list[Step]:
    return []


def state(plan: Launch, slice_index: int) -> None:
    return None


def preempted(state_output: str, returncode: int) -> bool:
    return False


# Below this much training (FLOPs, all members together: seconds of a CPU core), the few
# seconds each process takes to start and compile outweigh what a second core gives.
PARALLEL_MIN_FLOPS = 1e12
# Where `launch.parallel` pins a member's process: a comma-separated list of cores, read by
# the child's command line before JAX starts its threads (launch/cli.py).
CPUS_ENV = "SCALING_CPUS"


def auto_parallel(n_members: int, total_flops: float) -> int:
    """launch.parallel=0: one process per core on a CPU-only JAX for a sweep worth it, else 1."""
    if total_flops < PARALLEL_MIN_FLOPS or n_members < 2:
        return 1
    if has_accelerator():  # members would share the one accelerator, one at a time
        return 1
    return max(1, min(n_members, len(usable_cores())))


def pin_from_environment() -> None:
    """Pin this process to the cores in $SCALING_CPUS, if set (a parallel sweep's member)."""
    value = os.environ.get(CPUS_ENV, "")
    if value and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in value.split(",")})


def core_sets(parallel: int, cores: list[int] | None = None) -> list[list[int]]:
    """`parallel` disjoint sets of cores, as even as they go (none empty)."""
    cores = usable_cores() if cores is None else cores
    if len(cores) < parallel:
        return [list(cores)] * parallel  # more processes than cores: no pinning helps
    share = len(cores) // parallel
    return [cores[i * share : (i + 1) * share] for i in range(parallel)]


def member_statuses(study: str, overrides: dict) -> dict[str, str]:
    """{run_id: status} of every member of the study, from its store."""
    from launch import sweep  # noqa: PLC0415 - sweep imports JAX; only this path needs it

    return sweep.member_statuses(study, overrides)


def train_parallel(
    study: str,
    overrides: dict,
    parallel: int,
    retry_failed: bool = False,
    popen=subprocess.Popen,
    wait_s: float = 1.0,
) -> dict[str, str]:
    """Train the unfinished members, `parallel` processes at a time, largest first.

    Returns {run_id: "finished" | "failed (exit code N)"} for the members it trained.

    Each member is its own `python -m launch.cli run` process, pinned to its
    share of the cores; they share the store (SQLite in WAL mode with a busy
    timeout queues their writes). The members start in order of their
    training FLOPs, largest first, so the longest run never starts last.
    """
    from launch import config as config_lib  # noqa: PLC0415 - JAX: only this path needs it
    from launch import sweep, train  # noqa: PLC0415
    from launch.backends import runner  # noqa: PLC0415 - runner imports this module

    todo = set(sweep.members_to_train(study, overrides, retry_failed))
    plan = runner.prepare_launch(study, overrides, retry_failed)
    flops = {
        config_lib.run_id(c): train.run_record(c, "").flops
        for c in config_lib.study_sweep(study, overrides)
    }
    queue = sorted((m for m in plan.members if m.run_id in todo), key=lambda m: -flops[m.run_id])
    free = core_sets(parallel)
    running: dict[str, tuple[object, list[int]]] = {}
    codes: dict[str, int] = {}
    notice = _Notice()
    while queue or running:
        if notice.received:  # the machine is going: start nothing, pass the notice on once
            queue.clear()
            for process, _ in running.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            notice.received = False
        while queue and free:
            member, cores = queue.pop(0), free.pop(0)
            process = popen(
                trainer_args(sys.executable, plan, member),
                env={**os.environ, CPUS_ENV: ",".join(map(str, cores))},
            )
            running[member.run_id] = (process, cores)
        for run_id, (process, cores) in list(running.items()):
            if process.poll() is not None:
                codes[run_id] = process.returncode
                free.append(cores)
                del running[run_id]
        if running:
            time.sleep(wait_s)
    notice.close()
    return {run_id: _outcome(code) for run_id, code in codes.items()}


def _outcome(code: int) -> str:
    if code == 0:
        return "finished"
    if code == BUSY_EXIT_CODE:
        return "busy"
    if code in (Preempted.exit_code, -signal.SIGTERM):  # saved at the notice, or killed by it
        return "preempted"
    return f"failed (exit code {code})"


class _Notice:
    """SIGTERM to the parallel sweep: noted here, answered in its loop (main thread only)."""

    def __init__(self):
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._flag)

    def _flag(self, signum, frame):
        self.received = True

    def close(self):
        signal.signal(signal.SIGTERM, self._previous)
