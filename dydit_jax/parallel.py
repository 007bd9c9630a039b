"""Device mesh and sharding helpers: one code path from one CPU to a pod.

The mesh has axes ('data', 'fsdp', 'tensor'); the batch is sharded over ('data', 'fsdp').
Every parameter carries logical axis names (set in the model's layers: `embed`, `qkv`,
`heads`, `mlp`, `modulation`, `classes`, `layers`, ...); the config's `sharding_rules` map
each name to a mesh axis (or None = replicated). FSDP shards `embed` over `fsdp`; tensor
parallelism shards attention and MLP widths over `tensor`. A dimension that the mesh axis
does not divide is not split by it (another dimension may take `fsdp`, see
`logical_to_mesh_spec`), so tiny models run on any mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


def initialize_distributed() -> None:
    """Start multi-process JAX when launched as one of several processes.

    GPU hosts: set JAX_COORDINATOR_ADDRESS=host0:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID
    on every process. TPU pods and SLURM are detected by `jax.distributed.initialize()` with
    no arguments (set DYDIT_DISTRIBUTED=1). Must run before any other JAX call.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        # Collectives between CPU devices of different processes (affects only the CPU backend).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif os.environ.get("DYDIT_DISTRIBUTED") == "1":
        jax.distributed.initialize()
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


INFERENCE_MESH = (-1, 1, 1)  # sampling, evaluation, extraction: every device, data parallel


def parse_mesh_shape(text: str) -> tuple[int, ...]:
    """A command line's mesh shape, '(2,4,1)', '2,4,1' or '[2, 4, 1]' (-1 = the rest)."""
    try:
        shape = tuple(int(v) for v in text.strip().strip("()[]").split(","))
    except ValueError:
        raise ValueError(
            f"mesh shape {text!r} is not {len(MESH_AXES)} whole numbers like '(-1,1,1)' or "
            "'2,4,1' (axes data, fsdp, tensor; -1 = the remaining devices)"
        ) from None
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {text!r} needs {len(MESH_AXES)} entries {MESH_AXES}")
    return shape


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def on_mesh(fn, mesh: Mesh):
    """`fn` traced under `mesh` as the abstract mesh, whatever mesh the caller has set (or
    none): the activation constraints in the blocks read it, so a program built for a mesh
    compiles to the same layout from a training loop, a test or a planning tool."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def jit(fn, *, mesh: Mesh | None = None, compiler_options: Mapping | None = None, **kwargs):
    """`jax.jit(fn, **kwargs)` for the library's programs: with `mesh`, `fn` is traced under
    it (`on_mesh`); `compiler_options` (the run config's, e.g. an XLA backend option) go to
    XLA as they are, and none or an empty mapping leaves XLA's defaults."""
    if mesh is not None:
        fn = on_mesh(fn, mesh)
    options = dict(compiler_options) if compiler_options else None
    return jax.jit(fn, compiler_options=options, **kwargs)


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


# Activation logical axis -> mesh axes (None: replicated). One mechanism for every model's
# blocks: the rows over ('data', 'fsdp'), the rest replicated over 'tensor' (the Megatron
# layout after the row-parallel projections). `qkv` and `modulation` name projection outputs
# that are split into chunks: gathered first, see `constrain`.
ACTIVATION_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "length": None,  # tokens
    "groups": None,  # U-DiT's four 2x2-downsampled token groups
    "height": None,
    "width": None,
    "embed": None,
    "qkv": None,
    "modulation": None,
}
TOKENS = ("batch", "length", "embed")  # (B, N, D) block inputs, outputs and branches
IMAGE = ("batch", "height", "width", "embed")  # (B, H, W, C): U-DiT's token grids


