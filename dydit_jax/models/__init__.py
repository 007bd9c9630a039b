"""Model registry: build any model by name, e.g. `create_model("DiT-XL/2", ...)`."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
from flax import nnx

from dydit_jax.models.dit import DIT_SIZES, DiT, DiTConfig
from dydit_jax.models.dydit import DyDiT, DyDiTConfig
from dydit_jax.models.udit import UDIT_SIZES, UDiT, UDiTConfig, fuse_params

_NAME = re.compile(r"^(?P<family>DiT|DyDiT)-(?P<size>[A-Z]+)/(?P<patch>\d+)$")
FAMILIES = {"DiT": (DiT, DiTConfig), "DyDiT": (DyDiT, DyDiTConfig)}
_UDIT_NAME = re.compile(r"^U-DiT-(?P<size>[A-Z]+)$")  # U-DiT-{S,B,L}: no patch size


def model_names(family: str | None = None) -> list[str]:
    """Registered names, e.g. DiT-S/2 ... DiT-XL/8, DyDiT-S/2 ..., U-DiT-S (one family or
    all)."""
    families = [*FAMILIES, "U-DiT"] if family is None else [family]
    return [
        name for f in families
        for name in (
            [f"U-DiT-{s}" for s in UDIT_SIZES] if f == "U-DiT"
            else [f"{f}-{s}/{p}" for s in DIT_SIZES for p in (2, 4, 8)]
        )
    ]


def model_class(config: DiTConfig) -> type[DiT]:
    """The module class that builds a model config (DiT, DyDiT or U-DiT)."""
    if isinstance(config, UDiTConfig):
        return UDiT
    return DyDiT if isinstance(config, DyDiTConfig) else DiT


def model_config(
    name: str, *, input_size: int, in_channels: int, num_classes: int, **overrides: Any
) -> DiTConfig:
    """The config of a named model; `overrides` replace any field (hidden_size, depth, ...)."""
    match = _NAME.match(name)
    udit = _UDIT_NAME.match(name)
    if udit and udit["size"] in UDIT_SIZES:
        hidden, heads = UDIT_SIZES[udit["size"]]
        config_class = UDiTConfig
        fields = dict(
            input_size=input_size,
            in_channels=in_channels,
            hidden_size=hidden,
            num_heads=heads,
            num_classes=num_classes,
        )
    elif not match or match["size"] not in DIT_SIZES or int(match["patch"]) not in (2, 4, 8):
        raise ValueError(
            f"unknown model name {name!r}; choose one of: {', '.join(model_names())}"
        )
    else:
        depth, hidden, heads = DIT_SIZES[match["size"]]
        config_class = FAMILIES[match["family"]][1]
        fields = dict(
            input_size=input_size,
            patch_size=int(match["patch"]),
            in_channels=in_channels,
            hidden_size=hidden,
            depth=depth,
            num_heads=heads,
            num_classes=num_classes,
        )
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"unknown model option(s) {unknown} for {name}; known options: {sorted(known)}"
        )
    fields.update(overrides)
    config = config_class(**fields)
    config.validate()
    return config


def create_model(
    name: str,
    *,
    input_size: int,
    in_channels: int,
    num_classes: int,
    rngs: nnx.Rngs,
    **overrides: Any,
) -> DiT:
    """Build a model by name (DiT, DyDiT or U-DiT). Returns an NNX module called as
    `model(x, t, y)`."""
    config = model_config(
        name, input_size=input_size, in_channels=in_channels, num_classes=num_classes, **overrides
    )
    return model_class(config)(config, rngs=rngs)


def fuse_model_params(config, params):
    """(config, params) of the inference form: U-DiT's re-parameterised FFNs fused
    (`udit.fuse_params`); every other model (and an already fused or vanilla U-DiT) comes
    back unchanged, so samplers can call it unconditionally."""
    if isinstance(config, UDiTConfig):
        return fuse_params(config, params)
    return config, params


__all__ = [
    "DiT", "DiTConfig", "DyDiT", "DyDiTConfig", "UDiT", "UDiTConfig", "create_model",
    "fuse_model_params", "model_class", "model_config", "model_names",
]


def unstack_blocks(config, params):
    """(config, params, graphdef) of the same model with its scan-stacked blocks
    (`scan_blocks=True`) as one module per layer, for code that runs the layers one at a
    time (the DyDiT engine); a model without stacked blocks comes back as it is."""
    if not getattr(config, "scan_blocks", False):
        return config, params, None

    flat = dataclasses.replace(config, scan_blocks=False)
    structure = {}

    def split():
        structure["graphdef"], p, _ = nnx.split(
            model_class(flat)(flat, rngs=nnx.Rngs(0)), nnx.Param, ...)
        return p

    jax.eval_shape(split)
    stacked = params["blocks"]
    blocks = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(config.depth)}
    return flat, {**params, "blocks": blocks}, structure["graphdef"]
