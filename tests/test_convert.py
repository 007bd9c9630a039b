"""Reference checkpoint conversion (dydit_jax.convert): names, shapes, layouts, numerics,
workdir output and the CLI. CPU only, no torch: reference state_dicts are built here with
numpy, by an inverse mapping written independently of the converter."""

import json
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dydit_jax import config_lib, convert, sample_lib
from dydit_jax.checkpoint import read_meta
from dydit_jax.models import create_model, layers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"depth": 2, "hidden_size": 64, "num_heads": 4}  # with arch "{DiT,DyDiT}-S/4"
INPUT, CLASSES = 16, 10


def random_params(model, seed=0):
    """The model's parameter tree with every entry random (adaLN and the output layer are
    zero at init, which would make a forward comparison vacuous)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [rng.normal(0, 0.2, x.shape).astype(np.float32) for x in leaves]
    return jax.tree.unflatten(treedef, leaves)


def to_reference(params, grid, hidden):
    """Our params -> the reference state_dict (names and (out, in) / OIHW shapes)."""
    lin = lambda node, name: {f"{name}.weight": node["kernel"].T, f"{name}.bias": node["bias"]}
    sd = {"pos_embed": layers.sincos_2d(hidden, grid)[None].astype(np.float32)}
    sd["x_embedder.proj.weight"] = params["x_embedder"]["proj"]["kernel"].transpose(3, 2, 0, 1)
    sd["x_embedder.proj.bias"] = params["x_embedder"]["proj"]["bias"]
    sd |= lin(params["t_embedder"]["fc1"], "t_embedder.mlp.0")
    sd |= lin(params["t_embedder"]["fc2"], "t_embedder.mlp.2")
    sd["y_embedder.embedding_table.weight"] = params["y_embedder"]["table"]["embedding"]
    for i, block in params["blocks"].items():
        b = f"blocks.{i}."
        sd |= lin(block["attn"]["qkv"], b + "attn.qkv")
        sd |= lin(block["attn"]["proj"], b + "attn.proj")
        sd |= lin(block["mlp"]["fc1"], b + "mlp.fc1")
        sd |= lin(block["mlp"]["fc2"], b + "mlp.fc2")
        sd |= lin(block["adaLN"]["linear"], b + "adaLN_modulation.1")
        if "attn_rate" in block:
            sd |= lin(block["attn_rate"], b + "attn_rate.router")
            sd |= lin(block["mlp_rate"], b + "mlp_rate.router")
            sd |= lin(block["token_fc1"], b + "token_selection.mlp_head.0")
            sd |= lin(block["token_fc2"], b + "token_selection.mlp_head.2")
    sd |= lin(params["final_layer"]["adaLN"]["linear"], "final_layer.adaLN_modulation.1")
    sd |= lin(params["final_layer"]["linear"], "final_layer.linear")
    return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def tiny(kind, **overrides):
    """(our model with random params, its params, the reference state_dict, arch)."""
    arch = {"dit": "DiT-S/4", "dydit": "DyDiT-S/4"}[kind]
    model = create_model(
        arch, input_size=INPUT, in_channels=4, num_classes=CLASSES, rngs=nnx.Rngs(0),
        **TINY, **overrides,
    )
    params = random_params(model)
    nnx.update(model, params)
    sd = to_reference(params, model.config.grid, model.config.hidden_size)
    return model, params, sd, arch


def reference_shapes(kind, size, patch, latent, classes=1000, router_logits=None):
    """Shapes only (no memory) of a reference checkpoint, from the layout in docs/dit.md."""
    depth, d, heads = {"S": (12, 384, 6), "B": (12, 768, 12), "XL": (28, 1152, 16)}[size]
    n = (latent // patch) ** 2
    s = {
        "pos_embed": (1, n, d), "x_embedder.proj.weight": (d, 4, patch, patch),
        "x_embedder.proj.bias": (d,), "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.2.weight": (d, d), "y_embedder.embedding_table.weight": (classes + 1, d),
        "final_layer.linear.weight": (patch * patch * 8, d),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
    }
    for i in range(depth):
        s |= {
            f"blocks.{i}.attn.qkv.weight": (3 * d, d), f"blocks.{i}.attn.proj.weight": (d, d),
            f"blocks.{i}.mlp.fc1.weight": (4 * d, d),
            f"blocks.{i}.mlp.fc2.weight": (d, 4 * d),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d),
        }
        if kind == "dydit":
            k = heads if router_logits is None else router_logits
            s |= {
                f"blocks.{i}.attn_rate.router.weight": (k, d),
                f"blocks.{i}.mlp_rate.router.weight": (k, d),
                f"blocks.{i}.token_selection.mlp_head.0.weight": (d // 16, d),
                f"blocks.{i}.token_selection.mlp_head.2.weight": (1, d // 16),
            }
    for key, shape in list(s.items()):  # every linear and the conv have a bias
        if key.endswith(".weight") and "embedding_table" not in key:
            s[key[: -len("weight")] + "bias"] = (shape[0],)
    return s


def inputs(seed=1):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, INPUT, INPUT, 4)), jnp.float32)
    return x, jnp.array([3, 999]), jnp.array([1, CLASSES])


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------------- DiT


def test_dit_conversion_reproduces_params_and_forward():
    model, params, sd, arch = tiny("dit")
    config, converted = convert.state_dict_to_params("dit", sd, arch, overrides=TINY)
    assert config == model.config
    assert_trees_equal(converted, params)
    loaded = convert.merge_params(config, converted)
    np.testing.assert_allclose(loaded(*inputs()), model(*inputs()), rtol=1e-6, atol=1e-6)


def test_pos_embed_with_swapped_axes_is_refused():
    model, _, sd, arch = tiny("dit")
    grid, d = model.config.grid, model.config.hidden_size
    hh, ww = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    swapped = np.concatenate([layers.sincos_1d(d // 2, hh), layers.sincos_1d(d // 2, ww)], 1)
    with pytest.raises(ValueError, match="pos_embed differs"):
        convert.state_dict_to_params(
            "dit", sd | {"pos_embed": swapped[None].astype(np.float32)}, arch, overrides=TINY
        )
    # float32 rounding of the reference table is within tolerance
    convert.check_pos_embed(sd["pos_embed"].astype(np.float32), d, grid)


# ------------------------------------------------------------------------------- DyDiT


@pytest.mark.parametrize("layout", ["all", "first_on"])
def test_dydit_router_layout_detected_and_values_placed(layout):
    model, params, sd, arch = tiny("dydit", router_layout=layout)
    k = sd["blocks.0.attn_rate.router.weight"].shape[0]
    assert k == (4 if layout == "all" else 3)
    config, converted = convert.state_dict_to_params("dydit", sd, arch, overrides=TINY)
    assert config.router_layout == layout and config == model.config
    block = converted["blocks"][1]
    np.testing.assert_array_equal(block["attn_rate"]["bias"], sd["blocks.1.attn_rate.router.bias"])
    np.testing.assert_array_equal(
        block["mlp_rate"]["kernel"], sd["blocks.1.mlp_rate.router.weight"].T
    )
    np.testing.assert_array_equal(
        block["token_fc2"]["kernel"], sd["blocks.1.token_selection.mlp_head.2.weight"].T
    )
    assert_trees_equal(converted, params)
    loaded = convert.merge_params(config, converted)
    out, masks = loaded(*inputs(), return_masks=True)
    ref_out, ref_masks = model(*inputs(), return_masks=True)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-6)
    assert_trees_equal(masks, ref_masks)


def test_router_size_fitting_no_layout_is_refused():
    shapes = reference_shapes("dydit", "S", 2, 32, router_logits=4)
    with pytest.raises(ValueError, match="fits neither layout"):
        convert.infer_config("dydit", shapes)


# ---------------------------------------------------------------------- arch inference


@pytest.mark.parametrize(
    "kind,size,patch,latent,k,name,layout",
    [
        ("dit", "S", 8, 32, None, "DiT-S/8", None),
        ("dit", "XL", 2, 32, None, "DiT-XL/2", None),
        ("dit", "XL", 2, 64, None, "DiT-XL/2", None),
        ("dydit", "XL", 2, 32, 16, "DyDiT-XL/2", "all"),
        ("dydit", "XL", 2, 32, 15, "DyDiT-XL/2", "first_on"),
        ("dydit", "B", 4, 32, 11, "DyDiT-B/4", "first_on"),
    ],
)
def test_arch_inferred_from_shapes(kind, size, patch, latent, k, name, layout):
    shapes = reference_shapes(kind, size, patch, latent, router_logits=k)
    if (kind, size) == ("dit", "XL"):
        assert len(shapes) == 292  # docs/dit.md
    got, config = convert.infer_config(kind, shapes)
    assert got == name
    assert (config.input_size, config.patch_size, config.in_channels) == (latent, patch, 4)
    assert config.num_classes == 1000 and config.learn_sigma
    if layout:
        assert config.router_layout == layout


def test_non_registry_size_needs_arch():
    _, _, sd, _ = tiny("dit")
    with pytest.raises(ValueError, match="no registry size has depth 2 and width 64"):
        convert.state_dict_to_params("dit", sd)


# -------------------------------------------------------------------------- mismatches


def test_shape_mismatch_names_key_and_both_shapes():
    _, _, sd, arch = tiny("dit")
    bad = sd | {"blocks.1.attn.proj.weight": np.zeros((64, 32), np.float32)}
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.proj\.weight.*\(64, 32\).*\(64, 64\)"):
        convert.state_dict_to_params("dit", bad, arch, overrides=TINY)


def test_missing_and_unexpected_keys_are_listed():
    _, _, sd, arch = tiny("dit")
    bad = {k: v for k, v in sd.items() if k != "blocks.0.mlp.fc2.bias"}
    bad["blocks.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as err:
        convert.state_dict_to_params("dit", bad, arch, overrides=TINY)
    msg = str(err.value)
    assert "missing keys: blocks.0.mlp.fc2.bias (1)" in msg
    assert "unexpected keys: blocks.0.extra.weight (1)" in msg


def test_dydit_file_as_dit_hints_at_kind():
    _, _, sd, _ = tiny("dydit")
    with pytest.raises(ValueError, match="use kind 'dydit'"):
        convert.state_dict_to_params("dit", sd, "DiT-S/4", overrides=TINY)


def test_ema_of_trainer_file_is_taken():
    _, params, sd, arch = tiny("dit")
    junk = {k: np.zeros_like(v) for k, v in sd.items()}
    wrapped = {"model": junk, "ema": sd, "opt": {"state": {}}, "args": None}
    _, converted = convert.state_dict_to_params("dit", wrapped, arch, overrides=TINY)
    assert_trees_equal(converted, params)
    _, converted = convert.state_dict_to_params("dit", {"model": sd}, arch, overrides=TINY)
    assert_trees_equal(converted, params)


# ------------------------------------------------------------------------ file formats


def write_safetensors(path, arrays):
    """The safetensors format: u64 header length, JSON header, little-endian raw data."""
    header, blobs, offset = {}, [], 0
    for name, a in arrays.items():
        raw = np.ascontiguousarray(a, "<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_safetensors_and_npz_files_load(tmp_path):
    _, _, sd, _ = tiny("dit")
    write_safetensors(tmp_path / "w.safetensors", sd)
    np.savez(tmp_path / "w.npz", **sd)
    for name in ("w.safetensors", "w.npz"):
        loaded = convert.load_state_dict(str(tmp_path / name))
        assert sorted(loaded) == sorted(sd)
        for key in sd:
            np.testing.assert_array_equal(loaded[key], sd[key])
            assert loaded[key].dtype == np.float32
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        (tmp_path / "w.bad").write_bytes(b"")
        convert.load_state_dict(str(tmp_path / "w.bad"))


def test_pt_file_without_torch_is_a_clear_error(tmp_path):
    try:
        import torch  # noqa: F401

        pytest.skip("torch is installed")
    except ImportError:
        pass
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(ImportError, match=r"pip install torch \(CPU\) to read .pt files"):
        convert.load_state_dict(str(tmp_path / "w.pt"))


def test_pt_files_as_the_reference_trainer_writes_them(tmp_path):
    """torch.save of the reference trainer's dict ({"model", "ema", "opt", "args"}, bf16 and
    fp32 tensors) converts to the same parameters (skipped where torch is not installed)."""
    torch = pytest.importorskip("torch")
    import argparse

    _, params, sd, arch = tiny("dydit")
    ema = {k: torch.from_numpy(v) for k, v in sd.items()}
    junk = {k: torch.zeros_like(v) for k, v in ema.items()}
    torch.save({"model": junk, "ema": ema, "opt": {}, "args": argparse.Namespace(a=1)},
               tmp_path / "ckpt.pt")
    loaded = convert.load_state_dict(str(tmp_path / "ckpt.pt"))
    _, converted = convert.state_dict_to_params("dydit", loaded, arch, overrides=TINY)
    assert_trees_equal(converted, params)
    torch.save({k: v.to(torch.bfloat16) for k, v in ema.items()}, tmp_path / "bf16.pt")
    half = convert.load_state_dict(str(tmp_path / "bf16.pt"))
    assert half["blocks.0.attn.qkv.weight"].dtype == np.float32
    np.testing.assert_allclose(half["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"],
                               rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------- workdir


def test_write_workdir_then_sample(tmp_path):
    model, _, sd, arch = tiny("dydit", router_layout="all")
    config, params = convert.state_dict_to_params("dydit", sd, arch, overrides=TINY)
    dst = str(tmp_path / "run")
    convert.write_workdir(
        dst, config, params, model_name=arch, image_size=INPUT, num_classes=CLASSES
    )
    _, meta = read_meta(dst)
    assert meta["model"] == arch and meta["step"] == 0
    assert meta["config"]["model_overrides"] == TINY | {"router_layout": "all"}
    assert config_lib.validate_config(ml_collections.ConfigDict(meta["config"])) == config
    out = str(tmp_path / "out")
    sample_lib.sample_from_workdir(
        dst, out, num_samples=2, sampling_steps="2", cfg_scale=1.0, progress=False
    )
    with np.load(os.path.join(out, "samples.npz")) as f:
        assert f["arr_0"].shape == (2, INPUT, INPUT, 4) and f["arr_0"].dtype == np.uint8
    with pytest.raises(ValueError, match="refusing to overwrite"):
        convert.write_workdir(
            dst, config, params, model_name=arch, image_size=INPUT, num_classes=CLASSES
        )


# --------------------------------------------------------------------------------- CLI


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "dydit_jax.convert", *args],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
    )


def test_cli_errors_exit_2_and_write_nothing(tmp_path):
    dst = tmp_path / "dst"
    proc = run_cli("dit", "--src", str(tmp_path / "nope.pt"), "--dst", str(dst))
    assert proc.returncode == 2 and "error:" in proc.stderr and "nope.pt" in proc.stderr
    assert not dst.exists()
    proc = run_cli("unet", "--src", str(tmp_path / "nope.pt"), "--dst", str(dst))
    assert proc.returncode == 2 and "error:" in proc.stderr and not dst.exists()
    _, _, sd, _ = tiny("dit")  # a non-registry size: the error says so, nothing written
    np.savez(tmp_path / "tiny.npz", **sd)
    proc = run_cli("dit", "--src", str(tmp_path / "tiny.npz"), "--dst", str(dst))
    assert proc.returncode == 2 and "error: no registry size" in proc.stderr
    assert not dst.exists()


def test_cli_converts_a_registry_model(tmp_path):
    """DiT-S/8 on an 8x8 latent (one token): a real registry size, inferred from shapes."""
    shapes = reference_shapes("dit", "S", 8, 8, classes=10)
    rng = np.random.default_rng(0)
    sd = {k: rng.normal(0, 0.02, s).astype(np.float32) for k, s in shapes.items()}
    sd["pos_embed"] = layers.sincos_2d(384, 1)[None].astype(np.float32)
    src = tmp_path / "s8.safetensors"
    write_safetensors(src, sd)
    dst = tmp_path / "run"
    proc = run_cli("dit", "--src", str(src), "--dst", str(dst))
    assert proc.returncode == 0, proc.stderr
    assert "DiT-S/8" in proc.stdout
    _, meta = read_meta(str(dst))
    assert meta["model"] == "DiT-S/8" and meta["model_config"]["input_size"] == 8
    assert meta["config"]["model_overrides"] == {}
    proc = run_cli("dit", "--src", str(src), "--dst", str(dst))  # no overwrite
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr


# ------------------------------------------- independent numpy forward of the reference layout


def np_pos_embed(d, grid):
    """docs/dit.md: the column coordinate fills the first half; [sin, cos]; float64."""
    omega = 1.0 / 10000 ** (np.arange(d // 4, dtype=np.float64) / (d / 4))
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    half = lambda pos: np.concatenate([np.sin(np.outer(pos, omega)),
                                       np.cos(np.outer(pos, omega))], axis=1)
    return np.concatenate([half(cols.ravel()), half(rows.ravel())], axis=1)[None]


def np_reference_forward(sd, x, t, y, heads, patch):
    """The reference DiT (one block) in float64 numpy, NCHW in, NCHW out."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    lin = lambda h, name: h @ sd[name + ".weight"].T + sd[name + ".bias"]
    silu = lambda h: h / (1 + np.exp(-h))
    ln = lambda h: (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
    gelu = lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    b, c_in, size, _ = x.shape
    g, d = size // patch, sd["pos_embed"].shape[-1]
    w = sd["x_embedder.proj.weight"].reshape(d, -1)  # (D, C p p), patches (C, p, p)
    patches = x.reshape(b, c_in, g, patch, g, patch).transpose(0, 2, 4, 1, 3, 5)
    tokens = patches.reshape(b, g * g, -1) @ w.T + sd["x_embedder.proj.bias"]
    tokens = tokens + sd["pos_embed"]
    freqs = np.exp(-np.log(10000) * np.arange(128) / 128)
    args = t[:, None].astype(np.float64) * freqs
    temb = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    temb = lin(silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    mods = np.split(lin(silu(c), "blocks.0.adaLN_modulation.1"), 6, axis=1)
    modulate = lambda h, shift, scale: ln(h) * (1 + scale[:, None]) + shift[:, None]
    h = modulate(tokens, mods[0], mods[1])
    qkv = lin(h, "blocks.0.attn.qkv").reshape(b, g * g, 3, heads, d // heads)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    logits = q @ k.transpose(0, 1, 3, 2) * (d // heads) ** -0.5
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn = attn / attn.sum(-1, keepdims=True)
    out = (attn @ v).transpose(0, 2, 1, 3).reshape(b, g * g, d)
    tokens = tokens + mods[2][:, None] * lin(out, "blocks.0.attn.proj")
    h = modulate(tokens, mods[3], mods[4])
    mlp = lin(gelu(lin(h, "blocks.0.mlp.fc1")), "blocks.0.mlp.fc2")
    tokens = tokens + mods[5][:, None] * mlp
    shift, scale = np.split(lin(silu(c), "final_layer.adaLN_modulation.1"), 2, axis=1)
    out = lin(modulate(tokens, shift, scale), "final_layer.linear")  # (B, N, p p C_out)
    out = out.reshape(b, g, g, patch, patch, -1).transpose(0, 5, 1, 3, 2, 4)
    return out.reshape(b, -1, g * patch, g * patch)


@pytest.mark.parametrize("size,latent", [("S", 32), ("S", 64), ("XL", 32), ("XL", 64)])
def test_converted_dit_matches_an_independent_numpy_forward(size, latent):
    # The reference layout of DiT-{S,XL}/2 at 256 and 512 px, cut to its first block (the
    # widths, heads, patch and token grid of the real model; one block keeps it small).
    shapes = reference_shapes("dit", size, 2, latent)
    rng = np.random.default_rng(0)
    sd = {k: (rng.normal(0, 1 / np.sqrt(s[-1] if len(s) > 1 else 1), s) if len(s) > 1
              else rng.normal(0, 0.1, s)).astype(np.float32)
          for k, s in shapes.items() if not k.startswith("blocks.") or k.startswith("blocks.0.")}
    d = shapes["pos_embed"][-1]
    sd["pos_embed"] = np_pos_embed(d, latent // 2).astype(np.float32)
    heads = {"S": 6, "XL": 16}[size]
    config, params = convert.state_dict_to_params(
        "dit", sd, f"DiT-{size}/2", overrides={"depth": 1}
    )
    assert (config.hidden_size, config.num_heads, config.input_size) == (d, heads, latent)
    model = convert.merge_params(config, params)
    np.testing.assert_allclose(model.pos_embed[...], sd["pos_embed"], atol=1e-6)
    x = rng.normal(size=(2, 4, latent, latent)).astype(np.float32)
    t, y = np.array([3, 999]), np.array([1, 1000])
    want = np_reference_forward(sd, x, t, y, heads, 2)
    got = np.asarray(jax.jit(lambda *a: model(*a))(
        jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(y)
    )).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
