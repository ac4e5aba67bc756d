"""The `launch` section of a config: where a sweep's runs go, and its checks.

Every key can also be set by a `scaling sweep` flag (`--backend`, `--zone`,
...), which wins over the config file. None of these keys is part of a run's
identity (config.NON_IDENTITY_KEYS), so moving a sweep from this CPU to a pod
keeps its run ids, and a relaunch finds the runs it already trained.
"""

from __future__ import annotations

import math
import re
import shlex

import ml_collections

from scaling.errors import UserError

BACKENDS = ("local", "tpu", "xpk", "slurm")

# v4-32, v5litepod-16, v5p-128, v6e-8: a TPU generation, a variant, a core/chip count.
_ACCELERATOR = re.compile(r"^v\d+[a-z]*-\d+$")
_ZONE = re.compile(r"^[a-z]+-[a-z]+\d+-[a-z]$")  # us-central2-b, europe-west4-a
# Google Cloud resource names (TPU nodes, queued resources, GKE clusters).
_RESOURCE = re.compile(r"^[a-z]([-a-z0-9]{0,37}[a-z0-9])?$")
_BUCKET = re.compile(r"^gs://[a-z0-9][-_.a-z0-9]{1,221}[a-z0-9](/.*)?$")


def launch_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.backend = "local"  # local | tpu (Cloud TPU VMs via gcloud) | xpk (GKE via xpk)
    c.project = ""  # Google Cloud project; "" = the one `gcloud config` names
    c.zone = ""  # e.g. us-central2-b (v4), us-west4-a (v5e); needed by tpu and xpk
    c.accelerator = ""  # TPU type, e.g. v5litepod-16, v4-32; needed by tpu and xpk
    c.runtime_version = "tpu-ubuntu2204-base"  # TPU VM image (gcloud --version/--runtime-version)
    c.tpu_name = ""  # tpu: the slice's name (also its queued resource's); xpk: workload prefix
    c.queued = True  # tpu: ask through a queued resource (waits for capacity) or create directly
    c.spot = False  # spot capacity: cheaper, can be preempted at any time
    c.best_effort = False  # queued best-effort capacity (gcloud alpha); exclusive with spot
    c.bucket = ""  # gs://BUCKET[/path] (or a local folder): records and checkpoints of remote runs
    # local: members trained at once, one process each, pinned to its share of
    # the cores; 0 = one per core where JAX has no accelerator, else 1.
    c.parallel = 0
    c.runs_per_slice = 0  # members trained on one slice before it is deleted; 0 = all
    c.keep_slice = False  # keep the slice after the sweep (it keeps costing until deleted)
    # USD per chip-hour (per GPU for GPU types) that `scaling plan` and the sweep's
    # cost line multiply the chip-hours by; 0 = not priced. Prices move and differ
    # by region, commitment and spot: the user gives theirs.
    c.price = 0.0
    c.max_retries = 3  # re-requests of a preempted slice per run, then the run is reported
    c.retry_backoff_s = 60.0  # seconds before the first re-request; doubles each time
    c.poll_s = 30.0  # seconds between checks that a queued resource is ACTIVE
    c.remote_dir = "scaling-suite"  # folder of the code in each worker's home
    c.python = "python3"  # interpreter on the workers
    c.cluster = ""  # xpk: GKE cluster name
    c.docker_image = "python:3.11-slim"  # xpk: base image the code folder is added to
    # slurm: where and how each run's job goes (sbatch options; "" = the cluster's default)
    c.partition = ""
    c.account = ""
    c.qos = ""
    c.nodes = 1  # nodes per run, one trainer process each
    c.gpus_per_node = 0
    c.time_limit = ""  # e.g. 4:00:00; the trainer saves at USR1, 2 minutes before it
    c.sbatch = ""  # more sbatch options, e.g. "--constraint=h100 --exclusive"
    return c


