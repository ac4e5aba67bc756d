"""Runs made of several processes (hosts): joining them, and each host's share of a batch.

`maybe_initialize()` calls `jax.distributed.initialize()` when this process is
one of several and does nothing otherwise. It must run before anything starts
a JAX backend (`jax.devices()`, any computation); `scaling run` and `scaling
sweep` call it first thing. Every process then sees the devices of all of them,
the mesh spans them all, and the trainer is the same program on each.

How a process learns that it is one of several (the first that applies wins):

1. Explicit settings, from the environment or from the `scaling run/sweep`
   flags `--coordinator`, `--num-processes`, `--process-id` (a flag wins over
   its variable). Give all three, on every process:

       SCALING_COORDINATOR    host:port of the coordinator service, which
                              process 0 starts; the same on every process
       SCALING_NUM_PROCESSES  how many processes take part
       SCALING_PROCESS_ID     this process's id, 0 .. SCALING_NUM_PROCESSES - 1

   SCALING_NUM_PROCESSES=1 is a single-process run (nothing to join).
2. SCALING_DISTRIBUTED=auto: let JAX find the cluster itself (Cloud TPU VMs,
   Slurm, Open MPI, Kubernetes); SCALING_DISTRIBUTED=off: never initialise,
   not even on a detected TPU pod.
3. A multi-host Cloud TPU slice announced in the environment
   (TPU_WORKER_HOSTNAMES or TPU_PROCESS_ADDRESSES listing more than one host,
   or MEGASCALE_NUM_SLICES > 1): JAX's own detection, as with `auto`. TPU VMs
   that publish their workers only through the metadata server need
   SCALING_DISTRIBUTED=auto.

SCALING_INIT_TIMEOUT (seconds, default 300) bounds the wait for the others;
past it jaxlib ends the process (DEADLINE_EXCEEDED).

What each process does in a multi-process run:

* It loads only its own rows of every global batch: process p of P feeds rows
  [p * B / P, (p + 1) * B / P) (`launch/data.train_batch`, and the same slice
  of every eval batch). `check_batch_layout` verifies that these are exactly
  the rows the mesh places on p's devices.
* Only process 0 writes the results store and prints progress.
* All processes write and restore the orbax checkpoints together, so
  `workdir` must be one folder all hosts see (a shared or cloud filesystem).
* On CPU the cross-process collectives use gloo, JAX's default
  (`jax_cpu_collectives_implementation`); on TPU and GPU, the platform's own.
"""

from __future__ import annotations

import os
import sys

import jax

from scaling.errors import UserError, first_line

ENV_COORDINATOR = "SCALING_COORDINATOR"
ENV_NUM_PROCESSES = "SCALING_NUM_PROCESSES"
ENV_PROCESS_ID = "SCALING_PROCESS_ID"
ENV_MODE = "SCALING_DISTRIBUTED"
ENV_TIMEOUT = "SCALING_INIT_TIMEOUT"


def maybe_initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Join the other processes of this run, if there are any; True if this run is distributed.

    Arguments override the SCALING_* variables above. Calling it again after
    a successful join does nothing. Raises UserError for settings that
    cannot work and when the coordinator cannot be reached in time.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    num_processes = _int_setting(ENV_NUM_PROCESSES, num_processes)
    process_id = _int_setting(ENV_PROCESS_ID, process_id)
    timeout = _int_setting(ENV_TIMEOUT, None)
    timeout = 300 if timeout is None else timeout
    mode = env.get(ENV_MODE, "").strip().lower()
    if mode not in ("", "auto", "off"):
        raise UserError(f"{ENV_MODE}={env[ENV_MODE]!r} must be 'auto' or 'off' (or unset)")

    explicit = {
        "coordinator": coordinator,
        "number of processes": num_processes,
        "process id": process_id,
    }
    given = [name for name, value in explicit.items() if value is not None]
    if given:
        if num_processes == 1 and process_id in (None, 0):
            return False
        missing = [name for name, value in explicit.items() if value is None]
        if missing:
            raise UserError(
                f"a multi-process run needs the coordinator, the number of processes and this "
                f"process's id; {', '.join(missing)} not given (set {ENV_COORDINATOR}=host:port, "
                f"{ENV_NUM_PROCESSES}=N and {ENV_PROCESS_ID}=0..N-1 on every process)"
            )
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(
                f"process id {process_id} must be in [0, {num_processes}) "
                f"({ENV_PROCESS_ID}, {ENV_NUM_PROCESSES})"
            )
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(
                f"coordinator {coordinator!r} must be host:port, e.g. 10.0.0.1:1234 "
                f"({ENV_COORDINATOR})"
            )
        _initialize(
            f"as process {process_id} of {num_processes} via {coordinator}",
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout,
        )
        return True
    if mode == "off":
        return False
    if mode == "auto" or _multihost_tpu_env():
        _initialize("through JAX's cluster detection", initialization_timeout=timeout)
        return True
    return False


def check_batch_layout(batch_sharding, global_shape: tuple[int, ...]):
    """Raise UserError unless this process's devices hold exactly the rows it loads.

    The loader gives process p of P rows [p * B / P, (p + 1) * B / P) of
    every global batch of B rows; the mesh must place those rows, and only
    those, on p's devices (it does when the batch axes span the processes).
    Also catches a batch that does not divide over the mesh's batch axes.
    """
    batch = global_shape[0]
    try:
        batch_sharding.shard_shape(global_shape)
    except ValueError:
        shards = _batch_shards(batch_sharding)
        raise UserError(
            f"train.batch_size={batch} does not split into the {shards} shards of the mesh's "
            f"batch axes; use a multiple of {shards}"
        ) from None
    count, index = jax.process_count(), jax.process_index()
    if batch % count:
        raise UserError(
            f"train.batch_size={batch} is not divisible by the {count} processes; "
            f"use a multiple of {count}"
        )
    rows = batch // count
    held = set()
    for slices in batch_sharding.addressable_devices_indices_map(global_shape).values():
        held.update(range(batch)[slices[0]])
    if held != set(range(index * rows, (index + 1) * rows)):
        raise UserError(
            f"process {index} of {count} loads rows [{index * rows}, {(index + 1) * rows}) of "
            f"each batch, but the mesh puts other rows on its devices ({len(held)} rows); "
            "give the batch axes (mesh.data x mesh.fsdp) at least as many devices as there "
            "are processes, so that each process holds its own block of rows"
        )


def _batch_shards(batch_sharding) -> int:
    spec = batch_sharding.spec[0] if len(batch_sharding.spec) else None
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    shards = 1
    for axis in axes:
        shards *= batch_sharding.mesh.shape[axis]
    return shards


def _int_setting(variable: str, value: int | None) -> int | None:
    if value is not None:
        return value
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{variable}={raw!r} must be an integer") from None


def _multihost_tpu_env() -> bool:
    env = os.environ
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return True
    try:
        return int(env.get("MEGASCALE_NUM_SLICES") or 1) > 1
    except ValueError:
        return False


def _initialize(how: str, **kwargs):
    # A coordinator that stays unreachable past the timeout aborts the process
    # inside jaxlib (DEADLINE_EXCEEDED), so say first what is being waited for.
    print(
        f"distributed: joining {how} (waiting up to {kwargs['initialization_timeout']} s "
        "for the other processes)",
        file=sys.stderr,
        flush=True,
    )
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:  # e.g. called after a JAX backend had started
        raise UserError(
            f"could not join the multi-process run {how}: {first_line(e, None)}"
        ) from None
