"""Convert reference PyTorch checkpoints (DiT, DyDiT, U-DiT) into this project's parameters.

The reference state_dict layout is in specs/DIT.md ("Checkpoint layout") and specs/DYDIT.md
(router keys). Linear weights are (out, in) and become kernels (in, out); the patch conv is
OIHW and becomes HWIO; the fixed sin-cos `pos_embed` is not a parameter here but is checked
against ours (a different axis order would silently scramble positions).

    config, params = state_dict_to_params("dit", load_state_dict("DiT-XL-2-256x256.pt"))
    model = load_reference("dydit", "new_dydit0.7.pt")        # a ready NNX model
    write_workdir("runs/dit_xl", config, params, model_name="DiT-XL/2", image_size=32,
                  num_classes=1000)                           # for sample.py / init_from

U-DiT (kind "udit", specs/UDIT.md) has its own name map and layouts in `convert/udit.py`;
the functions here dispatch to it.

Everything here runs on numpy; torch is only imported to read `.pt`/`.pth` files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from dydit_jax.models import dit as dit_lib
from dydit_jax.models import layers, model_class, model_config
from dydit_jax.models.udit import UDiT, UDiTConfig

KINDS = {"dit": "DiT", "dydit": "DyDiT", "udit": "U-DiT"}
POS_EMBED_TOL = 1e-6

# our parameter path prefix -> reference module name ({i} = block index)
_RENAMES = (
    (("x_embedder", "proj"), "x_embedder.proj"),
    (("t_embedder", "fc1"), "t_embedder.mlp.0"),
    (("t_embedder", "fc2"), "t_embedder.mlp.2"),
    (("y_embedder", "table"), "y_embedder.embedding_table"),
    (("attn", "qkv"), "attn.qkv"),
    (("attn", "proj"), "attn.proj"),
    (("mlp", "fc1"), "mlp.fc1"),
    (("mlp", "fc2"), "mlp.fc2"),
    (("adaLN", "linear"), "adaLN_modulation.1"),
    (("attn_rate",), "attn_rate.router"),
    (("mlp_rate",), "mlp_rate.router"),
    (("token_fc1",), "token_selection.mlp_head.0"),
    (("token_fc2",), "token_selection.mlp_head.2"),
    (("linear",), "linear"),  # final_layer.linear
)
_LEAF = {"kernel": "weight", "bias": "bias", "embedding": "weight"}


# ------------------------------------------------------------------------------ reading


def unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """The model weights of a file: "ema" of a reference trainer file ({"model", "ema",
    "opt", "args"}), else "model", else the dict itself; a DDP "module." prefix is dropped."""
    for name in ("ema", "model"):
        if isinstance(state_dict.get(name), Mapping):
            state_dict = state_dict[name]
            break
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError:
        return _read_safetensors_numpy(path)
    return load_file(path)


_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _read_safetensors_numpy(path: str) -> dict[str, np.ndarray]:
    """Minimal reader of the safetensors format (u64 header size, JSON header, raw bytes),
    used when the safetensors package is not installed."""
    not_safetensors = (
        f"{path} is not a safetensors file (an 8-byte header size, then a JSON header); "
        "check the file or save it again with safetensors"
    )
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(not_safetensors)
        (size,) = struct.unpack("<Q", head)
        if size > os.path.getsize(path) - 8:
            raise ValueError(not_safetensors)
        try:
            header = json.loads(f.read(size))
        except ValueError:  # JSON or UTF-8 decoding
            raise ValueError(not_safetensors) from None
        data = f.read()
    if not isinstance(header, dict):
        raise ValueError(not_safetensors)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info["dtype"]
        start, end = info["data_offsets"]
        raw = data[start:end]
        if dtype == "BF16":  # bfloat16 = the high half of a float32
            bits = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif dtype in _ST_DTYPES:
            array = np.frombuffer(raw, np.dtype(_ST_DTYPES[dtype]).newbyteorder("<"))
        else:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        out[name] = array.reshape(info["shape"])
    return out


def _read_torch(path: str) -> Mapping[str, Any]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"cannot read {path}: pip install torch (CPU) to read .pt files, or convert it "
            "to .safetensors"
        ) from e
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # trainer files keep argparse.Namespace args: allow just that
            import argparse

            if "Namespace" not in str(e):
                raise
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's unpickler fails with any error type on a foreign file
        raise ValueError(
            f"{path} is not a readable torch checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no details'}); check the file, or "
            "convert it to .safetensors"
        ) from e


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (bfloat16 has no numpy dtype)
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reference weights from `.safetensors`, `.pt`/`.pth` (torch, weights_only) or `.npz`,
    as float32 numpy arrays by reference name (trainer files: their "ema" weights)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        raw: Mapping[str, Any] = _read_safetensors(path)
    elif ext in (".pt", ".pth", ".bin"):
        raw = _read_torch(path)
    elif ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                raw = {k: f[k] for k in f.files}
        except (OSError, ValueError, TypeError, zipfile.BadZipFile, EOFError):
            # (a non-archive makes np.load suggest unpickling it: not what to do here)
            raise ValueError(
                f"{path} is not an .npz archive of arrays; save one with "
                "np.savez(path, **state_dict)"
            ) from None
    else:
        raise ValueError(
            f"{path}: unknown checkpoint format {ext!r}; use .safetensors, .pt/.pth or .npz"
        )
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path} holds a {type(raw).__name__}, not a state_dict")
    state = unwrap(raw)
    bad = [k for k, v in state.items() if not hasattr(v, "shape")]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad[:5]}")
    return {k: _to_numpy(v) for k, v in state.items()}


# ---------------------------------------------------------------------------- inference


def _shape(shapes: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    value = shapes.get(key)
    if value is None:
        return None
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def _need(shapes: Mapping[str, Any], key: str, ndim: int) -> tuple[int, ...]:
    shape = _shape(shapes, key)
    if shape is None:
        raise ValueError(f"missing key {key!r}: cannot infer the architecture without it")
    if len(shape) != ndim:
        raise ValueError(f"{key} has shape {shape}; expected {ndim} dimensions")
    return shape


def size_name(depth: int, hidden_size: int) -> str | None:
    """The registry size (S, B, L, XL) with this depth and width, or None."""
    for name, (d, h, _) in dit_lib.DIT_SIZES.items():
        if (d, h) == (depth, hidden_size):
            return name
    return None


def infer_arch(kind: str, shapes: Mapping[str, Any]) -> dict[str, Any]:
    """Architecture fields from a reference state_dict's shapes (values: arrays, or shape
    tuples, so that a 675M-parameter layout can be inspected without memory).

    Returns {"depth", "hidden_size", "patch_size", "in_channels", "input_size", "num_classes",
    "learn_sigma", "mlp_ratio", "size" (S/B/L/XL or None)} and for DyDiT "router_logits"
    (K) and "token_router_ratio". The router layout needs the head count: see
    `router_layout`. U-DiT: see `convert.udit.infer_arch`."""
    _check_kind(kind)
    if kind == "udit":
        from dydit_jax.convert import udit

        return udit.infer_arch(shapes)
    shapes = unwrap(shapes)
    pos = _need(shapes, "pos_embed", 3)
    tokens, hidden = pos[1], pos[2]
    conv = _need(shapes, "x_embedder.proj.weight", 4)
    patch, in_channels = conv[2], conv[1]
    grid = int(round(tokens**0.5))
    if grid * grid != tokens:
        raise ValueError(f"pos_embed has {tokens} tokens, not a square grid")
    table = _need(shapes, "y_embedder.embedding_table.weight", 2)
    blocks = {int(m[1]) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise ValueError("the state_dict has no blocks.{i}.* keys")
    depth = max(blocks) + 1
    final = _need(shapes, "final_layer.linear.weight", 2)
    out_channels = final[0] // (patch * patch)
    fields = {
        "depth": depth,
        "hidden_size": hidden,
        "patch_size": patch,
        "in_channels": in_channels,
        "input_size": grid * patch,
        "num_classes": table[0] - 1,
        "learn_sigma": out_channels == 2 * in_channels,
        "mlp_ratio": 4.0,
        "size": size_name(depth, hidden),
    }
    fc1 = _shape(shapes, "blocks.0.mlp.fc1.weight")
    if fc1 is not None and len(fc1) == 2:
        fields["mlp_ratio"] = fc1[0] / hidden
    if kind == "dydit":
        router = _need(shapes, "blocks.0.attn_rate.router.weight", 2)
        fields["router_logits"] = router[0]
        token = _shape(shapes, "blocks.0.token_selection.mlp_head.0.weight")
        fields["token_router_ratio"] = hidden // token[0] if token and token[0] else 16
    return fields


def router_layout(router_logits: int, num_heads: int) -> str:
    """K == H: "all" (inference-only release); K == H - 1: "first_on" (training release)."""
    if router_logits == num_heads:
        return "all"
    if router_logits == num_heads - 1:
        return "first_on"
    raise ValueError(
        f"router output size {router_logits} fits neither layout for {num_heads} heads "
        f"(expected {num_heads} or {num_heads - 1})"
    )


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {sorted(KINDS)}")


def infer_config(
    kind: str,
    shapes: Mapping[str, Any],
    arch: str | None = None,
    *,
    input_size: int | None = None,
    num_classes: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[str, Any]:
    """(registry name, model config) of a reference state_dict.

    Without `arch` the name comes from (depth, width) matched to the registry sizes; with it
    (e.g. "DyDiT-XL/2", optionally `overrides` such as depth/hidden_size/num_heads for
    non-registry sizes) depth and width come from the name and the shapes are checked later.
    Input size, channels, classes, learn_sigma, MLP ratio and the router layout always come
    from the shapes unless given. U-DiT: see `convert.udit.infer_config`."""
    if kind == "udit":
        from dydit_jax.convert import udit

        return udit.infer_config(
            shapes, arch, input_size=input_size, num_classes=num_classes, overrides=overrides
        )
    fields = infer_arch(kind, shapes)
    family = KINDS[kind]
    if arch is None:
        if fields["size"] is None:
            known = {s: v[:2] for s, v in dit_lib.DIT_SIZES.items()}
            raise ValueError(
                f"no registry size has depth {fields['depth']} and width "
                f"{fields['hidden_size']} (sizes (depth, width): {known}); pass arch= and "
                "overrides for a non-standard model"
            )
        arch = f"{family}-{fields['size']}/{fields['patch_size']}"
    elif not arch.startswith(f"{family}-"):
        raise ValueError(f"arch {arch!r} is not a {family} model (kind {kind!r})")
    options: dict[str, Any] = {}
    if not fields["learn_sigma"]:
        options["learn_sigma"] = False
    if fields["mlp_ratio"] != 4.0:
        options["mlp_ratio"] = fields["mlp_ratio"]
    if kind == "dydit" and fields["token_router_ratio"] != 16:
        options["token_router_ratio"] = fields["token_router_ratio"]
    options.update(overrides or {})
    kwargs = dict(
        input_size=fields["input_size"] if input_size is None else input_size,
        in_channels=fields["in_channels"],
        num_classes=fields["num_classes"] if num_classes is None else num_classes,
    )
    config = model_config(arch, **kwargs, **options)
    if kind == "dydit" and "router_layout" not in options:
        layout = router_layout(fields["router_logits"], config.num_heads)
        config = model_config(arch, **kwargs, **options, router_layout=layout)
    return arch, config


# ---------------------------------------------------------------------------- conversion


def param_shapes(config) -> dict:
    """Our parameter tree's shapes for a model config (a pure dict of ShapeDtypeStructs)."""
    import jax
    from flax import nnx

    def build():
        model = model_class(config)(config, rngs=nnx.Rngs(0))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    return jax.eval_shape(build)


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def reference_name(path: tuple) -> str:
    """The reference state_dict key of one of our parameter paths."""
    *module, leaf = path
    prefix = []
    if module and module[0] in ("blocks", "final_layer"):
        prefix = [module[0]] + ([str(module[1])] if module[0] == "blocks" else [])
        module = module[len(prefix):]
    for ours, theirs in _RENAMES:
        if tuple(module) == ours:
            return ".".join([*prefix, theirs, _LEAF[leaf]])
    raise RuntimeError(f"no reference name for parameter {path}; update convert._RENAMES")


