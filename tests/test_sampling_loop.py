"""The whole sampling loop of a batch is one compiled function (`make_batch_sampler`: a
`fori_loop` over steps, guidance inside); it equals a Python loop that runs one jitted
reverse step at a time, for DiT and U-DiT, with and without guidance, DDPM and DDIM."""

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


def step_by_step(parts, params, key, indices, labels, *, cfg_scale, sampler):
    """The reference loop: initial noise, then one jitted reverse step per Python iteration."""
    config = parts.config
    diffusion = diffusion_lib.create_diffusion(STEPS)
    guided = cfg_scale != 1.0
    image_shape = (config.input_size, config.input_size, config.in_channels)
    x, keys = diffusion_lib.initial_noise(key, indices, image_shape, guided)

    @jax.jit
    def step(params, x, i):
        model = nnx.merge(parts.graphdef, params, parts.buffers)
        if guided:
            model_fn = diffusion_lib.classifier_free_guidance(
                model, labels, config.num_classes, cfg_scale, None
            )
        else:
            model_fn = lambda x, t: model(x, t, labels)
        return diffusion_lib.sampler_step(diffusion, model_fn, x, i, keys, sampler=sampler)

    for i in range(diffusion.num_timesteps - 1, -1, -1):
        x = step(params, x, jnp.int32(i))
    return np.asarray(x[: labels.shape[0]])


@pytest.mark.parametrize(
    "name, cfg_scale, sampler",
    [("DiT", 1.0, "ddpm"), ("DiT", 4.0, "ddim"),
     pytest.param("U-DiT", 4.0, "ddpm", marks=pytest.mark.slow)],
)
def test_the_compiled_loop_equals_the_step_by_step_loop(name, cfg_scale, sampler):
    parts, params, mesh = random_model(name)
    key = jax.random.key(3)
    with jax.set_mesh(mesh):
        rows = parallel.global_batch(  # one row per (fake) device
            {"i": np.arange(8, dtype=np.int32), "y": np.arange(8, dtype=np.int32) % 10}, mesh
        )
        indices, labels = rows["i"], rows["y"]
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
