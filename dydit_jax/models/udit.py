"""U-DiT (Tian et al., NeurIPS 2024): a U-Net of adaLN-Zero transformer blocks whose
self-attention runs on downsampled tokens (docs/udit.md).

Layout, NHWC, widths C / 2C / 4C (C = hidden_size):

  stem Conv3x3(in -> C)
  encoder_level_1  [2 blocks, HxW,     C,  cond c1]  -> down1_2: Conv3x3(C -> C/2), unshuffle
  encoder_level_2  [5 blocks, H/2,     2C, cond c2]  -> down2_3: Conv3x3(2C -> C), unshuffle
  latent           [8 blocks, H/4,     4C, cond c3]  -> up3_2: Conv3x3(4C -> 8C), shuffle
  decoder_level_2  [5 blocks, H/2,     2C, cond c2]  (after concat with encoder 2, 1x1 4C -> 2C)
                                                     -> up2_1: Conv3x3(2C -> 4C), shuffle
  decoder_level_1  [2 blocks, HxW,     2C, cond c2]  (after concat with encoder 1, 1x1 2C -> 2C)
  output Conv3x3(2C -> 2C); final layer: adaLN on c2, LN, Conv3x3(2C -> out)

Every block holds two sub-layers (attention + FFN each, own adaLN modulation). Attention:
`y = DWConv5x5(x) + x`, split into the 4 interleaved 2x2 sub-grids, multi-head attention inside
each sub-grid (shared weights), RoPE2D on q/k, cosine logits times a clamped learned per-head
scale, merge back, 1x1 output projection. FFN (training form): 1x1 (w -> h/2) -> 1x1 (h/2 -> h)
-> exact GELU -> identity + DW5 + DW3 + DW1 -> 1x1 (h -> h/2) -> 1x1 (h/2 -> w), with h = 2w.
The fused (inference) form merges each 1x1 pair into one matmul and the depthwise branches and
identity into one 5x5 kernel: `fuse_params` maps training-form parameters to it (a pure
function; nothing is changed in place). `vanilla=True` is the paper's plain baseline: scaled
dot-product attention without RoPE and a Linear -> tanh GELU -> Linear MLP (the token
downsampling with its depthwise conv stays).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dydit_jax import parallel
from dydit_jax.models import layers
from dydit_jax.models.dit import REMAT_POLICIES

# hidden size C (stage widths C, 2C, 4C) and heads (the same in every stage), docs/udit.md
UDIT_SIZES = {"S": (96, 4), "B": (192, 8), "L": (384, 16)}

LOGIT_SCALE_INIT = math.log(10.0)  # cosine attention starts at temperature 1/10
# the learned scale's clamp: the release's literal 4.6052, not ln 100 = 4.605170 (docs/udit.md)
LOGIT_SCALE_MAX = 4.6052
ROPE_THETA = 10000.0
DOWNSAMPLER_KERNEL = 5  # depthwise conv in front of the token split
FFN_KERNELS = (5, 3, 1)  # re-parameterisable depthwise branches of the FFN (fused into 5x5)
NUM_LABEL_EMBEDDERS = 3  # one conditioning vector per width (C, 2C, 4C)
CONV_IMPLS = ("shifted", "xla")


@dataclasses.dataclass(frozen=True)
class UDiTConfig:
    input_size: int = 32  # latent height = width; divisible by 8
    in_channels: int = 4
    hidden_size: int = 192  # C: stage widths are C, 2C, 4C (decoder level 1 runs at 2C)
    num_heads: int = 8  # in every stage
    depth_level1: int = 2  # blocks of encoder level 1 (and of decoder level 1)
    depth_level2: int = 5  # blocks of encoder level 2 (and of decoder level 2)
    depth_latent: int = 8  # blocks at 1/4 resolution
    mlp_ratio: float = 2.0  # FFN hidden width h = mlp_ratio * w
    num_classes: int = 1000
    learn_sigma: bool = True  # output 2C channels: eps and the variance interpolation value
    vanilla: bool = False  # plain baseline: dot-product attention, no RoPE, Linear-GELU MLP
    fused: bool = False  # re-parameterised (inference) FFN; build it with `fuse_params`
    dtype: str = "float32"  # compute dtype (bfloat16 for speed); parameters stay float32
    attention: str = "einsum"  # einsum (f32 softmax) | xla | cudnn: jax.nn.dot_product_attention
    remat: str = "none"  # per-block rematerialisation: none | full | dots (save matmul outputs)
    # depthwise convs: shifted (sum of k*k shifted slices, fused into one loop; much faster
    # than XLA:CPU's grouped conv, but slower to compile) | xla (lax grouped convolution)
    depthwise: str = "shifted"

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def num_label_embedders(self) -> int:
        """Label columns the model accepts: the trainer drops labels per column (reference)."""
        return NUM_LABEL_EMBEDDERS

    @property
    def widths(self) -> tuple[int, int, int]:
        """Channel widths of the three resolutions (and of the three conditioning vectors)."""
        c = self.hidden_size
        return c, 2 * c, 4 * c

    def mlp_hidden(self, width: int) -> int:
        return int(width * self.mlp_ratio)

    def stages(self) -> list[tuple[str, int, int, int]]:
        """(module name, width, grid side, conditioning index) of the five block stages."""
        c, s = self.hidden_size, self.input_size
        return [
            ("encoder_level_1", c, s, 0),
            ("encoder_level_2", 2 * c, s // 2, 1),
            ("latent", 4 * c, s // 4, 2),
            ("decoder_level_2", 2 * c, s // 2, 1),
            ("decoder_level_1", 2 * c, s, 1),
        ]

    def stage_depths(self) -> tuple[int, int, int, int, int]:
        return (
            self.depth_level1, self.depth_level2, self.depth_latent, self.depth_level2,
            self.depth_level1,
        )

    def validate(self) -> None:
        for name in (
            "input_size", "in_channels", "hidden_size", "num_heads", "depth_level1",
            "depth_level2", "depth_latent", "num_classes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.input_size % 8:
            raise ValueError(
                f"U-DiT needs an input size divisible by 8 (two 2x downsamplings, then 2x2 "
                f"token groups at 1/4 resolution), got {self.input_size}; resize or pad the "
                "input (digits: --config.image_size=16)"
            )
        # RoPE2D rotates channel pairs alternating x and y: head width divisible by 4.
        unit = 2 if self.vanilla else 4
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % unit:
            raise ValueError(
                f"hidden size {self.hidden_size} with {self.num_heads} heads: the head width "
                f"must be a whole multiple of {unit} (RoPE2D pairs alternate x and y); choose "
                "a head count that divides hidden_size / 4"
            )
        if self.mlp_hidden(self.hidden_size) % 2 or self.mlp_hidden(self.hidden_size) < 2:
            raise ValueError(
                f"mlp_ratio {self.mlp_ratio} gives an odd FFN width "
                f"{self.mlp_hidden(self.hidden_size)}; the re-parameterisable FFN halves it"
            )
        if self.vanilla and self.fused:
            raise ValueError("vanilla U-DiT has no re-parameterisable FFN; set fused=False")
        choices = {
            "attention": layers.ATTENTION_IMPLS, "remat": tuple(REMAT_POLICIES),
            "depthwise": CONV_IMPLS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")


# ------------------------------------------------------------------- tensor reshuffles


def pixel_unshuffle(x: jax.Array, factor: int = 2) -> jax.Array:
    """(B, H, W, C) -> (B, H/f, W/f, C f^2); output channel c*f*f + i*f + j holds row offset
    i and column offset j of input channel c (PyTorch's PixelUnshuffle order)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // factor, w // factor, c * factor**2)


def pixel_shuffle(x: jax.Array, factor: int = 2) -> jax.Array:
    """Inverse of `pixel_unshuffle` (PyTorch's PixelShuffle order)."""
    b, h, w, cf = x.shape
    c = cf // factor**2
    x = x.reshape(b, h, w, c, factor, factor)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * factor, w * factor, c)


