"""The Stable Diffusion KL-f8 autoencoder (docs/vae.md) in Flax NNX, NHWC.

Module and parameter names follow the diffusers layout (`encoder.down_blocks.{i}.resnets.{j}.
conv1`, `mid_block.attention.to_q`, ...) so that the converter's name map is short: our
`downsample`/`upsample` convs are diffusers' `downsamplers.0.conv`/`upsamplers.0.conv`, our
`attention` is `attentions.0` and its `to_out` is `to_out.0`; conv kernels are HWIO, linear
kernels (in, out), GroupNorm `scale` is the reference `weight`.

Parameters are float32; `VAEConfig.dtype` is the compute dtype of the convs and linears.
GroupNorm statistics and the attention softmax are always float32, and the public outputs
(moments, latents, images) are float32.

    model = AutoencoderKL(VAEConfig(), rngs=nnx.Rngs(0))   # or vae.load(DIR)
    moments = model.encode(images)                         # (B, H/8, W/8, 8), images in [-1, 1]
    z = model.encode_to_latents(images, key)               # sample * 0.18215
    images = model.decode_latents(z)                       # decode(z / 0.18215)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # encoder resnets per level; the decoder has one more
    latent_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.18215  # latents = sample * scaling_factor
    dtype: str = "float32"  # compute dtype of convs/linears ("bfloat16" for speed)

    def __post_init__(self):
        chans = tuple(int(c) for c in self.block_out_channels)
        object.__setattr__(self, "block_out_channels", chans)
        if not self.block_out_channels:
            raise ValueError("block_out_channels needs at least one level")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {self.block_out_channels}: {bad} not divisible by "
                f"norm_num_groups {self.norm_num_groups}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: choose one of {sorted(DTYPES)}")
        if self.layers_per_block < 1 or self.latent_channels < 1:
            raise ValueError("layers_per_block and latent_channels must be positive")

    @property
    def downsample_factor(self) -> int:
        """Image size / latent size: 2 ** (levels - 1) (8 for the default config)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["block_out_channels"] = list(self.block_out_channels)
        return out

    @classmethod
    def from_dict(cls, fields: dict) -> VAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown VAEConfig fields {unknown}; known: {sorted(known)}")
        fields = dict(fields)
        if "block_out_channels" in fields:
            fields["block_out_channels"] = tuple(fields["block_out_channels"])
        return cls(**fields)


# ---------------------------------------------------------------------------- posterior


class DiagonalGaussian(NamedTuple):
    """The encoder's posterior N(mean, exp(logvar)) per latent element (a pytree)."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        """Split (..., 2C) moments into mean and logvar, logvar clipped to [-30, 20]."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


# ------------------------------------------------------------------------------- layers


class GroupNorm(nnx.Module):
    """GroupNorm over (H, W, C/G) with affine scale/bias; statistics in float32 (two-pass
    variance), output in the input's dtype."""

    def __init__(self, channels: int, groups: int, eps: float):
        self.groups, self.eps = groups, eps
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        *lead, c = x.shape
        x32 = x.astype(jnp.float32).reshape(*lead[:1], -1, self.groups, c // self.groups)
        mean = x32.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(x32 - mean).mean(axis=(1, 3), keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def _conv(cin: int, cout: int, kernel: int, *, rngs, dtype, stride: int = 1,
          padding=None) -> nnx.Conv:
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nnx.Conv(
        cin, cout, (kernel, kernel), strides=stride, padding=padding, dtype=dtype,
        param_dtype=jnp.float32, rngs=rngs,
    )


class ResnetBlock(nnx.Module):
    """GN -> SiLU -> Conv3x3 -> GN -> SiLU -> Conv3x3, plus a 1x1 `conv_shortcut` of the input
    when the width changes (dropout is 0 at inference and omitted)."""

    def __init__(self, cin: int, cout: int, config: VAEConfig, *, rngs):
        dtype, g, eps = config.compute_dtype, config.norm_num_groups, config.norm_eps
        self.norm1 = GroupNorm(cin, g, eps)
        self.conv1 = _conv(cin, cout, 3, rngs=rngs, dtype=dtype)
        self.norm2 = GroupNorm(cout, g, eps)
        self.conv2 = _conv(cout, cout, 3, rngs=rngs, dtype=dtype)
        self.conv_shortcut = _conv(cin, cout, 1, rngs=rngs, dtype=dtype) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nnx.Module):
    """Single-head self-attention over all positions: GN, q/k/v/out linears, softmax in
    float32, residual."""

    def __init__(self, channels: int, config: VAEConfig, *, rngs):
        dtype = config.compute_dtype
        self.group_norm = GroupNorm(channels, config.norm_num_groups, config.norm_eps)
        lin = lambda: nnx.Linear(channels, channels, dtype=dtype, param_dtype=jnp.float32,
                                 rngs=rngs)
        self.to_q, self.to_k, self.to_v, self.to_out = lin(), lin(), lin(), lin()

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * (1.0 / math.sqrt(c)), axis=-1).astype(v.dtype)
        out = self.to_out(jnp.einsum("bqk,bkc->bqc", probs, v))
        return x + out.reshape(b, h, w, c).astype(x.dtype)


