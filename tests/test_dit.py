"""DiT: parameter counts, position/timestep embeddings, and the forward against an
independent numpy implementation of the reference layout (docs/dit.md)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dydit_jax.models import create_model, model_config, model_names
from dydit_jax.models.layers import Buffer, sincos_2d, timestep_features

SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PAPER_PARAMS_M = {"S": 33.0, "B": 130.5, "L": 458.1, "XL": 675.1}  # p=2, with pos-embed


def expected_trainable(depth, d, p, c=4, classes=1000, mlp_ratio=4):
    """Independent count from the reference state-dict shapes."""
    h = int(d * mlp_ratio)
    block = (3 * d * d + 3 * d) + (d * d + d) + (h * d + h) + (d * h + d) + (6 * d * d + 6 * d)
    embed = (d * c * p * p + d) + (d * 256 + d) + (d * d + d) + (classes + 1) * d
    final = (p * p * 2 * c * d + p * p * 2 * c) + (2 * d * d + 2 * d)
    return embed + depth * block + final


def count(model, kind):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, kind)))


@pytest.mark.parametrize("name", model_names("DiT"))
def test_parameter_counts_of_all_sizes(name):
    size, patch = name[4:].split("/")
    depth, d, _ = SIZES[size]
    model = nnx.eval_shape(
        lambda: create_model(name, input_size=32, in_channels=4, num_classes=1000, rngs=nnx.Rngs(0))
    )
    trainable = count(model, nnx.Param)
    assert trainable == expected_trainable(depth, d, int(patch))
    tokens = (32 // int(patch)) ** 2
    assert count(model, Buffer) == tokens * d  # the fixed position table
    if patch == "2":
        assert round((trainable + tokens * d) / 1e6, 1) == PAPER_PARAMS_M[size]


def test_dit_xl2_exact_counts():
    model = nnx.eval_shape(
        lambda: create_model(
            "DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, rngs=nnx.Rngs(0)
        )
    )
    assert count(model, nnx.Param) == 674_834_720
    assert count(model, nnx.Param) + count(model, Buffer) == 675_129_632


def test_position_embedding_axis_order_and_values():
    d, g = 16, 4
    emb = sincos_2d(d, g)
    assert emb.shape == (g * g, d) and emb.dtype == np.float64
    omega = 1.0 / 10000 ** (np.arange(d // 4) / (d / 4))
    for h in range(g):
        for w in range(g):
            row = emb[h * g + w]  # tokens are row-major
            np.testing.assert_allclose(row[: d // 4], np.sin(w * omega))  # column coord first
            np.testing.assert_allclose(row[d // 4 : d // 2], np.cos(w * omega))
            np.testing.assert_allclose(row[d // 2 : 3 * d // 4], np.sin(h * omega))
            np.testing.assert_allclose(row[3 * d // 4 :], np.cos(h * omega))


def test_timestep_features_cos_first():
    t = jnp.array([0, 7, 999])
    feats = np.asarray(timestep_features(t, 256))
    freqs = np.exp(-math.log(10000) * np.arange(128) / 128)
    args = np.array([0, 7, 999])[:, None] * freqs
    np.testing.assert_allclose(feats, np.concatenate([np.cos(args), np.sin(args)], 1), atol=2e-4)


def test_initialisation_is_adaln_zero():
    model = create_model("DiT-S/4", input_size=16, in_channels=4, num_classes=10, rngs=nnx.Rngs(0))
    for block in model.blocks:
        assert not np.any(block.adaLN.linear.kernel[...])
        assert not np.any(block.adaLN.linear.bias[...])
    assert not np.any(model.final_layer.linear.kernel[...])
    assert not np.any(model.x_embedder.proj.bias[...])
    assert abs(float(model.y_embedder.table.embedding[...].std()) - 0.02) < 2e-3
    # xavier bound on the (out, in*p*p) view of the patch conv
    bound = math.sqrt(6 / (4 * 16 + 384))
    kernel = np.asarray(model.x_embedder.proj.kernel[...])
    assert kernel.max() <= bound and kernel.max() > 0.9 * bound
    out = model(jnp.ones((2, 16, 16, 4)), jnp.array([3, 500]), jnp.array([1, 10]))
    assert out.shape == (2, 16, 16, 8) and not np.any(out)  # zero final layer


# --------------------------------------------------------------- numpy reference forward


def np_layer_norm(x):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_silu(x):
    return x / (1 + np.exp(-x))


def to_reference(model):
    """Our parameters as a reference (PyTorch layout) state dict: Linear (out, in), conv OIHW."""
    lin = lambda m: (np.asarray(m.kernel[...], np.float64).T, np.asarray(m.bias[...], np.float64))
    sd = {
        "pos_embed": np.asarray(model.pos_embed[...], np.float64),
        "x_proj": (
            np.asarray(model.x_embedder.proj.kernel[...], np.float64).transpose(3, 2, 0, 1),
            np.asarray(model.x_embedder.proj.bias[...], np.float64),
        ),
        "t1": lin(model.t_embedder.fc1),
        "t2": lin(model.t_embedder.fc2),
        "y": np.asarray(model.y_embedder.table.embedding[...], np.float64),
        "final_ada": lin(model.final_layer.adaLN.linear),
        "final": lin(model.final_layer.linear),
        "blocks": [
            {
                "qkv": lin(b.attn.qkv),
                "proj": lin(b.attn.proj),
                "fc1": lin(b.mlp.fc1),
                "fc2": lin(b.mlp.fc2),
                "ada": lin(b.adaLN.linear),
            }
            for b in model.blocks
        ],
    }
    return sd


def np_dit_forward(sd, x_nchw, t, y, p, heads):
    """The reference forward, written from the spec in NCHW/torch layout with float64."""
    lin = lambda v, wb: v @ wb[0].T + wb[1]
    w, b = sd["x_proj"]
    n, c, hh, ww = x_nchw.shape
    gh, gw = hh // p, ww // p
    patches = x_nchw.reshape(n, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)  # n,gh,gw,c,p,p
    tokens = patches.reshape(n, gh * gw, c * p * p) @ w.reshape(w.shape[0], -1).T + b
    tokens = tokens + sd["pos_embed"]
    freqs = np.exp(-math.log(10000) * np.arange(128) / 128)
    args = t[:, None].astype(np.float64) * freqs
    temb = lin(np_silu(lin(np.concatenate([np.cos(args), np.sin(args)], 1), sd["t1"])), sd["t2"])
    c_vec = temb + sd["y"][y]
    d = tokens.shape[-1]
    hd = d // heads
    for blk in sd["blocks"]:
        mods = np.split(lin(np_silu(c_vec), blk["ada"]), 6, axis=1)
        sh1, sc1, g1, sh2, sc2, g2 = (m[:, None, :] for m in mods)
        hmod = np_layer_norm(tokens) * (1 + sc1) + sh1
        qkv = lin(hmod, blk["qkv"]).reshape(n, -1, 3, heads, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv
        logits = q @ k.transpose(0, 1, 3, 2) * hd**-0.5
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        att = (probs @ v).transpose(0, 2, 1, 3).reshape(n, -1, d)
        tokens = tokens + g1 * lin(att, blk["proj"])
        hmod = np_layer_norm(tokens) * (1 + sc2) + sh2
        tokens = tokens + g2 * lin(np_gelu_tanh(lin(hmod, blk["fc1"])), blk["fc2"])
    shift, scale = np.split(lin(np_silu(c_vec), sd["final_ada"]), 2, axis=1)
    out = lin(np_layer_norm(tokens) * (1 + scale[:, None]) + shift[:, None], sd["final"])
    co = out.shape[-1] // (p * p)
    out = out.reshape(n, gh, gw, p, p, co)
    return np.einsum("nhwpqc->nchpwq", out).reshape(n, co, gh * p, gw * p)


def randomize(model, key):
    """Replace every parameter by random values (the zero adaLN init would hide bugs)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, tree = jax.tree.flatten(nnx.to_pure_dict(params))
    keys = jax.random.split(key, len(leaves))
    leaves = [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves), rest)


