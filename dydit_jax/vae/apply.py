"""The VAE as pure, jitted functions of (params, batch), with the batch sharded over the
mesh's ('data', 'fsdp') axes and the parameters replicated.

    vae = ShardedVAE(model, mesh)           # mesh=None: plain jit on the default device
    moments = vae.encode(images)            # (B, H/8, W/8, 8)
    images = vae.decode_latents(latents)    # (B, H, W, 3)

Host (numpy) batches of any size are padded up to a multiple of the batch shards and the
result is cut back; global arrays spanning several processes must already be a multiple.
Each distinct input shape compiles once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dydit_jax import parallel
from dydit_jax.vae.model import AutoencoderKL


def encode(graphdef, params, x):
    """Pure: posterior moments of images x (see `AutoencoderKL.encode`)."""
    return nnx.merge(graphdef, params).encode(x)


def encode_to_latents(graphdef, params, x, key):
    """Pure: scaled posterior samples of images x."""
    return nnx.merge(graphdef, params).encode_to_latents(x, key)


def decode(graphdef, params, z):
    """Pure: images from unscaled latents z."""
    return nnx.merge(graphdef, params).decode(z)


def decode_latents(graphdef, params, z):
    """Pure: images from scaled (diffusion-model) latents z."""
    return nnx.merge(graphdef, params).decode_latents(z)


class ShardedVAE:
    """Jitted encode/decode of one model on a mesh (or on the default device: mesh=None).

    The random noise of `encode_to_latents` depends on the (padded) batch shape, as
    `jax.random.normal` does; moments and decodes do not depend on batching or the mesh
    beyond float round-off."""

    def __init__(self, model: AutoencoderKL, mesh: Mesh | None = None):
        self.config, self.mesh = model.config, mesh
        graphdef, params = nnx.split(model)
        if mesh is None:
            self.shards = 1
            jit = lambda f, keyed=False: jax.jit(functools.partial(f, graphdef))
        else:
            rep, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
            params = jax.device_put(params, rep)
            self.shards = parallel.batch_size_per_step(mesh)
            jit = lambda f, keyed=False: jax.jit(
                functools.partial(f, graphdef),
                in_shardings=(rep, batch, rep) if keyed else (rep, batch),
                out_shardings=batch,
            )
        self.params = params
        self._encode = jit(encode)
        self._encode_to_latents = jit(encode_to_latents, keyed=True)
        self._decode = jit(decode)
        self._decode_latents = jit(decode_latents)

    def _pad(self, x) -> tuple[jax.Array | np.ndarray, int]:
        n = x.shape[0]
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if n % self.shards:
                raise ValueError(
                    f"global batch of {n} is not a multiple of the {self.shards} batch shards"
                )
            return x, n
        pad = -n % self.shards
        if pad:
            x = np.asarray(x)
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        if self.mesh is not None:
            x = jax.device_put(jnp.asarray(x, jnp.float32), parallel.batch_sharding(self.mesh))
        return x, n

    def _run(self, fn, x, *extra):
        if x.ndim != 4:
            raise ValueError(f"expected an NHWC batch, got shape {tuple(x.shape)}")
        x, n = self._pad(x)
        out = fn(self.params, x, *extra)
        return out if out.shape[0] == n else out[:n]

    def encode(self, x) -> jax.Array:
        """images (B, H, W, 3) in [-1, 1] -> moments (B, H/f, W/f, 2 * latent)."""
        return self._run(self._encode, x)

    def encode_to_latents(self, x, key: jax.Array) -> jax.Array:
        """images -> posterior samples * scaling_factor."""
        return self._run(self._encode_to_latents, x, key)

    def decode(self, z) -> jax.Array:
        """unscaled latents -> images (B, H, W, 3)."""
        return self._run(self._decode, z)

    def decode_latents(self, z) -> jax.Array:
        """latents * scaling_factor (what the diffusion models sample) -> images."""
        return self._run(self._decode_latents, z)
