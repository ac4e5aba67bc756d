"""Cloud TPU VMs through `gcloud`: create a slice, ship the code, train on every worker, delete.

For slice i of a sweep (named config.launch.tpu_name, or NAME-i when the
members need several slices, one after another):

    git archive HEAD                 the committed code, packed here (once)
    gcloud ... queued-resources create NAME --node-id NAME ...
    gcloud ... queued-resources describe NAME ...    (polled until ACTIVE)
    gcloud ... tpu-vm scp ARCHIVE NAME:... --worker=all
    gcloud ... tpu-vm ssh NAME --worker=all --command 'unpack && pip install'
    gcloud ... tpu-vm ssh NAME --worker=all --command 'cd ... && python3 -m launch.cli run ...'
    gcloud ... queued-resources delete NAME --force --quiet   (unless keep_slice)

Without config.launch.queued the slice is created directly with `tpu-vm
create` (which returns when the VM is READY) and deleted with `tpu-vm
delete`. Best-effort capacity exists only in `gcloud alpha`.

How a preemption is told from a failed run: when the trainer's ssh fails,
the runner asks for the slice's state (`describe --format=value(...)`). A
live slice (ACTIVE for a queued resource, READY for a VM) means the run
itself failed; any other state (SUSPENDING, SUSPENDED, FAILED, PREEMPTED,
...) or a describe that fails (the slice is gone) is a preemption. The exit
code of ssh alone cannot tell: 255 is both "the VM went away" and "the
network dropped".
"""

from __future__ import annotations

import os
import shlex
import tempfile

from launch.backends import Launch, Member, Step, split
from launch.backends.commands import remote_shell, trainer_args, worker_install

ARCHIVE = "scaling-suite.tar.gz"  # in each worker's home
LIVE = {"ACTIVE", "READY"}


def prepare(plan: Launch) -> list[Step]:
    """Pack the committed code (HEAD) once; every slice gets this archive."""
    return [Step(["git", "archive", "--format=tar.gz", f"--output={local_archive(plan)}", "HEAD"])]


def groups(plan: Launch) -> list[list[Member]]:
    return split(plan.members, plan.launch["runs_per_slice"])


def slice_name(plan: Launch, slice_index: int) -> str:
    if len(groups(plan)) <= 1:
        return plan.launch["tpu_name"]
    return f"{plan.launch['tpu_name']}-{slice_index}"


def _where(launch: dict) -> list[str]:
    project = ["--project", launch["project"]] if launch["project"] else []
    return ["--zone", launch["zone"], *project]


def local_archive(plan: Launch) -> str:
    return os.path.join(tempfile.gettempdir(), f"{plan.launch['tpu_name']}-{ARCHIVE}")


def acquire(plan: Launch, slice_index: int) -> list[Step]:
    launch, name = plan.launch, slice_name(plan, slice_index)
    where = _where(launch)
    if launch["queued"]:
        # --best-effort is offered by the alpha track only (gcloud SDK 528).
        track = ["alpha"] if launch["best_effort"] else []
        capacity = (
            ["--spot"] if launch["spot"] else (["--best-effort"] if launch["best_effort"] else [])
        )
        create = [
            Step(
                [
                    "gcloud",
                    *track,
                    "compute",
                    "tpus",
                    "queued-resources",
                    "create",
                    name,
                    "--node-id",
                    name,
                    *where,
                    "--accelerator-type",
                    launch["accelerator"],
                    "--runtime-version",
                    launch["runtime_version"],
                    *capacity,
                ]
            ),
            Step(_describe(plan, slice_index), wait_for="ACTIVE"),
        ]
    else:
        create = [
            Step(
                [
                    "gcloud",
                    "compute",
                    "tpus",
                    "tpu-vm",
                    "create",
                    name,
                    *where,
                    "--accelerator-type",
                    launch["accelerator"],
                    "--version",
                    launch["runtime_version"],
                    *(["--spot"] if launch["spot"] else []),
                ]
            )
        ]
    directory = launch["remote_dir"]
    install = " && ".join(
        [
            shlex.join(["mkdir", "-p", directory]),
            shlex.join(["tar", "-xzf", ARCHIVE, "-C", directory]),
            remote_shell(directory, worker_install(launch["python"])),
        ]
    )
    return [
        *create,
        Step(
            [
                "gcloud",
                "compute",
                "tpus",
                "tpu-vm",
                "scp",
                local_archive(plan),
                f"{name}:{ARCHIVE}",
                "--worker=all",
                *where,
            ]
        ),
        _ssh(plan, name, install),
    ]


def train(plan: Launch, slice_index: int, member: Member) -> list[Step]:
    launch = plan.launch
    # SCALING_DISTRIBUTED=auto: every worker joins the others (launch/distributed.py).
    command = remote_shell(
        launch["remote_dir"],
        trainer_args(launch["python"], plan, member),
        env={"SCALING_DISTRIBUTED": "auto"},
    )
    return [_ssh(plan, slice_name(plan, slice_index), command)]


def release(plan: Launch, slice_index: int) -> list[Step]:
    launch, name = plan.launch, slice_name(plan, slice_index)
    if launch["keep_slice"]:
        return []
    if launch["queued"]:
        # --force also deletes the TPU VM the queued resource holds.
        return [
            Step(
                [
                    "gcloud",
                    "compute",
                    "tpus",
                    "queued-resources",
                    "delete",
                    name,
                    *_where(launch),
                    "--force",
                    "--quiet",
                ]
            )
        ]
    return [
        Step(["gcloud", "compute", "tpus", "tpu-vm", "delete", name, *_where(launch), "--quiet"])
    ]


def state(plan: Launch, slice_index: int) -> Step:
    return Step(_describe(plan, slice_index))


def preempted(state_output: str, returncode: int) -> bool:
    return returncode != 0 or state_output.strip() not in LIVE


def _describe(plan: Launch, slice_index: int) -> list[str]:
    launch, name = plan.launch, slice_name(plan, slice_index)
    if launch["queued"]:
        return [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "describe",
            name,
            *_where(launch),
            "--format=value(state.state)",
        ]
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "describe",
        name,
        *_where(launch),
        "--format=value(state)",
    ]


def _ssh(plan: Launch, name: str, command: str) -> Step:
    return Step(
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "ssh",
            name,
            *_where(plan.launch),
            "--worker=all",
            "--command",
            command,
        ]
    )
