"""This machine: members one after another (launch/sweep.run_sweep does the real work).

The commands below are what --dry-run prints: one `python -m launch.cli run`
per member. A real local launch trains in this process through
`run_sweep`, as `scaling sweep` always did, or, with `launch.parallel` > 1
(`--parallel N`), as N `run` processes at a time (`train_parallel`).
"""

from __future__ import annotations

import subprocess
import sys
import time

from launch.backends import Member, Step, SweepPlan
from launch.backends.commands import trainer_args


def prepare(plan: SweepPlan) -> list[Step]:
    return []


def groups(plan: SweepPlan) -> list[list[Member]]:
    return [plan.members] if plan.members else []


def acquire(plan: SweepPlan, slice_index: int) -> list[Step]:
    return []


def train(plan: SweepPlan, slice_index: int, member: Member) -> list[Step]:
    return [Step(trainer_args(sys.executable, plan, member))]


def release(plan: SweepPlan, slice_index: int) -> list[Step]:
    return []


def state(plan: SweepPlan, slice_index: int) -> None:
    return None


def preempted(state_output: str, returncode: int) -> bool:
    return False


def train_parallel(study: str, overrides: dict, parallel: int, retry_failed: bool = False,
                   popen=subprocess.Popen, wait_s: float = 1.0) -> dict[str, str]:
    """Train the unfinished members, `parallel` processes at a time.

    Returns {run_id: "finished" | "failed (exit code N)"} for the members it trained.

    Each member is its own `python -m launch.cli run` process; they share the
    store (SQLite in WAL mode with a busy timeout queues their writes). Use
    it where cores allow: each process uses several threads of its own.
    """
    from launch import sweep  # noqa: PLC0415 - sweep imports JAX; only this path needs it
    from launch.backends import runner  # noqa: PLC0415 - runner imports this module

    todo = set(sweep.members_to_train(study, overrides, retry_failed))
    plan = runner.make_plan(study, overrides, retry_failed)
    queue = [m for m in plan.members if m.run_id in todo]
    running: dict[str, object] = {}
    codes: dict[str, int] = {}
    while queue or running:
        while queue and len(running) < parallel:
            member = queue.pop(0)
            running[member.run_id] = popen(trainer_args(sys.executable, plan, member))
        for run_id, process in list(running.items()):
            if process.poll() is not None:
                codes[run_id] = process.returncode
                del running[run_id]
        if running:
            time.sleep(wait_s)
    return {run_id: "finished" if code == 0 else f"failed (exit code {code})"
            for run_id, code in codes.items()}
