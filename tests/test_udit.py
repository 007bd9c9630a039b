"""U-DiT (docs/udit.md): reshuffles and RoPE2D against numpy loops of the spec's formulas,
fused vs training form, the converter and the whole forward against an independent numpy
implementation in the reference's NCHW layout, parameter counts and GFLOPs against the paper,
configs, and training (loss goes down; 8 sharded devices = 1 device)."""

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from dydit_jax import (
    config_lib,
    convert,
    flops,
    model_parts,
    models,
    parallel,
    sample_lib,
    update_step,
)
from dydit_jax import data as data_lib
from dydit_jax import diffusion as diffusion_lib
from dydit_jax.convert import __main__ as convert_cli
from dydit_jax.convert import udit as convert_udit
from dydit_jax.models import udit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 5 blocks (10 sub-layers) at 8x8: widths 16 / 32 / 64, head widths 8 / 16 / 32
TINY = dict(hidden_size=16, num_heads=2, depth_level1=1, depth_level2=1, depth_latent=1)
INPUT, CLASSES = 8, 10


def load_config(variant=None):
    path = os.path.join(ROOT, "configs", "udit.py")
    spec = importlib.util.spec_from_file_location("cfg_udit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*([variant] if variant is not None else []))


def tiny_config(input_size=INPUT, **overrides):
    return models.model_config(
        "U-DiT-S", input_size=input_size, in_channels=4, num_classes=CLASSES,
        **(TINY | overrides),
    )


_FORWARDS = {}


def forward(config, params, x, t, y):
    """Jitted model forward of pure params (one compile per config)."""
    if config not in _FORWARDS:
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: udit.UDiT(config, rngs=nnx.Rngs(0))))
        _FORWARDS[config] = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))
    return np.asarray(_FORWARDS[config](params, x, t, y))


def inputs(seed=1, batch=2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, INPUT, INPUT, 4)).astype(np.float32)
    return x, np.array([3, 999][:batch], np.int32), np.array([1, CLASSES][:batch], np.int32)


# ------------------------------------------------------------ reshuffles against loops


def test_pixel_unshuffle_and_shuffle_follow_pytorch_channel_order():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 4, 3)).astype(np.float32)
    want = np.zeros((2, 3, 2, 12), np.float32)
    for h in range(3):
        for w in range(2):
            for c in range(3):
                for i in range(2):
                    for j in range(2):
                        want[:, h, w, c * 4 + i * 2 + j] = x[:, 2 * h + i, 2 * w + j, c]
    down = np.asarray(udit.pixel_unshuffle(jnp.asarray(x)))
    np.testing.assert_array_equal(down, want)
    np.testing.assert_array_equal(np.asarray(udit.pixel_shuffle(jnp.asarray(down))), x)


def test_group_split_and_merge():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 8, 3)).astype(np.float32)
    groups = np.asarray(udit.split_groups(jnp.asarray(x)))
    assert groups.shape == (2, 4, 12, 3)
    for row in range(6):
        for col in range(8):
            g, t = (row % 2) * 2 + col % 2, (row // 2) * 4 + col // 2  # raster over 3 x 4
            np.testing.assert_array_equal(groups[:, g, t], x[:, row, col])
    np.testing.assert_array_equal(np.asarray(udit.merge_groups(jnp.asarray(groups), 6, 8)), x)


def test_rope2d_against_the_spec_formula():
    d, side, heads = 12, 3, 2
    n = side * side
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, n, heads, d)).astype(np.float32)
    got = np.asarray(udit.apply_rope2d(jnp.asarray(x), udit.rope2d_angles(d, n)))
    want = np.empty_like(x, dtype=np.float64)
    for t in range(n):
        col, row = t % side, t // side
        for p in range(d // 2):
            f = 1.0 / 10000 ** (4 * (p // 2) / d)
            angle = (col if p % 2 == 0 else row) * f
            a, b = x[:, t, :, 2 * p].astype(np.float64), x[:, t, :, 2 * p + 1].astype(np.float64)
            want[:, t, :, 2 * p] = a * math.cos(angle) - b * math.sin(angle)
            want[:, t, :, 2 * p + 1] = a * math.sin(angle) + b * math.cos(angle)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="square"):
        udit.rope2d_angles(d, 8)


@pytest.mark.parametrize("depthwise", [False, True])
def test_conv_implementations_agree(depthwise):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 5)), jnp.float32)
    convs = {}
    with nnx.use_eager_sharding(False):
        for impl in udit.CONV_IMPLS:
            convs[impl] = udit.SameConv(
                5, 5 if depthwise else 7, 5, axes=(None,) * 4, rngs=nnx.Rngs(0),
                depthwise=depthwise, impl=impl,
            )
    state = nnx.state(convs["xla"])
    nnx.update(convs["xla"], jax.tree.map(lambda v: rng.normal(size=v.shape), state))
    nnx.update(convs["shifted"], nnx.state(convs["xla"]))
    np.testing.assert_allclose(convs["shifted"](x), convs["xla"](x), rtol=1e-5, atol=1e-5)


