"""Generic trainer: config -> mesh -> model -> jitted step -> loop with EMA, logs, checkpoints.

The train state is a pytree of pure dicts (params, EMA, optimizer state) plus the step; the
model structure (graphdef) and fixed buffers live outside it, so the jitted step is a pure
function: nnx.merge inside, no module mutation. Per-step randomness is fold_in(seed, step),
and the batch of a step is `batches[step]`: resuming at step s replays exactly what an
uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx, struct
from jax.experimental import multihost_utils

from dydit_jax import checkpoint as ckpt_lib
from dydit_jax import data as data_lib
from dydit_jax import diffusion as diffusion_lib
from dydit_jax import dynamic, flops, models, parallel, sample_lib, xla_cpu
from dydit_jax.metric_writer import MetricWriter
from dydit_jax.models import layers

# ----------------------------------------------------------------------------- config


def base_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, at the DiT paper's recipe; config files override."""
    c = ml_collections.ConfigDict()
    # --- model
    c.model = "DiT-XL/2"  # registry name: DiT-{S,B,L,XL}/{2,4,8}
    c.model_overrides = model_overrides()  # replace model fields (depth, dtype, ...)
    # --- data
    c.dataset = "digits"  # digits (embedded) | latents (ArrayRecord shards in data_dir)
    c.data_dir = ""
    c.image_size = 8
    c.in_channels = 1
    c.num_classes = 10
    c.label_dropout = 0.1  # null label with this probability: classifier-free guidance
    # --- optimisation (AdamW, constant lr 1e-4, no weight decay, warm-up or clipping)
    c.num_steps = 400_000
    c.global_batch_size = 256
    c.learning_rate = 1e-4
    c.warmup_steps = 0  # linear lr warm-up steps from 0 (0 = none)
    c.lr_schedule = "constant"  # after warm-up: constant | cosine (decay to 0 at num_steps)
    c.weight_decay = 0.0
    c.grad_clip_norm = 0.0  # global-norm clipping (0 = none)
    # skip the whole update (params, EMA, optimizer state kept; counted and logged) when the
    # global gradient norm is >= this: the DyDiT release's `clip_max_norm` (0 = never)
    c.grad_skip_norm = 0.0
    c.ema_decay = 0.9999  # EMA of the weights, updated every step; used for sampling
    c.seed = 0
    c.init_from = ""  # a DiT/DyDiT workdir: start from its EMA weights (new routers keep init)
    # a non-finite loss or gradient never updates the state; then: "stop" (a clear error
    # naming the step; checkpoints before it kept) or "skip" (the batch is skipped, counted)
    c.nonfinite = "stop"
    # --- DyDiT fine-tuning (used by DyDiT-* models)
    c.dydit = ml_collections.ConfigDict(
        dict(
            lambda_target=0.5,  # target FLOPs ratio
            hold_steps=100,  # lambda = 1 before this step (the release's 100)
            warmup_steps=1000,  # lambda ramps from 1 at step 0 to lambda_target at this step
            complete_model_steps=0,  # warm-up stage: also train the complete model (stage 1)
            stratified_timesteps=True,  # example i draws t from quarter (i mod 4)
        )
    )
    # --- parallelism: mesh over ('data', 'fsdp', 'tensor'); -1 = the remaining devices
    c.mesh_shape = (-1, 1, 1)
    # logical parameter axis -> mesh axis (None = replicated); see dydit_jax/parallel.py
    c.sharding_rules = parallel.DEFAULT_RULES
    # --- diffusion and sampling
    c.diffusion_steps = 1000
    c.sample = ml_collections.ConfigDict(
        dict(
            sampler="ddpm",  # ddpm | ddim
            steps="250",  # respacing: "250", "ddim50", ...
            cfg_scale=1.5,  # classifier-free guidance scale (1.0 = none)
            guided_channels=3,  # eps channels guided: 3 = reference quirk, -1 = all
            num_images=64,  # images in each periodic grid
            batch_size=64,
            # DyDiT inference engine (sample.py; dydit_jax/dynamic): sliced widths and
            # capacity-bounded tokens. False = the masked model (no savings, reference form).
            dynamic=True,
            width_multiple=1,  # round active head/group counts up to this (fewer compiles)
            token_capacity="calibrate",  # calibrate | all | fraction (0.75) | count (192)
            capacity_margin=0.1,  # calibrated capacity = most selected * (1 + margin)
            capacity_step_buckets=1,  # separate capacities for this many step ranges
            mlp_shape_budget=32,  # at most this many (groups, capacity) MLP shapes compiled
            layers_per_call=1,  # blocks per compiled call (more: faster, more compiles)
        )
    )
    # --- bookkeeping
    c.log_every_steps = 100
    c.checkpoint_every_steps = 10_000
    c.keep_checkpoints = 3
    c.sample_every_steps = 50_000  # EMA sample grids (and DyDiT's eval FLOPs ratio); 0: none
    # (first, last): a jax.profiler trace of steps first..last-1 in WORKDIR/profile (TensorBoard
    # profile plugin or Perfetto); () = none
    c.profile_steps = ()
    return c


# model fields that the run config sets at its top level (image_size, in_channels, ...)
_TOP_LEVEL_MODEL_FIELDS = ("input_size", "in_channels", "num_classes")