def _reference_shape(path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the reference stores our parameter with."""
    if path[-1] == "kernel" and len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel":
        return shape[::-1]
    return shape


def _from_reference(path: tuple, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if path[-1] == "kernel" and value.ndim == 4:
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if path[-1] == "kernel":
        return np.ascontiguousarray(value.T)
    return value


def key_mismatch(expected, found, show=lambda key: key) -> list[str]:
    """["missing keys: ...", "unexpected keys: ..."] (only those that apply; naturally
    sorted, shortened) for a state_dict whose keys `found` should be `expected`; `show`
    renders an unexpected key (e.g. with the file's own name)."""
    missing = sorted(set(expected) - set(found), key=_natural)
    unexpected = sorted(set(found) - set(expected), key=_natural)
    parts = []
    if missing:
        parts.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listing([show(k) for k in unexpected])}")
    return parts


def _listing(keys: list[str], limit: int = 8) -> str:
    more = f" ... ({len(keys)} in all)" if len(keys) > limit else f" ({len(keys)})"
    return ", ".join(keys[:limit]) + more


def check_pos_embed(pos_embed: np.ndarray, hidden_size: int, grid: int) -> None:
    """Raise unless the reference table equals ours (same sin-cos values, same axis order)."""
    ours = layers.sincos_2d(hidden_size, grid)[None]
    pos_embed = np.asarray(pos_embed, np.float64)
    err = float(np.max(np.abs(pos_embed - ours)))
    if not err <= POS_EMBED_TOL:
        raise ValueError(
            f"pos_embed differs from this project's sin-cos table by up to {err:.3g} "
            f"(tolerance {POS_EMBED_TOL}): another axis order or formula; the converted "
            "model would scramble token positions"
        )


def state_dict_to_params(
    kind: str,
    state_dict: Mapping[str, Any],
    arch: str | None = None,
    *,
    input_size: int | None = None,
    num_classes: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Any, dict]:
    """(model config, params) from a reference state_dict (numpy arrays by reference name).

    kind: "dit" or "dydit". The architecture is inferred from the shapes (see
    `infer_config`); params is a pure nested dict of float32 numpy arrays shaped like
    `nnx.to_pure_dict(nnx.state(model, nnx.Param))`. Raises ValueError on missing or
    unexpected keys, a shape mismatch, or a pos_embed that is not ours. kind "udit": see
    `convert.udit.state_dict_to_params` (`overrides={"fused": True}` fuses the FFNs)."""
    _check_kind(kind)
    if kind == "udit":
        from dydit_jax.convert import udit

        return udit.state_dict_to_params(
            state_dict, arch, input_size=input_size, num_classes=num_classes,
            overrides=overrides,
        )
    state_dict = unwrap(state_dict)
    _, config = infer_config(
        kind, state_dict, arch, input_size=input_size, num_classes=num_classes,
        overrides=overrides,
    )
    targets = _flatten(param_shapes(config))
    names = {path: reference_name(path) for path in targets}
    expected = {*names.values(), "pos_embed"}
    parts = key_mismatch(expected, state_dict)
    if parts:
        if kind == "dit" and any("_rate.router" in k for k in set(state_dict) - expected):
            parts.append("(router keys: is this a DyDiT checkpoint? use kind 'dydit')")
        raise ValueError(f"{KINDS[kind]} checkpoint does not match {config}: " + "; ".join(parts))
    want_pos = (1, config.num_tokens, config.hidden_size)
    checks = [("pos_embed", want_pos)] + [
        (names[p], _reference_shape(p, tuple(s.shape))) for p, s in targets.items()
    ]
    for key, want in checks:
        got = tuple(np.shape(state_dict[key]))
        if got != want:
            raise ValueError(
                f"shape mismatch at {key}: the checkpoint has {got}, the model "
                f"({config.hidden_size} wide, {config.num_heads} heads, patch "
                f"{config.patch_size}, input {config.input_size}) expects {want}"
            )
    check_pos_embed(state_dict["pos_embed"], config.hidden_size, config.grid)
    params = {p: _from_reference(p, state_dict[names[p]]) for p in targets}
    return config, _unflatten(params)


def _natural(key: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]


# ------------------------------------------------------------------------------ outputs


def merge_params(config, params: Mapping) -> Any:
    """A ready NNX model of `config` holding `params` (a pure dict, e.g. from
    `state_dict_to_params`)."""
    import jax.numpy as jnp
    from flax import nnx

    if isinstance(config, UDiTConfig):
        # every U-DiT variable is a parameter: build it abstractly (a random init of its
        # ~260+ arrays costs seconds) and fill in the given values
        graphdef, state = nnx.split(nnx.eval_shape(lambda: UDiT(config, rngs=nnx.Rngs(0))))
        nnx.replace_by_pure_dict(
            state, _unflatten({p: jnp.asarray(v) for p, v in _flatten(params).items()})
        )
        return nnx.merge(graphdef, state)
    model = model_class(config)(config, rngs=nnx.Rngs(0))
    graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)
    arrays = _unflatten({p: jnp.asarray(v) for p, v in _flatten(params).items()})
    nnx.replace_by_pure_dict(param_state, arrays)
    return nnx.merge(graphdef, param_state, rest)


