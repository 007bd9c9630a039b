"""The KL-f8 VAE (dydit_jax.vae) and its converter (dydit_jax.convert.vae).

The reference state_dict names and shapes are enumerated here from docs/vae.md, and the
fidelity reference is a float64 numpy forward written here (NCHW, diffusers names);
neither uses the project's modules or name map. CPU, tiny configs; the full config only
abstractly."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dydit_jax import parallel, vae
from dydit_jax.convert import vae as convert_vae
from dydit_jax.convert.__main__ import main as convert_main

# (16, 32) has a width change in both the encoder and the decoder (conv_shortcut)
TINY = vae.VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)


# ----------------------------------------------------------------------------- reference


def reference_shapes(chans, layers, latent=4, cin=3, cout=3) -> dict:
    """diffusers state_dict key -> torch shape, from the spec's architecture."""
    s = {}

    def conv(name, i, o, k):
        s[f"{name}.weight"], s[f"{name}.bias"] = (o, i, k, k), (o,)

    def norm(name, c):
        s[f"{name}.weight"], s[f"{name}.bias"] = (c,), (c,)

    def resnet(name, i, o):
        norm(f"{name}.norm1", i)
        conv(f"{name}.conv1", i, o, 3)
        norm(f"{name}.norm2", o)
        conv(f"{name}.conv2", o, o, 3)
        if i != o:
            conv(f"{name}.conv_shortcut", i, o, 1)

    def mid(name, c):
        resnet(f"{name}.resnets.0", c, c)
        norm(f"{name}.attentions.0.group_norm", c)
        for lin in ("to_q", "to_k", "to_v", "to_out.0"):
            s[f"{name}.attentions.0.{lin}.weight"] = (c, c)
            s[f"{name}.attentions.0.{lin}.bias"] = (c,)
        resnet(f"{name}.resnets.1", c, c)

    conv("encoder.conv_in", cin, chans[0], 3)
    prev = chans[0]
    for i, c in enumerate(chans):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", prev, c)
            prev = c
        if i < len(chans) - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3)
    mid("encoder.mid_block", chans[-1])
    norm("encoder.conv_norm_out", chans[-1])
    conv("encoder.conv_out", chans[-1], 2 * latent, 3)
    conv("quant_conv", 2 * latent, 2 * latent, 1)
    conv("post_quant_conv", latent, latent, 1)
    rev = chans[::-1]
    conv("decoder.conv_in", latent, rev[0], 3)
    mid("decoder.mid_block", rev[0])
    prev = rev[0]
    for i, c in enumerate(rev):
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", prev, c)
            prev = c
        if i < len(rev) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3)
    norm("decoder.conv_norm_out", rev[-1])
    conv("decoder.conv_out", rev[-1], cout, 3)
    return s


def random_state_dict(config, seed=0) -> dict:
    """A diffusers-named state_dict of random float32 weights scaled to keep activations
    O(1) (so that a wrong layout shows up as a large error)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in reference_shapes(
        config.block_out_channels, config.layers_per_block, config.latent_channels
    ).items():
        if len(shape) > 1:
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0, 1 / np.sqrt(fan_in), shape)
        elif key.endswith(".weight"):  # GroupNorm scale
            value = 1 + 0.2 * rng.normal(size=shape)
        else:
            value = 0.2 * rng.normal(size=shape)
        out[key] = value.astype(np.float32)
    return out


def old_diffusers_form(sd: dict) -> dict:
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, value in sd.items():
        for new, old in names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        out[key] = value
    return out


def ldm_form(sd: dict, levels: int) -> dict:
    """CompVis names: down/up/block/nin_shortcut/mid.block_{1,2}/attn_1 as 1x1 convs, up
    levels numbered from the lowest resolution."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in sd.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        new = new.replace("downsamplers.0.conv", "downsample.conv")
        new = new.replace("upsamplers.0.conv", "upsample.conv")
        new = new.replace("mid_block.resnets.0.", "mid.block_1.")
        new = new.replace("mid_block.resnets.1.", "mid.block_2.")
        for ours, theirs in attn.items():
            if f"mid_block.attentions.0.{ours}." in new:
                new = new.replace(f"mid_block.attentions.0.{ours}.", f"mid.attn_1.{theirs}.")
                if theirs != "norm" and new.endswith(".weight"):
                    value = value[:, :, None, None]
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"^encoder\.down_blocks\.", "encoder.down.", new)
        m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsample)\.(.*)$", new)
        if m:
            level = levels - 1 - int(m[1])
            new = f"decoder.up.{level}.{'block' if m[2] == 'resnets' else 'upsample'}.{m[3]}"
        out[new] = value
    return out


