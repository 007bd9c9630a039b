"""The Stable Diffusion KL-f8 autoencoder (docs/vae.md): model, loading, sharded apply.

    model = vae.load("vae/ema")                   # python -m dydit_jax.convert vae --src ...
    images = model.decode_latents(latents)        # NHWC, about [-1, 1]
    sharded = vae.ShardedVAE(model, mesh)         # batch over ('data', 'fsdp')
    moments = sharded.encode(images)              # (B, H/8, W/8, 8)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from dydit_jax.vae import folder
from dydit_jax.vae.apply import ShardedVAE, decode, decode_latents, encode, encode_to_latents
from dydit_jax.vae.model import (
    AutoencoderKL,
    DiagonalGaussian,
    VAEConfig,
    abstract_model,
    param_count,
    param_shapes,
)


def from_params(config: VAEConfig, params: Mapping) -> AutoencoderKL:
    """A ready model of `config` holding `params` (a pure dict, e.g. from the converter);
    built abstractly, so no random initialisation is spent."""
    graphdef, state = nnx.split(abstract_model(config))
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params))
    return nnx.merge(graphdef, state)


def load(directory: str, *, dtype: str | None = None) -> AutoencoderKL:
    """The model written by `python -m dydit_jax.convert vae --src FILE --dst DIRECTORY`.
    `dtype` overrides the stored compute dtype ("float32" or "bfloat16")."""
    config, params = folder.read_vae_dir(directory)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    return from_params(config, params)


__all__ = [
    "AutoencoderKL", "DiagonalGaussian", "ShardedVAE", "VAEConfig", "abstract_model", "decode",
    "decode_latents", "encode", "encode_to_latents", "folder", "from_params", "load", "param_count",
    "param_shapes",
]
