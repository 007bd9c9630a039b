"""Sampling loops (ancestral DDPM, DDIM, DPM-Solver++(2M)) and classifier-free guidance.

Each loop is `jax.lax.fori_loop`s from the last step to step 0 (one loop, or three when a
guidance interval switches guidance off at both ends), so the whole sampler compiles once;
noise for step i is `normal(fold_in(key, i))`, which makes a run reproducible from its key
regardless of how many steps there are.

A sampler's state is a carry `(x, x0_before)`: the current x and, for DPM-Solver++(2M), the
previous step's prediction of the clean image (DDPM and DDIM pass it through untouched).
Under guidance the carry holds the conditional rows only; the model function doubles them
into [x; x] with labels [y; null] for the network, as the reference does, and returns the
guided output of the conditional rows.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .gaussian import GaussianDiffusion, ModelFn, gather
from .respace import space_timesteps

ApplyFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
Carry = tuple[jax.Array, jax.Array]

SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
# a multistep solver needs an earlier prediction to be better than first order
MIN_STEPS = {"dpmpp2m": 2}


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


def dpmpp2m_step(
    diffusion: GaussianDiffusion, model_fn: ModelFn, carry: Carry, step: jax.Array
) -> Carry:
    """Multistep DPM-Solver++ (second order, data prediction; Lu et al. 2022) from step
    `step` to the one before it, on the diffusion's own alpha_bars. The network's eps (the
    first half of a learned-sigma output) gives the clean-image prediction x0; the update
    extrapolates it with the previous step's (`gaussian.GaussianDiffusion`'s dpm_* tables).
    Deterministic: it solves the probability-flow ODE."""
    x, x0_before = carry
    t = jnp.full((x.shape[0],), step, jnp.int32)
    eps = model_fn(x, diffusion.original_timesteps(t))[..., : x.shape[-1]]
    x0 = diffusion.predict_xstart_from_eps(x, t, eps)
    nd = x.ndim
    extrapolated = x0 + gather(diffusion.dpm_x0_weight, t, nd) * (x0 - x0_before)
    x = gather(diffusion.dpm_sigma_ratio, t, nd) * x + gather(
        diffusion.dpm_x0_coef, t, nd
    ) * extrapolated
    return x, x0


def init_carry(x: jax.Array) -> Carry:
    """The sampler state at x_T: (x_T, no earlier clean-image prediction yet)."""
    return x, jnp.zeros_like(x)


def sampler_step(
    diffusion: GaussianDiffusion, model_fn: ModelFn, carry: Carry, step: jax.Array,
    key: jax.Array, *, sampler: str = "ddpm", eta: float = 0.0,
) -> Carry:
    """One reverse step (index `step` of this diffusion) of the named sampler, on the carry
    `(x, x0_before)` (see `init_carry`)."""
    if sampler == "dpmpp2m":
        return dpmpp2m_step(diffusion, model_fn, carry, step)
    x, x0_before = carry
    if sampler == "ddpm":
        return ddpm_step(diffusion, model_fn, x, step, key), x0_before
    if sampler == "ddim":
        return ddim_step(diffusion, model_fn, x, step, key, eta), x0_before
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")


def sample_loop(
    diffusion: GaussianDiffusion, model_fn: ModelFn, x_T: jax.Array, key: jax.Array, *,
    sampler: str = "ddpm", eta: float = 0.0, guided_fn: ModelFn | None = None,
    guided_steps: tuple[int, int] | None = None,
) -> jax.Array:
    """Run the full reverse process from x_T to x_0 (jittable).

    `model_fn(x, t)` receives the ORIGINAL timesteps (diffusion.timestep_map), never the
    respaced index. `key` is a single key or one key per row of x_T. `guided_fn`, if given,
    replaces `model_fn` at the step indices [first, stop) of `guided_steps` (all steps when
    None; see `guidance_steps`): each stretch of steps with one function is one fori_loop.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    n = diffusion.num_timesteps
    if guided_fn is None:
        segments = [(0, n, model_fn)]
    else:
        first, stop = (0, n) if guided_steps is None else guided_steps
        segments = [(stop, n, model_fn), (first, stop, guided_fn), (0, first, model_fn)]

    carry = init_carry(x_T)
    for low, high, fn in segments:  # in the order visited: high step indices first
        if high <= low:
            continue

        def body(i, carry, fn=fn, high=high):
            return sampler_step(diffusion, fn, carry, high - 1 - i, key, sampler=sampler,
                                eta=eta)

        carry = jax.lax.fori_loop(0, high - low, body, carry)
    return carry[0]


