"""Every sharding decision, in one place: the mesh and the logical-axis rules.

Parameters and activations carry logical axis names (see
`models/transformer.py`); `RULES` maps each one onto the mesh axes
`data`, `fsdp` and `tensor`. A single CPU device is just the mesh (1, 1, 1):
there is no separate unsharded code path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes, or None for replicated).
# Parameters: `embed` is split over fsdp (ZeRO-3 style), the head, MLP and
# vocabulary axes over tensor. Activations: the batch over data and fsdp;
# the residual stream's feature axis (`act_embed`) stays whole so the
# layer norms and residual adds need no communication.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("layers", None),
    ("position", None),
    ("norm", None),
)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); one size may be -1 (the rest).

    Raises ValueError naming the sizes when their product does not match
    the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"only one of mesh.{', mesh.'.join(free)} may be -1 (the rest)")
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{name}={size} must be a positive integer or -1")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(
                f"mesh sizes {sizes} do not divide the {len(devices)} devices; "
                "choose sizes whose product divides the device count"
            )
        sizes[free[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} = "
            f"{math.prod(sizes.values())} devices, but {len(devices)} are present; "
            "make the product equal the device count (or set one size to -1)"
        )
    # Auto axes: the compiler propagates shardings from the annotations we
    # place (parameter shardings, batch sharding, a few activation
    # constraints). Explicit axes would make every op's sharding part of its
    # type, which the Linen modules here do not spell out.
    return jax.make_mesh(
        tuple(sizes[a] for a in MESH_AXES),
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def cpu_data_parallel(mesh: Mesh) -> bool:
    """Whether each device of `mesh` runs the model on its own rows (`launch/steps.py`).

    So it does on a mesh of this process's CPU devices that splits only the
    batch (`launch/host_devices.py` makes one device per core): each device
    runs one core's program, with the one-CPU-device kernels
    (`ModelConfig.per_device`), and only the gradients cross between them.
    XLA:CPU partitions those kernels' loops poorly, and a device's own
    program needs no partitioning. A mesh of one such device is the plain
    case. Elsewhere the step is one program that XLA partitions over the mesh.
    """
    return (
        mesh.devices.flat[0].platform == "cpu"
        and jax.process_count() == 1
        and mesh.shape["fsdp"] == 1
        and mesh.shape["tensor"] == 1
    )


def data_parallel_devices(batch_size: int, even_rows: bool) -> list[jax.Device]:
    """The most of this process's devices that a batch splits over in equal shares.

    `even_rows`: each share must be even too (the noise scale splits every
    device's rows in two). One device always qualifies, so a batch that
    splits no other way trains as before, on one.
    """
    devices = jax.local_devices()
    for n in range(len(devices), 1, -1):
        rows, rest = divmod(batch_size, n)
        if not rest and not (even_rows and rows % 2):
            return devices[:n]
    return devices[:1]


def run_mesh(data: int, fsdp: int, tensor: int, batch_size: int, even_rows: bool) -> Mesh:
    """The mesh a run trains on: `make_mesh` of the sizes given.

    Under the default sizes (-1, 1, 1) in a single-process CPU run, over as
    many of its devices as the batch splits into (`data_parallel_devices`):
    one per core where it can (`launch/host_devices.py`).
    """
    devices = None
    if (data, fsdp, tensor) == (-1, 1, 1) and jax.process_count() == 1:
        if jax.local_devices()[0].platform == "cpu":
            devices = data_parallel_devices(batch_size, even_rows)
    return make_mesh(data, fsdp, tensor, devices)


def rules_with_overrides(overrides: dict[str, object] | None = None):
    """RULES with some logical axes remapped, e.g. {"embed": None, "mlp": "fsdp"}.

    Raises ValueError for a logical axis the model does not use or a mesh
    axis that does not exist.
    """
    rules = dict(RULES)
    for logical, mesh_axes in (overrides or {}).items():
        if logical not in rules:
            raise ValueError(
                f"unknown logical axis {logical!r} in sharding rules; known: {sorted(rules)}"
            )
        targets = mesh_axes if isinstance(mesh_axes, (tuple, list)) else (mesh_axes,)
        for target in targets:
            if target is not None and target not in MESH_AXES:
                raise ValueError(
                    f"sharding rule {logical!r} -> {target!r}: mesh axes are {MESH_AXES}"
                )
        rules[logical] = tuple(mesh_axes) if isinstance(mesh_axes, list) else mesh_axes
    return tuple(rules.items())


def logical_shardings(abstract_boxed_tree, mesh: Mesh, rules):
    """NamedShardings for a tree of boxed (logically partitioned) abstract values.

    A leaf that has no logical names (a step counter) is replicated. A
    logical name missing from `rules` is an error, so no parameter is ever
    replicated by accident.
    """
    known = {name for name, _ in rules}
    for leaf in jax.tree.leaves(abstract_boxed_tree, is_leaf=_is_boxed):
        if _is_boxed(leaf):
            unknown = [n for n in leaf.names if n is not None and n not in known]
            if unknown:
                raise ValueError(f"no sharding rule for logical axes {unknown}; add them to RULES")
    specs = nn.get_partition_spec(abstract_boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of a [batch, length] token array: rows over the data axes."""
    spec = nn.logical_to_mesh_axes(("batch", "length"), rules)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _is_boxed(x) -> bool:
    return isinstance(x, nn.Partitioned)
