"""Layers shared by DiT, DyDiT and U-DiT.

Numerics follow the reference releases (docs/dit.md): cos-first timestep features, a null
label row, adaLN-Zero modulation, LayerNorm without affine at eps 1e-6, tanh GELU, and the
reference initialisation (xavier-uniform linears, normal(0.02) embeddings, zero adaLN and
output layers). Tensors are NHWC / (batch, tokens, channels).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dydit_jax import parallel

Dtype = jnp.dtype

xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
normal_002 = nnx.initializers.normal(stddev=0.02)


class Buffer(nnx.Variable):
    """A fixed, non-trainable array stored with the model (e.g. the sin-cos position table)."""


def dense(
    in_features: int,
    out_features: int,
    *,
    axes: tuple[str, str],
    rngs: nnx.Rngs,
    dtype: Dtype | None = None,
    kernel_init=xavier_uniform,
    bias_init=zeros,
) -> nnx.Linear:
    """A Linear layer with the reference initialisation (xavier-uniform kernel, zero bias).

    `axes` are the logical names of the kernel's (in, out) dimensions; the bias carries the
    out name. `parallel.py` maps logical names to mesh axes with the config's rules.
    """
    return nnx.Linear(
        in_features,
        out_features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(kernel_init, axes),
        bias_init=nnx.with_partitioning(bias_init, (axes[1],)),
        rngs=rngs,
    )


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters, computed in float32 whatever the compute dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation; shift/scale are per sample (B, D) and broadcast over tokens."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


# ---------------------------------------------------------------------------- embeddings


def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """[sin(pos * omega), cos(pos * omega)] with omega_k = 1 / 10000^(k / (embed_dim / 2))."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int | None = None) -> np.ndarray:
    """Fixed 2-D position table (grid_h * grid_w, embed_dim) in float64, tokens row-major.

    The column (w) coordinate fills the first half of the channels, the row (h) coordinate
    the second half, as in the reference release (its meshgrid puts w first).
    """
    grid_w = grid_h if grid_w is None else grid_w
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    hh, ww = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb_w = sincos_1d(embed_dim // 2, ww)
    emb_h = sincos_1d(embed_dim // 2, hh)
    return np.concatenate([emb_w, emb_h], axis=1)


def timestep_features(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal timestep features, cos first (reference order), float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbedder(nnx.Module):
    """t -> 256 sinusoidal features -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden: int, *, freq_dim: int = 256, rngs: nnx.Rngs, dtype=None):
        self.freq_dim = freq_dim
        init = dict(rngs=rngs, dtype=dtype, kernel_init=normal_002)
        self.fc1 = dense(freq_dim, hidden, axes=("freq", "mlp"), **init)
        self.fc2 = dense(hidden, hidden, axes=("mlp", "embed"), **init)

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.fc2(nnx.silu(self.fc1(timestep_features(t, self.freq_dim))))


class LabelEmbedder(nnx.Module):
    """Class table with one extra row (index num_classes) for the null label of guidance."""

    def __init__(self, num_classes: int, hidden: int, *, rngs: nnx.Rngs, dtype=None):
        self.num_classes = num_classes
        self.table = nnx.Embed(
            num_classes + 1,
            hidden,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=nnx.with_partitioning(normal_002, ("classes", "embed")),
            rngs=rngs,
        )

    def __call__(self, y: jax.Array) -> jax.Array:
        return self.table(y)


def drop_labels(key: jax.Array, y: jax.Array, prob: float, null_label: int) -> jax.Array:
    """Replace each label by the null label with probability `prob` (classifier-free training)."""
    if prob <= 0:
        return y
    drop = jax.random.uniform(key, y.shape) < prob
    return jnp.where(drop, null_label, y)


class PatchEmbed(nnx.Module):
    """Conv with kernel = stride = patch (VALID): NHWC image -> (B, N, D) row-major tokens."""

    def __init__(self, patch: int, in_ch: int, hidden: int, *, rngs: nnx.Rngs, dtype=None):
        # xavier-uniform on the (out, in * p * p) view, as the reference does; jax's own
        # conv fans would also count the receptive field in fan_out.
        bound = math.sqrt(6.0 / (in_ch * patch * patch + hidden))
        init = nnx.initializers.uniform(scale=2 * bound)
        self.patch = patch
        self.proj = nnx.Conv(
            in_ch,
            hidden,
            kernel_size=(patch, patch),
            strides=(patch, patch),
            padding="VALID",
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=nnx.with_partitioning(
                lambda k, s, d: init(k, s, d) - bound, ("patch", "patch", "channels", "embed")
            ),
            bias_init=nnx.with_partitioning(zeros, ("embed",)),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d)


def unpatchify(x: jax.Array, patch: int, channels: int, grid_h: int, grid_w: int) -> jax.Array:
    """(B, h*w, p*p*C) -> (B, h*p, w*p, C); each token holds a (p, p, C) patch, channel-last."""
    b = x.shape[0]
    x = x.reshape(b, grid_h, grid_w, patch, patch, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid_h * patch, grid_w * patch, channels)


# ------------------------------------------------------------------------------- blocks


class AdaLNModulation(nnx.Module):
    """SiLU -> Linear(D -> n*D), zero-initialised (adaLN-Zero); returns n chunks of (B, D)."""

    def __init__(self, hidden: int, n: int, *, rngs: nnx.Rngs, dtype=None):
        self.n = n
        self.linear = dense(
            hidden, n * hidden, axes=("embed", "modulation"), rngs=rngs, dtype=dtype,
            kernel_init=zeros,
        )

    def __call__(self, c: jax.Array) -> list[jax.Array]:
        # chunks of a tensor-sharded output: gathered first (parallel.constrain)
        modulation = parallel.constrain(self.linear(nnx.silu(c)), ("batch", "modulation"))
        return jnp.split(modulation, self.n, axis=-1)


ATTENTION_IMPLS = ("einsum", "xla", "cudnn")


class Attention(nnx.Module):
    """Multi-head self-attention with one fused qkv projection ([q | k | v], head-major).

    `impl`: "einsum" computes the softmax in float32 (reference numerics); "xla" and "cudnn"
    use `jax.nn.dot_product_attention` with that implementation (cudnn: fused flash attention
    on NVIDIA GPUs, bf16/fp16 only).
    """

    def __init__(
        self, hidden: int, num_heads: int, *, rngs: nnx.Rngs, dtype=None, impl: str = "einsum"
    ):
        if hidden % num_heads:
            raise ValueError(
                f"hidden size {hidden} is not divisible by num_heads {num_heads}; "
                "choose a head count that divides the hidden size"
            )
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention {impl!r} is not one of {ATTENTION_IMPLS}")
        self.impl = impl
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.qkv = dense(hidden, 3 * hidden, axes=("embed", "qkv"), rngs=rngs, dtype=dtype)
        self.proj = dense(hidden, hidden, axes=("heads", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, head_mask: jax.Array | None = None) -> jax.Array:
        """`head_mask` (B, H) multiplies each head's output before `proj` (DyDiT's TDW).

        The head count is read from the qkv kernel, so the same module runs with weights
        sliced to a subset of heads (the DyDiT engine); zero heads gives proj's bias.
        """
        b, n, _ = x.shape
        heads = self.qkv.kernel.shape[-1] // (3 * self.head_dim)
        qkv = parallel.constrain(self.qkv(x), ("batch", "length", "qkv"))
        qkv = qkv.reshape(b, n, 3, heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.impl == "einsum":
            out = dot_product_attention(q, k, v)
        else:
            out = jax.nn.dot_product_attention(q, k, v, implementation=self.impl)
        if head_mask is not None:
            out = out * head_mask[:, None, :, None].astype(out.dtype)
        return self.proj(out.reshape(b, n, heads * self.head_dim))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale=None) -> jax.Array:
    """Softmax attention over (B, N, H, Dh) inputs, returning (B, N, H, Dh); the logits and
    softmax in float32. `scale`: None (Dh^-0.5), a number, or per head (H, 1, 1).

    Laid out for speed (the same math to float round-off): heads are moved before tokens so
    that both products are plain batched matmuls (XLA:CPU ran the strided (B, N, H, Dh) form
    4x slower), the scale is applied to q (N x Dh values, not N x N), and the softmax's
    normalisation divides the (N, Dh) output instead of the (N, N) weights.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, H, N, Dh)
    q = (q.astype(jnp.float32) * scale).astype(k.dtype)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    # The shift only keeps exp in range; the softmax does not depend on it, so its gradient
    # is zero: stopping it spares the backward an (N, N) argmax mask.
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    out = jnp.einsum(
        "bhqk,bhkd->bhqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    out = out / weights.sum(axis=-1, keepdims=True)
    return out.astype(v.dtype).transpose(0, 2, 1, 3)


class Mlp(nnx.Module):
    """Linear -> tanh-GELU -> Linear."""

    def __init__(self, hidden: int, mlp_hidden: int, *, rngs: nnx.Rngs, dtype=None):
        self.fc1 = dense(hidden, mlp_hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = dense(mlp_hidden, hidden, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, group_mask: jax.Array | None = None) -> jax.Array:
        """`group_mask` (B, G) multiplies G contiguous channel groups of the hidden layer
        before GELU (GELU(0) = 0, so a masked group equals a dropped one)."""
        h = self.fc1(x)
        if group_mask is not None:
            per_group = h.shape[-1] // group_mask.shape[-1]
            h = h * jnp.repeat(group_mask, per_group, axis=-1)[:, None, :].astype(h.dtype)
        return self.fc2(gelu_tanh(h))


class FinalLayer(nnx.Module):
    """adaLN (shift first) -> zero-initialised Linear(D -> p*p*out_channels)."""

    def __init__(self, hidden: int, out_features: int, *, rngs: nnx.Rngs, dtype=None):
        self.adaLN = AdaLNModulation(hidden, 2, rngs=rngs, dtype=dtype)
        self.linear = dense(
            hidden, out_features, axes=("embed", "out"), rngs=rngs, dtype=dtype,
            kernel_init=zeros,
        )

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = self.adaLN(c)
        return self.linear(modulate(layer_norm(x), shift, scale))
