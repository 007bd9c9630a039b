"""Reference U-DiT checkpoints (docs/udit.md "Checkpoint names") -> our parameters.

    config, params = convert.state_dict_to_params("udit", load_state_dict("U-DiT-B-400k.pt"))
    model = convert.load_reference("udit", "U-DiT-L-1M.pt", overrides={"fused": True})

Layouts: Linear (out, in) -> kernel (in, out); dense conv OIHW -> HWIO; depthwise (C, 1, k, k)
-> (k, k, 1, C); the 1x1 convs that are Dense layers here (to_out, project_in/out, the channel
reductions, the vanilla MLP) -> `W[:, :, 0, 0].T`. The release files hold the training form
of the FFN; `overrides={"fused": True}` converts it and then applies `udit.fuse_params`.

The input size is not stored in a U-DiT checkpoint (no position table): it defaults to 32
(256px) and must be given for 512px checkpoints (`input_size=64`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dydit_jax.convert import common
from dydit_jax.models import model_config, udit

DEFAULT_INPUT_SIZE = 32
STAGES = ("encoder_level_1", "encoder_level_2", "latent", "decoder_level_2", "decoder_level_1")
# A dwconv.0 centre tap this large means the reference's eval() fusion was added into it.
EVAL_MUTATION_THRESHOLD = 0.5

# reference 1x1 convs that are Dense layers here
_CONV1X1 = re.compile(
    r"\.(to_out|project_in\.\d|project_out\.\d|fc\d)\.weight$|^reduce_chan_level\d\.weight$"
)


def reference_name(path: tuple) -> str:
    """The reference state_dict key of one of our (training-form or vanilla) parameter paths."""
    leaf = {"kernel": "weight", "bias": "bias", "embedding": "weight"}.get(path[-1], path[-1])
    head, *rest = path[:-1]
    if head == "x_embedder":
        return f"x_embedder.proj.{leaf}"
    if head == "t_embedders":
        k, fc = rest
        index = {"fc1": 0, "fc2": 2}[fc]  # mlp = Sequential(Linear, SiLU, Linear)
        return f"t_embedder_{k + 1}.mlp.{index}.{leaf}"
    if head == "y_embedders":
        return f"y_embedder_{rest[0] + 1}.embedding_table.{leaf}"
    if head in ("down1_2", "down2_3", "up3_2", "up2_1"):
        return f"{head}.body.0.{leaf}"
    if head in ("reduce_chan_level1", "reduce_chan_level2", "output"):
        return f"{head}.{leaf}"
    if head == "final_layer":
        module = {("adaLN", "linear"): "adaLN_modulation.1", ("out_proj",): "out_proj"}
        return f"final_layer.{module[tuple(rest)]}.{leaf}"
    if head in STAGES:
        block, _, i, part, *inner = rest
        i += 1
        prefix = f"{head}.{block}."
        if part == "adaLN":
            return f"{prefix}adaLN_modulation{i}.1.{leaf}"
        if part == "attn":
            if path[-1] == "logit_scale":
                return f"{prefix}attn{i}.logit_scale"
            name = "downsampler.layer" if inner == ["downsampler"] else inner[0]
            return f"{prefix}attn{i}.{name}.{leaf}"
        if part == "mlp":
            return ".".join([f"{prefix}mlp{i}", *map(str, inner), leaf])
    raise RuntimeError(f"no reference name for parameter {path}; update convert/udit.py")


def _from_reference(key: str, ours: tuple[int, ...], value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if len(ours) == 4:  # conv kernels (dense or depthwise): OIHW -> HWIO
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if len(ours) == 2 and key.endswith(".weight") and "embedding_table" not in key:
        if value.ndim == 4:  # a 1x1 conv used as a Dense layer
            value = value[:, :, 0, 0]
        return np.ascontiguousarray(value.T)
    return value


def _reference_shape(key: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    if len(ours) == 4:
        return (ours[3], ours[2], ours[0], ours[1])
    if len(ours) == 2 and key.endswith(".weight") and "embedding_table" not in key:
        return (ours[1], ours[0], 1, 1) if _CONV1X1.search(key) else (ours[1], ours[0])
    return ours


def _depth(shapes: Mapping[str, Any], stage: str) -> int:
    blocks = {int(m[1]) for k in shapes if (m := re.match(rf"{stage}\.(\d+)\.", k))}
    if not blocks:
        raise ValueError(f"the state_dict has no {stage}.{{i}}.* keys: not a U-DiT checkpoint")
    return max(blocks) + 1


def infer_arch(shapes: Mapping[str, Any]) -> dict[str, Any]:
    """Architecture fields from a reference U-DiT state_dict's shapes (arrays or shape tuples):
    hidden_size, in_channels, num_classes, learn_sigma, num_heads (None for vanilla: not
    stored), depths, mlp_ratio, vanilla, size (S/B/L or None)."""
    shapes = common.unwrap(shapes)
    stem = common.need(shapes, "x_embedder.proj.weight", 4)
    c, in_channels = stem[0], stem[1]
    table = common.need(shapes, "y_embedder_1.embedding_table.weight", 2)
    final = common.need(shapes, "final_layer.out_proj.weight", 4)
    if final[0] not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"final_layer.out_proj has {final[0]} outputs for {in_channels} input channels "
            f"(expected {in_channels} or {2 * in_channels})"
        )
    depths = [_depth(shapes, stage) for stage in STAGES]
    if depths[3:] != depths[:2][::-1]:
        raise ValueError(f"stage depths {depths}: the decoder must mirror the encoder")
    vanilla = "encoder_level_1.0.mlp1.fc1.weight" in shapes
    first = "encoder_level_1.0"
    if vanilla:
        hidden = common.need(shapes, f"{first}.mlp1.fc1.weight", 4)[0]
        heads = None
    else:
        hidden = common.need(shapes, f"{first}.mlp1.project_in.1.weight", 4)[0]
        heads = common.need(shapes, f"{first}.attn1.logit_scale", 3)[0]
    size = next((s for s, (w, h) in udit.UDIT_SIZES.items()
                 if w == c and heads in (h, None)), None)
    return {
        "hidden_size": c,
        "in_channels": in_channels,
        "num_classes": table[0] - 1,
        "learn_sigma": final[0] == 2 * in_channels,
        "num_heads": heads,
        "depths": depths,
        "mlp_ratio": hidden / c,
        "vanilla": vanilla,
        "size": size,
    }


def infer_config(
    shapes: Mapping[str, Any],
    arch: str | None = None,
    *,
    input_size: int | None = None,
    num_classes: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[str, udit.UDiTConfig]:
    """(registry name, UDiTConfig) of a reference state_dict. Without `arch` the size comes
    from the stem width and head count (S/B/L); `overrides` replace any config field (e.g.
    num_heads for a vanilla checkpoint of a non-registry width, or fused=True)."""
    fields = infer_arch(shapes)
    if arch is None:
        if fields["size"] is None:
            known = {s: dict(hidden_size=w, num_heads=h) for s, (w, h) in udit.UDIT_SIZES.items()}
            raise ValueError(
                f"no registry U-DiT size has hidden size {fields['hidden_size']} and "
                f"{fields['num_heads']} heads ({known}); pass arch= and overrides"
            )
        arch = f"U-DiT-{fields['size']}"
    elif not arch.startswith("U-DiT-"):
        raise ValueError(f"arch {arch!r} is not a U-DiT model (kind 'udit')")
    elif fields["size"] is not None and arch != f"U-DiT-{fields['size']}":
        raise ValueError(
            f"the checkpoint's shapes are those of U-DiT-{fields['size']}, not {arch}; drop "
            "--arch or pass the right one"
        )
    d1, d2, d3 = fields["depths"][:3]
    options: dict[str, Any] = dict(depth_level1=d1, depth_level2=d2, depth_latent=d3)
    if fields["num_heads"] is not None:
        options["num_heads"] = fields["num_heads"]
    options.update(
        hidden_size=fields["hidden_size"], mlp_ratio=fields["mlp_ratio"],
        learn_sigma=fields["learn_sigma"], vanilla=fields["vanilla"],
    )
    options.update(overrides or {})
    config = model_config(
        arch,
        input_size=DEFAULT_INPUT_SIZE if input_size is None else input_size,
        in_channels=fields["in_channels"],
        num_classes=fields["num_classes"] if num_classes is None else num_classes,
        **options,
    )
    return arch, config


def check_not_eval_mutated(state_dict: Mapping[str, np.ndarray]) -> None:
    """Refuse weights saved from a live reference model after `eval()`: its fusion adds the
    3x3 and 1x1 branches and the identity (+1) into `dwconv.0.weight` in place, every time."""
    taps = [
        np.asarray(v)[:, 0, 2, 2] for k, v in state_dict.items()
        if k.endswith(".dwconv.0.weight") and np.ndim(v) == 4 and np.shape(v)[2:] == (5, 5)
    ]
    if taps and float(np.median(np.concatenate(taps))) > EVAL_MUTATION_THRESHOLD:
        raise ValueError(
            "the FFN depthwise 5x5 kernels have centre taps near 1 or above: these weights "
            "look already fused in place by the reference's eval() (it adds the 3x3, 1x1 and "
            "identity branches into dwconv.0 on every call). Convert the released .pt file or "
            "a state_dict saved from a model that was never put in eval mode."
        )


def state_dict_to_params(
    state_dict: Mapping[str, Any],
    arch: str | None = None,
    *,
    input_size: int | None = None,
    num_classes: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[udit.UDiTConfig, dict]:
    """(UDiTConfig, params) from a reference U-DiT state_dict (numpy arrays by reference name);
    with `overrides={"fused": True}` the params are the fused inference form. Raises
    ValueError on missing or unexpected keys or a shape mismatch."""
    state_dict = common.unwrap(state_dict)
    overrides = dict(overrides or {})
    fuse = bool(overrides.pop("fused", False))
    _, config = infer_config(
        state_dict, arch, input_size=input_size, num_classes=num_classes, overrides=overrides
    )
    targets = common.flatten(common.param_shapes(config))
    names = {path: reference_name(path) for path in targets}
    parts = common.key_mismatch(names.values(), state_dict)
    if parts:
        raise ValueError(f"U-DiT checkpoint does not match {config}: " + "; ".join(parts))
    for path, struct in targets.items():
        key = names[path]
        want = _reference_shape(key, tuple(struct.shape))
        got = tuple(np.shape(state_dict[key]))
        if got != want:
            raise ValueError(
                f"shape mismatch at {key}: the checkpoint has {got}, the model "
                f"(hidden size {config.hidden_size}, {config.num_heads} heads) expects {want}"
            )
    check_not_eval_mutated(state_dict)
    params = common.unflatten(
        {p: _from_reference(names[p], tuple(s.shape), state_dict[names[p]])
         for p, s in targets.items()}
    )
    if fuse:
        config, params = udit.fuse_params(config, params)
        params = _numpy_tree(params)
    return config, params


def _numpy_tree(tree: Mapping) -> dict:
    return {k: _numpy_tree(v) if isinstance(v, Mapping) else np.asarray(v, np.float32)
            for k, v in tree.items()}


def to_reference(config: udit.UDiTConfig, params: Mapping) -> dict[str, np.ndarray]:
    """Our training-form (or vanilla) params -> the reference state_dict layout (the inverse
    of `state_dict_to_params`, for exporting back to PyTorch)."""
    if config.fused:
        raise ValueError("the reference stores the training form; export unfused params")
    out = {}
    for path, value in common.flatten(params).items():
        key = reference_name(path)
        value = np.asarray(value, np.float32)
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2 and key.endswith(".weight") and "embedding_table" not in key:
            value = value.T
            if _CONV1X1.search(key):
                value = value[:, :, None, None]
        out[key] = np.ascontiguousarray(value)
    return out


__all__ = [
    "check_not_eval_mutated", "infer_arch", "infer_config", "reference_name",
    "state_dict_to_params", "to_reference",
]
