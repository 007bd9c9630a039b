"""DyDiT (Zhao et al., ICLR 2025): DiT with routers that switch off attention heads and MLP
channel groups per timestep (TDW) and skip the MLP for unneeded tokens (SDT).

The backbone is DiT's (same block, same parameter names), so a DiT checkpoint initialises a
DyDiT directly; each block adds three routers (docs/dydit.md):
  attn_rate       Linear(D -> K) on the timestep embedding t_emb: one logit per head
  mlp_rate        Linear(D -> K) on t_emb: one logit per MLP channel group (H groups of 4D/H)
  token_selection Linear(D -> D/16) -> ReLU -> Linear(D/16 -> 1) on the residual stream right
                  after the attention residual: one logit per token (skip the MLP or not)
K = H ("all" layout, the inference-only release) or H - 1 with head/group 0 always on
("first_on", the training release). Training masks are straight-through gumbel-sigmoid
(tau 5, threshold 0.5); evaluation masks are `logits > 0`. Training here is static-shape
masking: shapes never depend on the data.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dydit_jax import parallel
from dydit_jax.models import dit, layers
from dydit_jax.models.dit import DiT, DiTBlock, DiTConfig

ROUTER_LAYOUTS = ("first_on", "all")
WIDTH_ROUTER_BIAS = 15.0  # starts with every head and group on
TOKEN_ROUTER_BIAS = 35.0  # starts with every token on


@dataclasses.dataclass(frozen=True)
class DyDiTConfig(DiTConfig):
    router_layout: str = "first_on"  # first_on: head/group 0 always on (training release)
    tau: float = 5.0  # gumbel-sigmoid temperature (only the surrogate gradient's slope)
    token_router_ratio: int = 16  # token router hidden width = D / ratio

    def validate(self) -> None:
        super().validate()
        if self.router_layout not in ROUTER_LAYOUTS:
            raise ValueError(f"router_layout {self.router_layout!r} not in {ROUTER_LAYOUTS}")
        if self.mlp_hidden % self.num_heads:
            raise ValueError(
                f"MLP width {self.mlp_hidden} is not divisible into {self.num_heads} groups"
            )
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")

    @property
    def num_router_logits(self) -> int:
        return self.num_heads - 1 if self.router_layout == "first_on" else self.num_heads


def gumbel_sigmoid(logits: jax.Array, key: jax.Array | None, tau: float) -> jax.Array:
    """0/1 masks. With a key (training): hard threshold of sigmoid((logits + L) / tau), L ~
    Logistic(0, 1) (= the difference of two Gumbels), with the straight-through gradient of
    the soft value. Without a key (evaluation): 1[logits > 0]."""
    logits = logits.astype(jnp.float32)
    if key is None:
        return (logits > 0).astype(jnp.float32)
    soft = jax.nn.sigmoid((logits + jax.random.logistic(key, logits.shape)) / tau)
    hard = (soft > 0.5).astype(jnp.float32)
    return hard - jax.lax.stop_gradient(soft) + soft


class DyDiTBlock(DiTBlock):
    """A DiT block plus its three routers (the block's computation is DiTBlock.forward)."""

    def __init__(self, config: DyDiTConfig, *, rngs, dtype=None):
        super().__init__(
            config.hidden_size, config.num_heads, config.mlp_hidden, rngs=rngs, dtype=dtype,
            attention=config.attention,
        )
        d, k = config.hidden_size, config.num_router_logits
        width_bias = nnx.initializers.constant(WIDTH_ROUTER_BIAS)
        self.attn_rate = layers.dense(
            d, k, axes=("embed", "router"), rngs=rngs, bias_init=width_bias
        )
        self.mlp_rate = layers.dense(
            d, k, axes=("embed", "router"), rngs=rngs, bias_init=width_bias
        )
        hidden = d // config.token_router_ratio
        self.token_fc1 = layers.dense(d, hidden, axes=("embed", "router"), rngs=rngs)
        self.token_fc2 = layers.dense(
            hidden, 1, axes=("router", "out"), rngs=rngs,
            bias_init=nnx.initializers.constant(TOKEN_ROUTER_BIAS),
        )
        self.first_on = config.router_layout == "first_on"

    def width_logits(self, t_emb: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.attn_rate(t_emb), self.mlp_rate(t_emb)

    def token_logits(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.token_fc1(x.astype(jnp.float32)))
        return self.token_fc2(h)[..., 0]

    def capacity_forward(self, x: jax.Array, c: jax.Array, capacity: int):
        """The inference engine's block: weights already sliced to the active heads and MLP
        groups (so no width masks), and at most `capacity` tokens per sample through the MLP:
        the highest-scoring of those the token router selects (logit > 0) are gathered, run
        and scattered back. Equals `forward` with the eval masks when nothing overflows.

        Returns (x, stats): int32 (B, 2), per sample [tokens selected, tokens dropped for
        capacity] (per row, so that no cross-device reduction sits in the block). The engine
        runs the two halves (`attention_step`, `token_mlp`) as separate compiled calls.
        """
        x, mods = self.attention_step(x, c)
        return self.token_mlp(x, mods, capacity)

    def attention_step(
        self, x: jax.Array, c: jax.Array, head_mask: jax.Array | None = None
    ) -> tuple[jax.Array, tuple]:
        """(x after the attention residual, the six adaLN chunks for `token_mlp`)."""
        mods = tuple(self.adaLN(c))
        return self.attention_residual(x, mods, head_mask), mods

    def token_mlp(
        self, x: jax.Array, mods: tuple, capacity: int, group_mask: jax.Array | None = None
    ):
        """The MLP residual for at most `capacity` tokens per sample (see capacity_forward;
        `group_mask` (B, G): as in `forward`)."""
        logits = self.token_logits(x)
        selected = logits > 0
        count = selected.sum(axis=-1, dtype=jnp.int32)
        n = x.shape[1]
        gate = mods[5][:, None, :]
        if capacity >= n:  # every token fits: a mask is cheaper than gather + scatter
            update = self.mlp_branch(x, mods, group_mask)
            x = x + gate * selected[..., None].astype(x.dtype) * update
        elif capacity > 0:
            order = jnp.argsort(-logits, axis=-1, stable=True)  # best first
            index = order[:, :capacity]
            scores = jnp.take_along_axis(logits, index, axis=1)
            keep = (scores > 0)[..., None].astype(x.dtype)
            rows = jnp.take_along_axis(x, index[..., None], axis=1)
            update = gate * keep * self.mlp_branch(rows, mods, group_mask)
            # Back to token order with a gather, not a scatter-add (a serial loop on CPU,
            # atomics on GPU): token n reads its row of the update, or a zero row if it
            # did not run.
            rank = jnp.argsort(order, axis=-1)
            update = jnp.concatenate([update, jnp.zeros_like(update[:, :1])], axis=1)
            back = jnp.minimum(rank, capacity)[..., None]
            x = x + jnp.take_along_axis(update, back, axis=1)
        overflow = jnp.maximum(count - min(capacity, n), 0)
        return x, jnp.stack([count, overflow], axis=-1)

    def full_width(self, mask: jax.Array) -> jax.Array:
        """Prepend the always-on head/group 0 of the training release's layout."""
        if not self.first_on:
            return mask
        return jnp.concatenate([jnp.ones_like(mask[:, :1]), mask], axis=-1)


class DyDiT(DiT):
    """model(x, t, y, key=None, complete=False, return_masks=False).

    key: PRNG key for training masks (gumbel noise); None gives the deterministic eval masks.
    complete: bypass the routers (every head, group and token on; the warm-up stage's term).
    return_masks: also return {"heads": (B, L, H), "groups": (B, L, H), "tokens": (B, L, N)}.
    """

    @staticmethod
    def block_class(config: DyDiTConfig, *, rngs, dtype) -> DyDiTBlock:
        return DyDiTBlock(config, rngs=rngs, dtype=dtype)

    def __call__(self, x, t, y, *, key=None, complete=False, return_masks=False):
        tokens, t_emb, c = self.embed_all(x, t, y)
        if complete:
            out = self.head(self.run_blocks(tokens, c), c)
            if not return_masks:
                return out
            cfg = self.config
            ones = jnp.ones((x.shape[0], cfg.depth, cfg.num_heads), jnp.float32)
            tokens_on = jnp.ones((x.shape[0], cfg.depth, cfg.num_tokens), jnp.float32)
            return out, {"heads": ones, "groups": ones, "tokens": tokens_on}
        tokens, (heads, groups, token_masks) = self.run_routed_blocks(tokens, t_emb, c, key)
        out = self.head(tokens, c)
        if not return_masks:
            return out
        return out, {"heads": heads, "groups": groups, "tokens": token_masks}

    def run_routed_blocks(self, tokens, t_emb, c, key):
        """The blocks with their routers: (tokens, (head, group, token masks)), each mask
        (B, L, ...). Layer i draws its gumbel noise from fold_in(key, i), so the loop and
        the scan (scan_blocks) give the same masks; remat as in DiT.run_blocks."""
        tau = self.config.tau

        def layer(graphdef, block_state, h, i):
            block = nnx.merge(graphdef, block_state)
            keys = [None] * 3
            if key is not None:
                keys = list(jax.random.split(jax.random.fold_in(key, i), 3))
            head_logits, group_logits = block.width_logits(t_emb)
            head_mask = block.full_width(gumbel_sigmoid(head_logits, keys[0], tau))
            group_mask = block.full_width(gumbel_sigmoid(group_logits, keys[1], tau))
            router = lambda z: gumbel_sigmoid(block.token_logits(z), keys[2], tau)
            h, token_mask = block.forward(h, c, head_mask, group_mask, router)
            return parallel.constrain(h, parallel.TOKENS), (head_mask, group_mask, token_mask)

        if self.config.remat != "none":
            layer = jax.checkpoint(
                layer, policy=dit.REMAT_POLICIES[self.config.remat], static_argnums=(0,)
            )
        if self.config.scan_blocks:
            graphdef, stacked = nnx.split(self.blocks)
            body = lambda h, xs: layer(graphdef, xs[0], h, xs[1])
            tokens, masks = jax.lax.scan(
                body, tokens, (stacked, jnp.arange(self.config.depth))
            )
            return tokens, tuple(jnp.moveaxis(m, 0, 1) for m in masks)
        per_layer = []
        for i, block in enumerate(self.blocks):
            graphdef, block_state = nnx.split(block)
            tokens, masks = layer(graphdef, block_state, tokens, i)
            per_layer.append(masks)
        return tokens, tuple(jnp.stack(m, axis=1) for m in zip(*per_layer, strict=True))