def constrain(x: jax.Array, names: Sequence[str]) -> jax.Array:
    """Pin an activation to the layout its logical axis names give (`ACTIVATION_RULES`)
    under the current (abstract) mesh; a no-op without a mesh, on one device, or when the
    mesh does not divide the batch dimension.

    Blocks pin their inputs, outputs and branch outputs, so the partitioner never guesses a
    layout for them. Projection outputs that are sliced or split into chunks (`qkv`,
    `modulation`) are pinned before the split: their last dim is sharded over 'tensor' by the
    parameter rules, and left to the partitioner, slicing a sharded dim of a matmul whose
    contraction dim is sharded over an axis that also shards the batch gives wrong gradients
    (XLA's SPMD partitioner, jaxlib 0.10.2; reproduced without our code in docs/xla/)."""
    unknown = [n for n in names if n not in ACTIVATION_RULES]
    if unknown or len(names) != x.ndim:
        raise ValueError(f"activation axes {tuple(names)} for shape {x.shape}: names must be "
                         f"{x.ndim} of {tuple(ACTIVATION_RULES)}")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    spec = []
    for dim, name in zip(x.shape, names, strict=True):
        axes = ACTIVATION_RULES[name] or ()
        ways = int(np.prod([mesh.shape[a] for a in axes]))
        if dim % ways:
            return x  # an indivisible batch: leave the layout to XLA
        spec.append(axes or None)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def global_batch_from_full(full: dict, mesh: Mesh) -> dict:
    """A global batch from the whole batch held by every process: each process contributes
    only the rows its devices hold (on one process: all of them)."""
    sharding = batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        rows = sorted({idx[0].indices(len(x))[:2] for idx in
                       sharding.addressable_devices_indices_map(x.shape).values()})
        local = np.concatenate([x[lo:hi] for lo, hi in rows], axis=0)
        return jax.make_array_from_process_local_data(sharding, local, x.shape)

    return jax.tree.map(put, full)


# logical axis name -> mesh axis (None: replicated). Names not listed are replicated.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("modulation", "tensor"),
    ("layers", None),
    ("classes", None),
)


def rules_dict(rules: Sequence[Sequence[Any]] | Mapping[str, Any] | None) -> dict[str, Any]:
    """Config rules (pairs or a mapping) as {logical name: mesh axis or None}."""
    if rules is None:
        return dict(DEFAULT_RULES)
    pairs = rules.items() if isinstance(rules, Mapping) else rules
    out = {}
    for pair in pairs:
        name, axis = pair
        if axis is not None and axis not in MESH_AXES:
            raise ValueError(
                f"sharding rule {name!r} -> {axis!r}: the mesh axis must be one of {MESH_AXES}"
            )
        out[str(name)] = axis
    return out


# Mesh axes that only store parameters (gathered before use): when the rule's dimension is
# not divisible, another dimension of the same parameter may take them.
STORAGE_AXES = ("fsdp",)


def logical_to_mesh_spec(
    logical: PartitionSpec, shape: Sequence[int], mesh: Mesh, rules: Mapping[str, Any]
) -> PartitionSpec:
    """Map a logical PartitionSpec to mesh axes; a mesh axis is used at most once per array.

    A dimension that its rule's axis does not divide is left unsharded. If that axis is a
    storage axis (`fsdp`), the largest other unsharded dimension that it divides takes it
    instead (a 1152-wide embedding on a 256-way fsdp axis: the 4608-wide MLP dimension), so
    the parameter is still split; what no dimension can take stays replicated
    (`stored_form` still splits it, padded)."""
    names = tuple(logical) + (None,) * (len(shape) - len(logical))
    used: set[str] = set()
    spec: list[str | None] = []
    missed: list[str] = []
    for dim, name in zip(shape, names, strict=True):
        axis = rules.get(name) if name is not None else None
        if axis is None or axis in used or mesh.shape[axis] == 1:
            spec.append(None)
        elif dim % mesh.shape[axis]:
            spec.append(None)
            missed.append(axis)
        else:
            spec.append(axis)
            used.add(axis)
    for axis in missed:
        if axis not in STORAGE_AXES or axis in used:
            continue
        free = [i for i, dim in enumerate(shape)
                if spec[i] is None and dim % mesh.shape[axis] == 0]
        if free:
            spec[max(free, key=lambda i: shape[i])] = axis
            used.add(axis)
    return PartitionSpec(*spec)