def reference_forward(sd: dict, config, images: np.ndarray, latents: np.ndarray):
    """(moments, decoded images) of the reference computation in float64 numpy, NCHW as the
    reference runs it (cross-correlation convs, group norm, nearest upsampling)."""
    w = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    groups, eps = config.norm_num_groups, 1e-6

    def conv(name, x, padding=1, stride=1):
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
        kernel = w[f"{name}.weight"]  # (out, in, kh, kw)
        windows = np.lib.stride_tricks.sliding_window_view(x, kernel.shape[2:], axis=(2, 3))
        windows = windows[:, :, ::stride, ::stride]  # (b, in, h, w, kh, kw)
        out = np.einsum("bihwyx,oiyx->bohw", windows, kernel)
        return out + w[f"{name}.bias"][None, :, None, None]

    def gn(name, x):
        b, c, hh, ww = x.shape
        g = x.reshape(b, groups, -1)
        g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
        g = g.reshape(b, c, hh, ww)
        return g * w[f"{name}.weight"][None, :, None, None] + w[f"{name}.bias"][None, :, None, None]

    def silu(x):
        return x / (1 + np.exp(-x))

    def resnet(name, x):
        h = conv(f"{name}.conv1", silu(gn(f"{name}.norm1", x)))
        h = conv(f"{name}.conv2", silu(gn(f"{name}.norm2", h)))
        if f"{name}.conv_shortcut.weight" in w:
            x = conv(f"{name}.conv_shortcut", x, padding=0)
        return x + h

    def attention(name, x):
        b, c, hh, ww = x.shape
        t = gn(f"{name}.group_norm", x).reshape(b, c, hh * ww).transpose(0, 2, 1)
        lin = lambda n, a: a @ w[f"{name}.{n}.weight"].T + w[f"{name}.{n}.bias"]
        q, k, v = lin("to_q", t), lin("to_k", t), lin("to_v", t)
        logits = q @ k.transpose(0, 2, 1) / c**0.5
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return x + lin("to_out.0", p @ v).transpose(0, 2, 1).reshape(b, c, hh, ww)

    def mid(name, x):
        x = resnet(f"{name}.resnets.0", x)
        x = attention(f"{name}.attentions.0", x)
        return resnet(f"{name}.resnets.1", x)

    levels = len(config.block_out_channels)
    x = np.asarray(images, np.float64).transpose(0, 3, 1, 2)
    h = conv("encoder.conv_in", x)
    for i in range(levels):
        for j in range(config.layers_per_block):
            h = resnet(f"encoder.down_blocks.{i}.resnets.{j}", h)
        if i < levels - 1:
            h = np.pad(h, ((0, 0), (0, 0), (0, 1), (0, 1)))  # asymmetric, as the reference
            h = conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", h, padding=0, stride=2)
    h = mid("encoder.mid_block", h)
    h = conv("encoder.conv_out", silu(gn("encoder.conv_norm_out", h)))
    moments = conv("quant_conv", h, padding=0)

    z = np.asarray(latents, np.float64).transpose(0, 3, 1, 2)
    h = conv("decoder.conv_in", conv("post_quant_conv", z, padding=0))
    h = mid("decoder.mid_block", h)
    for i in range(levels):
        for j in range(config.layers_per_block + 1):
            h = resnet(f"decoder.up_blocks.{i}.resnets.{j}", h)
        if i < levels - 1:
            h = h.repeat(2, axis=2).repeat(2, axis=3)  # nearest
            h = conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", h)
    out = conv("decoder.conv_out", silu(gn("decoder.conv_norm_out", h)))
    nhwc = lambda t: t.transpose(0, 2, 3, 1)
    return nhwc(moments), nhwc(out)


