"""DyDiT: equals DiT at router initialisation, masks equal sliced computation, gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dydit_jax import flops
from dydit_jax.models import create_model
from dydit_jax.models.dydit import gumbel_sigmoid

KW = dict(input_size=8, in_channels=2, num_classes=5, depth=2, hidden_size=32, num_heads=4)


def make(name, seed=0, **kw):
    return create_model(name, rngs=nnx.Rngs(seed), **(KW | kw))


def inputs(b=3):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, 8, 8, 2)), jnp.float32)
    return x, jnp.array([0, 400, 999][:b], jnp.int32), jnp.array([1, 5, 3][:b], jnp.int32)


def randomize_backbone(model, key):
    """Random values for every DiT parameter (zero adaLN init would hide differences)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pure = nnx.to_pure_dict(params)
    leaves, tree = jax.tree.flatten(pure)
    keys = jax.random.split(key, len(leaves))
    leaves = [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves), rest)


def copy_backbone(src_dit, dst_dydit):
    """Load DiT parameters into a DyDiT (same names); routers keep their own values."""
    dit_params = nnx.to_pure_dict(nnx.state(src_dit, nnx.Param))
    graphdef, params, rest = nnx.split(dst_dydit, nnx.Param, ...)
    pure = nnx.to_pure_dict(params)

    def merge(a, b):
        return {k: (merge(a[k], b[k]) if isinstance(a[k], dict) else b.get(k, a[k])) if k in b
                else a[k] for k in a}

    return nnx.merge(graphdef, merge(pure, dit_params), rest)


@pytest.mark.parametrize("layout", ["first_on", "all"])
def test_initial_dydit_equals_dit(layout):
    dit = randomize_backbone(make("DiT-S/2"), jax.random.key(1))
    dydit = copy_backbone(dit, make("DyDiT-S/2", router_layout=layout))
    x, t, y = inputs()
    out, masks = dydit(x, t, y, return_masks=True)
    assert all(float(m.min()) == 1.0 for m in masks.values())  # biases 15 / 35: all on
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dit(x, t, y)))
    np.testing.assert_array_equal(np.asarray(dydit(x, t, y, complete=True)), np.asarray(out))
    assert masks["heads"].shape == (3, 2, 4) and masks["tokens"].shape == (3, 2, 16)


def set_router(model, layer, name, kernel, bias):
    block = model.blocks[layer]
    getattr(block, name).kernel[...] = kernel
    getattr(block, name).bias[...] = bias


def np_block(blk, x, c, head_mask, group_mask, token_router):
    """One DyDiT block with weights SLICED to the active heads and groups and the MLP run on
    the kept tokens only (then scattered back): the computation the masks stand for."""
    f = lambda a: np.asarray(a, np.float64)
    d = x.shape[-1]
    heads = blk.attn.num_heads
    hd = d // heads
    mods = np.split(f(c) / (1 + np.exp(-f(c))) @ f(blk.adaLN.linear.kernel[...])
                    + f(blk.adaLN.linear.bias[...]), 6, axis=-1)
    sh1, sc1, g1, sh2, sc2, g2 = mods
    ln = lambda v: (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-6)
    out = x.copy()
    for b in range(x.shape[0]):
        active = np.flatnonzero(head_mask[b])
        h = ln(x[b]) * (1 + sc1[b]) + sh1[b]
        wqkv, bqkv = f(blk.attn.qkv.kernel[...]), f(blk.attn.qkv.bias[...])
        cols = np.concatenate([part * d + hh * hd + np.arange(hd) for part in range(3)
                               for hh in active])  # q, k, v columns of the active heads
        qkv = h @ wqkv[:, cols] + bqkv[cols]
        q, k, v = np.split(qkv, 3, axis=-1)
        att = []
        for j in range(len(active)):
            sl = slice(j * hd, (j + 1) * hd)
            logits = q[:, sl] @ k[:, sl].T * hd**-0.5
            p = np.exp(logits - logits.max(-1, keepdims=True))
            att.append((p / p.sum(-1, keepdims=True)) @ v[:, sl])
        rows = np.concatenate([hh * hd + np.arange(hd) for hh in active])
        proj = (np.concatenate(att, -1) @ f(blk.attn.proj.kernel[...])[rows]
                if len(active) else 0.0) + f(blk.attn.proj.bias[...])
        out[b] = x[b] + g1[b] * proj
        keep = np.flatnonzero(token_router[b])
        groups = np.flatnonzero(group_mask[b])
        per = blk.mlp.fc1.kernel[...].shape[1] // len(group_mask[b])
        hidden = np.concatenate([g * per + np.arange(per) for g in groups])
        hm = ln(out[b, keep]) * (1 + sc2[b]) + sh2[b]
        a = hm @ f(blk.mlp.fc1.kernel[...])[:, hidden] + f(blk.mlp.fc1.bias[...])[hidden]
        a = 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))
        mlp = a @ f(blk.mlp.fc2.kernel[...])[hidden] + f(blk.mlp.fc2.bias[...])
        out[b, keep] = out[b, keep] + g2[b] * mlp
    return out


