"""Analytic compute of DiT / DyDiT and the DyDiT FLOPs-constrained training objective.

Units: every ``*_macs`` function returns multiply-adds (MACs) of one forward pass at batch 1.
"FLOPs" in the DiT and DyDiT papers are MACs; divide by 1e9 for the GFLOPs of their tables.

Counting convention (``dit_macs``)
----------------------------------
Only matmuls and convolutions are counted, one MAC per multiply-add of a weight product;
biases, softmax, layer norms, modulation, GELU/SiLU, residual adds, the position embedding
and the label-table lookup are free. With ``N`` tokens, width ``D``, MLP width ``Dm`` (4D),
``L`` blocks, patch ``p``, ``C`` input and ``C_out`` output channels:

- patch embedding conv: ``N * (C p^2) * D``;
- timestep embedder MLP (once per sample): ``256 D + D^2``;
- per block: qkv ``3 N D^2``, attention scores ``q k^T`` ``N^2 D``, ``attn @ v`` ``N^2 D``,
  proj ``N D^2``, fc1 ``N D Dm``, fc2 ``N Dm D``, adaLN linear (once per sample, not per
  token) ``6 D^2``;
- final layer: adaLN linear ``2 D^2`` (per sample) and linear ``N * D * (p^2 C_out)``.

This is the only subset of {patch conv, block matmuls, q@k^T and attn@v, block adaLN,
t-embedder MLP, final adaLN, final linear} (the block linears always included) that
reproduces all twelve entries of the DiT table at 256px (S/2 6.06, S/4 1.41, S/8 0.36,
B/2 23.01, B/4 5.57, B/8 1.42, L/2 80.70, L/4 19.70, L/8 5.01, XL/2 118.62, XL/4 29.04,
XL/8 7.39) to the printed decimals, and it gives 524.54 (printed 524.5) for XL/2 at 512px.
Dropping any single part breaks at least one entry.

DyDiT convention (``dydit_convention=True``)
--------------------------------------------
The DyDiT paper prints slightly larger baselines: DiT-S 6.07, DiT-B 23.02, DiT-XL 118.69.
They are reproduced exactly by additionally counting every layer norm at 4 operations per
input element (mean, subtract, variance, divide; no affine), i.e. ``(2 L + 1) * 4 N D``
(two norms per block, one in the final layer) -- the default layer-norm charge of
fvcore-style counters, which is presumably what measured them. Counting 3 or 5 operations
per element does not match (B becomes 23.03 with 5, S stays 6.06 with 3), and adding the
DyDiT token routers instead overshoots (S would be 6.08). The per-sample width routers are
negligible (< 1 MMAC) and do not change any printed value either way.

Dynamic model
-------------
``flops_ratio`` is the DyDiT ratio of the *block* matmuls that run (attention
``A = 4 N D^2 + 2 N^2 D`` per block, MLP ``M = 2 N D Dm = 8 N D^2``); the embedders, the
blocks' adaLN linears, the final layer (and layer norms in the DyDiT convention) always run.
``dynamic_macs`` therefore is ``constant + ratio * L * (A + M)``, optionally plus the router
overhead (``router_macs``). The published DyDiT GFLOPs are measured averages of the achieved
ratio over the sampling trajectory, not ``lambda`` itself, so they are not a function of
lambda alone.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp
import numpy as np

# Width of the sinusoidal timestep features fed to the t-embedder MLP (docs/dit.md).
TIMESTEP_FREQ_DIM = 256
# Operations charged per layer-norm input element in the DyDiT convention.
LAYER_NORM_OPS_PER_ELEMENT = 4


def _mlp_hidden(config) -> int:
    return int(config.hidden_size * config.mlp_ratio)


def block_costs(num_tokens: int, hidden: int, mlp_hidden: int | None = None) -> tuple[int, int]:
    """Per-block multiply-adds (A, M) of the attention and MLP branches.

    ``A = 4 N D^2 + 2 N^2 D`` (qkv, proj, q k^T and attn @ v); ``M = 2 N D Dm``, which is
    ``8 N D^2`` for the default ``mlp_hidden = 4 D``. The adaLN modulation is not included
    (it is per sample and never skipped).
    """
    n, d = int(num_tokens), int(hidden)
    dm = 4 * d if mlp_hidden is None else int(mlp_hidden)
    attn = 4 * n * d * d + 2 * n * n * d
    mlp = 2 * n * d * dm
    return attn, mlp


def dit_macs_breakdown(config, *, dydit_convention: bool = False) -> dict[str, int]:
    """Multiply-adds of one DiT forward at batch 1, by part (see the module docstring).

    Keys: patch_embed, t_embedder, attn_qkv, attn_scores (q k^T), attn_values (attn @ v),
    attn_proj, mlp_fc1, mlp_fc2, adaln (all blocks), final_adaln, final_linear, layer_norm
    (non-zero only with ``dydit_convention``). The values sum to ``dit_macs(config)``.
    """
    n, d, depth = config.num_tokens, config.hidden_size, config.depth
    dm, p = _mlp_hidden(config), config.patch_size
    ln_count = 2 * depth + 1
    return {
        "patch_embed": n * config.in_channels * p * p * d,
        "t_embedder": TIMESTEP_FREQ_DIM * d + d * d,
        "attn_qkv": depth * 3 * n * d * d,
        "attn_scores": depth * n * n * d,
        "attn_values": depth * n * n * d,
        "attn_proj": depth * n * d * d,
        "mlp_fc1": depth * n * d * dm,
        "mlp_fc2": depth * n * dm * d,
        "adaln": depth * 6 * d * d,
        "final_adaln": 2 * d * d,
        "final_linear": n * d * p * p * config.out_channels,
        "layer_norm": ln_count * LAYER_NORM_OPS_PER_ELEMENT * n * d if dydit_convention else 0,
    }


def dit_macs(config, *, dydit_convention: bool = False) -> float:
    """Multiply-adds of one DiT forward at batch 1 (divide by 1e9 for the paper's GFLOPs).

    Default: the DiT paper's convention (matmuls and the patch conv only); reproduces its
    table for all 12 sizes and 524.5 for XL/2 at 512px. ``dydit_convention=True`` also charges
    4 ops per layer-norm element, which reproduces the DyDiT paper's baselines (6.07 / 23.02 /
    118.69 for S/2, B/2, XL/2).
    """
    return float(sum(dit_macs_breakdown(config, dydit_convention=dydit_convention).values()))


def routed_block_macs(config) -> int:
    """Multiply-adds of all blocks' routable parts: ``depth * (A + M)``."""
    attn, mlp = block_costs(config.num_tokens, config.hidden_size, _mlp_hidden(config))
    return config.depth * (attn + mlp)