def model_overrides(**values) -> ml_collections.ConfigDict:
    """`config.model_overrides`: a typed, unset (None) entry for every field of the DiT,
    DyDiT and U-DiT configs, so that `--config.model_overrides.KEY=VALUE` works on every
    config file; `values` set some. Unset entries change nothing."""
    group = ml_collections.ConfigDict()
    for config_class in (models.DiTConfig, models.DyDiTConfig, models.UDiTConfig):
        for field in dataclasses.fields(config_class):
            if field.name not in _TOP_LEVEL_MODEL_FIELDS and field.name not in group:
                group[field.name] = ml_collections.config_dict.placeholder(type(field.default))
    for name, value in values.items():
        group[name] = value
    return group


def active_overrides(config: ml_collections.ConfigDict) -> dict:
    """The model fields a run config sets (unset placeholders left out)."""
    return {k: v for k, v in dict(config.get("model_overrides") or {}).items() if v is not None}


def model_config_from(config: ml_collections.ConfigDict) -> models.DiTConfig:
    """The model config a run config names; raises a clear ValueError on bad fields."""
    overrides = active_overrides(config)
    return models.model_config(
        config.model,
        input_size=config.image_size,
        in_channels=config.in_channels,
        num_classes=config.num_classes,
        **overrides,
    )


def validate_config(
    config: ml_collections.ConfigDict, *, training: bool = True
) -> models.DiTConfig:
    """Check every field the trainer reads before anything is written; returns the model config.

    `training=False` (sampling, evaluating a run): the config's mesh_shape is not checked
    against the devices present, since inference picks its own mesh."""
    try:
        check_field_types(config)
    except OSError as e:  # ml_collections' stand-in for a --config file that failed to load
        raise ValueError(f"{e}\ncheck the --config path (configs/NAME.py[:VARIANT])") from None
    check_model_overrides(config)
    check_sharding_rules(config)
    model_config = model_config_from(config)
    positive = (
        "num_steps", "global_batch_size", "log_every_steps", "checkpoint_every_steps",
        "keep_checkpoints",
    )
    for name in positive:
        if int(config[name]) < 1:
            raise ValueError(f"config.{name} must be >= 1, got {config[name]}")
    if int(config.sample_every_steps) < 0:
        raise ValueError(f"config.sample_every_steps must be >= 0 (0: no sample grids), got "
                         f"{config.sample_every_steps}")
    learning_rate_schedule(config)  # validates lr_schedule
    if not config.learning_rate > 0:
        raise ValueError(f"config.learning_rate must be > 0, got {config.learning_rate}")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"config.ema_decay must be in [0, 1), got {config.ema_decay}")
    if not 0.0 <= config.label_dropout < 1.0:
        raise ValueError(f"config.label_dropout must be in [0, 1), got {config.label_dropout}")
    for name in ("warmup_steps", "seed", "diffusion_steps"):
        if int(config[name]) < (1 if name == "diffusion_steps" else 0):
            raise ValueError(f"config.{name} must be >= 0, got {config[name]}")
    for name in ("weight_decay", "grad_clip_norm", "grad_skip_norm"):
        if not float(config[name]) >= 0:
            raise ValueError(f"config.{name} must be >= 0, got {config[name]}")
    if config.get("nonfinite", "stop") not in NONFINITE_POLICIES:
        raise ValueError(
            f"config.nonfinite must be one of {NONFINITE_POLICIES}, got {config.nonfinite!r}"
        )
    sample = config.sample
    if not float(sample.cfg_scale) >= 1.0:
        raise ValueError(f"config.sample.cfg_scale must be >= 1 (1 = no guidance), got "
                         f"{sample.cfg_scale}")
    for name in ("num_images", "batch_size"):
        if int(sample[name]) < 1:
            raise ValueError(f"config.sample.{name} must be >= 1, got {sample[name]}")
    if training:
        try:
            parallel.resolve_mesh_shape(config.mesh_shape, jax.device_count())
        except ValueError as e:
            raise ValueError(
                f"config.mesh_shape: {e}; override it on the command line, e.g. "
                f"--config.mesh_shape='(-1,1,1)' (data parallel over all "
                f"{jax.device_count()} devices)"
            ) from None
    profile = tuple(config.get("profile_steps", ()))
    if profile and (len(profile) != 2 or not 0 <= int(profile[0]) < int(profile[1])):
        raise ValueError(
            f"config.profile_steps must be () or (first, last) with 0 <= first < last, e.g. "
            f"--config.profile_steps='(10,15)'; got {profile}"
        )
    if config.sample.sampler not in sample_lib.SAMPLERS:
        raise ValueError(
            f"config.sample.sampler {config.sample.sampler!r} is not one of {sample_lib.SAMPLERS}"
        )
    diffusion_lib.space_timesteps(config.diffusion_steps, config.sample.steps)
    engine_options(config.sample)  # validates the DyDiT engine's sampling options
    if isinstance(model_config, models.DyDiTConfig):
        dyn = config.dydit
        if not 0.0 < dyn.lambda_target <= 1.0:
            raise ValueError(
                f"config.dydit.lambda_target must be in (0, 1], got {dyn.lambda_target}"
            )
        for name in ("hold_steps", "warmup_steps", "complete_model_steps"):
            if int(dyn[name]) < 0:
                raise ValueError(f"config.dydit.{name} must be >= 0, got {dyn[name]}")
    return model_config


NONFINITE_POLICIES = ("stop", "skip")


