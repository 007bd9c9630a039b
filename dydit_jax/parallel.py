"""Device mesh and sharding helpers: one code path from one CPU to a pod.

The mesh has axes ('data', 'fsdp', 'tensor'); the batch is sharded over ('data', 'fsdp').
Parameters are replicated for now; logical-axis rules for FSDP and tensor parallelism plug
in here (see issue "Scale-out training").
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replace a single -1 by the remaining devices and check the product."""
    shape = [int(s) for s in mesh_shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh_shape needs {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh_shape {shape}: use positive sizes and at most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh_shape {shape} does not divide the {num_devices} devices; "
                "change mesh_shape so that the product divides the device count"
            )
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ValueError(
            f"mesh_shape {shape} uses {int(np.prod(shape))} devices but {num_devices} are "
            "present; set mesh_shape so that its product is the device count (or use -1)"
        )
    return tuple(shape)


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def batch_size_per_step(mesh: Mesh) -> int:
    """How many ways the batch axis is split (a global batch must be a multiple of this)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over ('data', 'fsdp'), everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Assemble a global batch from this process's rows (same code on 1 or many hosts)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local
    )