def test_masked_forward_equals_sliced_computation():
    model = randomize_backbone(make("DyDiT-S/2", router_layout="all", depth=1), jax.random.key(3))
    # width routers: zero kernels, biases choose the heads/groups (per layer, all samples)
    set_router(model, 0, "attn_rate", jnp.zeros((32, 4)), jnp.array([1.0, -1.0, 1.0, -1.0]))
    set_router(model, 0, "mlp_rate", jnp.zeros((32, 4)), jnp.array([-1.0, 1.0, 1.0, -1.0]))
    # token router: random weights, bias 0 -> a data-dependent mix of kept and skipped tokens
    model.blocks[0].token_fc2.bias[...] = jnp.zeros(1)
    x, t, y = inputs()
    out, masks = model(x, t, y, return_masks=True)
    tok = np.asarray(masks["tokens"][:, 0])
    assert 0 < tok.mean() < 1
    np.testing.assert_array_equal(np.asarray(masks["heads"][0, 0]), [1, 0, 1, 0])
    np.testing.assert_array_equal(np.asarray(masks["groups"][0, 0]), [0, 1, 1, 0])

    tokens, c = model.embed(x, t, y)
    ref = np_block(model.blocks[0], np.asarray(tokens, np.float64), np.asarray(c, np.float64),
                   np.asarray(masks["heads"][:, 0]), np.asarray(masks["groups"][:, 0]), tok)
    expected = np.asarray(model.head(jnp.asarray(ref, jnp.float32), c))
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)


def test_first_on_layout_keeps_head_and_group_zero():
    model = make("DyDiT-S/2", router_layout="first_on")
    assert model.blocks[0].attn_rate.kernel[...].shape == (32, 3)
    set_router(model, 0, "attn_rate", jnp.zeros((32, 3)), -jnp.ones(3))
    set_router(model, 0, "mlp_rate", jnp.zeros((32, 3)), -jnp.ones(3))
    _, masks = model(*inputs(), return_masks=True)
    np.testing.assert_array_equal(np.asarray(masks["heads"][:, 0]), [[1, 0, 0, 0]] * 3)
    np.testing.assert_array_equal(np.asarray(masks["groups"][:, 0]), [[1, 0, 0, 0]] * 3)


def router_grads(model, loss_of_model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.grad(lambda p: loss_of_model(nnx.merge(graphdef, p, rest)))(
        nnx.to_pure_dict(params))
    names = ("attn_rate", "mlp_rate", "token_fc1", "token_fc2")
    return {(i, n): grads["blocks"][i][n] for i in grads["blocks"] for n in names}


def test_gradients_reach_every_router_and_not_from_the_complete_model():
    model = randomize_backbone(make("DyDiT-S/2"), jax.random.key(4))
    for block in model.blocks:  # routers near their decision boundary
        block.attn_rate.bias[...] = jnp.zeros_like(block.attn_rate.bias[...])
        block.mlp_rate.bias[...] = jnp.zeros_like(block.mlp_rate.bias[...])
        block.token_fc2.bias[...] = jnp.zeros(1)
    x, t, y = inputs()
    cfg = model.config

    def dynamic_loss(m):
        out, masks = m(x, t, y, key=jax.random.key(0), return_masks=True)
        ratio = flops.flops_ratio(masks["heads"], masks["groups"], masks["tokens"],
                                  cfg.num_tokens, cfg.hidden_size)
        return jnp.mean(out**2) + flops.flops_loss(ratio, 0.5)

    for (layer, name), g in router_grads(model, dynamic_loss).items():
        norm = float(optax_norm(g))
        assert np.isfinite(norm) and norm > 0, (layer, name)
    complete = lambda m: jnp.mean(m(x, t, y, complete=True) ** 2)
    for key, g in router_grads(model, complete).items():
        assert float(optax_norm(g)) == 0.0, key


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(tree)))


def test_gumbel_sigmoid_hard_values_and_eval_threshold():
    logits = jnp.array([-3.0, -0.1, 0.1, 3.0])
    np.testing.assert_array_equal(np.asarray(gumbel_sigmoid(logits, None, 5.0)), [0, 0, 1, 1])
    train = gumbel_sigmoid(jnp.tile(logits, (2000, 1)), jax.random.key(0), 5.0)
    assert set(np.unique(np.asarray(train)).tolist()) <= {0.0, 1.0}
    # P(on) = sigmoid(logit) for the logistic noise: about 0.05, 0.475, 0.525, 0.95
    np.testing.assert_allclose(np.asarray(train.mean(0)), jax.nn.sigmoid(logits), atol=0.04)


