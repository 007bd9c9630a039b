"""Analytic MACs against the DiT / DyDiT tables, and the DyDiT FLOPs ratio, loss and lambda
schedule against hand-computed values (docs/dit.md, docs/dydit.md)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dydit_jax.flops import (
    block_costs,
    dit_macs,
    dit_macs_breakdown,
    dynamic_macs,
    flops_loss,
    flops_ratio,
    lambda_schedule,
    routed_block_macs,
    router_macs,
)
from dydit_jax.models import model_config

# DiT paper, 256px (32x32x4 latents), GMACs.
DIT_TABLE = {
    "DiT-S/2": 6.06,
    "DiT-S/4": 1.41,
    "DiT-S/8": 0.36,
    "DiT-B/2": 23.01,
    "DiT-B/4": 5.57,
    "DiT-B/8": 1.42,
    "DiT-L/2": 80.70,
    "DiT-L/4": 19.70,
    "DiT-L/8": 5.01,
    "DiT-XL/2": 118.62,
    "DiT-XL/4": 29.04,
    "DiT-XL/8": 7.39,
}
# DyDiT paper's baselines (lambda = 1.0 rows).
DYDIT_BASELINES = {"DiT-S/2": 6.07, "DiT-B/2": 23.02, "DiT-XL/2": 118.69}
# docs/dydit.md, N = 256, in GMACs.
SPEC_AM = {"S": (384, 0.2013, 0.3020), "B": (768, 0.7046, 1.2080), "XL": (1152, 1.5099, 2.7179)}


def config(name, input_size=32):
    return model_config(name, input_size=input_size, in_channels=4, num_classes=1000)


@pytest.mark.parametrize("name", sorted(DIT_TABLE))
def test_dit_table(name):
    cfg = config(name)
    total = dit_macs(cfg)
    assert round(total / 1e9, 2) == DIT_TABLE[name]
    parts = dit_macs_breakdown(cfg)
    assert sum(parts.values()) == total
    assert parts["layer_norm"] == 0
    assert all(v >= 0 for v in parts.values())


def test_dit_xl2_512():
    assert round(dit_macs(config("DiT-XL/2", input_size=64)) / 1e9, 1) == 524.5


@pytest.mark.parametrize("name", sorted(DYDIT_BASELINES))
def test_dydit_convention_baselines(name):
    cfg = config(name)
    total = dit_macs(cfg, dydit_convention=True)
    assert round(total / 1e9, 2) == DYDIT_BASELINES[name]
    parts = dit_macs_breakdown(cfg, dydit_convention=True)
    assert sum(parts.values()) == total
    n, d = cfg.num_tokens, cfg.hidden_size
    assert parts["layer_norm"] == (2 * cfg.depth + 1) * 4 * n * d
    assert total - dit_macs(cfg) == parts["layer_norm"]


def test_breakdown_by_hand_s2():
    # DiT-S/2 at 256px: N = 256, D = 384, L = 12, p = 2, 4 -> 8 channels.
    n, d, depth = 256, 384, 12
    parts = dit_macs_breakdown(config("DiT-S/2"))
    assert parts["patch_embed"] == n * 16 * d
    assert parts["t_embedder"] == 256 * d + d * d
    assert parts["attn_qkv"] + parts["attn_proj"] == depth * 4 * n * d * d
    assert parts["attn_scores"] == parts["attn_values"] == depth * n * n * d
    assert parts["mlp_fc1"] == parts["mlp_fc2"] == depth * 4 * n * d * d
    assert parts["adaln"] == depth * 6 * d * d
    assert parts["final_adaln"] == 2 * d * d
    assert parts["final_linear"] == n * d * 32


@pytest.mark.parametrize("size", sorted(SPEC_AM))
def test_block_costs_spec(size):
    d, a_g, m_g = SPEC_AM[size]
    attn, mlp = block_costs(256, d)
    assert round(attn / 1e9, 4) == a_g
    assert round(mlp / 1e9, 4) == m_g
    assert attn == 4 * 256 * d * d + 2 * 256 * 256 * d
    assert mlp == 8 * 256 * d * d
    assert block_costs(256, d, mlp_hidden=2 * d)[1] == mlp // 2


def test_routed_blocks_are_all_block_matmuls():
    cfg = config("DiT-XL/2")
    parts = dit_macs_breakdown(cfg)
    routed = sum(parts[k] for k in parts if k.startswith(("attn_", "mlp_")))
    assert routed_block_macs(cfg) == routed


# Hand example: L = 2 blocks, H = 4 heads/groups, N = 4 tokens, B = 2 samples.
N_TOK, HIDDEN = 4, 8
HEADS = np.array([[[1, 1, 0, 0], [1, 0, 0, 0]], [[1, 1, 1, 1], [0, 0, 0, 0]]], np.float32)
GROUPS = np.array([[[1, 1, 1, 0], [1, 1, 0, 0]], [[0, 0, 0, 0], [1, 1, 1, 1]]], np.float32)
TOKENS = np.array([[[1, 0, 0, 0], [1, 1, 1, 1]], [[1, 1, 0, 0], [1, 1, 1, 0]]], np.float32)


def hand_ratio(with_tokens):
    a = 4 * N_TOK * HIDDEN**2 + 2 * N_TOK**2 * HIDDEN  # 1024 + 256 = 1280
    m = 8 * N_TOK * HIDDEN**2  # 2048
    assert (a, m) == (1280, 2048)
    tok = [[1 / 4, 4 / 4], [2 / 4, 3 / 4]] if with_tokens else [[1.0, 1.0], [1.0, 1.0]]
    # sample 0: heads 2/4, 1/4; groups 3/4, 2/4
    r0 = (2 / 4 * a + 3 / 4 * tok[0][0] * m + 1 / 4 * a + 2 / 4 * tok[0][1] * m) / (2 * (a + m))
    # sample 1: heads 4/4, 0/4; groups 0/4, 4/4
    r1 = (1.0 * a + 0.0 * tok[1][0] * m + 0.0 * a + 1.0 * tok[1][1] * m) / (2 * (a + m))
    return [r0, r1]


def test_flops_ratio_hand_values():
    got = flops_ratio(HEADS, GROUPS, TOKENS, N_TOK, HIDDEN)
    assert got.shape == (2,)
    np.testing.assert_allclose(np.asarray(got), hand_ratio(True), rtol=1e-6)
    # Same with bool masks, and with token masks None (= all tokens run the MLP).
    got_bool = flops_ratio(HEADS > 0, GROUPS > 0, TOKENS > 0, N_TOK, HIDDEN)
    np.testing.assert_allclose(np.asarray(got_bool), hand_ratio(True), rtol=1e-6)
    got_none = flops_ratio(HEADS, GROUPS, None, N_TOK, HIDDEN)
    np.testing.assert_allclose(np.asarray(got_none), hand_ratio(False), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(flops_ratio(HEADS, GROUPS, np.ones_like(TOKENS), N_TOK, HIDDEN)),
        hand_ratio(False),
        rtol=1e-6,
    )


def test_flops_ratio_extremes_and_jit():
    b, depth, h, n, d = 3, 28, 16, 256, 1152
    ones_h, ones_t = jnp.ones((b, depth, h)), jnp.ones((b, depth, n))
    fn = jax.jit(flops_ratio, static_argnums=(3, 4))
    np.testing.assert_allclose(np.asarray(fn(ones_h, ones_h, ones_t, n, d)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fn(ones_h, ones_h, None, n, d)), 1.0, rtol=1e-6)
    zeros_h = jnp.zeros((b, depth, h))
    np.testing.assert_array_equal(np.asarray(fn(zeros_h, zeros_h, ones_t, n, d)), 0.0)
    np.testing.assert_array_equal(
        np.asarray(fn(ones_h, ones_h, jnp.zeros((b, depth, n)), n, d))
        - np.asarray(fn(ones_h, zeros_h, ones_t, n, d)),
        0.0,
    )
    # Only attention on: the attention share A / (A + M).
    attn, mlp = block_costs(n, d)
    np.testing.assert_allclose(
        np.asarray(fn(ones_h, zeros_h, None, n, d)), attn / (attn + mlp), rtol=1e-6
    )


def test_flops_ratio_rejects_bad_shapes():
    with pytest.raises(ValueError, match="num_tokens"):
        flops_ratio(HEADS, GROUPS, TOKENS[..., :3], N_TOK, HIDDEN)
    with pytest.raises(ValueError, match="disagree"):
        flops_ratio(HEADS, GROUPS[:1], TOKENS, N_TOK, HIDDEN)
    with pytest.raises(ValueError, match="batch, layers, heads"):
        flops_ratio(HEADS[0], GROUPS[0], None, N_TOK, HIDDEN)


def test_flops_loss_values_and_gradient():
    ratio = jnp.array([0.9, 0.7])
    np.testing.assert_allclose(float(flops_loss(ratio, 0.5)), 2.0 * 0.3**2, rtol=1e-6)
    assert float(flops_loss(jnp.array([0.5, 0.5]), 0.5)) == 0.0

    def loss(heads, groups, tokens):
        return flops_loss(flops_ratio(heads, groups, tokens, N_TOK, HIDDEN), 0.3)

    # Soft masks, as the straight-through estimator's gradient sees them.
    rng = np.random.default_rng(0)
    masks = [
        jnp.asarray(rng.uniform(0.2, 0.9, x.shape), jnp.float32) for x in (HEADS, GROUPS, TOKENS)
    ]
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*masks)
    for g, m in zip(grads, masks, strict=True):
        assert g.shape == m.shape
        assert np.all(np.isfinite(np.asarray(g)))
        assert np.all(np.asarray(g) != 0.0)
    # d loss / d head[b, l, h] = 4 (mean r - lam) * a_frac / (B L H), with a_frac = A/(A+M).
    mean_r = float(jnp.mean(flops_ratio(*masks, N_TOK, HIDDEN)))
    expected = 4 * (mean_r - 0.3) * (1280 / 3328) / (2 * 2 * 4)
    np.testing.assert_allclose(np.asarray(grads[0]), expected, rtol=1e-5)
    # Without token masks, gradients still flow to heads and groups.
    g_none = jax.grad(lambda h, g: loss(h, g, None), argnums=(0, 1))(*masks[:2])
    assert all(np.all(np.asarray(g) != 0.0) for g in g_none)


def release_lambda(s: int, lam: float, warm: int) -> float:
    """The release's train.py (lines 261-267), literally: a ramp from step 0, 1.0 before 100."""
    target = 1.0 - (1.0 - lam) * s / warm if s <= warm else lam
    return 1.0 if s < 100 else target