def load_reference(
    kind: str, path: str, arch: str | None = None, *, overrides: Mapping | None = None,
    input_size: int | None = None,
) -> Any:
    """A ready NNX model (DiT, DyDiT or U-DiT) from a reference checkpoint file.
    `input_size`: U-DiT files do not store it (default 32; 64 for 512px)."""
    config, params = state_dict_to_params(
        kind, load_state_dict(path), arch, overrides=overrides, input_size=input_size
    )
    return merge_params(config, params)


def run_config(model_config_, *, model_name: str, image_size: int, num_classes: int):
    """The run config (train_lib.base_config) of a converted model: latents dataset, model
    fields that differ from the registry defaults as `model_overrides`."""
    import ml_collections

    from dydit_jax import train_lib

    defaults = dataclasses.asdict(
        model_config(
            model_name, input_size=image_size, in_channels=model_config_.in_channels,
            num_classes=num_classes,
        )
    )
    fields = dataclasses.asdict(model_config_)
    config = train_lib.base_config()
    config.model = model_name
    config.dataset = "latents"
    config.image_size = image_size
    config.in_channels = model_config_.in_channels
    config.num_classes = num_classes
    config.model_overrides = ml_collections.ConfigDict(
        {k: v for k, v in fields.items() if defaults.get(k) != v}
    )
    return config


