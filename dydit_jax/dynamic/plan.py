"""Width plans: DyDiT's active heads and MLP groups for every (sampling step, layer).

The width routers read only the timestep embedding, so for a fixed sampler (its list of
timesteps) every head and group mask is known before sampling starts. Under classifier-free
guidance both halves of the batch share the timestep, hence the plan.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dydit_jax import flops
from dydit_jax.models.dydit import DyDiTConfig, gumbel_sigmoid


@dataclasses.dataclass(frozen=True)
class WidthPlan:
    """Masks of one sampling trajectory; row s is the s-th model call of the sampler."""

    timesteps: np.ndarray  # (S,) original timesteps (0..999) in the order they are visited
    heads: np.ndarray  # (S, L, H) bool: attention head h of layer l runs at step s
    groups: np.ndarray  # (S, L, G) bool: MLP channel group g of layer l runs at step s
    num_tokens: int
    hidden: int
    mlp_hidden: int

    @property
    def num_steps(self) -> int:
        return self.heads.shape[0]

    @property
    def depth(self) -> int:
        return self.heads.shape[1]

    def step_ratios(self, token_fraction=1.0) -> np.ndarray:
        """(S,) DyDiT FLOPs ratio of each step (flops.flops_ratio on the plan's masks).
        `token_fraction`: scalar or (S, L) fraction of tokens through the MLP (1 = all)."""
        return np.asarray(
            flops.fraction_ratio(
                self.heads.mean(-1), self.groups.mean(-1), np.asarray(token_fraction),
                self.num_tokens, self.hidden, self.mlp_hidden,
            ),
            np.float64,
        )

    def flops_ratio(self, token_fraction=1.0) -> float:
        """Mean FLOPs ratio over the trajectory (width only unless token fractions given)."""
        return float(self.step_ratios(token_fraction).mean())

    def active_indices(self, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Per (step, layer): the heads and groups to compute, counts rounded up to
        `multiple` (capped at the total) by padding with inactive ones. Returns two object
        arrays (S, L) of index tuples (active first, sorted; then the padding)."""
        return _padded_indices(self.heads, multiple), _padded_indices(self.groups, multiple)

    def summary(self, multiple: int = 1) -> dict:
        heads, groups = self.active_indices(multiple)
        counts = {(len(h), len(g)) for h, g in zip(heads.flat, groups.flat, strict=True)}
        return {
            "steps": self.num_steps,
            "timesteps": self.timesteps.tolist(),  # the network's, in the order run
            "layers": self.depth,
            "width_flops_ratio": round(self.flops_ratio(), 4),
            "mean_heads": round(float(self.heads.sum(-1).mean()), 3),
            "mean_groups": round(float(self.groups.sum(-1).mean()), 3),
            "width_shapes": len(counts),
        }


def rounded_counts(masks: np.ndarray, multiple: int) -> np.ndarray:
    """Active counts (over the last axis) rounded up to `multiple`, capped at the total."""
    if multiple < 1:
        raise ValueError(f"width multiple must be >= 1, got {multiple}")
    counts = masks.sum(-1)
    return np.minimum(masks.shape[-1], -(-counts // multiple) * multiple)


def padded_indices(masks: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per position of masks[..., :]: the active indices (sorted), then inactive ones up to
    `counts` (>= the active count) as padding; an object array of index tuples."""
    out = np.empty(masks.shape[:-1], dtype=object)
    for pos in np.ndindex(*masks.shape[:-1]):
        on = np.flatnonzero(masks[pos])
        if counts[pos] < len(on):
            raise ValueError(f"count {counts[pos]} below the {len(on)} active at {pos}")
        off = np.flatnonzero(~masks[pos])[: counts[pos] - len(on)]
        out[pos] = tuple(int(i) for i in np.concatenate([on, off]))
    return out


def _padded_indices(masks: np.ndarray, multiple: int) -> np.ndarray:
    return padded_indices(masks, rounded_counts(masks, multiple))


def merge_shapes(points: np.ndarray, budget: int) -> np.ndarray:
    """Bound the number of distinct compiled shapes: `points` (K, 2) int, the (MLP groups,
    token capacity) each (step, layer) needs; returns (K, 2) shapes that dominate them
    (both coordinates >=) with at most `budget` distinct ones. Greedy: while over budget,
    drop the shape whose users move most cheaply to another shape that dominates them; the
    cost of running a point at shape (g, c) is g * c (the token MLP's multiply-adds), so the
    FLOPs padding stays small. The joint maximum is always kept, so every point is covered."""
    if budget < 1:
        raise ValueError(f"shape budget must be >= 1, got {budget}")
    points = np.asarray(points, np.int64).reshape(-1, 2)
    needed, users, usage = np.unique(points, axis=0, return_inverse=True, return_counts=True)
    users = users.reshape(-1)
    top = needed.max(0)
    shapes = np.unique(np.concatenate([needed, top[None]]), axis=0)
    if len(shapes) <= budget or len(needed) == 1:
        return points
    covers = (shapes[None, :, 0] >= needed[:, None, 0]) & (shapes[None, :, 1] >= needed[:, None, 1])
    cost = np.where(covers, usage[:, None] * (shapes[:, 0] * shapes[:, 1] + 1.0)[None], np.inf)
    keep = np.ones(len(shapes), bool)
    is_top = (shapes == top).all(1)
    while keep.sum() > budget:
        live = np.flatnonzero(keep)
        sub = cost[:, live]
        order = np.argsort(sub, axis=1, kind="stable")
        best, second = order[:, 0], order[:, 1]
        rows = np.arange(len(needed))
        extra = sub[rows, second] - sub[rows, best]
        moved = np.zeros(len(live))
        np.add.at(moved, best, extra)
        moved[is_top[live]] = np.inf
        keep[live[np.argmin(moved)]] = False
    live = np.flatnonzero(keep)
    chosen = live[np.argmin(cost[:, live], axis=1)]
    return shapes[chosen][users]


def width_plan(graphdef, params, buffers, config: DyDiTConfig, timesteps) -> WidthPlan:
    """Evaluate every block's width routers at each timestep (original 0..999 scale), with
    the same modules and thresholds as the DyDiT forward in evaluation mode."""
    if not isinstance(config, DyDiTConfig):
        raise ValueError(f"width plans need a DyDiT model, got {type(config).__name__}")
    timesteps = np.asarray(timesteps, np.int32)

    @jax.jit
    def masks(params, t):
        model = nnx.merge(graphdef, params, buffers)
        t_emb = model.t_embedder(t)
        heads, groups = [], []
        for block in model.blocks:
            head_logits, group_logits = block.width_logits(t_emb)
            heads.append(block.full_width(gumbel_sigmoid(head_logits, None, config.tau)))
            groups.append(block.full_width(gumbel_sigmoid(group_logits, None, config.tau)))
        return jnp.stack(heads, 1) > 0, jnp.stack(groups, 1) > 0

    heads, groups = jax.device_get(masks(params, jnp.asarray(timesteps)))
    return WidthPlan(
        timesteps=timesteps,
        heads=np.asarray(heads),
        groups=np.asarray(groups),
        num_tokens=config.num_tokens,
        hidden=config.hidden_size,
        mlp_hidden=config.mlp_hidden,
    )
