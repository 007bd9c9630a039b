"""The whole sampling loop of a batch is one compiled function (`make_batch_sampler`: a
`fori_loop` over steps, guidance inside); it equals a Python loop that runs one jitted
reverse step at a time, for DiT and U-DiT, with and without guidance, DDPM, DDIM and
DPM-Solver++(2M)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dydit_jax import diffusion as diffusion_lib
from dydit_jax import model_parts, parallel, sample_lib
from dydit_jax.models import model_config

STEPS = "5"
MODELS = {
    "DiT": ("DiT-S/2", dict(hidden_size=32, depth=2, num_heads=2)),
    "U-DiT": ("U-DiT-S", dict(hidden_size=16, num_heads=2, depth_level1=1, depth_level2=1,
                              depth_latent=1)),
}


def random_model(name):
    arch, overrides = MODELS[name]
    config = model_config(arch, input_size=8, in_channels=4, num_classes=10, **overrides)
    mesh = parallel.make_mesh((-1, 1, 1))
    parts = model_parts.build_model(config, mesh, seed=0, rules=None, init_params=False)
    rng = np.random.default_rng(0)
    # random everywhere (the zero-initialised adaLN/output would make every step trivial)
    params = jax.tree.map(
        lambda s: np.float32(0.1) * rng.standard_normal(s.shape, np.float32), parts.param_shapes
    )
    return parts, jax.device_put(params, parts.param_shardings), mesh


def step_by_step(parts, params, key, indices, labels, *, cfg_scale, sampler, guided_at=None):
    """The reference loop: initial noise, then one jitted reverse step per Python iteration;
    guided (when cfg_scale != 1) at the step indices `guided_at` (default: every step)."""
    config = parts.config
    diffusion = diffusion_lib.create_diffusion(STEPS)
    image_shape = (config.input_size, config.input_size, config.in_channels)
    x, keys = diffusion_lib.initial_noise(key, indices, image_shape)
    if guided_at is None:
        guided_at = range(diffusion.num_timesteps) if cfg_scale != 1.0 else ()

    @functools.partial(jax.jit, static_argnums=3)
    def step(params, carry, i, guided):
        model = nnx.merge(parts.graphdef, params, parts.buffers)
        if guided:
            model_fn = diffusion_lib.classifier_free_guidance(
                model, labels, config.num_classes, cfg_scale, None
            )
        else:
            model_fn = lambda x, t: model(x, t, labels)
        return diffusion_lib.sampler_step(diffusion, model_fn, carry, i, keys, sampler=sampler)

    carry = diffusion_lib.init_carry(x)
    for i in range(diffusion.num_timesteps - 1, -1, -1):
        carry = step(params, carry, jnp.int32(i), i in guided_at)
    return np.asarray(carry[0])


def rows_of(mesh, n=8):
    rows = parallel.global_batch(  # one row per (fake) device
        {"i": np.arange(n, dtype=np.int32), "y": np.arange(n, dtype=np.int32) % 10}, mesh
    )
    return rows["i"], rows["y"]


@pytest.mark.parametrize(
    "name, cfg_scale, sampler",
    [("DiT", 1.0, "ddpm"), ("DiT", 4.0, "ddim"), ("DiT", 4.0, "dpmpp2m"),
     ("U-DiT", 1.0, "ddpm")],
)
def test_the_compiled_loop_equals_the_step_by_step_loop(name, cfg_scale, sampler):
    parts, params, mesh = random_model(name)
    key = jax.random.key(3)
    with jax.set_mesh(mesh):
        indices, labels = rows_of(mesh)
        whole = sample_lib.make_batch_sampler(
            parts, mesh=mesh, sampling_steps=STEPS, sampler=sampler, cfg_scale=cfg_scale,
            guided_channels=-1,
        )
        # one executable for the whole trajectory: no per-step programs
        compiled = whole.lower(params, key, indices, labels).compile()
        got = np.asarray(compiled(params, key, indices, labels))
        want = step_by_step(parts, params, key, indices, labels, cfg_scale=cfg_scale,
                            sampler=sampler)
    assert "while" in compiled.as_text()  # the steps are a loop inside the program
    assert np.isfinite(want).all() and np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_guidance_interval_guides_only_its_steps_on_the_doubled_batch():
    """Interval 0,1 = plain guidance; an empty interval = no guidance; a middle interval =
    guidance exactly at its steps (timesteps 0, 250, 500, 749, 999: 0.3,0.7 guides 500).
    Unguided steps run the conditional rows alone: half the network FLOPs."""
    parts, params, mesh = random_model("DiT")
    key = jax.random.key(3)
    flops = {}
    with jax.set_mesh(mesh):
        indices, labels = rows_of(mesh)
        for interval, want_guided in [((0, 1), None), ((0.5, 0.5), ()), ((0.3, 0.7), {2})]:
            sampler = sample_lib.make_batch_sampler(
                parts, mesh=mesh, sampling_steps=STEPS, sampler="dpmpp2m", cfg_scale=4.0,
                guided_channels=-1, cfg_interval=interval,
            )
            compiled = sampler.lower(params, key, indices, labels).compile()
            flops[interval] = compiled.cost_analysis()["flops"]  # one count per loop body
            got = np.asarray(compiled(params, key, indices, labels))
            want = step_by_step(parts, params, key, indices, labels, cfg_scale=4.0,
                                sampler="dpmpp2m", guided_at=want_guided)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
            if interval == (0.5, 0.5):
                unguided = step_by_step(parts, params, key, indices, labels, cfg_scale=1.0,
                                        sampler="dpmpp2m")
                np.testing.assert_array_equal(want, unguided)
    # an unguided loop body costs about half a guided one (the network dominates)
    assert 0.4 < flops[(0.5, 0.5)] / flops[(0, 1)] < 0.6, flops


def test_dpmpp2m_on_a_tiny_model_is_closer_to_the_ode_than_ddim():
    """100 DPM-Solver++(2M) steps land nearer to 1000 DDIM steps (eta 0: the probability-flow
    ODE, finely solved) than 100 DDIM steps do."""
    parts, params, mesh = random_model("DiT")
    key = jax.random.key(4)
    with jax.set_mesh(mesh):
        indices, labels = rows_of(mesh)

        def run(sampler, steps):
            fn = sample_lib.make_batch_sampler(parts, mesh=mesh, sampling_steps=steps,
                                               sampler=sampler)
            return np.asarray(fn(params, key, indices, labels), np.float64)

        ode = run("ddim", "1000")
        dpm, ddim = run("dpmpp2m", "100"), run("ddim", "100")
    dpm_err, ddim_err = np.abs(dpm - ode).max(), np.abs(ddim - ode).max()
    assert np.isfinite(ode).all() and dpm_err < 0.5 * ddim_err, (dpm_err, ddim_err)