def router_macs(config, *, num_logits: int | None = None, token_router: bool = True) -> int:
    """Multiply-adds of the DyDiT routers of all blocks at batch 1.

    Width routers (``attn_rate`` and ``mlp_rate``): two Linear(D -> K) on the timestep
    embedding, once per sample; ``K = num_logits`` (default ``num_heads - 1``, the training
    release; the inference-only release uses ``num_heads``). Token router (SDT, when
    ``token_router``): ``Linear(D -> D//16)`` and ``Linear(D//16 -> 1)`` on every token.
    """
    d, n = config.hidden_size, config.num_tokens
    k = config.num_heads - 1 if num_logits is None else int(num_logits)
    per_block = 2 * d * k
    if token_router:
        r = d // 16
        per_block += n * (d * r + r)
    return config.depth * per_block


def dynamic_macs(
    config,
    ratio,
    *,
    dydit_convention: bool = False,
    routers: bool = False,
    num_logits: int | None = None,
):
    """Multiply-adds of the dynamic model at batch 1 given a DyDiT FLOPs ratio.

    ``constant + ratio * depth * (A + M)``: only the blocks' attention and MLP matmuls scale
    with the ratio; the embedders, the blocks' adaLN linears, the final layer (and the layer
    norms with ``dydit_convention``) stay constant. ``routers=True`` adds ``router_macs``
    (with ``num_logits``; token routers included). ``ratio`` may be a float or an array
    (e.g. the per-sample output of ``flops_ratio``); the result has the same shape.
    ``dynamic_macs(config, 1.0) == dit_macs(config)`` without routers.
    """
    blocks = float(routed_block_macs(config))  # floats: too large for int32 arrays
    constant = dit_macs(config, dydit_convention=dydit_convention) - blocks
    if routers:
        constant += float(router_macs(config, num_logits=num_logits))
    if isinstance(ratio, numbers.Real):
        return constant + float(ratio) * blocks
    return constant + ratio * blocks


