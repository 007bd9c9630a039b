"""Sampling loops (ancestral DDPM, DDIM) and DiT's classifier-free guidance wrapper.

Each loop is a single `jax.lax.fori_loop` from the last step to step 0, so the whole sampler
compiles once; noise for step i is `normal(fold_in(key, i))`, which makes a run reproducible
from its key regardless of how many steps there are.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from .gaussian import GaussianDiffusion, ModelFn, gather

ApplyFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _step_noise(key: jax.Array, step: jax.Array, x: jax.Array) -> jax.Array:
    """Fresh per-step noise, tied to the step index rather than to loop order.

    `key` is one key for the whole batch, or a batch of keys (one per row of x): then each
    row's noise depends on its own key only, not on the batch size or the device layout.
    """
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if key.ndim == (0 if typed else 1):  # one key (typed, or legacy uint32 key data)
        return jax.random.normal(jax.random.fold_in(key, step), x.shape, x.dtype)
    return jax.vmap(
        lambda k: jax.random.normal(jax.random.fold_in(k, step), x.shape[1:], x.dtype)
    )(key)


def ddpm_step(
    diffusion: GaussianDiffusion, model_fn: ModelFn, x: jax.Array, step: jax.Array,
    key: jax.Array,
) -> jax.Array:
    """Ancestral p_sample: mean + exp(0.5 log_var) * noise, with no noise at step 0."""
    t = jnp.full((x.shape[0],), step, jnp.int32)
    out = diffusion.p_mean_variance(model_fn(x, diffusion.original_timesteps(t)), x, t)
    nonzero = (step != 0).astype(x.dtype)
    noise = _step_noise(key, step, x)
    return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise


def ddim_step(
    diffusion: GaussianDiffusion, model_fn: ModelFn, x: jax.Array, step: jax.Array,
    key: jax.Array, eta: float = 0.0,
) -> jax.Array:
    """IDDPM ddim_sample: eps re-derived from pred_xstart, sigma scaled by eta."""
    t = jnp.full((x.shape[0],), step, jnp.int32)
    out = diffusion.p_mean_variance(model_fn(x, diffusion.original_timesteps(t)), x, t)
    eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
    abar = gather(diffusion.alphas_cumprod, t, x.ndim)
    abar_prev = gather(diffusion.alphas_cumprod_prev, t, x.ndim)
    sigma = (
        eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
    )
    mean = out["pred_xstart"] * jnp.sqrt(abar_prev) + jnp.sqrt(
        1.0 - abar_prev - sigma**2
    ) * eps
    nonzero = (step != 0).astype(x.dtype)
    return mean + nonzero * sigma * _step_noise(key, step, x)


SAMPLERS = ("ddpm", "ddim")


def sampler_step(
    diffusion: GaussianDiffusion, model_fn: ModelFn, x: jax.Array, step: jax.Array,
    key: jax.Array, *, sampler: str = "ddpm", eta: float = 0.0,
) -> jax.Array:
    """One reverse step (index `step` of this diffusion) of the named sampler."""
    if sampler == "ddpm":
        return ddpm_step(diffusion, model_fn, x, step, key)
    if sampler == "ddim":
        return ddim_step(diffusion, model_fn, x, step, key, eta)
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")


def sample_loop(
    diffusion: GaussianDiffusion, model_fn: ModelFn, x_T: jax.Array, key: jax.Array, *,
    sampler: str = "ddpm", eta: float = 0.0,
) -> jax.Array:
    """Run the full reverse process from x_T to x_0 in one fori_loop (jittable).

    `model_fn(x, t)` receives the ORIGINAL timesteps (diffusion.timestep_map), never the
    respaced index. `key` is a single key or one key per row of x_T.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    n = diffusion.num_timesteps

    def body(i, x):
        return sampler_step(diffusion, model_fn, x, n - 1 - i, key, sampler=sampler, eta=eta)

    return jax.lax.fori_loop(0, n, body, x_T)


def classifier_free_guidance(
    apply_fn: ApplyFn, y: jax.Array, null_label: int, scale: float,
    guided_channels: int | None = 3,
) -> ModelFn:
    """Wrap a label-conditioned network into a model_fn for a doubled batch [z; z'].

    The network sees [x_1; x_1] (x_1 = the first half) with labels [y; null]; the guided eps
    `uncond + scale * (cond - uncond)` replaces the first
    `guided_channels` eps channels of both halves. The reference DiT guides only 3 of the 4
    eps channels (guided_channels=3, kept for reproducing published FIDs); None guides all eps
    channels. Remaining channels stay each half's own output; the caller keeps the first half.
    """

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        inputs, labels = guided_inputs(x, y, null_label)
        return combine_guided(apply_fn(inputs, t, labels), scale, guided_channels)

    return model_fn


def guided_inputs(x: jax.Array, y: jax.Array, null_label: int) -> tuple[jax.Array, jax.Array]:
    """The network's inputs under guidance: ([x_1; x_1], [y; null]) for a doubled batch x.
    As the reference, both halves are evaluated at the FIRST half's x (the second half's own
    state is ignored; it would drift away under independent noise)."""
    y = jnp.asarray(y, jnp.int32)
    b = x.shape[0] // 2
    labels = jnp.concatenate([y, jnp.full_like(y, null_label)], axis=0)
    return jnp.concatenate([x[:b], x[:b]], axis=0), labels


def combine_guided(out: jax.Array, scale: float, guided_channels: int | None) -> jax.Array:
    """The guided output of both halves from the network's output on `guided_inputs`."""
    b = out.shape[0] // 2
    g = out.shape[-1] // 2 if guided_channels is None else guided_channels
    eps, rest = out[..., :g], out[..., g:]
    cond, uncond = eps[:b], eps[b:]
    half = uncond + scale * (cond - uncond)
    return jnp.concatenate([jnp.concatenate([half, half], axis=0), rest], axis=-1)


def initial_noise(
    key: jax.Array, indices: jax.Array, image_shape: tuple[int, ...], guided: bool
) -> tuple[jax.Array, jax.Array]:
    """(x_T, per-row sampler keys) of a batch. Row r is image number indices[r] of the run:
    its noise comes from fold_in(key, indices[r]). Under guidance the batch is doubled as
    [z; z] (the second half's keys are folded once more; its state is never used)."""
    row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    noise_keys, loop_keys = jax.vmap(jax.random.split, out_axes=1)(row_keys)
    z = jax.vmap(lambda k: jax.random.normal(k, image_shape, jnp.float32))(noise_keys)
    if guided:
        z = jnp.concatenate([z, z], axis=0)
        uncond_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(loop_keys)
        loop_keys = jnp.concatenate([loop_keys, uncond_keys], axis=0)
    return z, loop_keys


def check_sampler(sampler: str, guided_channels: int | None) -> int | None:
    """Refuse an unknown sampler; returns guided_channels with -1 (all channels) as None."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    return None if guided_channels is not None and guided_channels < 0 else guided_channels
