"""Stable Diffusion KL VAE checkpoints -> this project's VAE parameters (docs/vae.md).

Three naming forms are accepted and normalised to the current diffusers names first:

- diffusers (`encoder.mid_block.attentions.0.to_q`, `to_out.0`),
- older diffusers (`attentions.0.query/key/value/proj_attn`),
- original CompVis/LDM (`encoder.down.{i}.block.{j}`, `nin_shortcut`, `encoder.mid.block_1`,
  `mid.attn_1.{norm,q,k,v,proj_out}` as 1x1 convs, `norm_out`, `decoder.up.{i}` numbered
  from the lowest resolution, i.e. in the reverse order of diffusers' `up_blocks`).

Files may wrap the weights in `state_dict` and prefix them `first_stage_model.` (a full LDM /
Stable Diffusion checkpoint: only those keys are taken); the discriminator of LDM VAE
training files (`loss.*`) is dropped. Conv weights OIHW become HWIO kernels, linear (out, in)
weights (in, out) kernels.

    config, params = state_dict_to_params(load_state_dict("diffusion_pytorch_model.bin"))
    write_vae_dir("vae/ema", config, params)        # read back with dydit_jax.vae.load
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dydit_jax import cli
from dydit_jax.convert import common
from dydit_jax.vae.folder import read_vae_dir, write_vae_dir
from dydit_jax.vae.model import VAEConfig, param_shapes

_ATTN_RENAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
             "proj_out": "to_out.0"}


# ------------------------------------------------------------------------------ reading


def select_vae(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The VAE entries of a checkpoint dict: unwrap `state_dict`, take only the
    `first_stage_model.` keys when there are any (prefix removed), drop `loss.*`."""
    if isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return {k: v for k, v in state_dict.items() if not k.startswith("loss.")}


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """The VAE weights of a file (.safetensors, .pt/.pth/.bin/.ckpt, .npz) as float32 numpy
    arrays by their names in the file (see `select_vae`). A full LDM checkpoint is filtered
    before conversion to numpy, so its other weights cost no extra memory."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".pt", ".pth", ".bin", ".ckpt"):
        return select_vae(common.load_state_dict(path))
    raw = common.read_torch(path)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path} holds a {type(raw).__name__}, not a state_dict")
    return common.numpy_state(path, select_vae(raw))


# -------------------------------------------------------------------------------- names


def _is_ldm(keys) -> bool:
    return any(re.match(r"(encoder|decoder)\.(down|up|mid)\.", k) for k in keys)


def _ldm_to_diffusers(key: str, num_up: int) -> str:
    """One CompVis/LDM key -> its diffusers name (`num_up`: decoder levels)."""
    key = re.sub(r"\.nin_shortcut\.", ".conv_shortcut.", key)
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.block_([12])\.",
                 lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.",
                 lambda m: f"{m[1]}.mid_block.attentions.0.{_LDM_ATTN[m[2]]}.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.conv\.",
                 r"encoder.down_blocks.\1.downsamplers.0.conv.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.block\.",
                 lambda m: f"decoder.up_blocks.{num_up - 1 - int(m[1])}.resnets.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.conv\.",
                 lambda m: f"decoder.up_blocks.{num_up - 1 - int(m[1])}.upsamplers.0.conv.",
                 key)
    return key


def normalize_names(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str], str]:
    """(state_dict by current diffusers names, {diffusers name: original name}, the form
    read: "diffusers", "diffusers-old" or "ldm"). Attention weights stored as 1x1 convs are
    squeezed to (out, in)."""
    state_dict = select_vae(state_dict)
    if _is_ldm(state_dict):
        form = "ldm"
        ups = {int(m[1]) for k in state_dict if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
        num_up = max(ups) + 1 if ups else 0
        rename = lambda k: _ldm_to_diffusers(k, num_up)
    else:
        old = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
        form = "diffusers-old" if any(old.search(k) for k in state_dict) else "diffusers"
        rename = lambda k: old.sub(lambda m: m[1] + _ATTN_RENAMES[m[2]] + ".", k)
    out, origin = {}, {}
    for key, value in state_dict.items():
        new = rename(key)
        if new in out:
            raise ValueError(f"keys {origin[new]!r} and {key!r} both map to {new!r}")
        shape = tuple(np.shape(value))
        if (re.search(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", new)
                and len(shape) == 4 and shape[2:] == (1, 1)):
            value = np.asarray(value).reshape(shape[:2])
        out[new], origin[new] = value, key
    return out, origin, form


def reference_name(path: tuple) -> str:
    """The diffusers state_dict key of one of our parameter paths."""
    parts = []
    for part in path[:-1]:
        part = str(part)
        parts.append({
            "downsample": "downsamplers.0.conv", "upsample": "upsamplers.0.conv",
            "attention": "attentions.0", "to_out": "to_out.0",
        }.get(part, part))
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
    return ".".join([*parts, leaf])


# ----------------------------------------------------------------------------- inference


def infer_config(state_dict: Mapping[str, Any], **overrides) -> VAEConfig:
    """VAEConfig from a (normalised, diffusers-named) state_dict's shapes. GroupNorm groups,
    eps, scaling factor and compute dtype are not stored in weights: defaults or
    `overrides`."""
    def need(key: str, ndim: int) -> tuple[int, ...]:
        if key not in state_dict:
            raise ValueError(f"missing key {key!r}: cannot infer the VAE architecture")
        shape = tuple(np.shape(state_dict[key]))
        if len(shape) != ndim:
            raise ValueError(f"{key} has shape {shape}; expected {ndim} dimensions")
        return shape

    levels = sorted({int(m[1]) for k in state_dict
                     if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    if not levels:
        raise ValueError("no encoder.down_blocks.{i}.* (or encoder.down.{i}.*) keys: not a "
                         "KL VAE state_dict")
    chans = tuple(need(f"encoder.down_blocks.{i}.resnets.0.conv1.weight", 4)[0]
                  for i in range(max(levels) + 1))
    resnets = {int(m[1]) for k in state_dict
               if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))}
    fields = dict(
        in_channels=need("encoder.conv_in.weight", 4)[1],
        out_channels=need("decoder.conv_out.weight", 4)[0],
        block_out_channels=chans,
        layers_per_block=max(resnets) + 1,
        latent_channels=need("post_quant_conv.weight", 4)[0],
    )
    fields.update(overrides)
    return VAEConfig(**fields)


# ---------------------------------------------------------------------------- conversion


def state_dict_to_params(
    state_dict: Mapping[str, Any], config: VAEConfig | None = None, **overrides
) -> tuple[VAEConfig, dict]:
    """(VAEConfig, params) from a VAE state_dict in any of the three naming forms.

    Without `config` it is inferred from the shapes (`overrides`: norm_num_groups,
    scaling_factor, dtype, ...). params is a pure nested dict of float32 numpy arrays shaped
    like `nnx.to_pure_dict(nnx.state(model, nnx.Param))`. Raises ValueError on missing or
    unexpected keys or a shape mismatch (the first offending key, both shapes)."""
    state, origin, form = normalize_names(state_dict)
    if config is None:
        config = infer_config(state, **overrides)
    elif overrides:
        raise ValueError("pass either config or overrides, not both")
    targets = common.flatten(param_shapes(config))
    names = {path: reference_name(path) for path in targets}
    expected = set(names.values())
    show = lambda k: k if origin.get(k, k) == k else f"{origin[k]} (= {k})"
    parts = common.key_mismatch(expected, state, show)
    if parts:
        raise ValueError(
            f"VAE checkpoint ({form} names) does not match {config}: " + "; ".join(parts)
        )
    for path, struct in targets.items():
        key = names[path]
        got = tuple(np.shape(state[key]))
        want = common.reference_shape(path, tuple(struct.shape))
        if got != want:
            raise ValueError(
                f"shape mismatch at {show(key)}: the checkpoint has {got}, the VAE "
                f"(block_out_channels {config.block_out_channels}, latent_channels "
                f"{config.latent_channels}) expects {want}"
            )
    params = {path: common.from_reference(path, state[names[path]]) for path in targets}
    return config, common.unflatten(params)


__all__ = [
    "infer_config", "load_state_dict", "normalize_names", "read_vae_dir", "reference_name",
    "select_vae", "state_dict_to_params", "write_vae_dir",
]


# ---------------------------------------------------------------------------------- CLI


def main(args) -> int:
    """`python -m dydit_jax.convert vae --src FILE --dst DIR [--dtype bfloat16]` (args parsed
    by convert/__main__.py)."""

    try:
        for flag, value in (("--arch", args.arch), ("--input-size", args.input_size),
                            ("--fuse", args.fuse or None)):
            if value is not None:
                raise ValueError(f"{flag} does not apply to kind vae")
        dst = os.path.abspath(args.dst)
        if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
            raise ValueError(f"{args.dst} already exists; refusing to overwrite it: pick a "
                             "new --dst")
        overrides = {"dtype": args.dtype} if args.dtype else {}
        config, params = state_dict_to_params(load_state_dict(args.src), **overrides)
        meta = write_vae_dir(args.dst, config, params, source=os.path.abspath(args.src))
    except (ValueError, OSError, ImportError, KeyError) as e:
        return cli.fail(e)
    print(
        f"wrote {args.dst}: KL VAE ({meta['param_count'] / 1e6:.1f}M parameters, "
        f"block_out_channels {list(config.block_out_channels)}, {config.latent_channels} "
        f"latent channels, compute dtype {config.dtype}, scaling factor "
        f"{config.scaling_factor})"
    )
    print(f"load: dydit_jax.vae.load({args.dst!r})")
    return 0
