"""The mesh contract: the loss and every gradient leaf of one training batch are the same on
every mesh as on one device (float32 round-off), for DiT, DyDiT and U-DiT at the digits
sizes. This is the test that found the XLA partitioner bugs of docs/xla/."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dydit_jax import config_lib, model_parts, parallel, train_lib, update_step
from dydit_jax import data as data_lib
from tests.helpers import tiny_config

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4), (2, 1, 4)]
UDIT_TINY = dict(hidden_size=16, num_heads=2, depth_level1=1, depth_level2=1, depth_latent=1)


def dit(patch):
    config = tiny_config()
    config.model_overrides.patch_size = patch
    return config


def dydit():
    from configs.dydit import get_config

    config = get_config("digits")
    config.init_from = ""
    config.model_overrides.update(depth=2, hidden_size=64, num_heads=2)
    config.dydit.complete_model_steps = 10_000  # both terms: dynamic and complete model
    return config


def udit(size):
    from configs.udit import get_config

    config = get_config("digits")
    config.image_size = size
    config.model_overrides.update(UDIT_TINY)
    return config


MODELS = {
    "DiT patch 2": lambda: dit(2),
    "DiT patch 4": lambda: dit(4),  # 4 tokens per sample
    "DyDiT": dydit,
    "U-DiT 8x8": lambda: udit(8),  # 1 token per 2x2 group in the latent stage
    "U-DiT 16x16": lambda: udit(16),
}
# U-DiT compiles slowly on 8 CPU devices (its depthwise convs are sums of shifted slices): its
# two sizes get one mesh each with fsdp and tensor axes, where XLA's partitioner bugs showed;
# the others get all.
MODEL_MESHES = {
    "U-DiT 8x8": [(2, 2, 2)],
    "U-DiT 16x16": [(1, 2, 4)],
}


def perturbed(params):
    """Initial parameters moved off adaLN-Zero's zeros, so that every leaf has a gradient."""
    leaves, tree = jax.tree.flatten(jax.device_get(params))
    rng = np.random.default_rng(1)
    return jax.tree.unflatten(
        tree, [x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves]
    )


def loss_and_grads(config, mesh_shape, params=None):
    model_config = config_lib.validate_config(config)
    mesh = parallel.make_mesh(mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    with jax.set_mesh(mesh):
        parts = model_parts.build_model(
            model_config, mesh, seed=0, rules=config.sharding_rules, init_params=params is None
        )
        if params is None:
            params = perturbed(parts.params)
        shardings = parts.param_shardings
        batches = data_lib.make_batches(data_lib.load_source(config), global_batch_size=16,
                                        seed=0)
        batch = parallel.global_batch(batches[0], mesh)
        loss_fn = update_step.make_loss_fn(parts, config)
        grad = jax.jit(
            jax.grad(loss_fn, has_aux=True),
            in_shardings=(parts.param_shardings, parallel.batch_sharding(mesh),
                          parallel.batch_sharding(mesh), None, None),
        )
        grads, metrics = grad(
            jax.device_put(params, parts.param_shardings), batch["image"], batch["label"],
            jax.random.key(7), 1000,
        )
        return params, float(metrics["loss"]), jax.device_get(grads), shardings


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.slow) if name.startswith(("U-DiT", "DyDiT")) else name
    for name in MODELS
])
def test_loss_and_every_gradient_leaf_match_one_device(name):
    config = MODELS[name]()
    params, ref_loss, ref, _ = loss_and_grads(config, (1, 1, 1))
    leaves = jax.tree_util.tree_leaves_with_path(ref)
    largest = max(float(np.linalg.norm(g)) for _, g in leaves)
    assert largest > 0
    for mesh_shape in MODEL_MESHES.get(name, MESHES):
        _, loss, grads, shardings = loss_and_grads(config, mesh_shape, params)
        bad = []
        assert loss == pytest.approx(ref_loss, rel=1e-5), mesh_shape
        for (path, want), got in zip(leaves, jax.tree.leaves(grads), strict=True):
            err = float(np.linalg.norm(np.asarray(got) - want))
            if err > 1e-4 * float(np.linalg.norm(want)) + 1e-6 * largest:
                bad.append(f"{jax.tree_util.keystr(path)}: {err / np.linalg.norm(want):.2g}")
        assert not bad, f"{name} on mesh {mesh_shape}: {len(bad)} leaves off: {bad[:5]}"
        if mesh_shape == (2, 2, 2) and name.startswith("U-DiT"):  # really sharded
            sub = shardings["latent"][0]["sublayers"][0]
            assert sub["attn"]["to_qkv"]["kernel"].spec == P("fsdp", "tensor")
            assert sub["mlp"]["dwconv"][0]["kernel"].spec == P(None, None, None, "tensor")
            assert sub["attn"]["logit_scale"].spec == P("tensor", None, None)


def test_xla_depthwise_training_is_refused_on_a_tensor_axis(tmp_path):
    # docs/xla/grouped_conv_kernel_grad.py: XLA scales those kernel gradients by 'tensor'
    config = udit(16)
    config.model_overrides.depthwise = "xla"
    config.mesh_shape = (2, 1, 4)
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="depthwise='xla' cannot train on a mesh with tensor"):
        train_lib.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()  # refused before anything is written
    config.mesh_shape = (4, 2, 1)  # no tensor axis: allowed
    model_config = config_lib.validate_config(config)
    update_step.check_training_mesh(model_config, parallel.make_mesh(config.mesh_shape))