def test_logit_scale_is_clamped_at_the_release_literal():
    cfg = tiny_config()
    with nnx.use_eager_sharding(False):
        attn = udit.TokenDownsampledAttention(16, 2, config=cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 4, 16)), jnp.float32)
    outs = {}
    for value in (4.6052, math.log(100.0), 4.60519, 7.0, 3.0):
        attn.logit_scale[...] = jnp.full((2, 1, 1), value)
        outs[value] = np.asarray(attn(x))
    np.testing.assert_array_equal(outs[7.0], outs[4.6052])  # clamped at the literal
    # between ln 100 = 4.605170 and 4.6052 the scale is not clamped yet
    assert not np.array_equal(outs[4.60519], outs[math.log(100.0)])
    assert not np.array_equal(outs[4.60519], outs[4.6052])
    assert not np.allclose(outs[3.0], outs[4.6052])


def test_initialisation_follows_the_reference():
    cfg = tiny_config()
    key = jax.random.key(0)
    with nnx.use_eager_sharding(False):
        dw = udit.SameConv(64, 64, 5, axes=(None,) * 4, depthwise=True, rngs=udit.InitKeys(key))
        dense = udit.SameConv(16, 8, 3, axes=(None,) * 4, rngs=udit.InitKeys(key))
        attn = udit.TokenDownsampledAttention(32, 2, config=cfg, rngs=udit.InitKeys(key))
        final = udit.UDiTFinalLayer(32, 8, rngs=udit.InitKeys(key))
        sub = udit.UDiTSubLayer(16, config=cfg, rngs=udit.InitKeys(key))
    stem = udit.stem_init(4, 96, 3)(key, (3, 3, 4, 96))
    # xavier-uniform bounds sqrt(6 / (fan_in + fan_out)) with torch's fans of (O, I/g, k, k)
    for kernel, fans in ((dw.kernel[...], 25 + 25 * 64), (dense.kernel[...], 9 * 16 + 9 * 8),
                         (stem, 4 * 9 + 96)):  # the stem: the (out, in * 9) view
        bound = math.sqrt(6 / fans)
        assert bound * 0.9 < float(jnp.max(jnp.abs(kernel))) <= bound
    assert not np.any(dw.bias[...]) and not np.any(attn.to_qkv.bias[...])
    ln10 = np.float32(math.log(10))
    np.testing.assert_array_equal(attn.logit_scale[...], np.full((2, 1, 1), ln10))
    for zero in (final.out_proj.kernel, final.out_proj.bias, final.adaLN.linear.kernel,
                 sub.adaLN.linear.kernel, sub.adaLN.linear.bias):
        assert not np.any(zero[...])


# ----------------------------------------------------------------- fused vs training


def random_params(config, seed=0, std=0.1):
    shapes = convert.param_shapes(config)
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        treedef, [rng.normal(0, std, x.shape).astype(np.float32) for x in leaves]
    )


def test_fusion_is_a_pure_function_of_the_params():
    """(The fused forward against the training form: in the conversion test below.)"""
    config = tiny_config()
    params = random_params(config)
    before = jax.tree.map(np.copy, params)
    fused_config, fused = udit.fuse_params(config, params)
    assert fused_config == tiny_config(fused=True)
    assert jax.tree.structure(fused) == jax.tree.structure(convert.param_shapes(fused_config))
    jax.tree.map(np.testing.assert_array_equal, params, before)  # inputs left alone
    ffn, got = params["latent"][0]["sublayers"][0]["mlp"], fused["latent"][0]["sublayers"][0]
    kernel = ffn["dwconv"][0]["kernel"].copy()  # the spec's kernel fusion, by hand
    kernel[1:4, 1:4] += ffn["dwconv"][1]["kernel"]
    kernel[2, 2] += ffn["dwconv"][2]["kernel"][0, 0] + 1
    np.testing.assert_allclose(got["mlp"]["dwconv"]["kernel"], kernel, rtol=1e-6)
    w0, w1 = ffn["project_out"][0], ffn["project_out"][1]
    np.testing.assert_allclose(got["mlp"]["project_out"]["kernel"], w0["kernel"] @ w1["kernel"],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["mlp"]["project_out"]["bias"],
                               w0["bias"] @ w1["kernel"] + w1["bias"], rtol=1e-5, atol=1e-7)
    assert models.fuse_model_params(fused_config, fused)[1] is fused  # idempotent
    dit = models.model_config("DiT-S/2", input_size=8, in_channels=4, num_classes=10)
    assert models.fuse_model_params(dit, params) == (dit, params)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="divisible by 8"):
        tiny_config(input_size=12)
    with pytest.raises(ValueError, match="head width"):
        tiny_config(num_heads=3)
    with pytest.raises(ValueError, match="vanilla"):
        tiny_config(vanilla=True, fused=True)
    with pytest.raises(ValueError, match="unknown model name"):
        models.model_config("U-DiT-XL", input_size=32, in_channels=4, num_classes=10)