def flat(params) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(params)}


def assert_same_params(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def close(ours, ref, rtol=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert err < rtol, f"max error {err:.3g} relative to max |ref|"


@pytest.fixture(scope="module")
def tiny():
    """(diffusers state_dict, converted params, model) of TINY."""
    sd = random_state_dict(TINY)
    config, params = convert_vae.state_dict_to_params(sd, norm_num_groups=8)
    assert config == TINY
    return sd, params, vae.from_params(config, params)


@pytest.fixture(scope="module")
def one_device(tiny):
    """(images, latents, moments, decoded) of TINY on the default device (jitted)."""
    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32)
    latents = rng.normal(size=(8, 4, 4, 4)).astype(np.float32)
    single = vae.ShardedVAE(tiny[2])
    return images, latents, np.asarray(single.encode(images)), np.asarray(single.decode(latents))


# ---------------------------------------------------------------------------------- tests


def test_default_config_parameter_count_and_names():
    config = vae.VAEConfig()
    assert vae.param_count(config) == 83_653_863
    assert vae.param_count(config, "encoder") == 34_163_592  # 34.2M
    assert vae.param_count(config, "decoder") == 49_490_179  # 49.5M
    ref = reference_shapes(config.block_out_channels, config.layers_per_block)
    assert len(ref) == 248 and sum(int(np.prod(s)) for s in ref.values()) == 83_653_863
    # every parameter maps to one reference key with the transposed shape, and back
    ours = {}
    for path, struct in jax.tree_util.tree_leaves_with_path(vae.param_shapes(config)):
        keys = tuple(p.key for p in path)
        shape = struct.shape
        ref_shape = (shape[3], shape[2], *shape[:2]) if len(shape) == 4 else shape[::-1]
        ours[convert_vae.reference_name(keys)] = ref_shape
    assert ours == ref
    # the full model traces at 256px: (1, 32, 32, 8) moments, (1, 256, 256, 3) images
    graphdef, state = nnx.split(vae.abstract_model(config))
    moments = jax.eval_shape(lambda s, x: vae.encode(graphdef, s, x), state,
                             jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
    assert moments.shape == (1, 32, 32, 8) and moments.dtype == jnp.float32
    images = jax.eval_shape(lambda s, z: vae.decode_latents(graphdef, s, z), state,
                            jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32))
    assert images.shape == (1, 256, 256, 3)


def test_tiny_shapes_scaling_and_posterior():
    config = vae.VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1,
                           norm_num_groups=4)
    assert config.downsample_factor == 4
    rng = np.random.default_rng(0)  # (an eager random init would compile op by op: slow)
    model = vae.from_params(config, jax.tree.map(
        lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), vae.param_shapes(config)))
    graphdef, params = nnx.split(model)
    x = jax.random.uniform(jax.random.key(1), (2, 16, 12, 3), minval=-1, maxval=1)
    key = jax.random.key(2)

    @jax.jit
    def run(params, x, key):
        m = nnx.merge(graphdef, params)
        z = m.encode_to_latents(x, key)
        return m.encode(x), z, m.decode_latents(z), m.decode(z / 0.18215)

    moments, z, images, decoded = run(params, x, key)
    assert moments.shape == (2, 4, 3, 8) and moments.dtype == jnp.float32
    post = vae.DiagonalGaussian.from_moments(moments)
    noise = jax.random.normal(key, post.mean.shape)
    np.testing.assert_allclose(z, (post.mean + post.std * noise) * 0.18215, rtol=1e-5,
                               atol=1e-6)
    assert images.shape == (2, 16, 12, 3) and images.dtype == jnp.float32
    np.testing.assert_allclose(images, decoded, rtol=1e-5, atol=1e-6)
    # posterior: logvar clipped to [-30, 20]; std = exp(logvar / 2)
    logvar = jnp.array([-100.0, 0.0, 100.0]).reshape(1, 1, 1, 3)
    post = vae.DiagonalGaussian.from_moments(jnp.concatenate([logvar * 0, logvar], axis=-1))
    np.testing.assert_array_equal(post.logvar.ravel(), [-30.0, 0.0, 20.0])
    np.testing.assert_allclose(post.std.ravel(), np.exp([-15.0, 0.0, 10.0]), rtol=1e-6)
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(jnp.zeros((1, 10, 12, 3)))
    with pytest.raises(ValueError, match="4 channels"):
        model.decode(jnp.zeros((1, 4, 4, 8)))
    # bfloat16 compute: float32 outputs near the float32 model
    bf16 = vae.from_params(vae.VAEConfig(**{**config.to_dict(), "dtype": "bfloat16"}),
                           nnx.to_pure_dict(params))
    out = vae.ShardedVAE(bf16).encode(x)
    assert out.dtype == jnp.float32
    close(out, moments, rtol=5e-2)


