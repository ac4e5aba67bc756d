"""The machine's own matmul peak, measured, for model FLOP utilisation (MFU).

MFU is achieved model FLOP/s over what this machine's matmul unit does at
best; the denominator is measured here, in the same process, never taken
from a table, because CPUs of one cloud type differ by 3x.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp


@functools.cache
def matmul_peak_flops(dtype: str = "float32", size: int = 0, repeats: int = 5) -> float:
    """Best FLOP/s of a jitted square matmul on the default device.

    `size` 0 picks 2048 on CPU (big enough to saturate its vector units,
    ~0.1 s a product) and 8192 on an accelerator.
    """
    if not size:
        size = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (size, size), dtype=jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (size, size), dtype=jnp.dtype(dtype))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