def write_workdir(
    dst: str, model_config_, params: Mapping, *, model_name: str, image_size: int,
    num_classes: int,
) -> dict:
    """Write a step-0 checkpoint (params = ema_params = the converted weights) that sample.py
    and train.py's `config.init_from` accept. Returns the meta written."""
    import jax.numpy as jnp
    import ml_collections

    from dydit_jax import checkpoint as ckpt_lib
    from dydit_jax import train_lib

    if image_size != model_config_.input_size or num_classes != model_config_.num_classes:
        raise ValueError(
            f"image_size {image_size} / num_classes {num_classes} disagree with the model "
            f"config ({model_config_.input_size} / {model_config_.num_classes})"
        )
    if os.path.exists(ckpt_lib.checkpoint_dir(dst)):
        raise ValueError(
            f"{dst} already holds checkpoints/; refusing to overwrite it: pick a new --dst"
        )
    config = run_config(
        model_config_, model_name=model_name, image_size=image_size, num_classes=num_classes
    )
    rebuilt = train_lib.validate_config(
        ml_collections.ConfigDict(config.to_dict()), training=False
    )
    if rebuilt != model_config_:
        raise RuntimeError(f"run config rebuilds {rebuilt}, not {model_config_}")
    shapes = _flatten(param_shapes(model_config_))
    flat = _flatten(params)
    if set(flat) != set(shapes) or any(
        tuple(np.shape(flat[p])) != tuple(s.shape) for p, s in shapes.items()
    ):
        raise ValueError("params do not match the model config's parameter tree")
    meta = train_lib.run_meta(config, model_config_, 0)
    arrays = _unflatten({p: jnp.asarray(v, jnp.float32) for p, v in flat.items()})
    ckpt = ckpt_lib.Checkpointer(dst)
    try:
        ckpt.save(0, {"params": arrays, "ema_params": arrays}, meta, force=True)
    finally:
        ckpt.close()
    return meta


__all__ = [
    "check_pos_embed", "infer_arch", "infer_config", "load_reference", "load_state_dict",
    "merge_params", "param_shapes", "reference_name", "router_layout", "run_config",
    "state_dict_to_params", "unwrap", "write_workdir",
]
