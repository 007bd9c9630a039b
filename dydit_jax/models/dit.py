"""DiT (Peebles & Xie, ICCV 2023): an isotropic adaLN-Zero transformer over latent patches."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dydit_jax import parallel
from dydit_jax.models import layers

# depth, hidden size, heads of the paper's four sizes (docs/dit.md).
DIT_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    input_size: int = 32  # latent height = width
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True  # output 2C channels: eps and the variance interpolation value
    dtype: str = "float32"  # compute dtype (bfloat16 for speed); parameters stay float32
    attention: str = "einsum"  # einsum (f32 softmax) | xla | cudnn: jax.nn.dot_product_attention
    remat: str = "none"  # per-block rematerialisation: none | full | dots (save matmul outputs)
    scan_blocks: bool = False  # lax.scan over stacked blocks: compile once, not depth times

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def validate(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input size {self.input_size} is not divisible by the patch size "
                f"{self.patch_size}; resize the input or pick a patch size that divides it"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden size {self.hidden_size} is not divisible by num_heads "
                f"{self.num_heads}; choose a head count that divides the hidden size"
            )
        if self.hidden_size % 4:
            raise ValueError(f"hidden size {self.hidden_size} must be divisible by 4")
        choices = {"attention": layers.ATTENTION_IMPLS, "remat": tuple(REMAT_POLICIES)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        for name in ("input_size", "patch_size", "in_channels", "depth", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class DiTBlock(nnx.Module):
    """adaLN-Zero block: x += gate * Attn(mod(LN(x))); x += gate * MLP(mod(LN(x)))."""

    def __init__(
        self, hidden: int, num_heads: int, mlp_hidden: int, *, rngs, dtype=None,
        attention: str = "einsum",
    ):
        self.attn = layers.Attention(hidden, num_heads, rngs=rngs, dtype=dtype, impl=attention)
        self.mlp = layers.Mlp(hidden, mlp_hidden, rngs=rngs, dtype=dtype)
        self.adaLN = layers.AdaLNModulation(hidden, 6, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        return self.forward(x, c)[0]

    def forward(
        self,
        x: jax.Array,
        c: jax.Array,
        head_mask: jax.Array | None = None,
        group_mask: jax.Array | None = None,
        token_router: Callable[[jax.Array], jax.Array] | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """The block with optional DyDiT masks: heads (B, H), MLP channel groups (B, G), and
        a token router that maps the residual stream after attention to a (B, N) mask of
        the tokens that run the MLP. Returns (x, token mask or None)."""
        mods = self.adaLN(c)
        x = self.attention_residual(x, mods, head_mask)
        token_mask = None if token_router is None else token_router(x)
        gate = mods[5][:, None, :]
        if token_mask is not None:
            gate = gate * token_mask[..., None].astype(gate.dtype)
        return x + gate * self.mlp_branch(x, mods, group_mask), token_mask

    def attention_residual(
        self, x: jax.Array, mods: list[jax.Array], head_mask: jax.Array | None = None
    ) -> jax.Array:
        """x + gate_msa * Attn(modulate(LN(x))); `mods` = the six adaLN chunks of c."""
        shift, scale, gate = mods[:3]
        h = self.attn(layers.modulate(layers.layer_norm(x), shift, scale), head_mask)
        return x + gate[:, None, :] * parallel.constrain(h, parallel.TOKENS)

    def mlp_branch(
        self, x: jax.Array, mods: list[jax.Array], group_mask: jax.Array | None = None
    ) -> jax.Array:
        """MLP(modulate(LN(x))) before its gate; x may hold any subset of the tokens."""
        h = self.mlp(layers.modulate(layers.layer_norm(x), mods[3], mods[4]), group_mask)
        return parallel.constrain(h, parallel.TOKENS)


class DiT(nnx.Module):
    """model(x, t, y): NHWC x, int32 t in 0..999, int32 y -> NHWC with out_channels."""

    @staticmethod
    def block_class(config: DiTConfig, *, rngs, dtype) -> DiTBlock:
        return DiTBlock(
            config.hidden_size, config.num_heads, config.mlp_hidden, rngs=rngs, dtype=dtype,
            attention=config.attention,
        )

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        # Parameters carry logical axis names; sharding is applied explicitly (jit
        # out_shardings from the config's rules), never eagerly at construction.
        with nnx.use_eager_sharding(False):
            self._build(config, rngs)

    def _build(self, config: DiTConfig, rngs: nnx.Rngs) -> None:
        dtype = jnp.dtype(config.dtype)
        d = config.hidden_size
        self.x_embedder = layers.PatchEmbed(
            config.patch_size, config.in_channels, d, rngs=rngs, dtype=dtype
        )
        self.t_embedder = layers.TimestepEmbedder(d, rngs=rngs, dtype=dtype)
        self.y_embedder = layers.LabelEmbedder(config.num_classes, d, rngs=rngs, dtype=dtype)
        # Fixed (not trained) sin-cos table, stored so that converted checkpoints can be checked.
        self.pos_embed = layers.Buffer(
            jnp.asarray(layers.sincos_2d(d, config.grid), jnp.float32)[None]
        )
        make_block = lambda r: self.block_class(config, rngs=r, dtype=dtype)
        if config.scan_blocks:
            # One block module whose parameters have a leading `layers` axis of size depth.
            @nnx.split_rngs(splits=config.depth)
            @nnx.vmap(axis_size=config.depth, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked(r):
                return make_block(r)

            self.blocks = stacked(rngs)
        else:
            self.blocks = nnx.List([make_block(rngs) for _ in range(config.depth)])
        self.final_layer = layers.FinalLayer(
            d, config.patch_size**2 * config.out_channels, rngs=rngs, dtype=dtype
        )

    def embed(self, x: jax.Array, t: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Tokens (B, N, D) with positions added, and the conditioning c = t_emb + y_emb."""
        tokens, t_emb, c = self.embed_all(x, t, y)
        return tokens, c

    def embed_all(self, x, t, y) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(tokens, t_emb, c): DyDiT's width routers read t_emb alone."""
        dtype = jnp.dtype(self.config.dtype)
        tokens = self.x_embedder(x.astype(dtype)) + self.pos_embed[...].astype(dtype)
        t_emb = self.t_embedder(t)
        return tokens, t_emb, t_emb + self.y_embedder(y)

    def head(self, tokens: jax.Array, c: jax.Array) -> jax.Array:
        cfg = self.config
        out = self.final_layer(tokens, c)
        out = layers.unpatchify(out, cfg.patch_size, cfg.out_channels, cfg.grid, cfg.grid)
        return out.astype(jnp.float32)

    def run_blocks(self, tokens: jax.Array, c: jax.Array) -> jax.Array:
        policy = REMAT_POLICIES[self.config.remat]

        def apply(graphdef, block_state, h):
            return nnx.merge(graphdef, block_state)(h, c)

        if self.config.remat != "none":
            apply = jax.checkpoint(apply, policy=policy, static_argnums=(0,))
        if self.config.scan_blocks:
            graphdef, stacked = nnx.split(self.blocks)
            body = lambda h, block_state: (
                parallel.constrain(apply(graphdef, block_state, h), parallel.TOKENS), None
            )
            return jax.lax.scan(body, tokens, stacked)[0]
        for block in self.blocks:  # pinned: see parallel.constrain
            graphdef, block_state = nnx.split(block)
            tokens = parallel.constrain(apply(graphdef, block_state, tokens), parallel.TOKENS)
        return tokens

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        tokens, c = self.embed(x, t, y)
        return self.head(self.run_blocks(tokens, c), c)