class MidBlock(nnx.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels: int, config: VAEConfig, *, rngs):
        self.resnets = nnx.List(
            [ResnetBlock(channels, channels, config, rngs=rngs) for _ in range(2)]
        )
        self.attention = Attention(channels, config, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.resnets[1](self.attention(self.resnets[0](x)))


class DownBlock(nnx.Module):
    """Resnets, then (all but the last level) pad right/bottom by one and a stride-2
    Conv3x3 without padding."""

    def __init__(self, cin: int, cout: int, num: int, down: bool, config: VAEConfig, *, rngs):
        self.resnets = nnx.List(
            [ResnetBlock(cin if j == 0 else cout, cout, config, rngs=rngs) for j in range(num)]
        )
        self.downsample = (
            _conv(cout, cout, 3, rngs=rngs, dtype=config.compute_dtype, stride=2,
                  padding=((0, 1), (0, 1)))
            if down else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsample is None else self.downsample(x)


class UpBlock(nnx.Module):
    """Resnets, then (all but the last level) nearest x2 upsampling and a Conv3x3."""

    def __init__(self, cin: int, cout: int, num: int, up: bool, config: VAEConfig, *, rngs):
        self.resnets = nnx.List(
            [ResnetBlock(cin if j == 0 else cout, cout, config, rngs=rngs) for j in range(num)]
        )
        self.upsample = _conv(cout, cout, 3, rngs=rngs, dtype=config.compute_dtype) if up else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsample is None:
            return x
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2
        return self.upsample(x)


# ------------------------------------------------------------------------------ encoder


class Encoder(nnx.Module):
    """images (B, H, W, in) -> (B, H/f, W/f, 2 * latent) before quant_conv."""

    def __init__(self, config: VAEConfig, *, rngs):
        chans, dtype = config.block_out_channels, config.compute_dtype
        self.conv_in = _conv(config.in_channels, chans[0], 3, rngs=rngs, dtype=dtype)
        self.down_blocks = nnx.List([
            DownBlock(chans[max(i - 1, 0)], c, config.layers_per_block, i < len(chans) - 1,
                      config, rngs=rngs)
            for i, c in enumerate(chans)
        ])
        self.mid_block = MidBlock(chans[-1], config, rngs=rngs)
        self.conv_norm_out = GroupNorm(chans[-1], config.norm_num_groups, config.norm_eps)
        self.conv_out = _conv(chans[-1], 2 * config.latent_channels, 3, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """latents (B, h, w, latent) after post_quant_conv -> images (B, h*f, w*f, out)."""

    def __init__(self, config: VAEConfig, *, rngs):
        chans, dtype = config.block_out_channels[::-1], config.compute_dtype
        self.conv_in = _conv(config.latent_channels, chans[0], 3, rngs=rngs, dtype=dtype)
        self.mid_block = MidBlock(chans[0], config, rngs=rngs)
        self.up_blocks = nnx.List([
            UpBlock(chans[max(i - 1, 0)], c, config.layers_per_block + 1, i < len(chans) - 1,
                    config, rngs=rngs)
            for i, c in enumerate(chans)
        ])
        self.conv_norm_out = GroupNorm(chans[-1], config.norm_num_groups, config.norm_eps)
        self.conv_out = _conv(chans[-1], config.out_channels, 3, rngs=rngs, dtype=dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


# -------------------------------------------------------------------------------- model


class AutoencoderKL(nnx.Module):
    """The KL autoencoder: encoder + quant_conv (moments), post_quant_conv + decoder."""

    def __init__(self, config: VAEConfig = VAEConfig(), *, rngs: nnx.Rngs):
        self.config = config
        dtype, latent = config.compute_dtype, config.latent_channels
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        self.quant_conv = _conv(2 * latent, 2 * latent, 1, rngs=rngs, dtype=dtype)
        self.post_quant_conv = _conv(latent, latent, 1, rngs=rngs, dtype=dtype)

    def _check(self, x: jax.Array, channels: int, what: str, factor: int = 1) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(
                f"{what} must be NHWC with {channels} channels, got shape {tuple(x.shape)}"
            )
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"{what} of size {x.shape[1]}x{x.shape[2]}: height and width must be "
                f"multiples of {factor} (the VAE's downsampling factor)"
            )

    def encode(self, x: jax.Array) -> jax.Array:
        """images (B, H, W, 3) in [-1, 1] -> posterior moments (B, H/f, W/f, 2 * latent)
        (mean then logvar, before clipping), float32."""
        cfg = self.config
        self._check(x, cfg.in_channels, "images", cfg.downsample_factor)
        h = self.encoder(x.astype(cfg.compute_dtype))
        return self.quant_conv(h).astype(jnp.float32)

    def posterior(self, x: jax.Array) -> DiagonalGaussian:
        return DiagonalGaussian.from_moments(self.encode(x))

    def decode(self, z: jax.Array) -> jax.Array:
        """unscaled latents (B, h, w, latent) -> images (B, h*f, w*f, 3), float32."""
        cfg = self.config
        self._check(z, cfg.latent_channels, "latents")
        h = self.post_quant_conv(z.astype(cfg.compute_dtype))
        return self.decoder(h).astype(jnp.float32)

    def encode_to_latents(self, x: jax.Array, key: jax.Array) -> jax.Array:
        """A posterior sample times scaling_factor (what the diffusion models train on)."""
        return self.posterior(x).sample(key) * self.config.scaling_factor

    def decode_latents(self, z: jax.Array) -> jax.Array:
        """decode(z / scaling_factor): diffusion-model latents -> images in about [-1, 1]."""
        return self.decode(z.astype(jnp.float32) / self.config.scaling_factor)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction: decode a posterior sample (the mean when key is None)."""
        post = self.posterior(x)
        return self.decode(post.mean if key is None else post.sample(key))


# ------------------------------------------------------------------------------ helpers


def abstract_model(config: VAEConfig = VAEConfig()) -> AutoencoderKL:
    """The model with ShapeDtypeStruct leaves (nothing allocated)."""
    return nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=8)
def _param_shapes(config: VAEConfig) -> dict:
    return nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))


def param_shapes(config: VAEConfig = VAEConfig()) -> dict:
    """Our pure parameter dict of a config, as ShapeDtypeStructs (a fresh tree each call)."""
    return jax.tree.map(lambda s: s, _param_shapes(config))


def param_count(config: VAEConfig = VAEConfig(), part: str | None = None) -> int:
    """Number of parameters (part: None = all, or "encoder", "decoder", "quant_conv",
    "post_quant_conv"), counted abstractly."""
    shapes = param_shapes(config)
    if part is not None:
        shapes = shapes[part]
    return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