# s = 0, 99, 100, 500, W, W + 1 for W = 1000 (the default) and 5000 (XL lambda 0.7)
SCHEDULE_STEPS = [(s, w) for w in (1000, 5000) for s in (0, 99, 100, 500, w, w + 1)]


@pytest.mark.parametrize("step,warm", SCHEDULE_STEPS)
def test_lambda_schedule_is_the_release_formula(step, warm):
    for lam in (0.5, 0.7, 0.3):
        got = lambda_schedule(step, lam, warmup_steps=warm)
        assert isinstance(got, float)
        assert math.isclose(got, release_lambda(step, lam, warm), rel_tol=1e-12, abs_tol=1e-15)


def test_lambda_schedule_jit():
    steps = jnp.array([s for s, w in SCHEDULE_STEPS if w == 1000], jnp.int32)
    fn = jax.jit(lambda s: lambda_schedule(s, 0.5))
    np.testing.assert_allclose(
        np.asarray(fn(steps)), [release_lambda(int(s), 0.5, 1000) for s in steps], rtol=1e-6
    )
    # anchored at step 0: at step 100 the ramp is a tenth of the way down, not at 1.0
    assert float(fn(jnp.int32(100))) == pytest.approx(0.95)
    # Traced target, longer warm-up.
    fn2 = jax.jit(lambda s, t: lambda_schedule(s, t, warmup_steps=5000))
    assert float(fn2(jnp.int32(2500), jnp.float32(0.3))) == pytest.approx(0.65)
    assert lambda_schedule(100, 0.3, warmup_steps=0) == 0.3
    assert lambda_schedule(99, 0.3, warmup_steps=0) == 1.0