@pytest.mark.parametrize("patch,size", [(2, 8), (4, 16)])
def test_forward_matches_numpy_reference(patch, size):
    model = create_model(
        "DiT-S/2", input_size=size, in_channels=3, num_classes=5, rngs=nnx.Rngs(1),
        patch_size=patch, depth=2, hidden_size=32, num_heads=4,
    )
    model = randomize(model, jax.random.key(2))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    t = np.array([0, 731], np.int32)
    y = np.array([4, 5], np.int32)  # 5 = the null label
    ours = np.asarray(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
    ref = np_dit_forward(to_reference(model), x.transpose(0, 3, 1, 2).astype(np.float64), t, y,
                         patch, 4)
    assert ours.shape == (2, size, size, 6)
    np.testing.assert_allclose(ours, ref.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(name="DiT-Q/2"), "unknown model name"),
        (dict(name="DiT-S/3"), "unknown model name"),
        (dict(input_size=31), "not divisible by the patch size"),
        (dict(hidden_size=100, num_heads=6), "not divisible by num_heads"),
        (dict(heads=3), "unknown model option"),
    ],
)
def test_bad_model_configs_raise_clear_errors(kwargs, message):
    args = dict(name="DiT-S/2", input_size=32, in_channels=4, num_classes=10) | kwargs
    name = args.pop("name")
    with pytest.raises(ValueError, match=message):
        model_config(name, **args)
