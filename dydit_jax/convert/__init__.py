"""Convert reference PyTorch checkpoints (DiT, DyDiT, U-DiT) into this project's parameters.

The reference state_dict layout is in docs/dit.md ("Checkpoint layout") and docs/dydit.md
(router keys). Linear weights are (out, in) and become kernels (in, out); the patch conv is
OIHW and becomes HWIO; the fixed sin-cos `pos_embed` is not a parameter here but is checked
against ours (a different axis order would silently scramble positions).

    config, params = state_dict_to_params("dit", common.load_state_dict("DiT-XL-2-256x256.pt"))
    model = load_reference("dydit", "new_dydit0.7.pt")        # a ready NNX model
    write_workdir("runs/dit_xl", config, params, model_name="DiT-XL/2", image_size=32,
                  num_classes=1000)                           # for sample.py / init_from

U-DiT (kind "udit", docs/udit.md) has its own name map and layouts in `convert/udit.py`;
the functions here dispatch to it.

Everything here runs on numpy; torch is only imported to read `.pt`/`.pth` files.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dydit_jax import checkpoint as ckpt_lib
from dydit_jax import config_lib, model_parts
from dydit_jax.convert import common, udit
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


# ---------------------------------------------------------------------------- inference


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
        return udit.infer_arch(shapes)
    shapes = common.unwrap(shapes)
    pos = common.need(shapes, "pos_embed", 3)
    tokens, hidden = pos[1], pos[2]
    conv = common.need(shapes, "x_embedder.proj.weight", 4)
    patch, in_channels = conv[2], conv[1]
    grid = int(round(tokens**0.5))
    if grid * grid != tokens:
        raise ValueError(f"pos_embed has {tokens} tokens, not a square grid")
    table = common.need(shapes, "y_embedder.embedding_table.weight", 2)
    blocks = {int(m[1]) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise ValueError("the state_dict has no blocks.{i}.* keys")
    depth = max(blocks) + 1
    final = common.need(shapes, "final_layer.linear.weight", 2)
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
    fc1 = common.shape_of(shapes, "blocks.0.mlp.fc1.weight")
    if fc1 is not None and len(fc1) == 2:
        fields["mlp_ratio"] = fc1[0] / hidden
    if kind == "dydit":
        router = common.need(shapes, "blocks.0.attn_rate.router.weight", 2)
        fields["router_logits"] = router[0]
        token = common.shape_of(shapes, "blocks.0.token_selection.mlp_head.0.weight")
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
        return udit.state_dict_to_params(
            state_dict, arch, input_size=input_size, num_classes=num_classes,
            overrides=overrides,
        )
    state_dict = common.unwrap(state_dict)
    _, config = infer_config(
        kind, state_dict, arch, input_size=input_size, num_classes=num_classes,
        overrides=overrides,
    )
    targets = common.flatten(common.param_shapes(config))
    names = {path: reference_name(path) for path in targets}
    expected = {*names.values(), "pos_embed"}
    parts = common.key_mismatch(expected, state_dict)
    if parts:
        if kind == "dit" and any("_rate.router" in k for k in set(state_dict) - expected):
            parts.append("(router keys: is this a DyDiT checkpoint? use kind 'dydit')")
        raise ValueError(f"{KINDS[kind]} checkpoint does not match {config}: " + "; ".join(parts))
    want_pos = (1, config.num_tokens, config.hidden_size)
    checks = [("pos_embed", want_pos)] + [
        (names[p], common.reference_shape(p, tuple(s.shape))) for p, s in targets.items()
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
    params = {p: common.from_reference(p, state_dict[names[p]]) for p in targets}
    return config, common.unflatten(params)


# ------------------------------------------------------------------------------ outputs


def merge_params(config, params: Mapping) -> Any:
    """A ready NNX model of `config` holding `params` (a pure dict, e.g. from
    `state_dict_to_params`)."""

    if isinstance(config, UDiTConfig):
        # every U-DiT variable is a parameter: build it abstractly (a random init of its
        # ~260+ arrays costs seconds) and fill in the given values
        graphdef, state = nnx.split(nnx.eval_shape(lambda: UDiT(config, rngs=nnx.Rngs(0))))
        nnx.replace_by_pure_dict(
            state, common.unflatten({p: jnp.asarray(v) for p, v in common.flatten(params).items()})
        )
        return nnx.merge(graphdef, state)
    model = model_class(config)(config, rngs=nnx.Rngs(0))
    graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)
    arrays = common.unflatten({p: jnp.asarray(v) for p, v in common.flatten(params).items()})
    nnx.replace_by_pure_dict(param_state, arrays)
    return nnx.merge(graphdef, param_state, rest)


def load_reference(
    kind: str, path: str, arch: str | None = None, *, overrides: Mapping | None = None,
    input_size: int | None = None,
) -> Any:
    """A ready NNX model (DiT, DyDiT or U-DiT) from a reference checkpoint file.
    `input_size`: U-DiT files do not store it (default 32; 64 for 512px)."""
    config, params = state_dict_to_params(
        kind, common.load_state_dict(path), arch, overrides=overrides, input_size=input_size
    )
    return merge_params(config, params)


def run_config(model_config_, *, model_name: str, image_size: int, num_classes: int):
    """The run config (config_lib.base_config) of a converted model: latents dataset, model
    fields that differ from the registry defaults as `model_overrides`."""
    defaults = dataclasses.asdict(
        model_config(
            model_name, input_size=image_size, in_channels=model_config_.in_channels,
            num_classes=num_classes,
        )
    )
    fields = dataclasses.asdict(model_config_)
    config = config_lib.base_config()
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
    rebuilt = config_lib.validate_config(
        ml_collections.ConfigDict(config.to_dict()), training=False
    )
    if rebuilt != model_config_:
        raise RuntimeError(f"run config rebuilds {rebuilt}, not {model_config_}")
    shapes = common.flatten(common.param_shapes(model_config_))
    flat = common.flatten(params)
    if set(flat) != set(shapes) or any(
        tuple(np.shape(flat[p])) != tuple(s.shape) for p, s in shapes.items()
    ):
        raise ValueError("params do not match the model config's parameter tree")
    meta = model_parts.run_meta(config, model_config_, 0)
    arrays = common.unflatten({p: jnp.asarray(v, jnp.float32) for p, v in flat.items()})
    ckpt = ckpt_lib.Checkpointer(dst)
    try:
        ckpt.save(0, {"params": arrays, "ema_params": arrays}, meta, force=True)
    finally:
        ckpt.close()
    return meta


load_state_dict, param_shapes, unwrap = common.load_state_dict, common.param_shapes, common.unwrap

__all__ = [
    "check_pos_embed", "infer_arch", "infer_config", "load_reference", "load_state_dict",
    "merge_params", "param_shapes", "reference_name", "router_layout", "run_config",
    "state_dict_to_params", "unwrap", "write_workdir",
]
