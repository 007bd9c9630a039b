"""The run config: every field the trainer, the samplers and the tools read, with its default
(`base_config`, which the files in configs/ start from), and the checks that turn a bad value
into one clear error before anything is written (`validate_config`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dydit_jax import diffusion as diffusion_lib
from dydit_jax import dynamic, models, parallel


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
            sampler="ddpm",  # ddpm | ddim | dpmpp2m (DPM-Solver++(2M): 20 steps)
            steps="250",  # respacing: "250", "ddim50", "logsnr20", ...
            cfg_scale=1.5,  # classifier-free guidance scale (1.0 = none)
            # guide only at timesteps t with LO <= t/1000 < HI (elsewhere: the conditional
            # half alone); (0, 1) guides every step
            cfg_interval=(0.0, 1.0),
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
    # options for XLA's compiler, passed to every jax.jit of the train step, the samplers and
    # the DyDiT engine (e.g. an experimental backend option); empty: XLA's defaults
    c.compiler_options = ml_collections.ConfigDict()
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
    if config.get("lr_schedule", "constant") not in LR_SCHEDULES:
        raise ValueError(
            f"config.lr_schedule {config.lr_schedule!r} is not one of {LR_SCHEDULES}"
        )
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
    for key, value in dict(config.get("compiler_options") or {}).items():
        if not isinstance(value, str | bool | int | float):
            raise ValueError(
                f"config.compiler_options.{key} must be a string, number or true/false (an "
                f"XLA option's value), got {value!r}"
            )
    profile = tuple(config.get("profile_steps", ()))
    if profile and (len(profile) != 2 or not 0 <= int(profile[0]) < int(profile[1])):
        raise ValueError(
            f"config.profile_steps must be () or (first, last) with 0 <= first < last, e.g. "
            f"--config.profile_steps='(10,15)'; got {profile}"
        )
    if config.sample.sampler not in diffusion_lib.SAMPLERS:
        raise ValueError(
            f"config.sample.sampler {config.sample.sampler!r} is not one of "
            f"{diffusion_lib.SAMPLERS}"
        )
    try:
        diffusion_lib.check_sampler(config.sample.sampler, None, config.sample.steps,
                                    config.diffusion_steps)
        cfg_interval(config.sample)
    except ValueError as e:
        raise ValueError(f"config.sample: {e}") from None
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
LR_SCHEDULES = ("constant", "cosine")


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
            elif name == "cfg_interval":  # two fractions: checked with the sampler
                continue
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


def cfg_interval(sample: ml_collections.ConfigDict) -> tuple[float, float]:
    """`sample.cfg_interval` checked, as (lo, hi); (0, 1), every step guided, for run
    configs from before the field existed."""
    return diffusion_lib.parse_cfg_interval(sample.get("cfg_interval", (0.0, 1.0)))


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
