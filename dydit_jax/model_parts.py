"""A model split for pure functions (`ModelParts`: structure, parameters, buffers, shardings):
built on a mesh with its parameters created in place, or restored from a workdir's
checkpoint, plus what a workdir records about the model it holds."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from dydit_jax import checkpoint as ckpt_lib
from dydit_jax import config_lib, models, parallel


@dataclasses.dataclass
class ModelParts:
    """A model split for pure functions: structure, trainable params, fixed buffers."""

    graphdef: Any
    params: Any  # pure dict of float32 arrays, sharded by `param_shardings` (None: not built)
    buffers: Any  # pure dict (e.g. the position table), replicated
    config: models.DiTConfig
    param_shapes: Any  # pure dict of ShapeDtypeStructs
    param_shardings: Any  # pure dict of NamedShardings from the logical axis rules
    storage: parallel.ParamStorage  # how training keeps the parameters on this mesh


def abstract_model(model_config: models.DiTConfig, seed: int = 0) -> tuple[Any, Any, Any]:
    """(graphdef, parameter ShapeDtypeStructs, logical PartitionSpecs), allocating nothing."""
    structure = {}

    def split_params():
        structure["graphdef"], params, _ = nnx.split(
            models.model_class(model_config)(model_config, rngs=nnx.Rngs(seed)), nnx.Param, ...
        )
        return params

    # jax.eval_shape rather than nnx.eval_shape: the latter would turn the logical names into
    # shardings of the active mesh.
    abstract_params = jax.eval_shape(split_params)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    return structure["graphdef"], nnx.to_pure_dict(abstract_params), logical


def build_model(
    model_config: models.DiTConfig,
    mesh,
    *,
    seed: int = 0,
    rules=None,
    init_params: bool = True,
) -> ModelParts:
    """Create the model's parameters directly in their shardings (no host copy of the model).

    With `init_params=False` only the structure, buffers and shardings are built (for a
    restore that fills the parameters from a checkpoint).
    """
    graphdef, shapes, logical = abstract_model(model_config, seed)
    rules = parallel.rules_dict(rules)
    shardings = parallel.tree_shardings(logical, shapes, mesh, rules)
    create = lambda: models.model_class(model_config)(model_config, rngs=nnx.Rngs(seed))
    rep = parallel.replicated(mesh)

    def init():
        _, params, buffers = nnx.split(create(), nnx.Param, ...)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)

    if init_params:
        params, buffers = jax.jit(init, out_shardings=(shardings, rep))()
    else:  # XLA drops the unused parameter initialisation
        params, buffers = None, jax.jit(lambda: init()[1], out_shardings=rep)()
    return ModelParts(graphdef, params, buffers, model_config, shapes, shardings,
                      parallel.ParamStorage(logical, shapes, mesh, rules))


def restore_weights(
    workdir: str, mesh, *, item: str = "ema_params", step: int | None = None
) -> tuple[int, ml_collections.ConfigDict, ModelParts, Any]:
    """(step, run config, model parts, weights) of one weights item ("ema_params" or "params")
    of a workdir's checkpoint, restored straight into this mesh's shardings."""
    step, meta = ckpt_lib.read_meta(workdir, step)
    config = ml_collections.ConfigDict(meta["config"])
    parts = build_model(
        config_lib.model_config_from(config), mesh, rules=config.get("sharding_rules"),
        init_params=False,
    )
    target = {item: ckpt_lib.abstract_like(parts.param_shapes, parts.param_shardings)}
    ckpt = ckpt_lib.Checkpointer(workdir, create=False)
    try:
        try:
            _, restored, _ = ckpt.restore(target, step)
        except ckpt_lib.CheckpointDamagedError as e:
            good = ckpt_lib.readable_steps(
                [s for s in ckpt.all_steps() if s != step], lambda s: ckpt.restore(target, s)
            )
            raise ckpt_lib.CheckpointDamagedError(
                f"{e}. {ckpt_lib.other_steps_hint(good)}", step
            ) from None
    finally:
        ckpt.close()
    return step, config, parts, restored[item]


def initial_weights(parts: ModelParts, workdir: str, mesh) -> Any:
    """parts.params with every parameter that the run in `workdir` has (same name) replaced by
    its EMA value: a DiT initialises the backbone of a DyDiT; the routers keep their init."""
    _, _, _, source = restore_weights(workdir, mesh)
    source = blocks_like(source, parts.params, parts.config.depth)
    loaded = dict(jax.tree_util.tree_leaves_with_path(source))
    used = set()

    def take(path, value):
        if path not in loaded:
            return value
        if loaded[path].shape != value.shape:
            raise ValueError(
                f"init_from {workdir}: {jax.tree_util.keystr(path)} has shape "
                f"{loaded[path].shape} there but {value.shape} here; the backbones differ"
            )
        used.add(path)
        return loaded[path]

    params = jax.device_put(jax.tree_util.tree_map_with_path(take, parts.params),
                            parts.param_shardings)
    unused = [jax.tree_util.keystr(p) for p in loaded if p not in used]
    if unused:
        raise ValueError(f"init_from {workdir}: parameters not in this model: {unused[:5]}")
    logging.info("initialised %d parameter arrays from %s", len(used), workdir)
    return params


def blocks_like(source: Any, target: Any, depth: int) -> Any:
    """`source` weights with their blocks in `target`'s layout: stacked (`scan_blocks`, one
    module whose leaves have a leading layer axis) or one module per layer; a run trained
    either way initialises the other."""
    blocks, want = source.get("blocks"), target.get("blocks")
    if blocks is None or want is None:
        return source
    stacked, want_stacked = 0 not in blocks, 0 not in want
    layers = (jax.tree.leaves(blocks)[0].shape[0] if stacked else len(blocks))
    if layers != depth:
        return source  # another depth: the per-parameter checks name what differs
    if stacked and not want_stacked:
        blocks = {i: jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(depth)}
    elif want_stacked and not stacked:
        blocks = jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in range(depth)])
    else:
        return source
    return {**source, "blocks": blocks}


def checkpoint_bytes(model_config: models.DiTConfig, config) -> int:
    """Disk a run needs for its checkpoints: params, EMA and AdamW's two moments in float32,
    `keep_checkpoints` of them plus the one being written."""
    _, shapes, _ = abstract_model(model_config)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    return 4 * 4 * params * (int(config.keep_checkpoints) + 1)


def run_meta(config: ml_collections.ConfigDict, model_config: models.DiTConfig, step: int) -> dict:
    return {
        "step": int(step),
        "model": config.model,
        "model_config": dataclasses.asdict(model_config),
        "config": config.to_dict(),
    }


def check_resume_compatible(meta: dict, model_config: models.DiTConfig, workdir: str) -> None:
    saved, now = meta.get("model_config") or {}, dataclasses.asdict(model_config)
    if saved != now:
        fields = sorted(set(saved) | set(now))
        differ = [f"{k}: {saved.get(k, '(none)')!r} there, {now.get(k, '(none)')!r} here"
                  for k in fields if saved.get(k, "(none)") != now.get(k, "(none)")]
        raise ValueError(
            f"{workdir} holds checkpoints of another model ({meta.get('model')}; "
            f"{'; '.join(differ)}). Use a new --workdir or the config the checkpoints were "
            "trained with."
        )


def log_replicated(model_config: models.DiTConfig, mesh, rules) -> None:
    """Say which parameters no mesh axis splits although the mesh has an fsdp axis (the rules
    name it for none of their dimensions; see `parallel.StoredForm`): each is whole on every
    chip, four times over (weights, EMA, AdamW's two moments)."""
    _, shapes, logical = abstract_model(model_config)
    whole = parallel.replicated_leaves(logical, shapes, mesh, parallel.rules_dict(rules))
    total = sum(b for _, b in whole)
    if total > 2**20:
        logging.warning(
            "%d parameter arrays (%.1f MiB per chip, x4 with EMA and AdamW state) are whole "
            "on every chip (fsdp=%d): the sharding rules name fsdp for none of their "
            "dimensions; largest: %s. Map one of their logical axes to fsdp in "
            "config.sharding_rules to split them.", len(whole), total / 2**20,
            mesh.shape["fsdp"],
            ", ".join(f"{p} ({b / 2**20:.1f} MiB)" for p, b in whole[:3]),
        )
