"""Keep freed host memory for reuse, so XLA:CPU's per-step buffers cost no page faults.

XLA:CPU allocates an execution's temporaries as one block (a hundred MB or
more for a small train step) and frees it when the step ends. glibc serves a
block that large from a thread's arena with mmap and unmaps it on free, so
every step faults its pages in afresh, and the kernel's time shows as `sys`
(the README's Performance section has the figures). Told to use one arena,
never mmap and never trim, glibc hands the same pages back step after step.

It must run before JAX starts its thread pools (the first computation), so the
command line calls it first thing; a notebook calls it before touching JAX.
Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's allocator to reuse freed blocks; True where it took effect."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_ARENA_MAX, 1),  # one arena: large blocks come from the main heap...
            (_M_MMAP_MAX, 0),  # ...never from mmap...
            (_M_TRIM_THRESHOLD, 2**31 - 1),  # ...and freed ones stay there for the next step
        )
    )