def test_dynamic_macs():
    cfg = config("DiT-XL/2")
    assert dynamic_macs(cfg, 1.0) == dit_macs(cfg)
    assert dynamic_macs(cfg, 1.0, dydit_convention=True) == dit_macs(cfg, dydit_convention=True)
    blocks = routed_block_macs(cfg)
    assert dynamic_macs(cfg, 0.0) == dit_macs(cfg) - blocks
    assert dynamic_macs(cfg, 0.5) == pytest.approx(dit_macs(cfg) - 0.5 * blocks)
    with_routers = dynamic_macs(cfg, 0.7, routers=True)
    assert with_routers - dynamic_macs(cfg, 0.7) == pytest.approx(router_macs(cfg))
    # Array ratios (per-sample output of flops_ratio) give per-sample MACs.
    arr = dynamic_macs(cfg, jnp.array([1.0, 0.5]))
    np.testing.assert_allclose(
        np.asarray(arr) / 1e9, [dit_macs(cfg) / 1e9, dynamic_macs(cfg, 0.5) / 1e9], rtol=1e-6
    )


def test_router_macs_by_hand():
    cfg = config("DiT-S/2")  # D = 384, H = 6, N = 256, L = 12
    width = 12 * 2 * 384 * 5
    token = 12 * 256 * (384 * 24 + 24)
    assert router_macs(cfg, token_router=False) == width
    assert router_macs(cfg, num_logits=6, token_router=False) == 12 * 2 * 384 * 6
    assert router_macs(cfg) == width + token
