"""Where a sweep's runs go: one interface, one module per launcher.

A backend turns a Launch (the members still to train) into argument
lists for the tools users already run: nothing here schedules jobs itself.

    local  this machine: `python -m launch.cli run ...` per member
    tpu    Cloud TPU VMs through `gcloud` (launch/backends/tpu.py)
    xpk    GKE through `xpk workload create` (launch/backends/xpk.py)
    slurm  a Slurm cluster through `sbatch`, one job per run (launch/backends/slurm.py)

Members are trained on "slices", in order: `prepare` runs once here
(packing the code), `acquire` makes slice i ready
(create it, wait for capacity, install the code), `train` runs one member on
it, `release` gives it back. `state` asks what became of a slice whose
command failed, and `preempted` reads that answer, so the runner
(launch/backends/runner.py) can tell a preemption, which it retries, from a
failure of the run itself, which it reports. Every command is a list of
arguments run without a shell; the one shell string, the command a remote
worker runs, is built with `shlex.quote` for every value (commands.py).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class Member:
    """One sweep member: its run id and its own get_sweep() overrides."""

    run_id: str
    overrides: dict


@dataclasses.dataclass(frozen=True)
class Step:
    """One command. `wait_for`: run it until its output is this word (a state poll)."""

    args: list[str]
    wait_for: str | None = None


@dataclasses.dataclass(frozen=True)
class Launch:
    """A sweep ready to launch: the study, its overrides, where it goes, what is left."""

    study: str  # the study file (with :arg), relative to the repository root
    overrides: dict  # command-line --config overrides, applied to every member
    launch: dict  # the resolved config.launch section
    sweep_name: str
    members: list[Member]  # members to train, in order
    skipped: dict  # run_id -> why it is not trained (finished, failed earlier)
    notes: list = dataclasses.field(default_factory=list)  # said before the commands


class Backend(Protocol):
    def prepare(self, plan: Launch) -> list[Step]: ...

    def groups(self, plan: Launch) -> list[list[Member]]: ...

    def acquire(self, plan: Launch, slice_index: int) -> list[Step]: ...

    def train(self, plan: Launch, slice_index: int, member: Member) -> list[Step]: ...

    def release(self, plan: Launch, slice_index: int) -> list[Step]: ...

    def state(self, plan: Launch, slice_index: int) -> Step | None: ...

    def preempted(self, state_output: str, returncode: int) -> bool: ...


def get_backend(name: str) -> Backend:
    """The backend module named by config.launch.backend (validated in settings.py)."""
    return importlib.import_module(f"launch.backends.{name}")


def launch_steps(backend: Backend, plan: Launch) -> list[Step]:
    """Every command of a launch without failures, in order (what --dry-run prints)."""
    steps: list[Step] = list(backend.prepare(plan))
    for i, group in enumerate(backend.groups(plan)):
        steps += backend.acquire(plan, i)
        for member in group:
            steps += backend.train(plan, i, member)
        steps += backend.release(plan, i)
    return steps


def split(members: list[Member], per_slice: int) -> list[list[Member]]:
    """Members in groups of `per_slice` (0: one group), in order; no empty group."""
    if not members:
        return []
    size = per_slice or len(members)
    return [members[i : i + size] for i in range(0, len(members), size)]