def split_groups(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, 4, H/2 * W/2, C): group g = (row % 2) * 2 + (col % 2), tokens of a
    group in raster order over its (H/2, W/2) sub-grid, all channels kept."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, 4, (h // 2) * (w // 2), c)


def merge_groups(x: jax.Array, height: int, width: int) -> jax.Array:
    """Inverse of `split_groups`: (B, 4, n, C) -> (B, height, width, C)."""
    b, _, _, c = x.shape
    x = x.reshape(b, 2, 2, height // 2, width // 2, c).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, height, width, c)


# ------------------------------------------------------------------------------ RoPE2D


def rope2d_frequencies(head_dim: int) -> np.ndarray:
    """f_k = 1 / theta^(4k / d), k = 0 .. d/4 - 1, computed in float32 like the reference."""
    exponent = np.arange(0, head_dim, 4)[: head_dim // 4].astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.power(np.float32(ROPE_THETA), exponent)).astype(np.float32)


def rope2d_angles(head_dim: int, num_tokens: int) -> np.ndarray:
    """(num_tokens, head_dim / 2) float32 rotation angles of the channel pairs (2p, 2p+1):
    `col * f_{p//2}` for even p, `row * f_{p//2}` for odd p, on a square grid of tokens in
    raster order (col = t % side, row = t // side)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"RoPE2D needs a square token grid, got {num_tokens} tokens")
    t = np.arange(num_tokens)
    freqs = rope2d_frequencies(head_dim)
    col = np.outer((t % side).astype(np.float32), freqs)
    row = np.outer((t // side).astype(np.float32), freqs)
    return np.stack([col, row], axis=-1).reshape(num_tokens, head_dim // 2).astype(np.float32)


def apply_rope2d(x: jax.Array, angles: np.ndarray) -> jax.Array:
    """Rotate adjacent channel pairs of x (..., n, heads, d) by `angles` (n, d/2), in float32:
    (a, b) -> (a cos - b sin, a sin + b cos)."""
    angles64 = angles.astype(np.float64)  # the float32 angles, with correctly rounded cos/sin
    cos = jnp.asarray(np.cos(angles64).astype(np.float32))[:, None, :]
    sin = jnp.asarray(np.sin(angles64).astype(np.float32))[:, None, :]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||_2, eps) over the last axis, in float32 (torch.nn.functional.normalize)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


# ---------------------------------------------------------------------------- builders


class InitKeys:
    """Initialisation keys for the model's layers, `fold_in(key, i)` for the i-th call of
    `.params()` (the only method NNX layers call on `rngs`).

    Why not nnx.Rngs itself: it writes its counter into a Variable on every call, and under
    tracing (nnx.eval_shape, the jitted init) each such write walks the whole trace so far
    (jax's tracer `.sharding` error message), which is quadratic in the number of layers:
    ~30 s for U-DiT's ~1000 layer inits. This counter lives in Python."""

    def __init__(self, key: jax.Array):
        self.key = key
        self.count = 0

    def params(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


class SameConv(nnx.Module):
    """Stride-1 "same" conv (zero padding k // 2) on (B, H, W, C), dense or depthwise, with
    the reference init: xavier-uniform on the HWIO kernel (k, k, I, O), or (k, k, 1, C) for
    depthwise -- the fans of torch's (O, I/groups, k, k) view -- and a zero bias. `axes` are
    the logical names of the kernel's four dims; the bias takes the last.

    impl "shifted": a sum over the k*k taps of shifted slices of the padded input, times
    K[i, j] (depthwise: elementwise, which XLA fuses into one loop; dense: one matmul per
    tap). "xla": lax.conv_general_dilated (cuDNN on GPUs).
    """

    def __init__(
        self, in_features: int, out_features: int, kernel: int, *,
        axes: tuple[str | None, ...], rngs, dtype=None, bias: bool = True,
        depthwise: bool = False, kernel_init=layers.xavier_uniform, impl: str = "shifted",
    ):
        if impl not in CONV_IMPLS:
            raise ValueError(f"conv {impl!r} is not one of {CONV_IMPLS}")
        if depthwise and in_features != out_features:
            raise ValueError("a depthwise conv keeps the channel count")
        self.impl, self.size, self.depthwise, self.dtype = impl, kernel, depthwise, dtype
        shape = (kernel, kernel, 1 if depthwise else in_features, out_features)
        init = nnx.with_partitioning(kernel_init, axes)
        self.kernel = nnx.Param(init(rngs.params(), shape, jnp.float32))
        if bias:
            zeros = nnx.with_partitioning(layers.zeros, (axes[-1],))
            self.bias = nnx.Param(zeros(None, (out_features,), jnp.float32))
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype if self.dtype is None else self.dtype
        x, kernel = x.astype(dtype), self.kernel[...].astype(dtype)
        k, pad = self.size, self.size // 2
        if self.impl == "xla":
            out = jax.lax.conv_general_dilated(
                x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=x.shape[-1] if self.depthwise else 1,
            )
        else:
            h, w = x.shape[1:3]
            padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x
            out = None
            for i in range(k):
                for j in range(k):
                    tap = padded[:, i : i + h, j : j + w]
                    tap = tap * kernel[i, j, 0] if self.depthwise else tap @ kernel[i, j]
                    out = tap if out is None else out + tap
        return out if self.bias is None else out + self.bias[...].astype(dtype)


def conv(
    in_features: int, out_features: int, kernel: int, *, axes: tuple[str | None, ...],
    rngs, dtype=None, bias: bool = True, kernel_init=layers.xavier_uniform,
) -> SameConv:
    """A dense "same" conv (lax.conv_general_dilated: faster than the shifted sum of matmuls
    on CPU, cuDNN on GPUs)."""
    return SameConv(
        in_features, out_features, kernel, axes=axes, rngs=rngs, dtype=dtype, bias=bias,
        kernel_init=kernel_init, impl="xla",
    )


def depthwise(width: int, kernel: int, *, axis: str, config: UDiTConfig, rngs,
              dtype=None) -> SameConv:
    """A depthwise "same" conv with bias (kernel (k, k, 1, width)), as `config.depthwise`."""
    return SameConv(
        width, width, kernel, axes=("conv", "conv", None, axis), rngs=rngs, dtype=dtype,
        depthwise=True, impl=config.depthwise,
    )


def stem_init(in_channels: int, out_channels: int, kernel: int):
    """xavier-uniform on the (out, in * k * k) view of the stem kernel, as the reference
    (which initialises it like a Linear): bound sqrt(6 / (in k^2 + out))."""
    bound = math.sqrt(6.0 / (in_channels * kernel * kernel + out_channels))
    uniform = nnx.initializers.uniform(scale=2 * bound)
    return lambda key, shape, dtype=jnp.float32: uniform(key, shape, dtype) - bound


# ------------------------------------------------------------------------------ layers


class TokenDownsampledAttention(nnx.Module):
    """Attention inside the four interleaved 2x2 sub-grids of a (B, H, W, w) map.

    Cosine form (default): RoPE2D on q and k, logits `normalize(q) . normalize(k)` times
    `exp(min(logit_scale_h, 4.6052))` (the release's rounding of ln 100). Vanilla form: no
    RoPE, logits `q . k / sqrt(d)`.
    """

    def __init__(self, width: int, num_heads: int, *, config: UDiTConfig, rngs, dtype=None):
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.cosine = not config.vanilla
        self.impl = config.attention
        self.downsampler = depthwise(
            width, DOWNSAMPLER_KERNEL, axis="embed", config=config, rngs=rngs, dtype=dtype
        )
        self.to_qkv = layers.dense(width, 3 * width, axes=("embed", "qkv"), rngs=rngs, dtype=dtype)
        self.to_out = layers.dense(width, width, axes=("heads", "embed"), rngs=rngs, dtype=dtype)
        if self.cosine:
            self.logit_scale = nnx.Param(
                jnp.full((num_heads, 1, 1), LOGIT_SCALE_INIT, jnp.float32),
                out_sharding=("heads", None, None),
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        groups = split_groups(self.downsampler(x) + x)  # (B, 4, n, w)
        n = groups.shape[2]
        qkv = parallel.constrain(self.to_qkv(groups), ("batch", "groups", "length", "qkv"))
        qkv = qkv.reshape(b, 4, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # (B, 4, n, H, d)
        if self.cosine:
            angles = rope2d_angles(self.head_dim, n)  # same for every group and head
            q, k = l2_normalize(apply_rope2d(q, angles)), l2_normalize(apply_rope2d(k, angles))
            scale = jnp.exp(jnp.minimum(self.logit_scale[...], LOGIT_SCALE_MAX))  # (H, 1, 1)
        else:
            scale = None
        out = self._attend(q, k, v, scale)
        return self.to_out(merge_groups(out.reshape(b, 4, n, c), h, w))

    def _attend(self, q, k, v, logit_scale) -> jax.Array:
        """softmax(logits) v per (sample, group, head); q, k, v (B, 4, n, H, d)."""
        b, g, n, heads, d = q.shape
        if self.impl == "einsum":  # the shared softmax attention, groups folded into the batch
            flat = lambda a: a.reshape(b * g, n, heads, d)
            out = layers.dot_product_attention(flat(q), flat(k), flat(v), logit_scale)
            return out.reshape(b, g, n, heads, d)
        # Fused kernels take one scalar scale: fold the per-head scale into q.
        if logit_scale is not None:
            q = q.astype(jnp.float32) * logit_scale[:, 0, 0][:, None]
        flat = lambda a: a.astype(v.dtype).reshape(b * g, n, heads, d)
        out = jax.nn.dot_product_attention(
            flat(q), flat(k), flat(v), scale=None if logit_scale is None else 1.0,
            implementation=self.impl,
        )
        return out.reshape(b, g, n, heads, d)


class ReparamFFN(nnx.Module):
    """The re-parameterisable FFN on (B, H, W, w) maps, training form (`fused=False`) or the
    fused inference form (`fused=True`, parameters from `fuse_params`).

    Logical names: dims of width w (including the h/2 = w middle of the 1x1 pairs) are
    `embed`, dims of width h are `mlp`, so tensor parallelism splits the depthwise part.
    """

    def __init__(self, width: int, hidden: int, *, config: UDiTConfig, rngs, dtype=None):
        mid = hidden // 2
        lin = lambda i, o, axes: layers.dense(i, o, axes=axes, rngs=rngs, dtype=dtype)
        dw = lambda k: depthwise(hidden, k, axis="mlp", config=config, rngs=rngs, dtype=dtype)
        self.fused = config.fused
        if self.fused:
            self.project_in = lin(width, hidden, ("embed", "mlp"))
            self.dwconv = dw(FFN_KERNELS[0])
            self.project_out = lin(hidden, width, ("mlp", "embed"))
        else:
            self.project_in = nnx.List(
                [lin(width, mid, ("embed", "embed")), lin(mid, hidden, ("embed", "mlp"))]
            )
            self.dwconv = nnx.List([dw(k) for k in FFN_KERNELS])
            self.project_out = nnx.List(
                [lin(hidden, mid, ("mlp", "embed")), lin(mid, width, ("embed", "embed"))]
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.fused:
            z = jax.nn.gelu(self.project_in(x), approximate=False)
            return self.project_out(self.dwconv(z))
        z = jax.nn.gelu(self.project_in[1](self.project_in[0](x)), approximate=False)
        u = z
        for branch in self.dwconv:  # identity + DW5 + DW3 + DW1, summed in this order
            u = u + branch(z)
        return self.project_out[1](self.project_out[0](u))


class UDiTSubLayer(nnx.Module):
    """x += gate_a * Attn(mod(LN(x))); x += gate_f * FFN(mod(LN(x))), on (B, H, W, w) maps."""

    def __init__(self, width: int, *, config: UDiTConfig, rngs, dtype=None):
        self.adaLN = layers.AdaLNModulation(width, 6, rngs=rngs, dtype=dtype)
        self.attn = TokenDownsampledAttention(
            width, config.num_heads, config=config, rngs=rngs, dtype=dtype
        )
        hidden = config.mlp_hidden(width)
        if config.vanilla:
            self.mlp = layers.Mlp(width, hidden, rngs=rngs, dtype=dtype)  # tanh GELU
        else:
            self.mlp = ReparamFFN(width, hidden, config=config, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.adaLN(c)
        attn = parallel.constrain(self.attn(_modulate(x, shift_a, scale_a)), parallel.IMAGE)
        x = x + _per_sample(gate_a) * attn
        mlp = parallel.constrain(self.mlp(_modulate(x, shift_f, scale_f)), parallel.IMAGE)
        return x + _per_sample(gate_f) * mlp


def _per_sample(v: jax.Array) -> jax.Array:
    """(B, w) -> (B, 1, 1, w): broadcast a per-sample vector over a map."""
    return v[:, None, None, :]


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return layers.layer_norm(x) * (1 + _per_sample(scale)) + _per_sample(shift)


class UDiTBlock(nnx.Module):
    """Two sub-layers (the reference's attn1/mlp1/adaLN_modulation1 and attn2/...)."""

    def __init__(self, width: int, *, config: UDiTConfig, rngs, dtype=None):
        self.sublayers = nnx.List(
            [UDiTSubLayer(width, config=config, rngs=rngs, dtype=dtype) for _ in range(2)]
        )

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        for sublayer in self.sublayers:
            x = sublayer(x, c)
        return x


class Resample(nnx.Module):
    """Conv3x3 without bias, then pixel unshuffle (down: C -> C/2 -> 2C at half size) or
    pixel shuffle (up: C -> 2C -> C/2 at double size)."""

    def __init__(self, width: int, *, down: bool, rngs, dtype=None):
        self.down = down
        out = width // 2 if down else width * 2
        self.conv = conv(
            width, out, 3, axes=("conv", "conv", "embed", "embed"), bias=False, rngs=rngs,
            dtype=dtype,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)
        return pixel_unshuffle(x) if self.down else pixel_shuffle(x)


class UDiTFinalLayer(nnx.Module):
    """shift, scale = adaLN(c) (shift first); zero-initialised Conv3x3(mod(LN(x)))."""

    def __init__(self, width: int, out_channels: int, *, rngs, dtype=None):
        self.adaLN = layers.AdaLNModulation(width, 2, rngs=rngs, dtype=dtype)
        self.out_proj = conv(
            width, out_channels, 3, axes=("conv", "conv", "embed", "out"), rngs=rngs,
            dtype=dtype, kernel_init=layers.zeros,
        )

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = self.adaLN(c)
        return self.out_proj(_modulate(x, shift, scale))


# ------------------------------------------------------------------------------- model


class UDiT(nnx.Module):
    """model(x, t, y): NHWC x, int32 t in 0..999, int32 labels -> NHWC with out_channels.

    `y` is (B,) (one label for all three label embedders) or (B, 3): one column per
    embedder, so that training can drop labels independently per embedder, as the
    reference does (`num_classes` = the null label).
    """

    def __init__(self, config: UDiTConfig, *, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        # Parameters carry logical axis names; sharding is applied explicitly by the trainer.
        with nnx.use_eager_sharding(False):
            self._build(config, InitKeys(rngs.params()))

    def _build(self, config: UDiTConfig, rngs: InitKeys) -> None:
        dtype = jnp.dtype(config.dtype)
        c = config.hidden_size
        self.x_embedder = conv(
            config.in_channels, c, 3, axes=("conv", "conv", "channels", "embed"), rngs=rngs,
            dtype=dtype, kernel_init=stem_init(config.in_channels, c, 3),
        )
        self.t_embedders = nnx.List(
            [layers.TimestepEmbedder(w, rngs=rngs, dtype=dtype) for w in config.widths]
        )
        self.y_embedders = nnx.List(
            [layers.LabelEmbedder(config.num_classes, w, rngs=rngs, dtype=dtype)
             for w in config.widths]
        )
        widths_and_depths = {
            name: (width, depth)
            for (name, width, _, _), depth in zip(config.stages(), config.stage_depths(),
                                                  strict=True)
        }

        def stage(name: str) -> nnx.List:
            width, depth = widths_and_depths[name]
            return nnx.List(
                [UDiTBlock(width, config=config, rngs=rngs, dtype=dtype) for _ in range(depth)]
            )

        resample = lambda w, down: Resample(w, down=down, rngs=rngs, dtype=dtype)
        reduce = lambda i, o: layers.dense(i, o, axes=("embed", "embed"), rngs=rngs, dtype=dtype)
        self.encoder_level_1 = stage("encoder_level_1")
        self.down1_2 = resample(c, True)
        self.encoder_level_2 = stage("encoder_level_2")
        self.down2_3 = resample(2 * c, True)
        self.latent = stage("latent")
        self.up3_2 = resample(4 * c, False)
        self.reduce_chan_level2 = reduce(4 * c, 2 * c)  # 1x1 conv after the skip concat
        self.decoder_level_2 = stage("decoder_level_2")
        self.up2_1 = resample(2 * c, False)
        self.reduce_chan_level1 = reduce(2 * c, 2 * c)
        self.decoder_level_1 = stage("decoder_level_1")
        self.output = conv(
            2 * c, 2 * c, 3, axes=("conv", "conv", "embed", "embed"), rngs=rngs, dtype=dtype
        )
        self.final_layer = UDiTFinalLayer(2 * c, config.out_channels, rngs=rngs, dtype=dtype)

    def conditionings(self, t: jax.Array, y: jax.Array) -> list[jax.Array]:
        """[c1, c2, c3] of widths C, 2C, 4C: c_k = t_emb_k(t) + y_emb_k(y_k)."""
        if y.ndim == 1:
            y = jnp.broadcast_to(y[:, None], (y.shape[0], NUM_LABEL_EMBEDDERS))
        if y.shape[1:] != (NUM_LABEL_EMBEDDERS,):
            raise ValueError(f"labels must be (B,) or (B, 3), got shape {y.shape}")
        return [
            t_emb(t) + y_emb(y[:, k])
            for k, (t_emb, y_emb) in enumerate(zip(self.t_embedders, self.y_embedders,
                                                   strict=True))
        ]

    def run_stage(self, blocks: nnx.List, x: jax.Array, c: jax.Array) -> jax.Array:
        def apply(graphdef, block_state, h):
            return nnx.merge(graphdef, block_state)(h, c)

        if self.config.remat != "none":
            apply = jax.checkpoint(
                apply, policy=REMAT_POLICIES[self.config.remat], static_argnums=(0,)
            )
        for block in blocks:
            graphdef, block_state = nnx.split(block)
            x = parallel.constrain(x, parallel.IMAGE)
            x = parallel.constrain(apply(graphdef, block_state, x), parallel.IMAGE)
        return x

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.config.dtype)
        c1, c2, c3 = self.conditionings(t, y)
        enc1 = self.run_stage(self.encoder_level_1, self.x_embedder(x.astype(dtype)), c1)
        enc2 = self.run_stage(self.encoder_level_2, self.down1_2(enc1), c2)
        lat = self.run_stage(self.latent, self.down2_3(enc2), c3)
        # skip connections: the upsampled map first, then the encoder output
        dec2 = self.reduce_chan_level2(jnp.concatenate([self.up3_2(lat), enc2], axis=-1))
        dec2 = self.run_stage(self.decoder_level_2, dec2, c2)
        dec1 = self.reduce_chan_level1(jnp.concatenate([self.up2_1(dec2), enc1], axis=-1))
        dec1 = self.run_stage(self.decoder_level_1, dec1, c2)
        return self.final_layer(self.output(dec1), c2).astype(jnp.float32)


# ---------------------------------------------------------------------------- fusion


def fuse_ffn_params(ffn: Mapping[str, Any]) -> dict[str, Any]:
    """Training-form FFN parameters (kernels (in, out), depthwise (k, k, 1, h)) -> fused form.

    project_in: K = K0 @ K1, b = b0 @ K1 + b1 (and the same for project_out); depthwise:
    K = K5; K[1:4, 1:4] += K3; K[2, 2] += K1 + 1 (the identity branch); b = b5 + b3 + b1.
    """
    hi = jax.lax.Precision.HIGHEST

    def pair(first, second):
        k1 = jnp.asarray(second["kernel"])
        return {
            "kernel": jnp.matmul(jnp.asarray(first["kernel"]), k1, precision=hi),
            "bias": jnp.matmul(jnp.asarray(first["bias"]), k1, precision=hi)
            + jnp.asarray(second["bias"]),
        }

    dw5, dw3, dw1 = (ffn["dwconv"][i] for i in range(3))
    kernel = jnp.asarray(dw5["kernel"])
    kernel = kernel.at[1:4, 1:4].add(jnp.asarray(dw3["kernel"]))
    kernel = kernel.at[2:3, 2:3].add(jnp.asarray(dw1["kernel"]) + 1.0)
    bias = jnp.asarray(dw5["bias"]) + jnp.asarray(dw3["bias"]) + jnp.asarray(dw1["bias"])
    return {
        "project_in": pair(ffn["project_in"][0], ffn["project_in"][1]),
        "dwconv": {"kernel": kernel, "bias": bias},
        "project_out": pair(ffn["project_out"][0], ffn["project_out"][1]),
    }


def _is_training_ffn(node: Any) -> bool:
    return (
        isinstance(node, Mapping)
        and set(node) == {"project_in", "dwconv", "project_out"}
        and isinstance(node["dwconv"], Mapping)
        and "kernel" not in node["dwconv"]
    )


def fuse_params(config: UDiTConfig, params: Mapping) -> tuple[UDiTConfig, dict]:
    """(fused config, fused params) of a training-form U-DiT: a pure function of the pure
    parameter dict (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`, numpy or jax arrays,
    jittable); the inputs are not modified. Every other parameter is passed through.

    Already fused or vanilla configs (nothing to re-parameterise) come back unchanged, so
    callers may fuse unconditionally.
    """
    if not isinstance(config, UDiTConfig):
        raise ValueError(f"fuse_params needs a UDiTConfig, got {type(config).__name__}")
    if config.fused or config.vanilla:
        return config, params

    def walk(node):
        if _is_training_ffn(node):
            return fuse_ffn_params(node)
        if isinstance(node, Mapping):
            return {key: walk(value) for key, value in node.items()}
        return node

    return dataclasses.replace(config, fused=True), walk(params)