@dataclasses.dataclass(frozen=True)
class StoredForm:
    """How one parameter is kept between training steps (weights, EMA, optimizer moments).

    Usually the parameter itself, split by `logical_to_mesh_spec`. When the storage axis
    divides none of its dimensions (DiT-XL's (28, 1152, 3456) qkv kernel on fsdp = 256), the
    dimension its rule names is zero-padded to a multiple of the axis, (28, 1280, 3456), and
    split there: ceil(1152 / 256) rows per chip instead of the whole array on every chip, four
    times over. Inside a program `unstore` slices the padding off, which leaves the same rows
    on each chip (XLA splits the 1152 rows unevenly, padded), so the layers still gather one
    layer at a time. The padding stays zero: its gradient is zero, so are AdamW's moments
    and step and the EMA there, and it adds nothing to norms."""

    shape: tuple[int, ...]
    stored_shape: tuple[int, ...]
    spec: PartitionSpec  # of both forms (the parameter's may split a dimension unevenly)

    @property
    def padded_dim(self) -> int | None:
        pairs = zip(self.shape, self.stored_shape, strict=True)
        return next((i for i, (a, b) in enumerate(pairs) if a != b), None)

    def store(self, x):
        dim = self.padded_dim
        if dim is None:
            return x
        pad = [(0, 0)] * x.ndim
        pad[dim] = (0, self.stored_shape[dim] - self.shape[dim])
        return jnp.pad(x, pad)

    def unstore(self, x):
        """The parameter's own shape; trace under the mesh (`on_mesh`) when padded."""
        dim = self.padded_dim
        if dim is None:
            return x
        x = jax.lax.slice_in_dim(x, 0, self.shape[dim], axis=dim)
        return jax.lax.with_sharding_constraint(x, self.spec)


def stored_form(logical: PartitionSpec, shape: Sequence[int], mesh: Mesh,
                rules: Mapping[str, Any]) -> StoredForm:
    """The `StoredForm` of one parameter on `mesh`: padded along the first dimension whose
    rule names a storage axis that no dimension could take."""
    shape = tuple(int(d) for d in shape)
    spec = list(logical_to_mesh_spec(logical, shape, mesh, rules))
    spec += [None] * (len(shape) - len(spec))
    names = tuple(logical) + (None,) * (len(shape) - len(logical))
    for i, name in enumerate(names):
        axis = rules.get(name) if name is not None else None
        if axis in STORAGE_AXES and axis not in spec and spec[i] is None:
            ways = mesh.shape[axis]
            if ways > 1:  # ceil(d / ways) <= d rows per chip: never more than whole
                spec[i] = axis
                stored = shape[:i] + (-(-shape[i] // ways) * ways,) + shape[i + 1:]
                return StoredForm(shape, stored, PartitionSpec(*spec))
    return StoredForm(shape, shape, PartitionSpec(*spec))


class ParamStorage:
    """The `StoredForm` of every parameter of a model on a mesh, and the conversions of a
    parameter-shaped pytree between the two forms (traceable; `unstore` under the mesh)."""

    def __init__(self, logical_specs: Any, shapes: Any, mesh: Mesh, rules: Mapping[str, Any]):
        self.mesh = mesh
        self.forms = jax.tree.map(
            lambda spec, x: stored_form(spec, x.shape, mesh, rules), logical_specs, shapes,
            is_leaf=lambda x: isinstance(x, PartitionSpec),
        )
        self.shapes = jax.tree.map(
            lambda f, x: jax.ShapeDtypeStruct(f.stored_shape, x.dtype), self.forms, shapes)
        self.padded = any(f.padded_dim is not None for f in jax.tree.leaves(self.forms))

    @functools.cached_property
    def shardings(self):
        """NamedShardings of the stored forms (needs a real mesh, not only its shape)."""
        return jax.tree.map(lambda f: NamedSharding(self.mesh, f.spec), self.forms)

    def store(self, tree):
        return jax.tree.map(lambda f, x: f.store(x), self.forms, tree)

    def unstore(self, tree):
        return jax.tree.map(lambda f, x: f.unstore(x), self.forms, tree)


def replicated_leaves(logical_specs: Any, shapes: Any, mesh: Mesh,
                      rules: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(parameter path, bytes per chip) of every parameter that stays whole on each chip
    although the mesh has a storage axis of size > 1 (even in its `StoredForm`), largest
    first."""
    if all(mesh.shape[a] == 1 for a in STORAGE_AXES):
        return []
    out = []
    flat = jax.tree_util.tree_leaves_with_path(
        logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (path, spec), x in zip(flat, jax.tree.leaves(shapes), strict=True):
        if all(a is None for a in stored_form(spec, x.shape, mesh, rules).spec):
            nbytes = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
            out.append((jax.tree_util.keystr(path), nbytes))
    return sorted(out, key=lambda item: -item[1])


def tree_shardings(logical_specs: Any, shapes: Any, mesh: Mesh, rules: Mapping[str, Any]):
    """NamedShardings for a pytree, from its logical specs and its shapes (arrays or structs)."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, logical_to_mesh_spec(spec, x.shape, mesh, rules)),
        logical_specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