# ------------------------------------------------- the reference, in numpy, NCHW layout


def reference_state_dict(config, seed=0):
    """A random state_dict with the reference names and shapes (docs/udit.md), weights
    scaled by 1/sqrt(fan in) so that activations stay O(1)."""
    c, heads, classes = config.hidden_size, config.num_heads, config.num_classes
    shapes = {
        "x_embedder.proj.weight": (c, config.in_channels, 3, 3), "x_embedder.proj.bias": (c,),
        "down1_2.body.0.weight": (c // 2, c, 3, 3), "down2_3.body.0.weight": (c, 2 * c, 3, 3),
        "up3_2.body.0.weight": (8 * c, 4 * c, 3, 3), "up2_1.body.0.weight": (4 * c, 2 * c, 3, 3),
        "reduce_chan_level2.weight": (2 * c, 4 * c, 1, 1), "reduce_chan_level2.bias": (2 * c,),
        "reduce_chan_level1.weight": (2 * c, 2 * c, 1, 1), "reduce_chan_level1.bias": (2 * c,),
        "output.weight": (2 * c, 2 * c, 3, 3), "output.bias": (2 * c,),
        "final_layer.adaLN_modulation.1.weight": (4 * c, 2 * c),
        "final_layer.adaLN_modulation.1.bias": (4 * c,),
        "final_layer.out_proj.weight": (config.out_channels, 2 * c, 3, 3),
        "final_layer.out_proj.bias": (config.out_channels,),
    }
    for k, w in enumerate((c, 2 * c, 4 * c), start=1):
        shapes |= {
            f"t_embedder_{k}.mlp.0.weight": (w, 256), f"t_embedder_{k}.mlp.0.bias": (w,),
            f"t_embedder_{k}.mlp.2.weight": (w, w), f"t_embedder_{k}.mlp.2.bias": (w,),
            f"y_embedder_{k}.embedding_table.weight": (classes + 1, w),
        }
    stages = [("encoder_level_1", c, 1), ("encoder_level_2", 2 * c, 1), ("latent", 4 * c, 1),
              ("decoder_level_2", 2 * c, 1), ("decoder_level_1", 2 * c, 1)]
    for name, w, depth in stages:
        for b in range(depth):
            for i in (1, 2):
                p = f"{name}.{b}."
                shapes |= {
                    f"{p}adaLN_modulation{i}.1.weight": (6 * w, w),
                    f"{p}adaLN_modulation{i}.1.bias": (6 * w,),
                    f"{p}attn{i}.to_qkv.weight": (3 * w, w), f"{p}attn{i}.to_qkv.bias": (3 * w,),
                    f"{p}attn{i}.to_out.weight": (w, w, 1, 1), f"{p}attn{i}.to_out.bias": (w,),
                    f"{p}attn{i}.downsampler.layer.weight": (w, 1, 5, 5),
                    f"{p}attn{i}.downsampler.layer.bias": (w,),
                }
                if config.vanilla:
                    shapes |= {
                        f"{p}mlp{i}.fc1.weight": (2 * w, w, 1, 1), f"{p}mlp{i}.fc1.bias": (2 * w,),
                        f"{p}mlp{i}.fc2.weight": (w, 2 * w, 1, 1), f"{p}mlp{i}.fc2.bias": (w,),
                    }
                    continue
                shapes[f"{p}attn{i}.logit_scale"] = (heads, 1, 1)
                for j, (o, n) in enumerate([(w, w), (2 * w, w)]):
                    shapes[f"{p}mlp{i}.project_in.{j}.weight"] = (o, n, 1, 1)
                    shapes[f"{p}mlp{i}.project_in.{j}.bias"] = (o,)
                for j, (o, n) in enumerate([(w, 2 * w), (w, w)]):
                    shapes[f"{p}mlp{i}.project_out.{j}.weight"] = (o, n, 1, 1)
                    shapes[f"{p}mlp{i}.project_out.{j}.bias"] = (o,)
                for j, k in enumerate((5, 3, 1)):
                    shapes[f"{p}mlp{i}.dwconv.{j}.weight"] = (2 * w, 1, k, k)
                    shapes[f"{p}mlp{i}.dwconv.{j}.bias"] = (2 * w,)
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("logit_scale"):
            # head 0 above the clamp (4.6052), the others below it
            value = np.concatenate([[5.5], rng.uniform(1.0, 4.0, shape[0] - 1)])[:, None, None]
        elif key.endswith(".weight") and len(shape) > 1 and "embedding" not in key:
            value = rng.normal(0, 1 / math.sqrt(np.prod(shape[1:])), shape)
        else:
            value = rng.normal(0, 0.3, shape)
        sd[key] = np.asarray(value, np.float32)
    return sd


def np_conv(x, w, b=None, depthwise=False):
    """Stride-1 'same' conv of NCHW x with an OIHW kernel, in float64."""
    k = w.shape[-1]
    p = k // 2
    h, wd = x.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    out = 0.0
    for i in range(k):
        for j in range(k):
            patch = xp[:, :, i:i + h, j:j + wd]
            if depthwise:
                out = out + patch * w[None, :, 0, i, j, None, None]
            else:
                out = out + np.einsum("bchw,oc->bohw", patch, w[:, :, i, j])
    return out if b is None else out + b[None, :, None, None]


def np_ln(x):
    mean = x.mean(1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(1, keepdims=True) + 1e-6)


def np_modulate(x, shift, scale):
    return np_ln(x) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


def np_linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def np_silu(x):
    return x / (1 + np.exp(-x))


def np_attention(x, sd, name, heads, vanilla):
    b, c, h, w = x.shape
    y = np_conv(x, sd[f"{name}.downsampler.layer.weight"], sd[f"{name}.downsampler.layer.bias"],
                depthwise=True) + x
    d, side = c // heads, w // 2
    out = np.zeros_like(y)
    for di in range(2):
        for dj in range(2):
            tokens = y[:, :, di::2, dj::2].reshape(b, c, -1).transpose(0, 2, 1)  # (B, n, C)
            q, k, v = np.split(np_linear(tokens, sd, f"{name}.to_qkv"), 3, axis=-1)
            q, k, v = (a.reshape(b, -1, heads, d).transpose(0, 2, 1, 3) for a in (q, k, v))
            n = q.shape[2]
            if vanilla:
                logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
            else:
                t = np.arange(n)
                freq = 1.0 / 10000 ** (4 * (np.arange(d // 2) // 2) / d)
                pos = np.where(np.arange(d // 2) % 2 == 0, (t % side)[:, None],
                               (t // side)[:, None])
                rot = np.exp(1j * pos * freq)  # (n, d/2)
                q, k = ((a[..., 0::2] + 1j * a[..., 1::2]) * rot for a in (q, k))
                q, k = (np.stack([a.real, a.imag], -1).reshape(b, heads, n, d) for a in (q, k))
                q, k = (a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
                        for a in (q, k))
                scale = np.exp(np.minimum(sd[f"{name}.logit_scale"], 4.6052))
                logits = q @ k.transpose(0, 1, 3, 2) * scale[None]
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            o = (probs @ v).transpose(0, 2, 1, 3).reshape(b, n, c)
            out[:, :, di::2, dj::2] = o.transpose(0, 2, 1).reshape(b, c, h // 2, w // 2)
    return np_conv(out, sd[f"{name}.to_out.weight"], sd[f"{name}.to_out.bias"])


def np_ffn(x, sd, name, vanilla):
    conv = lambda a, n: np_conv(a, sd[f"{name}.{n}.weight"], sd[f"{name}.{n}.bias"])
    if vanilla:  # tanh GELU
        z = conv(x, "fc1")
        z = 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
        return conv(z, "fc2")
    z = conv(conv(x, "project_in.0"), "project_in.1")
    z = 0.5 * z * (1 + erf(z / math.sqrt(2)))
    u = z
    for j in range(3):
        u = u + np_conv(z, sd[f"{name}.dwconv.{j}.weight"], sd[f"{name}.dwconv.{j}.bias"],
                        depthwise=True)
    return conv(conv(u, "project_out.0"), "project_out.1")


def np_block(x, c, sd, name, heads, vanilla):
    for i in (1, 2):
        mod = np.split(np_linear(np_silu(c), sd, f"{name}.adaLN_modulation{i}.1"), 6, axis=1)
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod
        h = np_attention(np_modulate(x, shift_a, scale_a), sd, f"{name}.attn{i}", heads, vanilla)
        x = x + gate_a[:, :, None, None] * h
        h = np_ffn(np_modulate(x, shift_f, scale_f), sd, f"{name}.mlp{i}", vanilla)
        x = x + gate_f[:, :, None, None] * h
    return x


def np_unshuffle(x):
    b, c, h, w = x.shape
    out = np.zeros((b, 4 * c, h // 2, w // 2))
    for i in range(2):
        for j in range(2):
            out[:, i * 2 + j::4] = x[:, :, i::2, j::2]
    return out


def np_shuffle(x):
    b, c4, h, w = x.shape
    out = np.zeros((b, c4 // 4, 2 * h, 2 * w))
    for i in range(2):
        for j in range(2):
            out[:, :, i::2, j::2] = x[:, i * 2 + j::4]
    return out


def np_udit(sd, x, t, y, heads, vanilla):
    """The whole reference forward (docs/udit.md "Forward"), NCHW, float64."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    half = 128
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = t[:, None].astype(np.float64) * freqs[None]
    features = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    conds = []
    for k in (1, 2, 3):
        temb = np_linear(np_silu(np_linear(features, sd, f"t_embedder_{k}.mlp.0")), sd,
                         f"t_embedder_{k}.mlp.2")
        conds.append(temb + sd[f"y_embedder_{k}.embedding_table.weight"][y])
    c1, c2, c3 = conds
    h = np_conv(x.transpose(0, 3, 1, 2), sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"])
    block = lambda h, name, c: np_block(h, c, sd, f"{name}.0", heads, vanilla)
    enc1 = block(h, "encoder_level_1", c1)
    enc2 = block(np_unshuffle(np_conv(enc1, sd["down1_2.body.0.weight"])), "encoder_level_2", c2)
    lat = block(np_unshuffle(np_conv(enc2, sd["down2_3.body.0.weight"])), "latent", c3)
    up = np.concatenate([np_shuffle(np_conv(lat, sd["up3_2.body.0.weight"])), enc2], axis=1)
    dec2 = np_conv(up, sd["reduce_chan_level2.weight"], sd["reduce_chan_level2.bias"])
    dec2 = block(dec2, "decoder_level_2", c2)
    up = np.concatenate([np_shuffle(np_conv(dec2, sd["up2_1.body.0.weight"])), enc1], axis=1)
    dec1 = np_conv(up, sd["reduce_chan_level1.weight"], sd["reduce_chan_level1.bias"])
    dec1 = block(dec1, "decoder_level_1", c2)
    h = np_conv(dec1, sd["output.weight"], sd["output.bias"])
    shift, scale = np.split(np_linear(np_silu(c2), sd, "final_layer.adaLN_modulation.1"), 2, 1)
    out = np_conv(np_modulate(h, shift, scale), sd["final_layer.out_proj.weight"],
                  sd["final_layer.out_proj.bias"])
    return out.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("vanilla", [False, True])
def test_converted_reference_matches_numpy_and_the_fused_form(vanilla):
    config = tiny_config(vanilla=vanilla)
    sd = reference_state_dict(config)
    # heads are stored only in the cosine form (logit_scale); vanilla needs them given
    options = {"num_heads": 2} if vanilla else {}
    got_config, params = convert.state_dict_to_params(
        "udit", sd, "U-DiT-S", input_size=INPUT, overrides=options
    )
    assert got_config == config
    # spot checks of the layouts: 1x1 conv -> (in, out); depthwise OIHW -> (k, k, 1, C)
    sub = params["latent"][0]["sublayers"][1]
    np.testing.assert_array_equal(
        sub["attn"]["to_out"]["kernel"], sd["latent.0.attn2.to_out.weight"][:, :, 0, 0].T
    )
    np.testing.assert_array_equal(
        sub["attn"]["downsampler"]["kernel"],
        sd["latent.0.attn2.downsampler.layer.weight"].transpose(2, 3, 1, 0),
    )
    exported = convert_udit.to_reference(config, params)
    assert exported.keys() == sd.keys()
    jax.tree.map(np.testing.assert_array_equal, exported, sd)
    x, t, y = inputs()
    want = np_udit(sd, x, t, y, config.num_heads, vanilla)
    got = forward(config, params, x, t, y)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)))
    if not vanilla:  # conversion straight to the fused form = fusing the converted params
        fused_config, fused = convert.state_dict_to_params(
            "udit", sd, "U-DiT-S", input_size=INPUT, overrides={"fused": True, **options}
        )
        assert fused_config == tiny_config(fused=True)
        ref_config, ref = udit.fuse_params(config, params)
        assert ref_config == fused_config
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                     fused, ref)
        # the fused inference form computes the same function
        out_fused = forward(fused_config, fused, x, t, y)
        rel = np.max(np.abs(out_fused - got)) / np.max(np.abs(got))
        assert rel < 1e-5, rel


def test_converter_refuses_bad_files(tmp_path):
    config = tiny_config()
    sd = reference_state_dict(config)
    with pytest.raises(ValueError, match="missing keys: latent.0.attn1.to_qkv.bias"):
        convert.state_dict_to_params(
            "udit", {k: v for k, v in sd.items() if k != "latent.0.attn1.to_qkv.bias"},
            "U-DiT-S", overrides={"num_heads": 2},
        )
    with pytest.raises(ValueError, match="unexpected keys: pos_embed"):
        convert.state_dict_to_params(
            "udit", sd | {"pos_embed": np.zeros(3, np.float32)}, "U-DiT-S",
            overrides={"num_heads": 2},
        )
    with pytest.raises(ValueError, match="shape mismatch at output.weight"):
        bad = sd | {"output.weight": np.zeros((32, 32, 1, 1), np.float32)}
        convert.state_dict_to_params("udit", bad, "U-DiT-S", overrides={"num_heads": 2})
    mutated = dict(sd)  # what the reference's eval() leaves in dwconv.0
    for key in [k for k in sd if k.endswith("dwconv.0.weight")]:
        mutated[key] = sd[key] + np.pad(np.ones((1, 1)), 2)[None, None].astype(np.float32)
    with pytest.raises(ValueError, match="eval"):
        convert.state_dict_to_params("udit", mutated, "U-DiT-S", overrides={"num_heads": 2})
    with pytest.raises(ValueError, match="no registry U-DiT size"):
        convert.infer_config("udit", sd)  # width 16 is no paper size


def test_release_layout_is_recognised():
    name, config = convert.infer_config("udit", release_shapes("S"))
    assert name == "U-DiT-S" and config == models.model_config(
        "U-DiT-S", input_size=32, in_channels=4, num_classes=1000
    )
    name, config = convert.infer_config("udit", release_shapes("L"), input_size=64)
    assert name == "U-DiT-L" and config.input_size == 64 and config.num_heads == 16
    with pytest.raises(ValueError, match="those of U-DiT-S, not U-DiT-B"):
        convert.infer_config("udit", release_shapes("S"), "U-DiT-B")


def test_cli_writes_a_fused_workdir(tmp_path):
    sd = reference_state_dict(tiny_config())
    src, dst = tmp_path / "tiny.npz", tmp_path / "wd"
    np.savez(src, **sd)
    argv = ["udit", "--src", str(src), "--dst", str(dst), "--arch", "U-DiT-S",
            "--input-size", str(INPUT), "--fuse"]
    assert convert_cli.main(argv) == 0  # widths, heads and depths come from the shapes
    assert convert_cli.main(argv) == 2  # never overwrites a workdir
    mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    _, run_config, parts, weights = model_parts.restore_weights(str(dst), mesh)
    assert parts.config == tiny_config(fused=True) and run_config.model == "U-DiT-S"
    _, want = convert.state_dict_to_params(
        "udit", sd, "U-DiT-S", input_size=INPUT, overrides={"fused": True}
    )
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(weights), want)
    assert convert_cli.main(["dit", "--src", str(src), "--dst", str(tmp_path / "x"),
                             "--fuse"]) == 2


def test_load_reference_from_a_torch_file(tmp_path):
    torch = pytest.importorskip("torch")
    sd = reference_state_dict(tiny_config())
    path = tmp_path / "U-DiT-tiny.pt"  # a reference trainer file: {"model", "ema", "args"}
    ema = {k: torch.from_numpy(v) for k, v in sd.items()}
    torch.save({"model": {k: v * 0 for k, v in ema.items()}, "ema": ema}, path)
    model = convert.load_reference("udit", str(path), "U-DiT-S", input_size=INPUT)
    assert isinstance(model, udit.UDiT) and model.config == tiny_config()
    np.testing.assert_array_equal(  # the EMA weights, in our layout
        model.latent[0].sublayers[1].mlp.dwconv[2].kernel[...],
        sd["latent.0.mlp2.dwconv.2.weight"].transpose(2, 3, 1, 0),
    )


def release_shapes(size):
    """Shape tuples of a released checkpoint (no memory), by scaling the tiny layout."""
    c, heads = udit.UDIT_SIZES[size]
    cfg = models.model_config("U-DiT-" + size, input_size=32, in_channels=4, num_classes=1000)
    params = convert.param_shapes(cfg)
    out = {}
    for path, struct in convert.common.flatten(params).items():
        key = convert_udit.reference_name(path)
        shape = tuple(struct.shape)
        if len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif len(shape) == 2 and "embedding_table" not in key:
            shape = (shape[1], shape[0], 1, 1) if convert_udit._CONV1X1.search(key) else shape[::-1]
        out[key] = shape
    assert out["encoder_level_1.0.attn1.logit_scale"] == (heads, 1, 1)
    assert out["up3_2.body.0.weight"] == (8 * c, 4 * c, 3, 3)
    return out


# ----------------------------------------------------------- parameter counts, GFLOPs

# docs/udit.md: params (fused / training form) and GFLOPs at 256px; vanilla GFLOPs
PAPER = {
    "S": dict(fused=52.05, raw=58.90, gflops=6.04, unfused=7.15, vanilla=5.91),
    "B": dict(fused=204.43, raw=231.25, gflops=22.22, unfused=26.56, vanilla=21.96),
    "L": dict(fused=810.19, raw=916.34, gflops=85.00, unfused=102.12, vanilla=84.48),
}


def count(config):
    model = nnx.eval_shape(lambda: udit.UDiT(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("size", sorted(PAPER))
def test_parameter_counts_and_gflops_match_the_paper(size):
    paper = PAPER[size]
    cfg = lambda **kw: models.model_config(
        f"U-DiT-{size}", input_size=32, in_channels=4, num_classes=1000, **kw
    )
    raw, fused, vanilla = cfg(), cfg(fused=True), cfg(vanilla=True)
    for config, want in ((raw, paper["raw"]), (fused, paper["fused"])):
        n = count(config)
        assert n == flops.udit_param_count(config)
        assert round(n / 1e6, 2) == want
    assert count(vanilla) == flops.udit_param_count(vanilla)
    assert round(flops.udit_macs(fused) / 1e9, 2) == paper["gflops"]
    assert round(flops.udit_macs(vanilla) / 1e9, 2) == paper["vanilla"]
    # the spec's training-form estimate: exact for S and L, 26.5549 (26.55) for B
    assert abs(flops.udit_macs(raw) / 1e9 - paper["unfused"]) < 0.006
    parts = flops.udit_macs_breakdown(fused)
    assert sum(parts.values()) == flops.udit_macs(fused) and min(parts.values()) >= 0
    assert parts["attn_rope"] > 0 and flops.udit_macs_breakdown(vanilla)["attn_rope"] == 0


def test_gflops_at_512():
    config = models.model_config(
        "U-DiT-B", input_size=64, in_channels=4, num_classes=1000, fused=True
    )
    assert round(flops.udit_macs(config) / 1e9, 1) == 106.7


# ------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("variant,latent,steps,vanilla", [
    (None, 32, 400_000, False), ("S", 32, 400_000, False), ("B,512", 64, 400_000, False),
    ("B,256,1M", 32, 1_000_000, False), ("L,1M", 32, 1_000_000, False),
    ("S,vanilla", 32, 400_000, True),
])
def test_config_variants(variant, latent, steps, vanilla):
    config = load_config(variant)
    model_config = config_lib.validate_config(config)
    assert isinstance(model_config, udit.UDiTConfig)
    assert model_config.input_size == config.image_size == latent
    assert (config.num_steps, model_config.vanilla) == (steps, vanilla)
    assert (model_config.in_channels, model_config.num_classes) == (4, 1000)
    assert (config.learning_rate, config.global_batch_size, config.ema_decay) == (1e-4, 256,
                                                                                  0.9999)


@pytest.mark.parametrize("bad", ["XL", "B,384", "B,2M", "B,512,512", "digits,16"])
def test_config_unknown_variant(bad):
    with pytest.raises(ValueError, match="SIZE"):
        load_config(bad)


def test_digits_config_is_valid():
    config = load_config("digits")
    model_config = config_lib.validate_config(config)
    assert config.dataset == "digits" and config.image_size == 8 == model_config.input_size
    assert data_lib.load_digits(16)[0].shape[1:] == (16, 16, 1)  # --config.image_size=16


# ----------------------------------------------------------------------------- training


def digits_config(**overrides):
    """configs/udit.py:digits shrunk (widths 16 / 32 / 64, one block per stage), at 16x16
    (8x8 is covered by tests/test_mesh_contract.py)."""
    config = load_config("digits")
    config.image_size = 16
    config.model_overrides.update(TINY)
    config.model_overrides.depthwise = "xla"  # compiles faster on XLA:CPU (one device here)
    config.update(global_batch_size=16, learning_rate=2e-3, warmup_steps=0, log_every_steps=1)
    config.sample.update(steps="2", num_images=8, batch_size=8, cfg_scale=1.0)
    config.update(overrides)
    return config


def train_steps(config, mesh, num_steps, keep_at=None, params=None):
    """(losses, final params, params after `keep_at` steps) of U-DiT steps on digits, from
    the given initial `params` (host arrays) or the seed-0 initialisation."""
    model_config = config_lib.validate_config(config)
    with jax.set_mesh(mesh):
        parts = model_parts.build_model(
            model_config, mesh, seed=0, rules=config.sharding_rules,
            init_params=params is None,
        )
        if params is not None:  # skips a second compile of the initialisation
            parts.params = jax.device_put(params, parts.param_shardings)
        tx = update_step.make_optimizer(config)
        state = update_step.init_state(parts, tx, mesh)
        step = update_step.make_train_step(parts, tx, config, mesh)
        batches = data_lib.make_batches(
            data_lib.load_source(config), global_batch_size=config.global_batch_size, seed=0
        )
        losses, kept = [], None
        for i in range(num_steps):
            state, metrics = step(state, parallel.global_batch(batches[i], mesh))
            losses.append(float(metrics["loss"]))
            if i + 1 == keep_at:
                kept = jax.device_get(state.params)
    return losses, state.params, kept


@pytest.mark.slow
def test_training_on_digits_lowers_the_loss():
    # One device: 16 steps lower the loss. At initialisation the model outputs zeros (zero
    # final conv): its loss is that of a zero prediction, about 1 (the noise's variance) plus
    # the vb term, whatever the batch.
    config = digits_config()
    config.model_overrides.depthwise = "xla"  # compiles faster; one device: no tensor axis
    one = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    initial_params = jax.device_get(
        model_parts.build_model(config_lib.validate_config(config), one, seed=0).params
    )
    losses, _, _ = train_steps(config, one, 16, params=initial_params)
    source = data_lib.load_source(config)
    diffusion = diffusion_lib.create_diffusion(None)
    images = jnp.asarray(source.images[:64])
    t = jnp.linspace(0, 999, 64).astype(jnp.int32)
    noise = jax.random.normal(jax.random.key(123), images.shape)
    zero_fn = lambda x, tt: jnp.zeros((*x.shape[:3], 2 * x.shape[3]))
    initial = float(diffusion.training_losses(zero_fn, images, t, noise)["loss"].mean())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < min(np.mean(losses[:3]), 0.5 * initial), (initial, losses)
    # the same on every mesh: tests/test_mesh_contract.py


def test_sample_runs_the_fused_form(tmp_path):
    # a training-form workdir samples through the fused form: the same images as a workdir
    # converted straight to the fused form
    sd = reference_state_dict(tiny_config())
    src = tmp_path / "tiny.npz"
    np.savez(src, **sd)
    images = {}
    for form, flags in (("training", []), ("fused", ["--fuse"])):
        dst = str(tmp_path / form)
        argv = ["udit", "--src", str(src), "--dst", dst, "--arch", "U-DiT-S",
                "--input-size", str(INPUT), *flags]
        assert convert_cli.main(argv) == 0
        out = str(tmp_path / f"{form}_samples")
        summary = sample_lib.sample_from_workdir(
            dst, out, num_samples=4, sampling_steps="2", cfg_scale=2.0, batch_size=4,
            progress=False,
        )
        assert summary["fused"]
        images[form] = np.load(os.path.join(out, "samples.npz"))["arr_0"]
    diff = np.abs(images["training"].astype(int) - images["fused"].astype(int))
    assert images["fused"].std() > 0 and diff.max() <= 1, diff.max()