@pytest.mark.slow
def test_finetuning_moves_the_flops_ratio_toward_lambda():
    from dydit_jax import config_lib, model_parts, parallel, update_step
    from dydit_jax import data as data_lib
    from tests.helpers import tiny_config

    config = tiny_config(model="DyDiT-S/2", learning_rate=3e-3, warmup_steps=0)
    config.model_overrides.update(hidden_size=64, num_heads=4)
    config.dydit.update(lambda_target=0.5, hold_steps=5, warmup_steps=60)
    model_config = config_lib.validate_config(config)
    mesh = parallel.make_mesh(config.mesh_shape)
    ratios = []
    with jax.set_mesh(mesh):
        parts = model_parts.build_model(model_config, mesh, seed=0)
        tx = update_step.make_optimizer(config)
        state = update_step.init_state(parts, tx, mesh)
        step = update_step.make_train_step(parts, tx, config, mesh)
        batches = data_lib.make_batches(data_lib.load_source(config), global_batch_size=32, seed=0)
        for i in range(150):
            state, metrics = step(state, parallel.global_batch(batches[i], mesh))
            ratios.append(float(metrics["flops_ratio"]))
        batch = parallel.global_batch(batches[0], mesh)
        evaluated = update_step.eval_flops_ratio(
            parts, state.params, batch["image"], batch["label"]
        )
    assert 0.2 < evaluated < 0.9, evaluated  # the hard eval masks also cut computation
    assert ratios[0] > 0.95  # routers start with everything on
    assert abs(np.mean(ratios[-10:]) - 0.5) < 0.15, ratios[::10]
    assert float(metrics["lambda"]) == 0.5


def test_dydit_configs_cover_the_paper_grid():
    from configs.dydit import LAMBDAS, get_config
    from dydit_jax import config_lib

    for size, lambdas in LAMBDAS.items():
        for lam in lambdas:
            config = get_config(f"{size}/2,{lam}")
            config.init_from = ""
            model_config = config_lib.validate_config(config)
            assert config.model == f"DyDiT-{size}/2" and config.dydit.lambda_target == lam
            assert model_config.num_classes == 1000 and model_config.input_size == 32
    # the release's scripts: train0.5.sh (stage 1 to 30k, stage 2 to 200k, clip_max_norm
    # 200, lr 1e-4, default warmup_step 1000) and train0.7.sh (stage 1 only, 150k steps,
    # clip_max_norm 50, lr 2.5e-5, warmup_step 5000); no gradient is scaled
    recipe = lambda c: (c.num_steps, c.dydit.complete_model_steps, c.dydit.warmup_steps,
                        c.dydit.hold_steps, c.learning_rate, c.grad_skip_norm, c.grad_clip_norm)
    assert recipe(get_config("XL/2,0.5")) == (200_000, 30_000, 1000, 100, 1e-4, 200.0, 0.0)
    assert recipe(get_config("XL/2,0.7")) == (150_000, 150_000, 5000, 100, 2.5e-5, 50.0, 0.0)
    assert recipe(get_config("B/2,0.5")) == (100_000, 0, 1000, 100, 1e-4, 15.0, 0.0)
    for bad in ("XL/2,0.9", "L/2,0.5", "digits,x", "digits,1.5"):
        with pytest.raises(ValueError):
            get_config(bad)


@pytest.mark.parametrize("option", [{"scan_blocks": True, "remat": "full"},
                                    {"scan_blocks": True}, {"remat": "dots"}])
def test_scanned_and_rematerialised_dydit_equal_the_block_loop(option):
    """Same weights, same key: scan over blocks and remat give the loop's outputs, training
    masks and gradients; models.unstack_blocks turns the stacked weights back into the loop's."""
    from dydit_jax import models

    loop = randomize_backbone(make("DyDiT-S/2"), jax.random.key(1))
    other = make("DyDiT-S/2", **option)
    graphdef, params, rest = nnx.split(loop, nnx.Param, ...)
    loop_params = nnx.to_pure_dict(params)
    other_graphdef, other_params, other_rest = nnx.split(other, nnx.Param, ...)
    if option.get("scan_blocks"):
        blocks = [loop_params["blocks"][i] for i in range(KW["depth"])]
        theirs = {**loop_params, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    else:
        theirs = loop_params
    x, t, y = inputs()
    key = jax.random.key(7)

    def loss(graphdef, rest):
        def fn(p):
            out, masks = nnx.merge(graphdef, p, rest)(x, t, y, key=key, return_masks=True)
            return jnp.mean(out**2), (out, masks)
        return jax.value_and_grad(fn, has_aux=True)

    (_, (out_a, masks_a)), grads_a = loss(graphdef, rest)(loop_params)
    (_, (out_b, masks_b)), grads_b = loss(other_graphdef, other_rest)(theirs)
    np.testing.assert_allclose(out_b, out_a, rtol=1e-5, atol=1e-5)
    for name in ("heads", "groups", "tokens"):
        np.testing.assert_array_equal(masks_b[name], masks_a[name])
    if option.get("scan_blocks"):
        flat_config, grads_b, _ = models.unstack_blocks(other.config, grads_b)
        assert not flat_config.scan_blocks
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        # float32 round-off: another summation order, relative to the leaf's largest entry
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-5 * float(jnp.abs(a).max()) + 1e-7)
    assert float(jnp.abs(grads_a["blocks"][0]["attn_rate"]["kernel"]).sum()) > 0
