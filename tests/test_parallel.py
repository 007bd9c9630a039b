"""Sharding: the same training on any mesh, parameters really sharded, restore across meshes,
and the bf16 / remat / scan switches against the plain float32 path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dydit_jax import checkpoint as ckpt_lib
from dydit_jax import config_lib, model_parts, parallel, train_lib, update_step
from dydit_jax import data as data_lib
from tests.helpers import tiny_config

MESHES = [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)]


def train_steps(config, mesh, num_steps=3, params=None):
    """(losses, final state, parts) of `num_steps` steps on digits under `mesh`."""
    model_config = config_lib.validate_config(config)
    with jax.set_mesh(mesh):
        parts = model_parts.build_model(model_config, mesh, seed=0, rules=config.sharding_rules)
        if params is not None:
            parts.params = jax.device_put(params, parts.param_shardings)
        tx = update_step.make_optimizer(config)
        state = update_step.init_state(parts, tx, mesh)
        step = update_step.make_train_step(parts, tx, config, mesh)
        batches = data_lib.make_batches(
            data_lib.load_source(config), global_batch_size=config.global_batch_size, seed=0
        )
        losses = []
        for i in range(num_steps):
            state, metrics = step(state, parallel.global_batch(batches[i], mesh))
            losses.append(float(metrics["loss"]))
    return losses, state, parts


def config_for_mesh():
    # hidden 64, 2 heads: every sharded dimension divides 8, 4 and 2
    return tiny_config(learning_rate=1e-3, global_batch_size=32)


@pytest.fixture(scope="module")
def single_device_run():
    mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    losses, state, _ = train_steps(config_for_mesh(), mesh)
    return losses, jax.device_get(state.params)


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_training_agrees_across_meshes(mesh_shape, single_device_run):
    ref_losses, ref_params = single_device_run
    losses, state, _ = train_steps(config_for_mesh(), parallel.make_mesh(mesh_shape))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(ref_params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_parameters_are_sharded_by_the_rules():
    mesh = parallel.make_mesh((2, 2, 2))
    _, state, _ = train_steps(config_for_mesh(), mesh, num_steps=1)
    block = state.params["blocks"][0]
    assert block["attn"]["qkv"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert block["attn"]["proj"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert block["mlp"]["fc2"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert block["adaLN"]["linear"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert state.params["y_embedder"]["table"]["embedding"].sharding.spec == P(None, "fsdp")
    # optimizer moments and EMA follow their parameters
    mu = state.opt_state[1][0].mu["blocks"][0]["attn"]["qkv"]["kernel"]
    assert mu.sharding.spec == P("fsdp", "tensor")
    ema = state.ema_params["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert ema.sharding.spec == P("fsdp", "tensor")
    shard = block["attn"]["qkv"]["kernel"].addressable_shards[0].data
    assert shard.shape == (64 // 2, 3 * 64 // 2)


def test_an_indivisible_dimension_hands_fsdp_to_another_and_the_rest_is_listed():
    mesh = parallel.make_mesh((1, 8, 1))
    rules = parallel.rules_dict(None)
    # 12 is not divisible by fsdp=8: the 16-wide dimension takes it (tensor has size 1)
    spec = parallel.logical_to_mesh_spec(P("embed", "mlp"), (12, 16), mesh, rules)
    assert spec == P(None, "fsdp")
    # no dimension divisible: not split by the rules (but see stored_form below)
    assert parallel.logical_to_mesh_spec(P("embed", "mlp"), (12, 6), mesh, rules) == P(None, None)
    # tensor is a compute axis: never moved to another dimension
    mesh = parallel.make_mesh((1, 1, 8))
    assert parallel.logical_to_mesh_spec(P("embed", "mlp"), (16, 12), mesh, rules) == P(None, None)
    mesh = parallel.make_mesh((1, 8, 1))
    # what no dimension can take is stored padded along the dimension the rule names
    form = parallel.stored_form(P("embed", "mlp"), (12, 6), mesh, rules)
    assert form == parallel.StoredForm((12, 6), (16, 6), P("fsdp", None))
    assert parallel.stored_form(P("embed", "mlp"), (12, 16), mesh, rules).padded_dim is None
    # only what the rules name for no storage axis stays whole on every chip, and is listed
    logical = {"a": P("embed", "mlp"), "b": P("embed", None), "c": P("embed"),
               "d": P("mlp", None)}
    shapes = {"a": jax.ShapeDtypeStruct((12, 6), np.float32),
              "b": jax.ShapeDtypeStruct((12, 16), np.float32),
              "c": jax.ShapeDtypeStruct((20,), np.float32),
              "d": jax.ShapeDtypeStruct((12, 6), np.float32)}
    whole = parallel.replicated_leaves(logical, shapes, mesh, rules)
    assert whole == [("['d']", 288)]
    assert parallel.replicated_leaves(logical, shapes, parallel.make_mesh((8, 1, 1)), rules) == []


def test_a_parameter_no_fsdp_size_divides_is_stored_padded_and_trains_the_same(tmp_path):
    # width 36 on fsdp = 8: no dimension of the attention kernels is divisible
    config = config_for_mesh()
    config.model_overrides.update(hidden_size=36)
    one = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    ref_losses, ref_state, _ = train_steps(config, one)
    mesh = parallel.make_mesh((1, 8, 1))
    losses, state, parts = train_steps(config, mesh)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # weights, EMA and AdamW's moments: 5 of 40 rows per chip, the 4 padding rows stay zero
    mu = state.opt_state[1][0].mu
    for tree in (state.params, state.ema_params, mu):
        qkv = tree["blocks"][0]["attn"]["qkv"]["kernel"]
        assert qkv.shape == (40, 108) and qkv.sharding.spec == P("fsdp", None)
        assert qkv.addressable_shards[0].data.shape == (5, 108)
        assert not np.asarray(qkv)[36:].any()
    # checkpoints hold every parameter in its own shape, the same as on one device
    tx = update_step.make_optimizer(config)
    with jax.set_mesh(mesh):
        items = update_step.make_checkpoint_items(parts, tx, mesh)(state)
    for name in ("params", "ema_params", "opt_state"):
        for a, b in zip(jax.tree.leaves(items[name]), jax.tree.leaves(getattr(ref_state, name)),
                        strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    saver = ckpt_lib.Checkpointer(str(tmp_path))
    saver.save(3, items, {"step": 3})
    saver.close()
    # ... and restore into the stored form of another mesh
    other = parallel.make_mesh((2, 4, 1))
    with jax.set_mesh(other):
        parts = model_parts.build_model(config_lib.validate_config(config), other,
                                        init_params=False)
        targets = update_step.restore_targets(parts, tx, other)
        _, restored, _ = ckpt_lib.Checkpointer(str(tmp_path), create=False).restore(targets)
        moved = update_step.stored_state(parts, tx, other, 3, restored)
    assert moved.params["blocks"][0]["attn"]["qkv"]["kernel"].shape == (36, 108)  # 36 % 4 == 0
    for a, b in zip(jax.tree.leaves(moved.params), jax.tree.leaves(items["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(moved.step) == 3


def test_training_names_the_parameters_that_stay_whole_on_every_chip(caplog):
    from dydit_jax.models import model_config

    config = model_config("DiT-S/2", input_size=8, in_channels=1, num_classes=10,
                          hidden_size=1004, num_heads=4, depth=1)  # 1004 % 8 != 0
    with caplog.at_level("WARNING"):  # stored padded: split after all
        model_parts.log_replicated(config, parallel.make_mesh((1, 8, 1)), None)
    assert "['attn']['qkv']['kernel']" not in caplog.text
    caplog.clear()
    # rules that name fsdp for no dimension of the attention kernels
    rules = (("embed", None), ("qkv", None), ("heads", None), ("mlp", "fsdp"))
    with caplog.at_level("WARNING"):
        model_parts.log_replicated(config, parallel.make_mesh((1, 8, 1)), rules)
    text = caplog.text
    assert "whole on every chip" in text and "fsdp=8" in text
    assert "['attn']['qkv']['kernel']" in text
    caplog.clear()
    with caplog.at_level("WARNING"):
        model_parts.log_replicated(config, parallel.make_mesh((8, 1, 1)), rules)
    assert "whole on every chip" not in caplog.text  # no fsdp axis: replication is the plan


def test_activations_are_constrained_by_their_logical_axis_names():
    mesh = parallel.make_mesh((2, 2, 2))

    def fn(x, y):
        return parallel.constrain(x, parallel.TOKENS), parallel.constrain(y, ("batch", "qkv"))

    x, y = jnp.zeros((8, 4, 6)), jnp.zeros((6, 12))  # 6 rows: not divisible by data x fsdp
    with jax.set_mesh(mesh):
        text = jax.jit(fn).lower(x, y).as_text()
    constraints = [line for line in text.splitlines() if "sharding_constraint" in line]
    assert len(constraints) == 1  # y is left to XLA
    assert '[{"data", "fsdp"}, {}, {}]' in constraints[0] and "8x4x6" in constraints[0]
    assert parallel.constrain(x, parallel.TOKENS) is x  # no mesh: a no-op
    with pytest.raises(ValueError, match="names must be"):
        parallel.constrain(x, ("batch", "tokens", "embed"))


@pytest.mark.parametrize("save_mesh,restore_devices,restore_mesh", [
    ((1, 8, 1), 1, (1, 1, 1)),
    ((1, 1, 1), 8, (2, 2, 2)),
    ((8, 1, 1), 8, (1, 4, 2)),
])
def test_restore_onto_another_mesh(tmp_path, save_mesh, restore_devices, restore_mesh):
    config = config_for_mesh()
    save_devices = jax.devices()[: int(np.prod(save_mesh))]
    _, state, _ = train_steps(config, parallel.make_mesh(save_mesh, devices=save_devices), 2)
    saver = ckpt_lib.Checkpointer(str(tmp_path))
    saver.save(2, {"params": state.params, "opt_state": state.opt_state}, {"step": 2})
    saver.close()

    mesh = parallel.make_mesh(restore_mesh, devices=jax.devices()[:restore_devices])
    model_config = config_lib.validate_config(config)
    parts = model_parts.build_model(model_config, mesh, init_params=False)
    tx = update_step.make_optimizer(config)
    shardings = update_step.state_shardings(parts, tx, mesh)
    targets = update_step.restore_targets(parts, tx, mesh)
    targets = {name: targets[name] for name in ("params", "opt_state")}
    step, items, _ = ckpt_lib.Checkpointer(str(tmp_path), create=False).restore(targets)
    assert step == 2
    for name in targets:
        for got, want, sharding in zip(jax.tree.leaves(items[name]),
                                       jax.tree.leaves(getattr(state, name)),
                                       jax.tree.leaves(getattr(shardings, name)), strict=True):
            assert got.sharding == sharding
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_an_unfinished_save_is_never_restored(tmp_path):
    workdir = str(tmp_path)
    train_lib.train_and_evaluate(tiny_config(num_steps=2, checkpoint_every_steps=2), workdir)
    # what an interrupted asynchronous save leaves behind: a temporary step directory
    junk = tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1234"
    (junk / "params").mkdir(parents=True)
    (junk / "params" / "garbage").write_bytes(b"\0" * 10)
    assert ckpt_lib.Checkpointer(workdir, create=False).latest_step() == 2
    state = train_lib.train_and_evaluate(tiny_config(num_steps=3), workdir)
    assert int(state.step) == 3


def stack_blocks(params):
    """Plain (list of blocks) parameters -> the scan layout (leading `layers` axis)."""
    blocks = [params["blocks"][i] for i in sorted(params["blocks"])]
    return dict(params, blocks=jax.tree.map(lambda *xs: jnp.stack(xs), *blocks))


@pytest.fixture(scope="module")
def float32_run():
    """Initial parameters and the loss curve of the plain float32 path."""
    mesh = parallel.make_mesh((-1, 1, 1))
    config = config_for_mesh()
    with jax.set_mesh(mesh):
        init = model_parts.build_model(config_lib.validate_config(config), mesh, seed=0).params
    losses, _, _ = train_steps(config, mesh, num_steps=4)
    return jax.device_get(init), losses


@pytest.mark.parametrize("overrides,tolerance", [
    ({"remat": "full"}, 1e-5),
    ({"scan_blocks": True, "remat": "dots"}, 1e-5),
    ({"dtype": "bfloat16"}, 3e-2),
])
def test_performance_switches_keep_the_loss_curve(overrides, tolerance, float32_run):
    params, ref_losses = float32_run
    config = config_for_mesh()
    config.model_overrides.update(overrides)
    if overrides.get("scan_blocks"):
        params = stack_blocks(params)
    losses, _, _ = train_steps(config, parallel.make_mesh((-1, 1, 1)), num_steps=4, params=params)
    np.testing.assert_allclose(losses, ref_losses, rtol=tolerance)


def test_few_tokens_per_sample_on_a_3d_mesh():
    # DiT-S/4 at 8x8 (4 tokens per sample) on data x fsdp x tensor = 2 x 2 x 2: XLA's SPMD
    # partitioner (jax 0.10.2) got this forward 11% wrong while the adaLN and qkv outputs
    # were split unpinned (parallel.constrain, "qkv"; docs/xla/slice_of_sharded_matmul.py)
    from flax import nnx

    from dydit_jax import models

    config = models.model_config("DiT-S/4", input_size=8, in_channels=1, num_classes=10,
                                 hidden_size=64, num_heads=2, depth=2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 1)).astype(np.float32)
    t, y = np.arange(16, dtype=np.int32) * 60, np.arange(16, dtype=np.int32) % 10
    outs = []
    for mesh in (parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1]),
                 parallel.make_mesh((2, 2, 2))):
        with jax.set_mesh(mesh):
            parts = model_parts.build_model(config, mesh, seed=0)
            params = jax.tree.map(  # adaLN and the final layer start at zero: perturb all
                lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
                parts.params,
            )
            graphdef, buffers = parts.graphdef, parts.buffers
            forward = jax.jit(
                lambda p, *a, g=graphdef, b=buffers: nnx.merge(g, p, b)(*a)
            )
            batch = parallel.global_batch({"x": x, "t": t, "y": y}, mesh)
            outs.append(np.asarray(forward(params, batch["x"], batch["t"], batch["y"])))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5 * np.abs(outs[0]).max())