def check_field_types(config: ml_collections.ConfigDict) -> None:
    """Each field of the run config has the type of `base_config()`'s (ints may stand for
    floats): a string where a number belongs is one clear error, not a crash later."""
    def walk(ours, base, prefix):
        for name, want in base.items():
            if name not in ours or name in ("model_overrides", "sharding_rules"):
                continue
            got = ours[name]
            where = f"config.{prefix}{name}"
            if isinstance(want, ml_collections.ConfigDict):
                if not isinstance(got, ml_collections.ConfigDict | dict):
                    raise ValueError(f"{where} must be a group of fields, got {got!r}")
                walk(got, want, f"{prefix}{name}.")
            elif isinstance(want, bool):
                if not isinstance(got, bool | np.bool_):
                    raise ValueError(f"{where} must be true or false, got {got!r}")
            elif isinstance(want, int | float):
                ok = isinstance(got, int | float | np.integer | np.floating)
                if not ok or isinstance(got, bool) or (isinstance(want, int) and isinstance(
                        got, float | np.floating) and not float(got).is_integer()):
                    kind = "a whole number" if isinstance(want, int) else "a number"
                    raise ValueError(f"{where} must be {kind}, got {got!r}")
            elif isinstance(want, str) and not isinstance(got, str):
                if not (name == "token_capacity" and isinstance(got, int | float)):
                    raise ValueError(f"{where} must be a string, got {got!r}")
            elif isinstance(want, tuple) and (not isinstance(got, tuple | list) or not all(
                    isinstance(s, int | np.integer) and not isinstance(s, bool) for s in got)):
                raise ValueError(f"{where} must be a list of whole-number sizes, got {got!r}")

    walk(config, base_config(), "")


def check_model_overrides(config: ml_collections.ConfigDict) -> None:
    """`config.model_overrides` against the model configs' fields: sizes are whole numbers
    >= 1, ratios positive numbers, switches true/false, `dtype` a floating-point type; one
    clear error here rather than a TypeError or ZeroDivisionError inside the model code.
    Unknown names are left to `models.model_config` (which lists the known ones)."""
    overrides = config.get("model_overrides") or {}
    if not isinstance(overrides, ml_collections.ConfigDict | dict):
        raise ValueError(f"config.model_overrides must be a group of fields, got {overrides!r}")
    overrides = active_overrides(config)
    kinds = {}
    for config_class in (models.DiTConfig, models.DyDiTConfig, models.UDiTConfig):
        kinds |= {f.name: type(f.default) for f in dataclasses.fields(config_class)}
    for name, value in overrides.items():
        kind, where = kinds.get(name), f"config.model_overrides.{name}"
        whole = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
        number = whole or isinstance(value, float | np.floating)
        if kind is int and not (whole and value >= 1):
            raise ValueError(f"{where} must be a whole number >= 1, got {value!r}")
        if kind is float and not (number and np.isfinite(value) and value > 0):
            raise ValueError(f"{where} must be a number > 0, got {value!r}")
        if kind is bool and not isinstance(value, bool | np.bool_):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
    if "dtype" in overrides:
        try:
            floating = jnp.issubdtype(jnp.dtype(overrides["dtype"]), jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise ValueError(
                "config.model_overrides.dtype must name a floating-point type (float32, "
                f"bfloat16), got {overrides['dtype']!r}"
            )


def check_sharding_rules(config: ml_collections.ConfigDict) -> None:
    """`config.sharding_rules`: (logical name, mesh axis or None) pairs naming real mesh axes."""
    try:
        parallel.rules_dict(config.get("sharding_rules"))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"config.sharding_rules: {e}; give (logical name, mesh axis or None) pairs, e.g. "
            f"{parallel.DEFAULT_RULES[:2]}"
        ) from None


def engine_options(sample: ml_collections.ConfigDict, **overrides) -> dict:
    """The DyDiT engine's options from `config.sample` (defaults for runs that predate them),
    with non-None `overrides` (command-line flags); raises ValueError on bad values."""
    defaults = base_config().sample
    names = (
        "width_multiple", "token_capacity", "capacity_margin", "capacity_step_buckets",
        "mlp_shape_budget", "layers_per_call",
    )
    opts = {name: sample.get(name, defaults[name]) for name in names}
    opts |= {k: v for k, v in overrides.items() if v is not None}
    for name in ("width_multiple", "capacity_step_buckets", "mlp_shape_budget",
                 "layers_per_call"):
        if int(opts[name]) < 1:
            raise ValueError(f"config.sample.{name} must be >= 1, got {opts[name]}")
    if not float(opts["capacity_margin"]) >= 0:
        raise ValueError(
            f"config.sample.capacity_margin must be >= 0, got {opts['capacity_margin']}"
        )
    return {
        "width_multiple": int(opts["width_multiple"]),
        "capacity": dynamic.parse_capacity(opts["token_capacity"]),
        "capacity_margin": float(opts["capacity_margin"]),
        "capacity_step_buckets": int(opts["capacity_step_buckets"]),
        "mlp_shape_budget": int(opts["mlp_shape_budget"]),
        "layers_per_call": int(opts["layers_per_call"]),
    }


# ------------------------------------------------------------------------------ state


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