def _as_float(x) -> jnp.ndarray:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(jnp.float32)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def flops_ratio(
    head_masks,
    group_masks,
    token_masks,
    num_tokens: int,
    hidden: int,
    mlp_hidden: int | None = None,
) -> jnp.ndarray:
    """Per-sample DyDiT FLOPs ratio, shape (B,).

    ``r_b = sum_l [mean_h(head[b,l]) A + mean_g(group[b,l]) mean_n(tok[b,l]) M] / (L (A + M))``
    with ``(A, M) = block_costs(num_tokens, hidden, mlp_hidden)``. Masks: head (B, L, H),
    group (B, L, G), token (B, L, N) or None (every token runs the MLP); bool or float.
    Jittable (``num_tokens``, ``hidden`` and ``mlp_hidden`` static) and differentiable with
    respect to float masks (the straight-through Gumbel masks carry gradients).
    """
    head = _as_float(head_masks)
    group = _as_float(group_masks)
    if head.ndim != 3 or group.ndim != 3:
        raise ValueError(
            f"head and group masks must be (batch, layers, heads), got shapes {head.shape} "
            f"and {group.shape}"
        )
    if head.shape[:2] != group.shape[:2]:
        raise ValueError(
            f"head masks {head.shape} and group masks {group.shape} disagree on (batch, layers)"
        )
    token_frac = 1.0
    if token_masks is not None:
        tok = _as_float(token_masks)
        if tok.ndim != 3 or tok.shape[:2] != head.shape[:2] or tok.shape[2] != num_tokens:
            raise ValueError(
                f"token masks must be (batch, layers, num_tokens) = "
                f"{(*head.shape[:2], num_tokens)}, got {tok.shape}"
            )
        token_frac = jnp.mean(tok, axis=-1)
    return fraction_ratio(
        jnp.mean(head, axis=-1), jnp.mean(group, axis=-1), token_frac, num_tokens, hidden,
        mlp_hidden,
    )


def fraction_ratio(
    head_frac, group_frac, token_frac, num_tokens: int, hidden: int, mlp_hidden: int | None = None
):
    """``flops_ratio`` from per-layer fractions (..., L): heads on, MLP groups on, tokens
    through the MLP (a scalar 1.0 for all). Numpy in, numpy out; jax in, jax out."""
    attn, mlp = block_costs(num_tokens, hidden, mlp_hidden)
    attn_frac = attn / (attn + mlp)  # normalise in Python: no 1e9-sized numbers in float32
    per_layer = attn_frac * head_frac + (1.0 - attn_frac) * group_frac * token_frac
    return per_layer.mean(axis=-1)


def flops_loss(ratio, lambda_target) -> jnp.ndarray:
    """DyDiT FLOPs loss ``2 (mean_b ratio_b - lambda_target)^2`` (batch mean, then square)."""
    return 2.0 * jnp.square(jnp.mean(_as_float(ratio)) - lambda_target)


def lambda_schedule(step, target, *, hold_steps: int = 100, warmup_steps: int = 1000):
    """Target FLOPs ratio at a training step, as the DyDiT release's trainer computes it.

    ``1 - (1 - target) * step / warmup_steps`` up to ``warmup_steps``, ``target`` after, and
    1.0 whenever ``step < hold_steps``: the ramp is anchored at step 0, so at ``hold_steps``
    it jumps to where the ramp is by then (docs/dydit_recipe.md). ``warmup_steps <= 0``:
    ``target`` from ``hold_steps`` on. Python numbers in -> Python float out; a jax/numpy
    step or target -> float32 array (jittable, ``hold_steps``/``warmup_steps`` static).
    """
    hold, warm = int(hold_steps), int(warmup_steps)
    if isinstance(step, numbers.Integral | np.integer) and isinstance(target, numbers.Real):
        if step < hold:
            return 1.0
        progress = 1.0 if warm <= 0 else min(int(step) / warm, 1.0)
        # Written so that progress 1 gives exactly `target`.
        return (1.0 - progress) + progress * float(target)
    s = jnp.asarray(step).astype(jnp.float32)
    progress = jnp.ones_like(s) if warm <= 0 else jnp.minimum(s / warm, 1.0)
    ramp = (1.0 - progress) + progress * jnp.asarray(target, jnp.float32)
    return jnp.where(s < hold, jnp.float32(1.0), ramp).astype(jnp.float32)