def validate_launch(launch):
    """Raise UserError naming the first launch.* key that is wrong, and the fix."""
    if launch.backend not in BACKENDS:
        raise UserError(
            f"config.launch.backend={launch.backend!r} is not one of {', '.join(BACKENDS)}"
        )
    bucket = launch.bucket
    if "://" in bucket and not bucket.startswith("gs://"):
        raise UserError(
            f"config.launch.bucket={bucket!r} is neither gs://BUCKET[/path] nor a local folder"
        )
    if bucket.startswith("gs://") and not _BUCKET.match(bucket):
        raise UserError(
            f"config.launch.bucket={bucket!r} is not a valid bucket address; "
            "write gs://BUCKET or gs://BUCKET/path (lower case)"
        )
    if launch.parallel < 0:
        raise UserError(
            f"config.launch.parallel={launch.parallel} must be 0 (one per core) or more"
        )
    for key in ("runs_per_slice", "max_retries"):
        if launch[key] < 0:
            raise UserError(f"config.launch.{key}={launch[key]} must be 0 or more")
    if not (launch.price >= 0 and math.isfinite(launch.price)):
        raise UserError(
            f"config.launch.price={launch.price} must be a finite price per chip-hour, "
            "0 or more (0 = not priced)"
        )
    for key in ("retry_backoff_s", "poll_s"):
        if launch[key] < 0:
            raise UserError(f"config.launch.{key}={launch[key]} must be 0 or more seconds")
    if launch.spot and launch.best_effort:
        raise UserError(
            "config.launch.spot and config.launch.best_effort are exclusive; "
            "choose one (--spot or --best-effort)"
        )
    if launch.backend == "local":
        return
    if launch.backend == "slurm":
        _validate_slurm(launch)
        return
    flag = {"zone": "--zone", "accelerator": "--accelerator", "bucket": "--bucket"}
    for key in ("zone", "accelerator", "bucket"):
        if not launch[key]:
            raise UserError(
                f"the {launch.backend} backend needs config.launch.{key} "
                f"(or {flag[key]}); runs on a pod write their results there"
                if key == "bucket"
                else f"the {launch.backend} backend needs config.launch.{key} (or {flag[key]})"
            )
    if not _ZONE.match(launch.zone):
        raise UserError(f"config.launch.zone={launch.zone!r} is not a zone like us-central2-b")
    if not _ACCELERATOR.match(launch.accelerator):
        raise UserError(
            f"config.launch.accelerator={launch.accelerator!r} is not a TPU type "
            "like v5litepod-16 or v4-32"
        )
    if launch.backend == "tpu":
        if not _RESOURCE.match(launch.tpu_name):
            raise UserError(
                f"config.launch.tpu_name={launch.tpu_name!r} must be 1-39 lower-case "
                "letters, digits or '-', starting with a letter (--tpu-name NAME)"
            )
        if launch.best_effort and not launch.queued:
            raise UserError(
                "config.launch.best_effort needs config.launch.queued=True: "
                "best-effort capacity comes only through a queued resource"
            )
    if launch.backend == "xpk":
        if not _RESOURCE.match(launch.cluster):
            raise UserError(
                f"config.launch.cluster={launch.cluster!r}: the xpk backend needs "
                "the GKE cluster's name (--cluster NAME)"
            )
        if launch.tpu_name and not _RESOURCE.match(launch.tpu_name):
            raise UserError(
                f"config.launch.tpu_name={launch.tpu_name!r} must be lower-case "
                "letters, digits or '-' (it prefixes the workload names)"
            )
        if launch.best_effort:
            raise UserError(
                "config.launch.best_effort is a queued-resource option of the tpu "
                "backend; xpk takes --spot"
            )


_SLURM_NAME = re.compile(r"^[A-Za-z0-9][-_.A-Za-z0-9]{0,63}$")
_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # [D-]H[:M[:S]] or minutes


def _validate_slurm(launch):
    for key in ("partition", "account", "qos"):
        if launch[key] and not _SLURM_NAME.match(launch[key]):
            raise UserError(
                f"config.launch.{key}={launch[key]!r} is not a Slurm name "
                "(letters, digits, '-', '_', '.')"
            )
    if launch.nodes < 1 or launch.gpus_per_node < 0:
        raise UserError(
            f"config.launch.nodes={launch.nodes} must be 1 or more and "
            f"config.launch.gpus_per_node={launch.gpus_per_node} 0 or more"
        )
    if launch.time_limit and not _SLURM_TIME.match(launch.time_limit):
        raise UserError(
            f"config.launch.time_limit={launch.time_limit!r} is not a Slurm time; "
            "write minutes, H:MM:SS or D-HH:MM:SS"
        )
    try:
        options = shlex.split(launch.sbatch)
    except ValueError as e:
        raise UserError(f"config.launch.sbatch={launch.sbatch!r} does not parse ({e})") from None
    for option in options:
        if option.split("=")[0] in ("--wrap", "--wait", "--chdir", "-D", "--parsable"):
            raise UserError(
                f"config.launch.sbatch sets {option.split('=')[0]}, which the launcher sets "
                "itself; leave it out"
            )