@dataclasses.dataclass
class ModelParts:
    """A model split for pure functions: structure, trainable params, fixed buffers."""

    graphdef: Any
    params: Any  # pure dict of float32 arrays, sharded by `param_shardings` (None: not built)
    buffers: Any  # pure dict (e.g. the position table), replicated
    config: models.DiTConfig
    param_shapes: Any  # pure dict of ShapeDtypeStructs
    param_shardings: Any  # pure dict of NamedShardings from the logical axis rules


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
    shardings = parallel.tree_shardings(logical, shapes, mesh, parallel.rules_dict(rules))
    create = lambda: models.model_class(model_config)(model_config, rngs=nnx.Rngs(seed))
    rep = parallel.replicated(mesh)

    def init():
        _, params, buffers = nnx.split(create(), nnx.Param, ...)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)

    if init_params:
        params, buffers = jax.jit(init, out_shardings=(shardings, rep))()
    else:  # XLA drops the unused parameter initialisation
        params, buffers = None, jax.jit(lambda: init()[1], out_shardings=rep)()
    return ModelParts(graphdef, params, buffers, model_config, shapes, shardings)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (torch defaults: betas 0.9/0.999, eps 1e-8), optional clipping and warm-up."""
    adamw = optax.adamw(
        learning_rate_schedule(config), b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=config.weight_decay,
    )
    if config.get("grad_clip_norm", 0) > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
    return adamw


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps`, then `lr_schedule`: constant or cosine."""
    lr, warmup = config.learning_rate, config.get("warmup_steps", 0)
    kind = config.get("lr_schedule", "constant")
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, max(1, config.num_steps - warmup))
    else:
        raise ValueError(f"lr_schedule {kind!r} is not one of ('constant', 'cosine')")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def state_shardings(parts: ModelParts, tx: optax.GradientTransformation, mesh) -> TrainState:
    """Shardings of the whole train state: EMA and optimizer moments like the parameters."""
    rep = parallel.replicated(mesh)
    opt_shapes = jax.eval_shape(tx.init, parts.param_shapes)
    opt = optax.tree_map_params(
        tx, lambda _, sharding: sharding, opt_shapes, parts.param_shardings,
        transform_non_params=lambda _: rep,
    )
    return TrainState(rep, parts.param_shardings, parts.param_shardings, opt)