# ----------------------------------------------------------------------------------- guidance


def parse_cfg_interval(spec) -> tuple[float, float]:
    """A guidance interval from a flag ("0.2,0.8") or a config pair: (lo, hi) with
    0 <= lo <= hi <= 1, fractions of the training timesteps (see `guidance_steps`)."""
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",")]
    else:
        parts = list(spec) if isinstance(spec, Sequence) else [spec]
    try:
        lo, hi = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(
            f"guidance interval {spec!r} is not two fractions LO,HI like 0.2,0.8"
        ) from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(
            f"guidance interval {spec!r}: need 0 <= LO <= HI <= 1 (fractions of the noise "
            "range: 0,1 guides every step)"
        )
    return lo, hi


def guidance_steps(diffusion: GaussianDiffusion, interval) -> tuple[int, int]:
    """The step indices [first, stop) of `diffusion` that are guided under `interval`
    (LO, HI): those whose model-input timestep t satisfies LO <= t / T < HI, T the training
    timesteps (1000: "0,1" guides every step, "0.3,0.3" none). Timesteps grow with the
    index, so the guided steps are one contiguous stretch."""
    lo, hi = parse_cfg_interval(interval)
    frac = diffusion.timestep_map / diffusion.train_timesteps
    guided = np.flatnonzero((frac >= lo) & (frac < hi))
    if len(guided) == 0:
        return 0, 0
    return int(guided[0]), int(guided[-1]) + 1


def classifier_free_guidance(
    apply_fn: ApplyFn, y: jax.Array, null_label: int, scale: float,
    guided_channels: int | None = 3,
) -> ModelFn:
    """Wrap a label-conditioned network into a guided model_fn for the conditional rows x.

    The network sees [x; x] with labels [y; null]; the guided eps
    `uncond + scale * (cond - uncond)` replaces the first `guided_channels` eps channels of
    the conditional output. The reference DiT guides only 3 of the 4 eps channels
    (guided_channels=3, kept for reproducing published FIDs); None guides all eps channels.
    """

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        inputs, labels = guided_inputs(x, y, null_label)
        t2 = jnp.concatenate([t, t], axis=0)
        return combine_guided(apply_fn(inputs, t2, labels), scale, guided_channels)

    return model_fn


def guided_inputs(x: jax.Array, y: jax.Array, null_label: int) -> tuple[jax.Array, jax.Array]:
    """The network's inputs under guidance for the conditional rows x: ([x; x], [y; null])."""
    y = jnp.asarray(y, jnp.int32)
    labels = jnp.concatenate([y, jnp.full_like(y, null_label)], axis=0)
    return jnp.concatenate([x, x], axis=0), labels


def combine_guided(out: jax.Array, scale: float, guided_channels: int | None) -> jax.Array:
    """The guided output of the conditional rows from the network's output on
    `guided_inputs`: guided eps channels, the conditional half's own other channels."""
    b = out.shape[0] // 2
    g = out.shape[-1] // 2 if guided_channels is None else guided_channels
    cond, uncond = out[:b], out[b:]
    half = uncond[..., :g] + scale * (cond[..., :g] - uncond[..., :g])
    return jnp.concatenate([half, cond[..., g:]], axis=-1)


def initial_noise(
    key: jax.Array, indices: jax.Array, image_shape: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """(x_T, per-row sampler keys) of a batch. Row r is image number indices[r] of the run:
    its noise comes from fold_in(key, indices[r])."""
    row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    noise_keys, loop_keys = jax.vmap(jax.random.split, out_axes=1)(row_keys)
    z = jax.vmap(lambda k: jax.random.normal(k, image_shape, jnp.float32))(noise_keys)
    return z, loop_keys


def check_sampler(
    sampler: str, guided_channels: int | None = None, sampling_steps: str | None = None,
    train_timesteps: int = 1000,
) -> int | None:
    """Refuse an unknown sampler, or (if given) a step spacing it cannot run; returns
    guided_channels with -1 (all channels) as None."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if sampling_steps is not None:
        steps = len(space_timesteps(train_timesteps, str(sampling_steps)))
        if steps < MIN_STEPS.get(sampler, 1):
            raise ValueError(
                f"the {sampler} sampler needs at least {MIN_STEPS[sampler]} sampling steps, "
                f"got {steps} ({sampling_steps!r}); e.g. --sampling_steps=20"
            )
    return None if guided_channels is not None and guided_channels < 0 else guided_channels