def test_matches_an_independent_numpy_reference(tiny, one_device):
    images, latents, moments, decoded = one_device
    ref_moments, ref_images = reference_forward(tiny[0], TINY, images, latents)
    close(moments, ref_moments)
    close(decoded, ref_images)


def test_converter_accepts_all_naming_forms(tiny):
    sd, params, _ = tiny
    levels = len(TINY.block_out_channels)
    old = old_diffusers_form(sd)
    assert any(".attentions.0.proj_attn." in k for k in old)
    ldm = ldm_form(sd, levels)
    assert "decoder.up.0.block.1.conv1.weight" in ldm  # lowest resolution = diffusers' last
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    assert "encoder.down.1.block.0.nin_shortcut.weight" in ldm
    loss = {"loss.discriminator.main.0.weight": np.zeros((64, 3, 4, 4), np.float32),
            "loss.logvar": np.zeros((), np.float32)}
    full = {"state_dict": {
        **{f"first_stage_model.{k}": v for k, v in ldm.items()},
        **{f"first_stage_model.{k}": v for k, v in loss.items()},
        "model.diffusion_model.input_blocks.0.0.weight": np.zeros((3, 3), np.float32),
        "cond_stage_model.transformer.x": np.zeros((2,), np.float32),
    }}
    for form in (old, ldm, {**ldm, **loss}, {**sd, **loss}, full):
        config, converted = convert_vae.state_dict_to_params(form, norm_num_groups=8)
        assert config == TINY
        assert_same_params(converted, params)
    assert convert_vae.normalize_names(ldm)[2] == "ldm"
    assert convert_vae.normalize_names(old)[2] == "diffusers-old"