__all__ = [
    "LAYER_NORM_OPS_PER_ELEMENT",
    "TIMESTEP_FREQ_DIM",
    "block_costs",
    "dit_macs",
    "dit_macs_breakdown",
    "dynamic_macs",
    "flops_loss",
    "flops_ratio",
    "fraction_ratio",
    "lambda_schedule",
    "routed_block_macs",
    "router_macs",
]


# =============================================================================================
# U-DiT (docs/udit.md)
# =============================================================================================
#
# Counting convention (``udit_macs``): that of torchprofile's ``profile_macs`` (the counter
# the U-DiT release imports), at batch 1:
#
# - one MAC per multiply-add of every Linear / Conv / matmul (biases free): stem conv, the
#   three timestep MLPs, the blocks' adaLN linears (per sample), depthwise convs, qkv, q k^T,
#   attn @ v, to_out, the FFN's 1x1 convs and depthwise convs, the down/up convs, the two
#   1x1 reductions, the output conv, the final adaLN and conv;
# - one operation per output element of every elementwise multiplication: adaLN modulate
#   (``x * (1 + scale)``, 2 per sub-layer and 1 in the final layer) and gate (2 per sub-layer)
#   of N w elements each, the attention logits times their scale (``H N^2 / 4`` per
#   sub-layer: 4 groups of (N/4)^2 logits per head; both the cosine and the vanilla form
#   scale them), the RoPE2D rotation of q and k as one complex product per channel pair
#   (``N w`` per sub-layer), and the timestep sinusoid (2 x 128 per embedder);
# - free: layer norms without affine, softmax, GELU/SiLU, adds, divisions (F.normalize),
#   exp, the label tables and the pixel (un)shuffles.
#
# This reproduces the paper's numbers to the printed digits: fused (the published model)
# 6.04 / 22.22 / 85.00 at 256px (S / B / L; 6.0435 / 22.2248 / 85.0003), vanilla 5.91 / 21.96
# / 84.48, and U-DiT-B 106.7 at 512px (106.710). The training form (unfused FFN) gives
# 7.15 / 26.55 / 102.12 (B: 26.5549) against the 7.15 / 26.56 / 102.12 estimated in
# docs/udit.md: B sits 0.00014 below the rounding edge. Matmuls and convs alone fall short
# (fused L 84.91, B 22.18); charging the layer norms at 4 ops per element instead of the
# multiplications (the DyDiT convention) gives fused L 84.99 and vanilla B 21.97, so that is
# not it either.

# elementwise multiplies per sub-layer, in units of N w: 2 modulate + 2 gate
UDIT_MULS_PER_SUBLAYER = 4