def restore_weights(
    workdir: str, mesh, *, item: str = "ema_params", step: int | None = None
) -> tuple[int, ml_collections.ConfigDict, ModelParts, Any]:
    """(step, run config, model parts, weights) of one weights item ("ema_params" or "params")
    of a workdir's checkpoint, restored straight into this mesh's shardings."""
    step, meta = ckpt_lib.read_meta(workdir, step)
    config = ml_collections.ConfigDict(meta["config"])
    parts = build_model(
        model_config_from(config), mesh, rules=config.get("sharding_rules"), init_params=False
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


def restore_targets(parts: ModelParts, tx: optax.GradientTransformation, mesh) -> dict:
    """Abstract checkpoint items with explicit target shardings for this mesh (the checkpoint
    may come from another mesh or device count)."""
    shardings = state_shardings(parts, tx, mesh)
    opt_shapes = jax.eval_shape(tx.init, parts.param_shapes)
    return {
        "params": ckpt_lib.abstract_like(parts.param_shapes, shardings.params),
        "ema_params": ckpt_lib.abstract_like(parts.param_shapes, shardings.ema_params),
        "opt_state": ckpt_lib.abstract_like(opt_shapes, shardings.opt_state),
    }


def init_state(parts: ModelParts, tx: optax.GradientTransformation, mesh) -> TrainState:
    shardings = state_shardings(parts, tx, mesh)
    # The EMA starts as a copy of the initial weights (reference recipe).
    ema = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(parts.params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step, parts.params, ema(parts.params), opt_state)


# ------------------------------------------------------------------------ update step


def sample_timesteps(key, batch: int, num_timesteps: int, stratified: bool) -> jax.Array:
    """Uniform timesteps, or DyDiT's stratified draw: example i gets a uniform timestep from
    quarter (i mod 4) of the schedule."""
    if not stratified:
        return jax.random.randint(key, (batch,), 0, num_timesteps)
    quarter = num_timesteps // 4
    return jax.random.randint(key, (batch,), 0, quarter) + quarter * (jnp.arange(batch) % 4)


def dydit_loss(model, diffusion, dyn, x0, t, noise, y, step, route_key, y_full):
    """DyDiT fine-tuning loss: diffusion loss of the dynamic forward + the FLOPs loss
    2 (mean r - lambda(step))^2, + during the warm-up stage (step < complete_model_steps) the
    diffusion loss of the complete model (routers bypassed, so they get no gradient from it)."""
    captured = {}

    def dynamic_fn(x, tt):
        out, captured["masks"] = model(x, tt, y, key=route_key, return_masks=True)
        return out

    terms = diffusion.training_losses(dynamic_fn, x0, t, noise)
    masks = captured["masks"]
    cfg = model.config
    ratio = flops.flops_ratio(
        masks["heads"], masks["groups"], masks["tokens"], cfg.num_tokens, cfg.hidden_size,
        cfg.mlp_hidden,
    )
    lam = flops.lambda_schedule(
        step, dyn.lambda_target, hold_steps=dyn.hold_steps, warmup_steps=dyn.warmup_steps
    )
    flops_term = flops.flops_loss(ratio, lam)

    def complete_term():
        full = diffusion.training_losses(
            lambda x, tt: model(x, tt, y_full, complete=True), x0, t, noise
        )
        return full["loss"].mean()

    complete = jax.lax.cond(
        step < dyn.complete_model_steps, complete_term, lambda: jnp.zeros((), jnp.float32)
    )
    loss = terms["loss"].mean() + flops_term + complete
    return loss, {
        "loss": loss, "mse": terms["mse"].mean(), "vb": terms["vb"].mean(),
        "flops_loss": flops_term, "complete_loss": complete, "lambda": lam,
        "flops_ratio": ratio.mean(), "kept_heads": masks["heads"].mean(),
        "kept_groups": masks["groups"].mean(), "kept_tokens": masks["tokens"].mean(),
    }


def eval_flops_ratio(parts: ModelParts, params, x0, labels, num_timesteps: int = 10) -> float:
    """FLOPs ratio of a DyDiT's evaluation masks (logits > 0), averaged over `num_timesteps`
    timesteps spread over 0..999 and over the examples x0 (noised to each timestep)."""
    diffusion = diffusion_lib.create_diffusion(None)
    cfg = parts.config

    @jax.jit
    def ratio_at(params, t):
        model = nnx.merge(parts.graphdef, params, parts.buffers)
        tt = jnp.full((x0.shape[0],), t, jnp.int32)
        x_t = diffusion.q_sample(x0, tt, jax.random.normal(jax.random.key(0), x0.shape))
        _, masks = model(x_t, tt, labels, return_masks=True)
        return flops.flops_ratio(
            masks["heads"], masks["groups"], masks["tokens"], cfg.num_tokens,
            cfg.hidden_size, cfg.mlp_hidden,
        ).mean()

    ts = np.linspace(0, diffusion.num_timesteps - 1, num_timesteps).round().astype(np.int32)
    return float(np.mean([ratio_at(params, t) for t in ts]))


def make_loss_fn(parts: ModelParts, config: ml_collections.ConfigDict):
    """loss_fn(params, x0, y, key, step) -> (loss, metrics): the training loss of one batch
    (DiT/U-DiT: the IDDPM hybrid loss; DyDiT: `dydit_loss`), a pure function of its inputs."""
    diffusion = diffusion_lib.create_diffusion(None, config.diffusion_steps)
    num_classes = parts.config.num_classes
    buffers = parts.buffers

    dynamic = isinstance(parts.config, models.DyDiTConfig)
    dyn = config.get("dydit") if dynamic else None
    stratified = bool(dyn and dyn.stratified_timesteps)
    # U-DiT's label embedders drop labels independently: the model takes one column each.
    label_columns = getattr(parts.config, "num_label_embedders", 1)

    def loss_fn(params, x0, y, key, step):
        model = nnx.merge(parts.graphdef, params, buffers)
        k_t, k_noise, k_drop, k_route, k_drop_full = jax.random.split(key, 5)
        t = sample_timesteps(k_t, x0.shape[0], diffusion.num_timesteps, stratified)
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
        y_cols = y if label_columns == 1 else jnp.repeat(y[:, None], label_columns, axis=1)
        y_in = layers.drop_labels(k_drop, y_cols, config.label_dropout, num_classes)
        if not dynamic:
            terms = diffusion.training_losses(lambda x, tt: model(x, tt, y_in), x0, t, noise)
            loss = terms["loss"].mean()
            return loss, {"loss": loss, "mse": terms["mse"].mean(), "vb": terms["vb"].mean()}
        return dydit_loss(model, diffusion, dyn, x0, t, noise, y_in, step, k_route,
                          layers.drop_labels(k_drop_full, y, config.label_dropout, num_classes))

    return loss_fn


def make_train_step(parts: ModelParts, tx, config: ml_collections.ConfigDict, mesh):
    """jit(fn(state, batch) -> (state, metrics)) with explicit shardings and donated state.

    An update is applied only when the loss and gradient are finite and, with
    `config.grad_skip_norm > 0`, the global gradient norm is below it (the DyDiT release's
    update-skip threshold); otherwise params, EMA and optimizer state stay as they were (the
    step still advances) and the metrics `nonfinite` / `skipped_large_grad` say so."""
    check_training_mesh(parts.config, mesh)
    seed = int(config.seed)
    ema_decay = config.ema_decay
    skip_norm = float(config.get("grad_skip_norm", 0.0))
    loss_fn = make_loss_fn(parts, config)

    def step_fn(state: TrainState, batch: dict):
        # the key is made in the program: building the step touches no device
        key, input_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), state.step))
        x0 = model_inputs(batch, input_key)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(
            state.params, x0, batch["label"], key, state.step
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(
            lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params
        )
        metrics["grad_norm"] = optax.tree.norm(grads)
        # A non-finite loss or gradient leaves the state as it was (only the step moves on),
        # so no NaN ever reaches the parameters or a checkpoint; the host reads the flag.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        small = metrics["grad_norm"] < skip_norm if skip_norm > 0 else jnp.bool_(True)
        apply = finite & small
        params, ema, opt_state = jax.tree.map(
            lambda new, old: jnp.where(apply, new, old),
            (params, ema, opt_state), (state.params, state.ema_params, state.opt_state),
        )
        metrics["nonfinite"] = (~finite).astype(jnp.float32)
        metrics["skipped_large_grad"] = (finite & ~small).astype(jnp.float32)
        return TrainState(state.step + 1, params, ema, opt_state), metrics

    shardings = state_shardings(parts, tx, mesh)
    rows = parallel.batch_sharding(mesh)
    return xla_cpu.jit(
        step_fn,
        model=parts.config,
        mesh=mesh,
        in_shardings=(shardings, rows),
        out_shardings=(shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )


# ------------------------------------------------------------------------------- loop

MAX_STEPS_IN_FLIGHT = 2


def model_input_shape(example_shape: dict) -> tuple[int, ...]:
    """The (H, W, C) the model sees for a source's examples (see `model_inputs`)."""
    if "moments" in example_shape:  # (2 = image and flip, H, W, 2C = mean and logvar)
        _, h, w, c2 = example_shape["moments"]
        return (h, w, c2 // 2)
    return tuple(example_shape["latents" if "latents" in example_shape else "image"])


def model_inputs(batch: dict, key: jax.Array) -> jax.Array:
    """x0 for the diffusion loss: images as they are, pre-sampled latents as they are, or,
    for VAE moments, a random flip and a posterior sample scaled by 0.18215 (per step)."""
    if "moments" in batch:
        return data_lib.sample_from_moments(key, batch["moments"])
    return batch["latents" if "latents" in batch else "image"].astype(jnp.float32)


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


def check_training_mesh(model_config: models.DiTConfig, mesh) -> None:
    """Refuse a model/mesh pair whose gradients XLA gets wrong (docs/xla/): U-DiT's XLA
    depthwise convolution on a mesh with a 'tensor' axis."""
    if getattr(model_config, "depthwise", None) == "xla" and mesh.shape["tensor"] > 1:
        raise ValueError(
            f"U-DiT with depthwise='xla' cannot train on a mesh with tensor = "
            f"{mesh.shape['tensor']}: XLA's partitioner gets the depthwise kernels' gradients "
            "wrong there (docs/xla/grouped_conv_kernel_grad.py). Use "
            "--config.model_overrides.depthwise=shifted, or a mesh_shape with tensor = 1"
        )


def log_replicated(model_config: models.DiTConfig, mesh, rules) -> None:
    """Say which parameters no mesh axis splits although the mesh has an fsdp axis: each is
    whole on every chip, four times over (weights, EMA, AdamW's two moments)."""
    _, shapes, logical = abstract_model(model_config)
    whole = parallel.replicated_leaves(logical, shapes, mesh, parallel.rules_dict(rules))
    total = sum(b for _, b in whole)
    if total > 2**20:
        logging.warning(
            "%d parameter arrays (%.1f MiB per chip, x4 with EMA and AdamW state) are whole "
            "on every chip: no dimension is divisible by fsdp=%d; largest: %s. A mesh_shape "
            "whose fsdp size divides the model width shards them (python -m dydit_jax.plan "
            "--search proposes one).", len(whole), total / 2**20, mesh.shape["fsdp"],
            ", ".join(f"{p} ({b / 2**20:.1f} MiB)" for p, b in whole[:3]),
        )


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train (resuming from the latest checkpoint in `workdir`), logging and sampling as set."""
    # --- validate everything before writing anything
    model_config = validate_config(config)
    source = data_lib.load_source(config)
    if int(source.labels.max()) >= model_config.num_classes:
        raise ValueError(
            f"the data has labels up to {int(source.labels.max())} but num_classes is "
            f"{model_config.num_classes}; set --config.num_classes={int(source.labels.max()) + 1}"
        )
    data_shape = model_input_shape(source.example_shape)
    expected = (model_config.input_size, model_config.input_size, model_config.in_channels)
    if data_shape != expected:
        raise ValueError(f"the data is {data_shape} per example but the model expects {expected}")
    fresh_start = not os.path.isdir(ckpt_lib.checkpoint_dir(workdir))
    if fresh_start and config.get("init_from"):
        if not os.path.isdir(ckpt_lib.checkpoint_dir(config.init_from)):
            raise ValueError(
                f"config.init_from={config.init_from!r} holds no checkpoints/; point it at the "
                "workdir of a finished run"
            )
    mesh = parallel.make_mesh(config.mesh_shape)
    check_training_mesh(model_config, mesh)
    ways = parallel.batch_size_per_step(mesh)
    if config.global_batch_size % ways:
        raise ValueError(
            f"global_batch_size {config.global_batch_size} is not divisible by the {ways} "
            "data-parallel devices; change global_batch_size or mesh_shape"
        )
    batches = data_lib.make_batches(
        source, global_batch_size=config.global_batch_size, seed=config.seed
    )
    ckpt_lib.check_writable(workdir, checkpoint_bytes(model_config, config), what="--workdir")
    if not fresh_start and not os.access(ckpt_lib.checkpoint_dir(workdir), os.R_OK | os.X_OK):
        raise ValueError(f"the checkpoints in {workdir} are not readable; fix the permissions")

    # --- mesh, init, restore
    with jax.set_mesh(mesh):
        return _train_loop(config, workdir, model_config, mesh, batches)


def _train_loop(config, workdir, model_config, mesh, batches) -> TrainState:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # local or gs:// workdirs
    ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    resume = _newest_readable_meta(ckpt, model_config, workdir) is not None
    parts = build_model(
        model_config, mesh, seed=config.seed, rules=config.sharding_rules,
        init_params=not resume,  # a resumed run never allocates a fresh state
    )
    tx = make_optimizer(config)
    logging.info(
        "model %s: %s trainable parameters", config.model,
        f"{sum(x.size for x in jax.tree.leaves(parts.param_shapes)):,}",
    )
    log_replicated(model_config, mesh, config.sharding_rules)
    if resume:
        step, items = _restore_newest(ckpt, restore_targets(parts, tx, mesh), model_config,
                                      workdir)
        shardings = state_shardings(parts, tx, mesh)
        state = TrainState(jax.device_put(jnp.asarray(step, jnp.int32), shardings.step), **items)
        logging.info("resumed from step %d in %s", step, ckpt.directory)
    else:
        if config.get("init_from"):
            parts.params = initial_weights(parts, config.init_from, mesh)
        state = init_state(parts, tx, mesh)
    start = int(state.step)
    if start >= config.num_steps:
        logging.info("training is complete: step %d of num_steps %d is saved in %s; nothing "
                     "to do (raise --config.num_steps to train on)", start, config.num_steps,
                     ckpt.directory)
        ckpt.close()
        return state
    grids = model_config.in_channels in (1, 3)  # latent grids need the VAE decoder (issue 7)

    writer = MetricWriter(workdir, just_logging=jax.process_index() > 0)
    train_step = make_train_step(parts, tx, config, mesh)
    grid_sampler = _make_grid_sampler(parts, config, mesh)

    preemption, stopped_at = PreemptionWatcher(), None
    profiler = StepProfiler(config.get("profile_steps", ()), workdir)
    watch = NonFiniteWatch(
        config.get("nonfinite", "stop"), ckpt, float(config.get("grad_skip_norm", 0.0))
    )
    pending: list[dict] = []
    t_last, step_last = time.perf_counter(), start
    try:
        for step in range(start, config.num_steps):
            if preemption.requested(step):
                logging.warning("%s: saving a checkpoint at step %d and stopping",
                                preemption.name, step)
                stopped_at = step
                watch.check(jax.device_get(pending), step - len(pending))
                if ckpt.latest_step() != step:
                    ckpt.save(step, _items(state), run_meta(config, model_config, step),
                              force=True)
                break
            batch = parallel.global_batch(batches[step], mesh)
            profiler.before(step)
            state, metrics = train_step(state, batch)
            profiler.after(step, state)
            pending.append(metrics)
            if len(pending) > MAX_STEPS_IN_FLIGHT:
                # Bound dispatch-ahead: the host may run at most a few steps ahead.
                jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT - 1])
            done = step + 1
            log = done % config.log_every_steps == 0 or done == config.num_steps
            save = done % config.checkpoint_every_steps == 0 or done == config.num_steps
            if log or save:
                # the only host sync: once per log or checkpoint interval; every step is
                # checked for a non-finite loss before a checkpoint can include it
                fetched = jax.device_get(pending)
                watch.check(fetched, done - len(fetched))
                summary = watch.summary(fetched)
                elapsed = time.perf_counter() - t_last
                summary["steps_per_sec"] = (done - step_last) / elapsed
                summary["images_per_sec"] = summary["steps_per_sec"] * config.global_batch_size
                writer.write_scalars(done, summary)
                pending, t_last, step_last = [], time.perf_counter(), done
            if save:
                ckpt.save(done, _items(state), run_meta(config, model_config, done))
            every = config.sample_every_steps
            if every and (done % every == 0 or done == config.num_steps):
                if grids:
                    _write_grid(grid_sampler, state.ema_params, config, mesh, writer, workdir, done)
                if isinstance(model_config, models.DyDiTConfig):
                    x0 = model_inputs(batch, jax.random.key(0))
                    ratio = eval_flops_ratio(parts, state.ema_params, x0, batch["label"])
                    writer.write_scalars(done, {"eval_flops_ratio": ratio})
                t_last = time.perf_counter()  # do not count sampling in steps/s
    finally:
        profiler.close()
        preemption.close()
        ckpt.close()  # waits for the async saves; their errors surface here
        writer.flush()
        writer.close()
    if stopped_at is not None and preemption.signum == signal.SIGINT:
        raise TrainingInterrupted(stopped_at, ckpt.directory)
    return state


class StepProfiler:
    """A jax.profiler trace of the train steps first..last-1 (`config.profile_steps`) in
    WORKDIR/profile, the layout TensorBoard's profile plugin reads (Perfetto opens the
    .trace.json.gz beside it). Steps are dispatched ahead, so the trace waits for the last
    profiled step before it stops."""

    def __init__(self, steps, workdir: str):
        self.first, self.last = (tuple(int(s) for s in steps) or (-1, -1))
        self.directory = os.path.join(workdir, "profile")
        self.active = False

    def before(self, step: int) -> None:
        if not self.active and self.first <= step < self.last:
            jax.profiler.start_trace(self.directory)
            self.active = True
            self.started = step

    def after(self, step: int, state) -> None:
        if self.active and step + 1 >= self.last:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            logging.info("profile of steps %d..%d written to %s (tensorboard --logdir %s)",
                         self.started, self.last - 1, self.directory, self.directory)


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss or gradient under `config.nonfinite = "stop"`."""


class NonFiniteWatch:
    """Host side of the train step's non-finite guard: stop with a clear error naming the
    step (policy "stop"), or count the skipped batches (policy "skip")."""

    def __init__(self, policy: str, ckpt: ckpt_lib.Checkpointer, skip_norm: float = 0.0):
        self.policy, self.ckpt, self.skipped = policy, ckpt, 0
        self.skip_norm, self.large_skipped = skip_norm, 0

    def check(self, fetched: list[dict], first_step: int) -> None:
        for i, m in enumerate(fetched):
            if m.get("skipped_large_grad"):
                self.large_skipped += 1
                logging.warning(
                    "step %d: update skipped, gradient norm %.4g >= grad_skip_norm %g (%d "
                    "skipped so far)", first_step + i, float(m["grad_norm"]), self.skip_norm,
                    self.large_skipped,
                )
        bad = [first_step + i for i, m in enumerate(fetched) if m["nonfinite"]]
        if not bad:
            return
        if self.policy == "skip":
            self.skipped += len(bad)
            logging.warning("non-finite loss or gradient: skipped the batches of steps %s "
                            "(%d skipped so far)", bad, self.skipped)
            return
        m = fetched[bad[0] - first_step]
        last = self.ckpt.latest_step()
        kept = (f"the last good checkpoint is step {last} in {self.ckpt.directory}"
                if last is not None else "no checkpoint had been written yet")
        raise NonFiniteLossError(
            f"non-finite loss at step {bad[0]} (loss {float(m['loss'])}, gradient norm "
            f"{float(m['grad_norm'])}); training stopped and nothing after the last finite "
            f"step was saved: {kept}. Check the data and the learning rate; resume with the "
            "same command, or set --config.nonfinite=skip to skip such batches"
        )

    def summary(self, fetched: list[dict]) -> dict:
        """Mean metrics over the finite steps, and the skipped batches so far."""
        good = [m for m in fetched if not m["nonfinite"]] or fetched
        flags = ("nonfinite", "skipped_large_grad")
        out = {k: float(np.mean([m[k] for m in good])) for k in good[0] if k not in flags}
        out["skipped_batches"] = float(self.skipped)
        out["skipped_large_grad"] = float(self.large_skipped)
        return out


class TrainingInterrupted(RuntimeError):
    """Ctrl-C (SIGINT) stopped training after a checkpoint of the current step was saved."""

    def __init__(self, step: int, directory: str):
        super().__init__(
            f"interrupted (Ctrl-C): saved a checkpoint at step {step} in {directory}; run the "
            "same command to resume"
        )
        self.step = step


class PreemptionWatcher:
    """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag that the loop checks between
    steps (all hosts agree); a second Ctrl-C interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.flag, self.signum = False, None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.flag:
            raise KeyboardInterrupt  # the second Ctrl-C: stop without waiting for the save
        self.flag, self.signum = True, self.signum or signum

    @property
    def name(self) -> str:
        return "Ctrl-C" if self.signum == signal.SIGINT else "SIGTERM"

    def requested(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.flag
        # Every host must stop at the same step to save one consistent checkpoint.
        flags = multihost_utils.process_allgather(np.asarray(self.flag, np.int32))
        return bool(np.max(flags))

    def close(self) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
        self.previous = {}


def _set_aside(ckpt: ckpt_lib.Checkpointer, error: ckpt_lib.CheckpointDamagedError) -> None:
    where = ckpt.set_aside(error.step)
    logging.warning("skipping damaged checkpoint step %d (%s); moved it to %s (kept, not "
                    "deleted) and resuming from an older one", error.step, error, where)


def _newest_readable_meta(ckpt: ckpt_lib.Checkpointer, model_config, workdir) -> int | None:
    """The newest saved step whose meta reads back (damaged newer ones are set aside), after
    checking that it is of this model; None when the workdir holds no checkpoint."""
    saved = ckpt.all_steps()
    for step in reversed(saved):
        try:
            meta = ckpt.meta(step)
        except ckpt_lib.CheckpointDamagedError as e:
            _set_aside(ckpt, e)
            continue
        check_resume_compatible(meta, model_config, workdir)
        return step
    if saved:
        raise ValueError(
            f"none of the checkpoints {saved} in {ckpt.directory} reads back (they were moved "
            f"to {ckpt_lib.DAMAGED_DIR}/); use a new --workdir"
        )
    return None


def _restore_newest(ckpt, targets, model_config, workdir) -> tuple[int, dict]:
    """Restore the newest step that restores whole, setting damaged ones aside."""
    while True:
        step = _newest_readable_meta(ckpt, model_config, workdir)
        if step is None:
            raise ValueError(f"no checkpoint in {ckpt.directory} restores; use a new --workdir")
        try:
            step, items, _ = ckpt.restore(targets, step)
            return step, items
        except ckpt_lib.CheckpointDamagedError as e:
            _set_aside(ckpt, e)


def _items(state: TrainState) -> dict:
    return {name: getattr(state, name) for name in ckpt_lib.ARRAY_ITEMS}


def _make_grid_sampler(parts: ModelParts, config, mesh):
    return sample_lib.make_batch_sampler(
        parts, mesh=mesh, sampling_steps=config.sample.steps, sampler=config.sample.sampler,
        cfg_scale=config.sample.cfg_scale, guided_channels=config.sample.guided_channels,
    )


def _write_grid(sampler, ema_params, config, mesh, writer, workdir, step) -> None:
    n = config.sample.num_images
    labels = sample_lib.make_labels("balanced", n, config.num_classes)
    images = sample_lib.to_uint8(
        sample_lib.generate(
            functools.partial(sampler, ema_params), labels, batch_size=config.sample.batch_size,
            seed=config.seed, mesh=mesh, progress=False,
        )
    )
    grid = sample_lib.make_grid(images, ncol=min(n, config.num_classes))
    if jax.process_index() == 0:
        path = os.path.join(workdir, "samples", f"grid_{step:07d}.png")
        upscale = sample_lib.grid_upscale(config.image_size)
        sample_lib.save_png(grid, path, upscale=upscale)
        sample_lib.save_png(grid, os.path.join(workdir, "grid.png"), upscale=upscale)
        logging.info("step %d: wrote %s", step, path)
    writer.write_images(step, {"ema_samples": grid[None]})