def test_converter_errors(tiny):
    sd, _, _ = tiny
    missing = {k: v for k, v in sd.items() if k != "decoder.conv_in.bias"}
    with pytest.raises(ValueError, match=r"missing keys: decoder\.conv_in\.bias"):
        convert_vae.state_dict_to_params(missing, TINY)
    with pytest.raises(ValueError, match=r"unexpected keys: encoder\.extra\.weight"):
        convert_vae.state_dict_to_params({**sd, "encoder.extra.weight": np.zeros(1)}, TINY)
    bad = dict(sd)
    bad["encoder.mid_block.attentions.0.to_k.weight"] = np.zeros((32, 16), np.float32)
    with pytest.raises(ValueError, match=r"shape mismatch at encoder\.mid_block\.attentions\.0"
                                         r"\.to_k\.weight: the checkpoint has \(32, 16\).*"
                                         r"expects \(32, 32\)"):
        convert_vae.state_dict_to_params(bad, TINY)
    # LDM form: the error names the file's key
    ldm = ldm_form(sd, 2)
    ldm["decoder.up.0.block.0.conv1.weight"] = np.zeros((16, 16, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"decoder\.up\.0\.block\.0\.conv1\.weight \(= decoder"
                                         r"\.up_blocks\.1\.resnets\.0\.conv1\.weight\).*"
                                         r"\(16, 16, 3, 3\).*\(16, 32, 3, 3\)"):
        convert_vae.state_dict_to_params(ldm, TINY)
    with pytest.raises(ValueError, match="not a KL VAE"):
        convert_vae.state_dict_to_params({"pos_embed": np.zeros((1, 4, 8))})


def test_cli_writes_refuses_overwrite_and_loads(tmp_path, capsys):
    config = vae.VAEConfig(block_out_channels=(32, 64), layers_per_block=1)  # 32 groups
    sd = random_state_dict(config, seed=5)
    src = tmp_path / "vae.npz"
    np.savez(src, **ldm_form(sd, 2))
    dst = tmp_path / "out"
    assert convert_main(["vae", "--src", str(src), "--dst", str(dst), "--dtype",
                         "bfloat16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(os.listdir(dst)) == ["config.json", "params.npz"]
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    model = vae.load(str(dst))
    assert model.config == vae.VAEConfig(**{**config.to_dict(), "dtype": "bfloat16"})
    _, want = convert_vae.state_dict_to_params(sd, config)
    assert_same_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), want)
    assert vae.load(str(dst), dtype="float32").config == config
    before = (dst / "params.npz").read_bytes()
    assert convert_main(["vae", "--src", str(src), "--dst", str(dst)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (dst / "params.npz").read_bytes() == before
    with pytest.raises(ValueError, match="refusing to overwrite"):
        convert_vae.write_vae_dir(str(dst), config, want)
    assert convert_main(["vae", "--src", str(src), "--dst", str(tmp_path / "o2"),
                         "--fuse"]) == 2
    assert "--fuse does not apply" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty directory may be the destination
    convert_vae.write_vae_dir(str(empty), config, want)
    assert vae.load(str(empty)).config == config
    with pytest.raises(FileNotFoundError, match="not a converted VAE directory"):
        vae.load(str(tmp_path))


def test_cli_reads_ldm_ckpt_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    sd = random_state_dict(vae.VAEConfig(block_out_channels=(32, 32), layers_per_block=1))
    ckpt = {"state_dict": {f"first_stage_model.{k}": torch.from_numpy(v)
                           for k, v in ldm_form(sd, 2).items()},
            "global_step": 7}
    ckpt["state_dict"]["model.diffusion_model.out.2.weight"] = torch.zeros(4, 4)
    src = tmp_path / "sd.ckpt"
    torch.save(ckpt, src)
    loaded = convert_vae.load_state_dict(str(src))
    assert loaded.keys() == ldm_form(sd, 2).keys()
    assert convert_main(["vae", "--src", str(src), "--dst", str(tmp_path / "out")]) == 0


def test_sharded_matches_one_device(tiny, one_device):
    images, latents, moments, decoded = one_device
    mesh = parallel.make_mesh((2, 4, 1))  # batch over data x fsdp = 8 shards
    sharded = vae.ShardedVAE(tiny[2], mesh)
    got = sharded.encode(images)
    assert got.sharding.spec == parallel.batch_sharding(mesh).spec
    close(got, moments, rtol=1e-5)
    close(sharded.decode(latents), decoded, rtol=1e-5)
    # a batch that is not a multiple of the 8 shards is padded (same compiled shape) and cut
    part = sharded.decode(latents[:5])
    assert part.shape == (5, 8, 8, 3)
    close(part, decoded[:5], rtol=1e-5)
    key = jax.random.key(0)
    post = vae.DiagonalGaussian.from_moments(jnp.asarray(moments))
    want = (post.mean + post.std * jax.random.normal(key, post.mean.shape)) * 0.18215
    close(sharded.encode_to_latents(images, key), want, rtol=1e-5)