def udit_macs_breakdown(config) -> dict[str, int]:
    """Multiply-adds (and elementwise multiplies) of one U-DiT forward at batch 1, by part.

    Keys: stem, t_embedder, adaln (blocks), modulate_gate (blocks' elementwise), downsampler
    (the attention's depthwise conv), attn_qkv, attn_rope, attn_scores, attn_logit_scale,
    attn_values, attn_out, ffn_linear, ffn_dwconv, resample (down/up convs), reduce,
    output_conv, final_adaln, final_modulate, final_conv. The values sum to
    ``udit_macs(config)``. The FFN is counted in the form the config builds: training form,
    ``fused`` or ``vanilla``."""
    c, s = config.hidden_size, config.input_size
    heads = config.num_heads
    parts = dict.fromkeys(
        (
            "stem", "t_embedder", "adaln", "modulate_gate", "downsampler", "attn_qkv",
            "attn_rope", "attn_scores", "attn_logit_scale", "attn_values", "attn_out",
            "ffn_linear", "ffn_dwconv", "resample", "reduce", "output_conv", "final_adaln",
            "final_modulate", "final_conv",
        ),
        0,
    )
    parts["stem"] = s * s * config.in_channels * 9 * c
    parts["t_embedder"] = sum(
        TIMESTEP_FREQ_DIM * w + w * w + TIMESTEP_FREQ_DIM for w in config.widths
    )
    for (_, w, side, _), depth in zip(config.stages(), config.stage_depths(), strict=True):
        n, layers_ = side * side, 2 * depth  # two sub-layers per block
        h = config.mlp_hidden(w)
        parts["adaln"] += layers_ * 6 * w * w
        parts["modulate_gate"] += layers_ * UDIT_MULS_PER_SUBLAYER * n * w
        parts["downsampler"] += layers_ * 25 * n * w
        parts["attn_qkv"] += layers_ * 3 * n * w * w
        if not config.vanilla:
            parts["attn_rope"] += layers_ * n * w  # q and k: n w / 2 complex products each
        group = n // 4
        parts["attn_scores"] += layers_ * 4 * group * group * w
        parts["attn_logit_scale"] += layers_ * 4 * heads * group * group
        parts["attn_values"] += layers_ * 4 * group * group * w
        parts["attn_out"] += layers_ * n * w * w
        if config.vanilla or config.fused:
            parts["ffn_linear"] += layers_ * 2 * n * w * h
        else:
            mid = h // 2
            parts["ffn_linear"] += layers_ * n * (w * mid + mid * h + h * mid + mid * w)
        if config.fused:
            parts["ffn_dwconv"] += layers_ * 25 * n * h
        elif not config.vanilla:
            parts["ffn_dwconv"] += layers_ * (25 + 9 + 1) * n * h
    half, quarter = (s // 2) ** 2, (s // 4) ** 2
    parts["resample"] = 9 * (
        s * s * c * (c // 2)  # down1_2 at full resolution
        + half * 2 * c * c  # down2_3
        + quarter * 4 * c * 8 * c  # up3_2
        + half * 2 * c * 4 * c  # up2_1
    )
    parts["reduce"] = half * 4 * c * 2 * c + s * s * 2 * c * 2 * c
    parts["output_conv"] = s * s * 9 * (2 * c) ** 2
    parts["final_adaln"] = 2 * c * 4 * c
    parts["final_modulate"] = s * s * 2 * c
    parts["final_conv"] = s * s * 9 * 2 * c * config.out_channels
    return parts


def udit_macs(config) -> float:
    """MACs of one U-DiT forward at batch 1 in the paper's convention (see the U-DiT section
    above); divide by 1e9 for its GFLOPs."""
    return float(sum(udit_macs_breakdown(config).values()))


def udit_param_count(config) -> int:
    """Analytic parameter count of a U-DiT config, from the reference layout (docs/udit.md):
    training form 58.90M / 231.25M / 916.34M, fused 52.05M / 204.43M / 810.19M (S / B / L)."""
    c, heads, out = config.hidden_size, config.num_heads, config.out_channels
    lin = lambda i, o: i * o + o
    total = 9 * config.in_channels * c + c  # stem
    for w in config.widths:
        total += lin(TIMESTEP_FREQ_DIM, w) + lin(w, w) + (config.num_classes + 1) * w

    def sublayer(w: int) -> int:
        h = config.mlp_hidden(w)
        n = lin(w, 6 * w) + 25 * w + w + lin(w, 3 * w) + lin(w, w)  # adaLN, dw, qkv, to_out
        if not config.vanilla:
            n += heads  # logit_scale
        if config.vanilla:
            return n + lin(w, h) + lin(h, w)
        if config.fused:
            return n + lin(w, h) + 25 * h + h + lin(h, w)
        mid = h // 2
        dw = sum(k * k * h + h for k in (5, 3, 1))
        return n + lin(w, mid) + lin(mid, h) + dw + lin(h, mid) + lin(mid, w)

    for (_, w, _, _), depth in zip(config.stages(), config.stage_depths(), strict=True):
        total += depth * 2 * sublayer(w)
    total += 9 * (c * (c // 2) + 2 * c * c + 4 * c * 8 * c + 2 * c * 4 * c)  # resample
    total += lin(4 * c, 2 * c) + lin(2 * c, 2 * c)  # 1x1 reductions
    total += 9 * (2 * c) ** 2 + 2 * c  # output conv
    total += lin(2 * c, 4 * c) + 9 * 2 * c * out + out  # final adaLN and conv
    return total


__all__ += ["UDIT_MULS_PER_SUBLAYER", "udit_macs", "udit_macs_breakdown", "udit_param_count"]
