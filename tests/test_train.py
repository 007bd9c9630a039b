"""Trainer: loss goes down on digits, checkpoints resume exactly, bad input fails cleanly."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dydit_jax import checkpoint as ckpt_lib
from dydit_jax import config_lib, model_parts, parallel, sample_lib, train_lib, update_step
from dydit_jax import data as data_lib
from dydit_jax import diffusion as diffusion_lib
from tests.helpers import run_entry_point, tiny_config


def fixed_loss(parts, params, images, labels):
    """Diffusion loss on a fixed batch, timesteps and noise: comparable across steps."""
    diffusion = diffusion_lib.create_diffusion(None)
    model = nnx.merge(parts.graphdef, params, parts.buffers)
    t = jnp.linspace(0, 999, images.shape[0]).astype(jnp.int32)
    noise = jax.random.normal(jax.random.key(123), images.shape)
    terms = diffusion.training_losses(lambda x, tt: model(x, tt, labels), images, t, noise)
    return float(terms["loss"].mean())


@pytest.mark.slow
def test_train_steps_lower_the_loss_on_digits():
    config = tiny_config(learning_rate=2e-3, warmup_steps=0, global_batch_size=64)
    model_config = config_lib.validate_config(config)
    mesh = parallel.make_mesh(config.mesh_shape)
    with jax.set_mesh(mesh):
        parts = model_parts.build_model(model_config, mesh, seed=0)
        tx = update_step.make_optimizer(config)
        state = update_step.init_state(parts, tx, mesh)
        step = update_step.make_train_step(parts, tx, config, mesh)
        source = data_lib.load_source(config)
        batches = data_lib.make_batches(source, global_batch_size=64, seed=0)
        images, labels = jnp.asarray(source.images[:256]), jnp.asarray(source.labels[:256])
        before = fixed_loss(parts, state.params, images, labels)
        for i in range(60):
            state, metrics = step(state, parallel.global_batch(batches[i], mesh))
            jax.block_until_ready(metrics)
        after = fixed_loss(parts, state.params, images, labels)
    assert int(state.step) == 60
    assert np.isfinite(float(metrics["loss"]))
    assert after < 0.7 * before, (before, after)


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "padded"])
def test_save_then_resume_is_exact(tmp_path, padded):
    # Uninterrupted: 6 steps (no sample grids: they change no state). Interrupted: 3 steps,
    # stop, then resume to 6. Padded: width 36 on fsdp = 8, so the attention kernels are kept
    # in their padded stored form and every checkpoint converts them (parallel.StoredForm).
    extra = {"mesh_shape": (1, 8, 1), "model_overrides.hidden_size": 36} if padded else {}
    config = lambda **kw: tiny_config(**kw, **extra)  # noqa: E731
    full_dir = str(tmp_path / "full")
    full = train_lib.train_and_evaluate(config(num_steps=6, sample_every_steps=0), full_dir)
    assert not os.path.exists(os.path.join(full_dir, "grid.png"))
    qkv = full.params["blocks"][0]["attn"]["qkv"]["kernel"]
    assert qkv.shape == ((40, 108) if padded else (64, 192))
    part = str(tmp_path / "part")
    half = train_lib.train_and_evaluate(config(num_steps=3), part)
    assert ckpt_lib.Checkpointer(part, create=False).latest_step() == 3
    # A restart with nothing left to do restores the saved state bit for bit.
    restored = train_lib.train_and_evaluate(config(num_steps=3), part)
    assert int(restored.step) == 3
    for name in ("params", "ema_params", "opt_state"):
        assert leaves_equal(getattr(half, name), getattr(restored, name)), name
    resumed = train_lib.train_and_evaluate(config(num_steps=6), part)
    assert int(resumed.step) == 6
    for name in ("params", "ema_params", "opt_state"):
        assert leaves_equal(getattr(full, name), getattr(resumed, name)), name
    # outputs of a run: checkpoints (keep-N), TensorBoard events, sample grids
    assert sorted(os.listdir(os.path.join(part, "checkpoints"))) == ["3", "6"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(part))
    assert os.path.exists(os.path.join(part, "grid.png"))


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    workdir = str(tmp_path / "wd")
    train_lib.train_and_evaluate(tiny_config(num_steps=2), workdir)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    with pytest.raises(ValueError, match="another model"):
        train_lib.train_and_evaluate(
            tiny_config(num_steps=4, **{"model_overrides.hidden_size": 32}), workdir
        )
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"num_classes": 5}, "num_classes"),
        ({"model": "DiT-Q/2"}, "unknown model name"),
        ({"image_size": 9}, "not divisible by the patch size"),
        ({"model_overrides.num_heads": 3}, "not divisible by num_heads"),
        ({"global_batch_size": 12}, "not divisible by the 8 data-parallel devices"),
        ({"sample.sampler": "euler"}, "sampler"),
        ({"sample.steps": "ddim7x"}, "ddim7x"),
        ({"ema_decay": 1.5}, "ema_decay"),
        ({"dataset": "cifar"}, "unknown dataset"),
        ({"init_from": "/nonexistent/dit_run"}, "holds no checkpoints"),
        ({"profile_steps": (5, 5)}, "profile_steps"),
    ],
)
def test_bad_config_fails_before_writing(tmp_path, overrides, message):
    workdir = tmp_path / "never"
    with pytest.raises(ValueError, match=message):
        train_lib.train_and_evaluate(tiny_config(**overrides), str(workdir))
    assert not workdir.exists()


@pytest.mark.parametrize("dit_scan", [False, True])
def test_init_from_restacks_blocks_between_scanned_and_per_layer_runs(tmp_path, dit_scan):
    dit_dir = str(tmp_path / "dit")
    train_lib.train_and_evaluate(
        tiny_config(num_steps=1, sample_every_steps=0,
                    **{"model_overrides.scan_blocks": dit_scan}), dit_dir)
    config = tiny_config(model="DyDiT-S/2", **{"model_overrides.scan_blocks": not dit_scan})
    model_config = config_lib.validate_config(config)
    mesh = parallel.make_mesh(config.mesh_shape)
    parts = model_parts.build_model(model_config, mesh)
    params = model_parts.initial_weights(parts, dit_dir, mesh)
    _, _, _, source = model_parts.restore_weights(dit_dir, mesh)
    fc1 = lambda p, i: (p["blocks"]["mlp"]["fc1"]["kernel"][i] if 0 not in p["blocks"]
                        else p["blocks"][i]["mlp"]["fc1"]["kernel"])
    for i in range(model_config.depth):
        np.testing.assert_array_equal(np.asarray(fc1(params, i)), np.asarray(fc1(source, i)))
    router = params["blocks"]["attn_rate"] if not dit_scan else params["blocks"][0]["attn_rate"]
    assert router["bias"].shape[-1] == model_config.num_router_logits  # kept its init


def test_profile_steps_write_a_trace_of_those_steps(tmp_path):
    workdir = tmp_path / "run"
    train_lib.train_and_evaluate(
        tiny_config(num_steps=4, profile_steps=(1, 3), sample_every_steps=0), str(workdir))
    traces = list((workdir / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert list((workdir / "profile").rglob("*.trace.json.gz"))  # for Perfetto


def test_train_cli_reports_bad_input_without_traceback(tmp_path):
    workdir = tmp_path / "never"
    proc = run_entry_point(
        "train.py", "--config=configs/digits.py:tiny", f"--workdir={workdir}",
        "--config.model=DiT-Q/2",
    )
    assert proc.returncode != 0
    assert "unknown model name 'DiT-Q/2'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()


def test_base_config_is_the_dit_recipe():
    c = config_lib.base_config()
    recipe = (c.learning_rate, c.weight_decay, c.ema_decay, c.label_dropout)
    assert recipe == (1e-4, 0.0, 0.9999, 0.1)
    assert (c.warmup_steps, c.grad_clip_norm, c.global_batch_size) == (0, 0.0, 256)
    assert (c.sample.steps, c.sample.guided_channels) == ("250", 3)
    tx = update_step.make_optimizer(c)
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.full(3, 0.5)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -1e-4, rtol=1e-4)  # Adam's first step is -lr*sign


def test_learning_rate_schedules():
    config = config_lib.base_config()
    config.update(learning_rate=1.0, warmup_steps=10, num_steps=110, lr_schedule="cosine")
    sched = update_step.learning_rate_schedule(config)
    np.testing.assert_allclose([sched(0), sched(5), sched(10)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(sched(60), 0.5, atol=1e-6)  # half way through the cosine
    np.testing.assert_allclose(sched(110), 0.0, atol=1e-6)
    config.lr_schedule = "constant"
    np.testing.assert_allclose(update_step.learning_rate_schedule(config)(100), 1.0)
    config.lr_schedule = "linear-ish"
    with pytest.raises(ValueError, match="lr_schedule"):
        config_lib.validate_config(config)


def test_a_gradient_norm_at_the_skip_threshold_skips_the_whole_update():
    # The DyDiT release's clip_max_norm: the update is applied only below the threshold;
    # otherwise params, EMA and AdamW state stay bit-identical and the step is counted.
    config = tiny_config(warmup_steps=0, global_batch_size=16)
    model_config = config_lib.validate_config(config)
    mesh = parallel.make_mesh(config.mesh_shape)
    with jax.set_mesh(mesh):
        parts = model_parts.build_model(model_config, mesh, seed=0)
        tx = update_step.make_optimizer(config)
        batches = data_lib.make_batches(
            data_lib.load_source(config), global_batch_size=16, seed=0
        )
        batch = parallel.global_batch(batches[0], mesh)
        results, initial = {}, parts.params
        for threshold in (1e-9, 1e9):
            config.grad_skip_norm = threshold
            parts.params = jax.tree.map(jnp.copy, initial)  # the step donates its state
            state = update_step.init_state(parts, tx, mesh)
            before = jax.device_get((state.params, state.ema_params, state.opt_state))
            step = update_step.make_train_step(parts, tx, config, mesh)
            new, metrics = step(state, batch)  # the state is donated
            after = jax.device_get((new.params, new.ema_params, new.opt_state))
            results[threshold] = (before, after, jax.device_get(metrics), int(new.step))
    before, after, metrics, step_after = results[1e-9]
    assert step_after == 1 and metrics["grad_norm"] > 1e-9
    assert metrics["skipped_large_grad"] == 1.0 and metrics["nonfinite"] == 0.0
    assert leaves_equal(before, after)
    before, after, metrics, _ = results[1e9]
    assert metrics["skipped_large_grad"] == 0.0
    assert not leaves_equal(before[0], after[0])  # applied: params, EMA and moments move
    assert not leaves_equal(before[2], after[2])

    # the host side counts and logs each skipped step
    watch = train_lib.NonFiniteWatch("stop", ckpt=None, skip_norm=1.0)
    fetched = [{"loss": 1.0, "grad_norm": 3.0, "nonfinite": 0.0, "skipped_large_grad": 1.0},
               {"loss": 1.0, "grad_norm": 0.5, "nonfinite": 0.0, "skipped_large_grad": 0.0}]
    watch.check(fetched, 10)
    assert watch.large_skipped == 1
    assert watch.summary(fetched)["skipped_large_grad"] == 1.0


def test_grad_skip_norm_must_not_be_negative():
    with pytest.raises(ValueError, match="grad_skip_norm must be >= 0"):
        config_lib.validate_config(tiny_config(grad_skip_norm=-1.0))


def test_compiler_options_of_the_config_reach_xla_for_the_step_and_the_samplers():
    """config.compiler_options go to every jit of the train step and the samplers (an option
    XLA does not know is refused by XLA itself, which shows it got there); none by default."""
    config = tiny_config(global_batch_size=8)
    assert dict(config.compiler_options) == {}
    config.compiler_options = {"xla_no_such_option_anywhere": "1"}
    model_config = config_lib.validate_config(config)
    mesh = parallel.make_mesh(config.mesh_shape)
    with jax.set_mesh(mesh):
        parts = model_parts.build_model(model_config, mesh, seed=0, init_params=False)
        tx = update_step.make_optimizer(config)
        shardings = update_step.state_shardings(parts, tx, mesh)
        state = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            jax.eval_shape(lambda: update_step.TrainState(
                jnp.zeros((), jnp.int32), parts.param_shapes, parts.param_shapes,
                tx.init(parts.param_shapes))), shardings)
        batch = {"image": jax.ShapeDtypeStruct((8, 8, 8, 1), jnp.float32),
                 "label": jax.ShapeDtypeStruct((8,), jnp.int32)}
        step = update_step.make_train_step(parts, tx, config, mesh)
        with pytest.raises(Exception, match="xla_no_such_option_anywhere"):
            step.lower(state, batch).compile()
        sampler = sample_lib.make_batch_sampler(
            parts, mesh=mesh, sampling_steps="2", compiler_options=config.compiler_options)
        rows = parallel.batch_sharding(mesh)
        params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              parts.param_shapes, parts.param_shardings)
        key = jax.eval_shape(lambda: jax.random.key(0))
        labels = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=rows)
        with pytest.raises(Exception, match="xla_no_such_option_anywhere"):
            sampler.lower(params, key, labels, labels).compile()
    config.compiler_options = {"xla_cpu_experimental_ynn_fusion_type": ["a"]}
    with pytest.raises(ValueError, match="compiler_options.xla_cpu_experimental_ynn"):
        config_lib.validate_config(config)


def test_a_run_ends_with_a_one_line_summary(tmp_path, caplog):
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO)
    caplog.set_level("INFO")
    train_lib.train_and_evaluate(tiny_config(num_steps=4, sample_every_steps=0),
                                 str(tmp_path / "run"))
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done:")]
    assert len(done) == 1, [r.getMessage() for r in caplog.records]
    assert "4 steps (0 to 4)" in done[0] and "final loss " in done[0]
    assert done[0].endswith(os.path.join(str(tmp_path / "run"), "checkpoints", "4"))
