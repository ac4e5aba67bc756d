"""What a run ran on: the JAX stack's versions and the devices, recorded at each start.

A loss curve depends on more than its config: another JAX or XLA compiles another program,
another chip rounds differently. Each start of a run records this in the store (and the
bucket's records), and every fit carries the environments of its runs in its provenance,
so `scaling query` says what the fitted runs were trained with.
"""

from __future__ import annotations

from importlib import metadata

import jax

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def current() -> dict:
    """{"packages": {name: version}, "platform", "device_kind", "device_count",
    "process_count"} of this process (all processes of a run see the same devices)."""
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "not installed"
    device = jax.devices()[0]
    return {
        "packages": packages,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
    }
