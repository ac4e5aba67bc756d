"""This machine: members one after another (launch/sweep.run_sweep does the real work).

The commands below are what --dry-run prints: one `python -m launch.cli run`
per member. A real local launch trains in this process through
`run_sweep`, as `scaling sweep` always did; training several members at
once on a many-core host is not offered yet.
"""

from __future__ import annotations

import sys

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
