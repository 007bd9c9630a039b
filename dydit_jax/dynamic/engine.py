"""The DyDiT inference engine: real wall-clock savings from DyDiT's routers.

The masked model (models/dydit.py) computes every head, channel group and token and
multiplies the unused ones by zero. The engine computes only what the routers keep:

- width: the plan (plan.py) fixes the active heads and MLP groups of every (step, layer)
  before sampling. Each layer runs with its weights sliced to them (qkv columns and proj rows
  of the heads, fc1 columns and fc2 rows of the groups), sliced once per distinct set. Counts
  can be rounded up to a multiple (`width_multiple`), padding with inactive heads/groups whose
  contribution is zeroed in the sliced weights: fewer shapes to compile, a few wasted FLOPs.
- tokens: at most `capacity` tokens per sample and layer run the MLP (a static shape): the
  top-scoring of those the token router selects are gathered, run and scattered back.
  Selected tokens beyond the capacity are dropped and counted (`report()["tokens_overflow"]`).
  With capacity = all tokens the engine equals the masked model (float round-off).

Each step runs as: one compiled embedding call, one compiled call per block (compiled once
per shape signature (heads, groups, capacity, batch)), and one compiled call for the final
layer, guidance and the sampler update. Nothing waits for the device inside a batch.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dydit_jax import diffusion as diffusion_lib
from dydit_jax import flops, parallel, sample_lib
from dydit_jax.dynamic.plan import WidthPlan, width_plan
from dydit_jax.models.dydit import DyDiTConfig

SLICED_MODULES = ("attn", "mlp")  # the rest of a block (adaLN, routers) is shared, not copied


def slice_block(
    block: dict, heads, head_valid, groups, group_valid, *, head_dim: int, width: int
) -> dict:
    """The attention and MLP weights of one block restricted to `heads` and `groups` (index
    arrays; `width` channels per MLP group); entries with valid = 0 are padding whose
    contribution is zeroed (proj rows; fc1 columns, so GELU(0) = 0, and fc2 rows)."""
    attn, mlp = block["attn"], block["mlp"]
    d = attn["qkv"]["kernel"].shape[0]
    nh, ng = heads.shape[0], groups.shape[0]
    qkv_kernel = attn["qkv"]["kernel"].reshape(d, 3, -1, head_dim)[:, :, heads]
    qkv_bias = attn["qkv"]["bias"].reshape(3, -1, head_dim)[:, heads]
    proj = attn["proj"]["kernel"].reshape(-1, head_dim, d)[heads] * head_valid[:, None, None]
    fc1_kernel = mlp["fc1"]["kernel"].reshape(d, -1, width)[:, groups] * group_valid[:, None]
    fc1_bias = mlp["fc1"]["bias"].reshape(-1, width)[groups] * group_valid[:, None]
    fc2_kernel = mlp["fc2"]["kernel"].reshape(-1, width, d)[groups] * group_valid[:, None, None]
    return {
        "attn": {
            "qkv": {
                "kernel": qkv_kernel.reshape(d, 3 * nh * head_dim),
                "bias": qkv_bias.reshape(3 * nh * head_dim),
            },
            "proj": {"kernel": proj.reshape(nh * head_dim, d), "bias": attn["proj"]["bias"]},
        },
        "mlp": {
            "fc1": {"kernel": fc1_kernel.reshape(d, ng * width), "bias": fc1_bias.reshape(-1)},
            "fc2": {"kernel": fc2_kernel.reshape(ng * width, d), "bias": mlp["fc2"]["bias"]},
        },
    }


def parse_capacity(spec: str):
    """A capacity from a flag or config string: "calibrate", "all" (None), a fraction of the
    tokens ("0.75") or a count ("192")."""
    spec = str(spec).strip()
    if spec in ("calibrate", "all"):
        return None if spec == "all" else spec
    try:
        value = float(spec)
    except ValueError:
        value = -1.0
    if "." in spec and 0 < value <= 1:
        return value
    if value >= 0 and value == int(value) and "." not in spec:
        return int(value)
    raise ValueError(
        f"token capacity {spec!r} is not 'calibrate', 'all', a fraction in (0, 1] like 0.75, "
        "or a token count like 192"
    )


class DyDiTEngine:
    """Sampler for a DyDiT: `engine(key, indices, labels)` -> float32 samples (B, H, W, C),
    the call of `sample_lib.generate` (same noise per image index as the masked sampler).

    parts/params: `train_lib.ModelParts` of a DyDiT and its weights. `capacity`: tokens per
    sample and layer through the MLP: None (all: exact), an int, a fraction in (0, 1], an
    array (L,) per layer or (K, L) per layer and K contiguous step buckets; or call
    `calibrate` to measure it on a batch.
    """

    def __init__(
        self,
        parts: Any,
        params: Any,
        *,
        mesh,
        sampling_steps: str = "250",
        sampler: str = "ddpm",
        cfg_scale: float = 1.0,
        guided_channels: int | None = None,
        eta: float = 0.0,
        width_multiple: int = 1,
        capacity=None,
        capacity_multiple: int = 8,
        capacity_margin: float = 0.1,
        capacity_step_buckets: int = 1,
    ):
        config = parts.config
        if not isinstance(config, DyDiTConfig):
            raise ValueError(f"the DyDiT engine needs a DyDiT model, got {type(config).__name__}")
        if sampler not in diffusion_lib.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {diffusion_lib.SAMPLERS}")
        if capacity_multiple < 1:
            raise ValueError(f"capacity multiple must be >= 1, got {capacity_multiple}")
        self.config, self.mesh, self.params = config, mesh, params
        self.graphdef, self.buffers = parts.graphdef, parts.buffers
        self.sampler, self.eta, self.cfg_scale = sampler, eta, cfg_scale
        self.guided = cfg_scale != 1.0
        if guided_channels is not None and guided_channels < 0:
            guided_channels = None
        self.guided_channels = guided_channels
        self.width_multiple, self.capacity_multiple = width_multiple, capacity_multiple
        self.diffusion = diffusion_lib.create_diffusion(sampling_steps)
        steps = self.diffusion.num_timesteps
        self.step_indices = np.arange(steps - 1, -1, -1)  # the order the sampler visits them
        self.plan: WidthPlan = width_plan(
            parts.graphdef, params, parts.buffers, config,
            self.diffusion.timestep_map[self.step_indices],
        )
        self._rows = parallel.batch_sharding(mesh)
        self._rep = parallel.replicated(mesh)
        self._build_functions()
        self._slice_weights()
        self.compiled: dict[tuple, Any] = {}
        self.compile_seconds = 0.0
        # "calibrate": the first batch runs with every token and sets the capacities.
        self.calibration = None
        if isinstance(capacity, str):
            capacity = parse_capacity(capacity)
        if capacity == "calibrate":
            self.calibration = dict(margin=capacity_margin, step_buckets=capacity_step_buckets)
            capacity = None
        self.set_capacity(capacity)
        self.reset_stats()

    # ------------------------------------------------------------------ weights and plan

    def _build_functions(self) -> None:
        cfg, graphdef, buffers = self.config, self.graphdef, self.buffers
        with nnx.use_eager_sharding(False):  # only the structure is wanted here
            model = nnx.merge(graphdef, self.params, buffers)
        self.block_graphdef = nnx.graphdef(model.blocks[0])
        head_dim = cfg.hidden_size // cfg.num_heads
        group_width = cfg.mlp_hidden // cfg.num_heads
        image_shape = (cfg.input_size, cfg.input_size, cfg.in_channels)
        guided, diffusion = self.guided, self.diffusion

        def slicer(block, heads, head_valid, groups, group_valid):
            return slice_block(
                block, heads, head_valid, groups, group_valid, head_dim=head_dim,
                width=group_width,
            )

        def initial(key, indices, labels):
            return sample_lib.initial_noise(key, indices, image_shape, guided)

        def embed(params, x, t, labels):
            model = nnx.merge(graphdef, params, buffers)
            b = labels.shape[0]
            if guided:
                x = jnp.concatenate([x[:b], x[:b]], axis=0)
                labels = jnp.concatenate([labels, jnp.full_like(labels, cfg.num_classes)])
            tokens, _, c = model.embed_all(x, jnp.full((x.shape[0],), t, jnp.int32), labels)
            return tokens, c

        def block(state, x, c, capacity):
            return nnx.merge(self.block_graphdef, state).capacity_forward(x, c, capacity)

        def finish(params, tokens, c, x, step, keys, labels):
            raw = nnx.merge(graphdef, params, buffers).head(tokens, c)
            if guided:
                model_fn = diffusion_lib.classifier_free_guidance(
                    lambda *_: raw, labels, cfg.num_classes, self.cfg_scale,
                    self.guided_channels,
                )
            else:
                model_fn = lambda *_: raw
            return diffusion_lib.sampler_step(
                diffusion, model_fn, x, step, keys, sampler=self.sampler, eta=self.eta
            )

        self._slicer = jax.jit(slicer, out_shardings=self._rep)
        self._initial = jax.jit(initial, out_shardings=(self._rows, self._rows))
        self._embed = jax.jit(embed)
        self._block = jax.jit(block, static_argnums=3)
        self._finish = jax.jit(finish, donate_argnums=(3,))

    def _slice_weights(self) -> None:
        """Sliced attention/MLP weights for every distinct (layer, heads, groups) of the plan."""
        start = time.perf_counter()
        heads, groups = self.plan.active_indices(self.width_multiple)
        active_h, active_g = self.plan.heads.sum(-1), self.plan.groups.sum(-1)
        self.slices: dict[tuple, dict] = {}
        self.step_states: list[list[dict]] = []
        for s in range(self.plan.num_steps):
            row = []
            for layer in range(self.plan.depth):
                key = (layer, heads[s, layer], groups[s, layer])
                if key not in self.slices:
                    h, g = np.asarray(key[1], np.int32), np.asarray(key[2], np.int32)
                    h_valid = (np.arange(len(h)) < active_h[s, layer]).astype(np.float32)
                    g_valid = (np.arange(len(g)) < active_g[s, layer]).astype(np.float32)
                    block = self.params["blocks"][layer]
                    sliced = self._slicer(block, h, h_valid, g, g_valid)
                    shared = {k: v for k, v in block.items() if k not in SLICED_MODULES}
                    shared = jax.device_put(shared, self._rep)
                    self.slices[key] = shared | sliced
                row.append(self.slices[key])
            self.step_states.append(row)
        jax.block_until_ready(list(self.slices.values()))
        self.slice_seconds = time.perf_counter() - start
        self.width_counts = np.vectorize(len)(heads), np.vectorize(len)(groups)

    def sliced_bytes(self) -> int:
        leaves = jax.tree.leaves([{k: v[k] for k in SLICED_MODULES} for v in self.slices.values()])
        return int(sum(x.nbytes for x in leaves))

    # ------------------------------------------------------------------------ capacity

    def set_capacity(self, capacity) -> None:
        """Token capacity per (step, layer); see the class docstring for the forms."""
        n, steps, depth = self.config.num_tokens, self.plan.num_steps, self.plan.depth
        if capacity is None:
            caps = np.full((steps, depth), n)
        elif np.ndim(capacity) == 0:
            value = float(capacity)
            if isinstance(capacity, float | np.floating) and value <= 1.0:
                if not value > 0:
                    raise ValueError(f"token capacity fraction must be in (0, 1], got {value}")
                value = self._round_capacity(value * n)
            if value < 0 or value != int(value):
                raise ValueError(
                    f"token capacity must be a count >= 0 or a fraction, got {capacity}"
                )
            caps = np.full((steps, depth), min(int(value), n))
        else:
            table = np.asarray(capacity)
            if table.ndim == 1:
                table = table[None]
            if table.ndim != 2 or table.shape[1] != depth or len(table) > steps:
                raise ValueError(
                    f"token capacities must have shape ({depth},) or (buckets, {depth}), got "
                    f"{np.shape(capacity)}"
                )
            if (table < 0).any():
                raise ValueError("token capacities must be >= 0")
            buckets = np.array_split(np.arange(steps), len(table))
            caps = np.empty((steps, depth), np.int64)
            for bucket, row in zip(buckets, table, strict=True):
                caps[bucket] = np.minimum(row, n)
        self.capacity = caps.astype(np.int64)

    def _round_capacity(self, count: float) -> int:
        m = self.capacity_multiple
        return min(self.config.num_tokens, int(math.ceil(count / m) * m))

    def calibrate(self, key, indices, labels, *, margin: float = 0.1, step_buckets: int = 1):
        """Sample one batch with every token allowed (exact), set the capacity of each layer
        (and of each of `step_buckets` contiguous step ranges) to the most tokens any sample
        selected there, times (1 + margin), rounded up to the capacity multiple; returns the
        batch's samples (they are exact, keep them)."""
        if margin < 0 or step_buckets < 1:
            raise ValueError(
                f"need margin >= 0 and step_buckets >= 1, got {margin}, {step_buckets}"
            )
        self.set_capacity(None)
        samples = self(key, indices, labels)
        most = self._last_max  # (S, L) most tokens selected in one sample
        buckets = np.array_split(np.arange(self.plan.num_steps), min(step_buckets, len(most)))
        table = [[self._round_capacity(c * (1 + margin)) for c in most[b].max(0)] for b in buckets]
        self.set_capacity(np.asarray(table))
        return samples

    # ------------------------------------------------------------------------ sampling

    def reset_stats(self) -> None:
        shape = (self.plan.num_steps, self.plan.depth)
        self.selected = np.zeros(shape, np.int64)
        self.overflow = np.zeros(shape, np.int64)
        self.network_rows = 0
        self.batches = 0
        self.sample_seconds = 0.0

    def _compiled_block(self, state, x, c, capacity: int):
        n = self.config.num_tokens
        capacity = min(capacity, n)
        key = (
            state["attn"]["qkv"]["kernel"].shape[1], state["mlp"]["fc1"]["kernel"].shape[1],
            capacity, x.shape, str(x.dtype),
        )
        if key not in self.compiled:
            start = time.perf_counter()
            self.compiled[key] = self._block.lower(state, x, c, capacity).compile()
            self.compile_seconds += time.perf_counter() - start
        return self.compiled[key]

    def _compiled(self, name: str, fn, *args):
        key = (name, *(a.shape for a in jax.tree.leaves(args[1:])))
        if key not in self.compiled:
            start = time.perf_counter()
            self.compiled[key] = fn.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - start
        return self.compiled[key]

    def __call__(self, key, indices, labels) -> jax.Array:
        if self.calibration is not None:
            options, self.calibration = self.calibration, None
            return self.calibrate(key, indices, labels, **options)
        start = time.perf_counter()
        params = self.params
        x, keys = self._compiled("initial", self._initial, key, indices, labels)(
            key, indices, labels
        )
        stats = []
        for s, step in enumerate(self.step_indices):
            t = jnp.int32(self.plan.timesteps[s])
            embed = self._compiled("embed", self._embed, params, x, t, labels)
            tokens, c = embed(params, x, t, labels)
            for layer, state in enumerate(self.step_states[s]):
                block = self._compiled_block(state, tokens, c, int(self.capacity[s, layer]))
                tokens, block_stats = block(state, tokens, c)
                stats.append(block_stats)
            step_arg = jnp.int32(step)
            finish = self._compiled(
                "finish", self._finish, params, tokens, c, x, step_arg, keys, labels
            )
            x = finish(params, tokens, c, x, step_arg, keys, labels)
        out = x[: labels.shape[0]]
        stats = np.asarray(jax.device_get(stats)).reshape(self.plan.num_steps, self.plan.depth, 3)
        self.selected += stats[..., 0]
        self.overflow += stats[..., 1]
        self._last_max = stats[..., 2]
        self.network_rows += x.shape[0]
        self.batches += 1
        self.sample_seconds += time.perf_counter() - start
        return out

    # -------------------------------------------------------------------------- report

    def report(self) -> dict:
        """Achieved FLOPs ratios, compile counts and times, and token overflow so far."""
        plan, n = self.plan, self.config.num_tokens
        heads_run, groups_run = self.width_counts
        capacity_run = np.minimum(self.capacity, n) / n
        out = {
            "plan_flops_ratio": plan.flops_ratio(),
            "signatures": sum(1 for k in self.compiled if not isinstance(k[0], str)),
            "compile_seconds": self.compile_seconds,
            "slice_seconds": self.slice_seconds,
            "sliced_weight_bytes": self.sliced_bytes(),
            "mean_capacity_fraction": float(capacity_run.mean()),
            "executed_flops_ratio": float(
                flops.fraction_ratio(
                    heads_run / plan.heads.shape[-1], groups_run / plan.groups.shape[-1],
                    capacity_run, n, plan.hidden, plan.mlp_hidden,
                ).mean()
            ),
        }
        if self.network_rows:
            tokens = self.network_rows * n
            run = (self.selected - self.overflow) / tokens
            out |= {
                "achieved_flops_ratio": plan.flops_ratio(run),
                "token_fraction": float(run.mean()),
                "tokens_selected": int(self.selected.sum()),
                "tokens_overflow": int(self.overflow.sum()),
                "overflow_fraction": float(self.overflow.sum() / max(1, self.selected.sum())),
                "sample_seconds": self.sample_seconds,
            }
        return out
