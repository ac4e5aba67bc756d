"""A Slurm cluster: one `sbatch` job per run, its trainer started by `srun` on every node.

    sbatch --wait --parsable --job-name SWEEP-<run_id> --nodes N --ntasks-per-node 1
        [--partition P] [--account A] [--qos Q] [--time T] [--gpus-per-node G]
        --signal USR1@120 [extra options] --chdir DIR
        --wrap 'SCALING_DISTRIBUTED=auto srun --kill-on-bad-exit=1 PYTHON -m launch.cli run ...'

The jobs run the code and the interpreter of the command that launched them, in its
folder (`--chdir`): a Slurm cluster's login and compute nodes share a filesystem. One job
per run, not an array: each run is retried on its own (an array element cannot be
resubmitted alone), and the job's exit code is the run's. `sbatch --wait` returns it; the
jobs are submitted all at once and waited for side by side (launch.parallel caps them).
With several nodes, `srun` starts one trainer per node and `jax.distributed` finds the
others from the variables srun sets for each task of a step (JAX's SlurmCluster reads
SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID, and puts
the coordinator on the step's first node at port 61440 + job id mod 4096), so the trainer
must run under srun, not in the batch shell itself.

Why sbatch options here and not submitit: submitit submits a pickled Python function, so
`--dry-run` could not show the command a job runs, and a job would need this process's
objects; the trainer is already a command line (the one every backend runs), and sbatch's
own options are what a cluster's documentation speaks in.

Preemption and time limits: Slurm sends USR1 two minutes before a job's time limit
(`--signal USR1@120`; the trainer is told with train.preemption_signal=SIGUSR1) and
SIGTERM when it preempts or ends the job; the trainer saves at the next step and exits
143, and the runner submits the run again, at most `max_retries` times, waiting
`retry_backoff_s` (doubling) between. Slurm's own `--requeue` is left to the user's extra
options: a requeued job keeps its id, and `sbatch --wait` would not see the second run.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from launch.backends import Launch, Member, Step
from launch.backends.commands import trainer_args

NOTICE = "USR1@120"  # Slurm's --signal: USR1 to every step, 120 s before the time limit


# The runner submits every run's job at once and waits for each in its own thread
# (launch.parallel caps how many are in the queue together; 0 = all).
CONCURRENT = True


LOGS = "slurm-logs"  # the jobs' output, one file per job, in the launching folder


def prepare(plan: Launch) -> list[Step]:
    return [Step(["mkdir", "-p", LOGS])]  # Slurm writes --output only into a folder that exists


def groups(plan: Launch) -> list[list[Member]]:
    return [[member] for member in plan.members]  # one job each


def acquire(plan: Launch, slice_index: int) -> list[Step]:
    return []


def job_name(plan: Launch, member: Member) -> str:
    return f"{plan.sweep_name}-{member.run_id}"


def sbatch_options(plan: Launch, member: Member) -> list[str]:
    """The job's resources and limits, as sbatch options (what #SBATCH lines would say)."""
    launch = plan.launch
    options = [
        "--job-name",
        job_name(plan, member),
        "--nodes",
        str(launch["nodes"]),
        "--ntasks-per-node",
        "1",
    ]
    for key in ("partition", "account", "qos"):
        if launch[key]:
            options += [f"--{key}", launch[key]]
    if launch["time_limit"]:
        options += ["--time", launch["time_limit"]]
    if launch["gpus_per_node"]:
        options += ["--gpus-per-node", str(launch["gpus_per_node"])]
    options += ["--signal", NOTICE, "--output", f"{LOGS}/%x-%j.out"]
    return options + shlex.split(launch["sbatch"])


def train(plan: Launch, slice_index: int, member: Member) -> list[Step]:
    python = sys.executable  # the same interpreter, on the shared filesystem
    trainer = trainer_args(python, plan, member) + ["--config.train.preemption_signal=SIGUSR1"]
    env = "SCALING_DISTRIBUTED=auto " if plan.launch["nodes"] > 1 else ""
    command = env + shlex.join(["srun", "--kill-on-bad-exit=1", *trainer])
    return [
        Step(
            [
                "sbatch",
                "--wait",
                "--parsable",
                *sbatch_options(plan, member),
                "--chdir",
                os.getcwd(),
                "--wrap",
                command,
            ]
        )
    ]


def log_of(plan: Launch, member: Member) -> Path | None:
    """The output file of the run's latest job (`--output` names it after the job's name)."""
    logs = sorted(Path(LOGS).glob(f"{job_name(plan, member)}-*.out"), key=_mtime)
    return logs[-1] if logs else None


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def release(plan: Launch, slice_index: int) -> list[Step]:
    return []


def state(plan: Launch, slice_index: int) -> None:
    return None  # a failed job's exit code says it all: 143 is a preemption (runner.py)


def preempted(state_output: str, returncode: int) -> bool:
    return False
