"""GKE through the `xpk` CLI: one workload per run on an existing cluster.

    xpk workload create --cluster C --workload NAME-<run_id> --tpu-type TYPE
        --num-slices 1 --script-dir . --base-docker-image IMAGE
        --max-restarts R [--spot] --command 'pip install ... && python3 -m launch.cli run ...'
    xpk workload list --cluster C --wait-for-job-completion NAME-<run_id>

xpk builds an image from the base image and this folder (`--script-dir`),
so the workers run the code as it is here, committed or not. The cluster
is the user's (`xpk cluster create` once); nothing is created or deleted
per sweep. Preemption is GKE's business: the JobSet restarts the workload
up to `--max-restarts` (config.launch.max_retries) times, and the trainer
resumes from its last checkpoint in the bucket. So the runner never
re-requests anything itself (`state` is None).
"""

from __future__ import annotations

import shlex

from launch.backends import Launch, Member, Step
from launch.backends.commands import trainer_args, worker_install


def prepare(plan: Launch) -> list[Step]:
    return []


def groups(plan: Launch) -> list[list[Member]]:
    return [plan.members] if plan.members else []


def workload_name(plan: Launch, member: Member) -> str:
    # Kubernetes names: lower case, at most 40 characters for xpk.
    prefix = (plan.launch["tpu_name"] or "scaling")[:26].rstrip("-")
    return f"{prefix}-{member.run_id}"


def acquire(plan: Launch, slice_index: int) -> list[Step]:
    return []


def train(plan: Launch, slice_index: int, member: Member) -> list[Step]:
    launch, name = plan.launch, workload_name(plan, member)
    where = ["--zone", launch["zone"]] + (
        ["--project", launch["project"]] if launch["project"] else []
    )
    command = " && ".join(
        [
            shlex.join(worker_install(launch["python"])),
            "SCALING_DISTRIBUTED=auto " + shlex.join(trainer_args(launch["python"], plan, member)),
        ]
    )
    return [
        Step(
            [
                "xpk",
                "workload",
                "create",
                "--cluster",
                launch["cluster"],
                "--workload",
                name,
                "--tpu-type",
                launch["accelerator"],
                "--num-slices",
                "1",
                "--script-dir",
                ".",
                "--base-docker-image",
                launch["docker_image"],
                "--max-restarts",
                str(launch["max_retries"]),
                *(["--spot"] if launch["spot"] else []),
                *where,
                "--command",
                command,
            ]
        ),
        Step(
            [
                "xpk",
                "workload",
                "list",
                "--cluster",
                launch["cluster"],
                *where,
                "--wait-for-job-completion",
                name,
            ]
        ),
    ]


def release(plan: Launch, slice_index: int) -> list[Step]:
    return []


def state(plan: Launch, slice_index: int) -> None:
    return None


def preempted(state_output: str, returncode: int) -> bool:
    return False
