"""One training update as a pure, jitted function: the loss (the IDDPM hybrid loss; DyDiT's
adds the FLOPs term), AdamW, the EMA, and the train state's shardings.

Per-step randomness is fold_in(seed, step), made inside the program."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct

from dydit_jax import checkpoint as ckpt_lib
from dydit_jax import config_lib, flops, model_parts, models, parallel
from dydit_jax import data as data_lib
from dydit_jax import diffusion as diffusion_lib
from dydit_jax.models import layers


@struct.dataclass
class TrainState:
    """The state between steps. params, ema_params and the optimizer's moments are in their
    stored form (`parallel.ParamStorage`: padded where fsdp divides no dimension);
    `make_checkpoint_items` and `make_natural_params` give every parameter its own
    shape."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


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
        raise ValueError(f"lr_schedule {kind!r} is not one of {config_lib.LR_SCHEDULES}")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _shardings_like(shapes, shardings, tx, mesh) -> TrainState:
    """Shardings of a train state whose parameters have `shapes` and `shardings`: EMA and
    optimizer moments like the parameters, the rest replicated."""
    rep = parallel.replicated(mesh)
    opt_shapes = jax.eval_shape(tx.init, shapes)
    opt = optax.tree_map_params(
        tx, lambda _, sharding: sharding, opt_shapes, shardings,
        transform_non_params=lambda _: rep,
    )
    return TrainState(rep, shardings, shardings, opt)


def state_shardings(
    parts: model_parts.ModelParts, tx: optax.GradientTransformation, mesh
) -> TrainState:
    """Shardings of the train state between steps: parameters, EMA and optimizer moments in
    their stored form (`parallel.ParamStorage`)."""
    return _shardings_like(parts.storage.shapes, parts.storage.shardings, tx, mesh)


def abstract_state(parts: model_parts.ModelParts, tx: optax.GradientTransformation, mesh
                   ) -> TrainState:
    """The train state between steps as ShapeDtypeStructs with shardings (allocates nothing)."""
    shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), parts.storage.shapes,
                        parts.storage.shapes, jax.eval_shape(tx.init, parts.storage.shapes))
    return ckpt_lib.abstract_like(shapes, state_shardings(parts, tx, mesh))


def restore_targets(parts: model_parts.ModelParts, tx: optax.GradientTransformation, mesh) -> dict:
    """Abstract checkpoint items with explicit target shardings for this mesh (the checkpoint
    may come from another mesh or device count). Checkpoints hold every parameter in its own
    shape, so they do not depend on the mesh; `stored_state` converts them."""
    shardings = _shardings_like(parts.param_shapes, parts.param_shardings, tx, mesh)
    opt_shapes = jax.eval_shape(tx.init, parts.param_shapes)
    return {
        "params": ckpt_lib.abstract_like(parts.param_shapes, shardings.params),
        "ema_params": ckpt_lib.abstract_like(parts.param_shapes, shardings.ema_params),
        "opt_state": ckpt_lib.abstract_like(opt_shapes, shardings.opt_state),
    }


def stored_state(parts: model_parts.ModelParts, tx: optax.GradientTransformation, mesh,
                 step, items: dict) -> TrainState:
    """A train state from checkpoint items (every parameter in its own shape, e.g. restored
    with `restore_targets`), in the stored form; the items' arrays are donated."""

    def build(items, step):
        items = _map_items(parts, tx, items, lambda form, x: form.store(x))
        return TrainState(step, items["params"], items["ema_params"], items["opt_state"])

    return _donating(build, parts, tx, mesh)(items, jnp.asarray(step, jnp.int32))


def _map_items(parts, tx, items: dict, fn) -> dict:
    """{params, ema_params, opt_state} with fn(StoredForm, leaf) applied to every
    parameter-shaped leaf (AdamW's moments included); traceable."""
    forms = parts.storage.forms
    each = lambda tree: jax.tree.map(fn, forms, tree)
    return {
        "params": each(items["params"]),
        "ema_params": each(items["ema_params"]),
        "opt_state": optax.tree_map_params(
            tx, lambda x, f: fn(f, x), items["opt_state"], forms),
    }


def make_checkpoint_items(parts: model_parts.ModelParts, tx: optax.GradientTransformation,
                          mesh):
    """fn(state) -> the state's params, ema_params and opt_state as checkpoints hold them
    (each parameter in its own shape): the state's own arrays, or, where a form is padded,
    copies made by one program compiled once."""
    names = ckpt_lib.ARRAY_ITEMS
    items = lambda state: {name: getattr(state, name) for name in names}  # noqa: E731
    if not parts.storage.padded:
        return items
    shardings = jax.tree.map(lambda x: x.sharding, restore_targets(parts, tx, mesh))
    unstore = parallel.jit(
        lambda i: _map_items(parts, tx, i, lambda form, x: form.unstore(x)), mesh=mesh,
        out_shardings=shardings)
    return lambda state: unstore(items(state))


def make_natural_params(parts: model_parts.ModelParts, mesh):
    """fn(stored parameters, a state's params or ema_params) -> the parameters in their own
    shapes and `parts.param_shardings`, for sampling and evaluation (the identity when
    nothing is padded)."""
    if not parts.storage.padded:
        return lambda params: params
    return parallel.jit(parts.storage.unstore, mesh=mesh, out_shardings=parts.param_shardings)


def init_state(parts: model_parts.ModelParts, tx: optax.GradientTransformation, mesh) -> TrainState:
    """A fresh train state from parts.params, whose arrays it takes over (donated)."""

    def fresh(params):
        params = parts.storage.store(params)
        # The EMA starts as a copy of the initial weights (reference recipe).
        return TrainState(jnp.zeros((), jnp.int32), params, jax.tree.map(jnp.copy, params),
                          tx.init(params))

    return _donating(fresh, parts, tx, mesh)(parts.params)


def _donating(fn, parts, tx, mesh):
    """jit(fn) -> the train state in its shardings, donating the first argument."""
    step = parallel.jit(fn, mesh=mesh, out_shardings=state_shardings(parts, tx, mesh),
                        donate_argnums=0)

    def call(*args):
        with warnings.catch_warnings():  # a padded leaf's buffer cannot be reused: expected
            warnings.filterwarnings("ignore", "Some donated buffers were not usable")
            return step(*args)

    return call


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


def eval_flops_ratio(
    parts: model_parts.ModelParts, params, x0, labels, num_timesteps: int = 10
) -> float:
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


def make_loss_fn(parts: model_parts.ModelParts, config: ml_collections.ConfigDict):
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


def make_train_step(parts: model_parts.ModelParts, tx, config: ml_collections.ConfigDict, mesh):
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
        grads, metrics = jax.grad(
            lambda stored, *args: loss_fn(parts.storage.unstore(stored), *args), has_aux=True
        )(state.params, x0, batch["label"], key, state.step)
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
    return parallel.jit(
        step_fn,
        mesh=mesh,
        compiler_options=config.get("compiler_options"),
        in_shardings=(shardings, rows),
        out_shardings=(shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )


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
