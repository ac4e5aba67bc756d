"""One JAX device per core, for a CPU run in one process (`mesh.cpu_per_core`).

XLA:CPU gives a process one device, and that device splits each operation
over the cores. The operations of a small model are too small to split well.
As several devices, one per core, the same process trains data parallel
(`models/sharding.cpu_data_parallel`): each device runs the whole step on its
own rows, one core's program, and only the gradients are averaged between
them. Off by default: faster at d_model 96, not at 64 and below, and its
collectives' thread needs are known only from counted runs (README,
Performance).

JAX fixes the device count when it starts its CPU backend, so
`one_device_per_core` runs before any JAX computation: first thing in
`scaling run` and in a sweep that trains its members in its own process. A
process pinned to one core (a parallel sweep's member) keeps its one device.
"""

from __future__ import annotations

import importlib.util
import os

# XLA's own way to the same end: where XLA_FLAGS set it, that choice stands.
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# The size of XLA:CPU's pool of worker threads, read when the CPU backend starts
# (by default one per core).
THREADS_ENV = "NPROC"
# JAX plugins of accelerators: with one installed, the run is not a CPU run.
ACCELERATOR_PLUGINS = (
    "jax_cuda12_plugin",
    "jax_cuda13_plugin",
    "jax_rocm60_plugin",
    "jax_rocm7_plugin",
    "libtpu",
)


def usable_cores() -> list[int]:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def has_accelerator() -> bool:
    """Whether this JAX has an accelerator's plugin installed (found without importing it)."""
    return any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS)


def one_device_per_core(environ=os.environ) -> int:
    """Ask JAX for one CPU device per usable core; returns that count (1: left alone).

    Left alone: a single core, an accelerator's JAX, XLA_FLAGS that already
    set the count (the user's, or a test's, choice wins), or a backend
    already started. Otherwise XLA:CPU's worker pool (`NPROC`) gets at least
    two threads per device. Not for a process that joins others
    (`launch/distributed.py` keeps one device per CPU process).
    """
    import jax  # noqa: PLC0415 - `scaling status` and friends never load JAX

    cores = len(usable_cores())
    if cores < 2 or DEVICE_COUNT_FLAG in environ.get("XLA_FLAGS", "") or has_accelerator():
        return 1
    try:
        jax.config.update("jax_num_cpu_devices", cores)
    except RuntimeError:  # a backend is up: its device count stands
        return 1
    # A device's collective waits on one of XLA:CPU's worker threads until every
    # device has reached it, and a device's execution can hold a second worker while
    # it does. With fewer than two workers per device, runs ended in a 40 s
    # rendezvous timeout that aborts the process (2 of 4 runs with one worker per
    # core, 6 of 8 with one more than the devices); with two per device, none of 15
    # (README, Performance). So at least that many, whatever NPROC said before.
    environ[THREADS_ENV] = str(max(2 * cores, int(environ.get(THREADS_ENV) or 0)))
    return cores
