"""The DyDiT inference engine: real wall-clock savings from DyDiT's routers.

The masked model (models/dydit.py) computes every head, channel group and token and
multiplies the unused ones by zero. The engine computes only what the routers keep:

- width: the plan (plan.py) fixes the active heads and MLP groups of every (step, layer)
  before sampling. Each layer's compiled call takes the layer's full weights and the indices
  of its active heads/groups and slices inside (qkv columns and proj rows of the heads, fc1
  columns and fc2 rows of the groups): the shape depends only on the counts, and no sliced
  copy is kept (250 steps have thousands of distinct active sets; a copy each would need
  tens of GB). Counts can be rounded up to a multiple (`width_multiple`) or merged (the shape
  budget), padding with inactive heads/groups whose contribution is zeroed in the slice.
  A call that keeps every head (group), padding included, runs the weights unsliced and
  masks the padded heads' (groups') activations: slicing would copy all of them.
- tokens: at most `capacity` tokens per sample and layer run the MLP (a static shape): the
  top-scoring of those the token router selects are gathered, run and scattered back.
  Selected tokens beyond the capacity are dropped and counted (`report()["tokens_overflow"]`).
  With capacity = all tokens the engine equals the masked model (float round-off).

Each step runs as: one compiled embedding call, the blocks, and one compiled call for the
final layer, guidance and the sampler update (any of `diffusion.SAMPLERS`; the plan covers
exactly the timesteps the sampler feeds the network). Under guidance a step runs the doubled
batch [x; x] with labels [y; null] inside the guidance interval and the conditional rows
alone outside it (each batch size compiles its own programs). Nothing waits for the device
inside a batch.
The blocks run as two compiled calls each (attention, token MLP; `layers_per_call=1`, the
default), each compiled once per shape (heads; groups and capacity): few signatures, 2 x
depth calls per step. Or `layers_per_call=k` runs k consecutive blocks per call, compiled once
per tuple of the k blocks' shapes: fewer calls and call boundaries, at the cost of more
signatures (up to one per step and chunk when the plan changes every step).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dydit_jax import diffusion as diffusion_lib
from dydit_jax import flops, models, parallel
from dydit_jax.dynamic import plan as plan_lib
from dydit_jax.dynamic.plan import WidthPlan, width_plan
from dydit_jax.models.dydit import DyDiTConfig


def slice_attention(attn: dict, heads, valid, *, head_dim: int) -> dict:
    """Attention weights restricted to `heads` (an index array): their q, k, v columns of qkv
    and input rows of proj. Entries with valid = 0 are padding: their proj rows are zeroed."""
    d = attn["qkv"]["kernel"].shape[0]
    n = heads.shape[0]
    qkv_kernel = attn["qkv"]["kernel"].reshape(d, 3, -1, head_dim)[:, :, heads]
    qkv_bias = attn["qkv"]["bias"].reshape(3, -1, head_dim)[:, heads]
    proj = attn["proj"]["kernel"].reshape(-1, head_dim, d)[heads] * valid[:, None, None]
    return {
        "qkv": {
            "kernel": qkv_kernel.reshape(d, 3 * n * head_dim),
            "bias": qkv_bias.reshape(3 * n * head_dim),
        },
        "proj": {"kernel": proj.reshape(n * head_dim, d), "bias": attn["proj"]["bias"]},
    }


def slice_mlp(mlp: dict, groups, valid, *, width: int) -> dict:
    """MLP weights restricted to channel `groups` of `width` channels: fc1 columns and bias,
    fc2 rows. Padding entries (valid = 0) are zeroed in fc1 (GELU(0) = 0) and fc2."""
    d = mlp["fc1"]["kernel"].shape[0]
    n = groups.shape[0]
    fc1_kernel = mlp["fc1"]["kernel"].reshape(d, -1, width)[:, groups] * valid[:, None]
    fc1_bias = mlp["fc1"]["bias"].reshape(-1, width)[groups] * valid[:, None]
    fc2_kernel = mlp["fc2"]["kernel"].reshape(-1, width, d)[groups] * valid[:, None, None]
    return {
        "fc1": {"kernel": fc1_kernel.reshape(d, n * width), "bias": fc1_bias.reshape(-1)},
        "fc2": {"kernel": fc2_kernel.reshape(n * width, d), "bias": mlp["fc2"]["bias"]},
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
    if value >= 1 and value == int(value) and "." not in spec:
        return int(value)
    raise ValueError(
        f"token capacity {spec!r} is not 'calibrate', 'all', a fraction in (0, 1] like 0.75, "
        "or a token count >= 1 like 192"
    )


class DyDiTEngine:
    """Sampler for a DyDiT: `engine(key, indices, labels)` -> float32 samples (B, H, W, C),
    the call of `sample_lib.generate` (same noise per image index as the masked sampler).

    parts/params: `model_parts.ModelParts` of a DyDiT and its weights. `capacity`: tokens per
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
        cfg_interval=(0.0, 1.0),
        eta: float = 0.0,
        width_multiple: int = 1,
        capacity=None,
        capacity_multiple: int = 8,
        capacity_margin: float = 0.1,
        capacity_step_buckets: int = 1,
        mlp_shape_budget: int = 32,
        layers_per_call: int = 1,
        compiler_options=None,
    ):
        config = parts.config
        if not isinstance(config, DyDiTConfig):
            raise ValueError(f"the DyDiT engine needs a DyDiT model, got {type(config).__name__}")
        graphdef = parts.graphdef
        if config.scan_blocks:  # the engine runs (and slices) one layer at a time
            config, params, graphdef = models.unstack_blocks(config, params)
        self.compiler_options = compiler_options  # the run config's, for every jit
        self.guided_channels = diffusion_lib.check_sampler(
            sampler, guided_channels, sampling_steps
        )
        if capacity_multiple < 1:
            raise ValueError(f"capacity multiple must be >= 1, got {capacity_multiple}")
        if mlp_shape_budget < 1:
            raise ValueError(f"MLP shape budget must be >= 1, got {mlp_shape_budget}")
        if layers_per_call < 1:
            raise ValueError(f"layers_per_call must be >= 1, got {layers_per_call}")
        self.layers_per_call = min(layers_per_call, config.depth)  # more: the whole step
        self.mlp_shape_budget = mlp_shape_budget
        self.config, self.params = config, params
        self.graphdef, self.buffers = graphdef, parts.buffers
        self.sampler, self.eta, self.cfg_scale = sampler, eta, cfg_scale
        self.sampling_steps = str(sampling_steps)
        self.guided = cfg_scale != 1.0
        self.width_multiple, self.capacity_multiple = width_multiple, capacity_multiple
        self.diffusion = diffusion_lib.create_diffusion(sampling_steps)
        steps = self.diffusion.num_timesteps
        self.step_indices = np.arange(steps - 1, -1, -1)  # the order the sampler visits them
        # per visited step: does it run guided (the doubled batch)?
        first, stop = diffusion_lib.guidance_steps(self.diffusion, cfg_interval)
        self.guided_steps = self.guided & (self.step_indices >= first) & (
            self.step_indices < stop
        )
        self.plan: WidthPlan = width_plan(
            graphdef, params, parts.buffers, config,
            self.diffusion.timestep_map[self.step_indices],
        )
        self.mesh = mesh
        self._rows = parallel.batch_sharding(mesh)
        self._rep = parallel.replicated(mesh)
        # XLA:CPU with several (fake) devices deadlocks when too many small programs are
        # queued ahead: each queued launch holds one of a device's in-flight slots (32) and a
        # launch that finds none blocks a thread of the pool the next collective needs. So on
        # a multi-device CPU mesh the loop waits every `_pace_every` calls; GPUs/TPUs don't.
        cpu_mesh = mesh.devices.flat[0].platform == "cpu" and mesh.devices.size > 1
        self._pace_every = 8 if cpu_mesh else 0
        self._build_functions()
        self._index_arrays: dict[tuple, tuple] = {}
        self.slice_seconds = 0.0
        self.compiled: dict[tuple, Any] = {}
        self._programs: dict[tuple, dict] = {}
        self.compile_seconds = 0.0
        # per-step scalars, on device once (not re-created in the sampling loop)
        self._timesteps = [jnp.int32(t) for t in self.plan.timesteps]
        self._steps = [jnp.int32(i) for i in self.step_indices]
        # "calibrate": the first batch runs with every token and sets the capacities.
        self.calibration = None
        if isinstance(capacity, str):
            capacity = parse_capacity(capacity)
        if isinstance(capacity, str) and capacity == "calibrate":
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
        diffusion = self.diffusion

        def attention_slicer(attn, heads, valid):
            return slice_attention(attn, heads, valid, head_dim=head_dim)

        def mlp_slicer(mlp, groups, valid):
            return slice_mlp(mlp, groups, valid, width=group_width)

        def initial(key, indices, labels):
            x, keys = diffusion_lib.initial_noise(key, indices, image_shape)
            return diffusion_lib.init_carry(x), keys

        def embed(params, x, t, labels, guided):
            model = nnx.merge(graphdef, params, buffers)
            if guided:
                x, labels = diffusion_lib.guided_inputs(x, labels, cfg.num_classes)
            tokens, _, c = model.embed_all(x, jnp.full((x.shape[0],), t, jnp.int32), labels)
            return tokens, c

        # The two halves of a block: the layer's full parameters, the kept heads (groups) and
        # their validity; the module runs on its slice (the other module, unused, is left
        # whole, which keeps the compiled signature to the one count). When every head
        # (group) is kept, padding included, the weights run unsliced and the validity masks
        # the heads' (groups') activations instead: the slice would be a copy of all the
        # weights.
        def full_mask(index, valid, rows):
            mask = jnp.zeros(index.shape, valid.dtype).at[index].set(valid)
            return jnp.broadcast_to(mask, (rows, index.shape[0]))

        def attention(block, heads, valid, x, c):
            if heads.shape[0] == cfg.num_heads:
                mask = full_mask(heads, valid, x.shape[0])
                return nnx.merge(self.block_graphdef, block).attention_step(x, c, mask)
            state = block | {"attn": attention_slicer(block["attn"], heads, valid)}
            return nnx.merge(self.block_graphdef, state).attention_step(x, c)

        def token_mlp(block, groups, valid, x, mods, capacity):
            if groups.shape[0] == cfg.num_heads:  # as many groups as heads
                mask = full_mask(groups, valid, x.shape[0])
                module = nnx.merge(self.block_graphdef, block)
                return module.token_mlp(x, mods, capacity, mask)
            state = block | {"mlp": mlp_slicer(block["mlp"], groups, valid)}
            return nnx.merge(self.block_graphdef, state).token_mlp(x, mods, capacity)

        # k consecutive blocks in one program; `capacities` (static) fixes each one's shape
        # with the lengths of its index arrays. Stats: (rows, k, 2).
        def blocks(states, attn_indices, mlp_indices, x, c, capacities):
            stats = []
            for block, (heads, hvalid), (groups, gvalid), capacity in zip(
                states, attn_indices, mlp_indices, capacities, strict=True
            ):
                x, mods = attention(block, heads, hvalid, x, c)
                x, block_stats = token_mlp(block, groups, gvalid, x, mods, capacity)
                stats.append(block_stats)
            return x, jnp.stack(stats, axis=1)

        def finish(params, tokens, c, carry, step, keys, guided):
            raw = nnx.merge(graphdef, params, buffers).head(tokens, c)
            if guided:
                raw = diffusion_lib.combine_guided(raw, self.cfg_scale, self.guided_channels)
            model_fn = lambda *_: raw
            return diffusion_lib.sampler_step(
                diffusion, model_fn, carry, step, keys, sampler=self.sampler, eta=self.eta
            )

        # Fixed output shardings: every call's inputs match what its executable was built for.
        rows = self._rows
        jit = functools.partial(
            parallel.jit, mesh=self.mesh, compiler_options=self.compiler_options
        )
        self._initial = jit(initial, out_shardings=((rows, rows), rows))
        self._embed = jit(embed, static_argnums=4, out_shardings=(rows, rows))
        self._attention = jit(attention, out_shardings=(rows, rows))
        self._token_mlp = jit(token_mlp, static_argnums=5, out_shardings=(rows, rows))
        self._blocks = jit(blocks, static_argnums=5, out_shardings=(rows, rows))
        self._finish = jit(finish, static_argnums=6, donate_argnums=(3,),
                           out_shardings=(rows, rows))

    def _schedule(self) -> None:
        """What runs at each (step, layer): head count (active, rounded up to the width
        multiple), and the token MLP's (group count, capacity), merged so that at most
        `mlp_shape_budget` distinct MLP shapes are compiled (plan.merge_shapes; padding
        groups and capacity slots compute nothing that counts); then the index arrays."""
        plan = self.plan
        heads = plan_lib.rounded_counts(plan.heads, self.width_multiple)
        groups = plan_lib.rounded_counts(plan.groups, self.width_multiple)
        wanted = np.stack([groups, self.capacity], -1).reshape(-1, 2)
        merged = plan_lib.merge_shapes(wanted, self.mlp_shape_budget).reshape(*groups.shape, 2)
        self.width_counts = (heads, merged[..., 0])
        self.capacity_run = merged[..., 1]
        self._layer_indices(
            plan_lib.padded_indices(plan.heads, heads),
            plan_lib.padded_indices(plan.groups, merged[..., 0]),
        )

    def set_shape_budget(self, budget: int) -> None:
        """Re-merge the token-MLP shapes into at most `budget` (see `_schedule`)."""
        if budget < 1:
            raise ValueError(f"MLP shape budget must be >= 1, got {budget}")
        self.mlp_shape_budget = budget
        self._schedule()

    def mlp_shapes(self) -> int:
        """Distinct (layer-independent) token-MLP shapes the schedule compiles."""
        counts = np.stack([self.width_counts[1], self.capacity_run], -1).reshape(-1, 2)
        return len(np.unique(counts, axis=0))

    def _layer_indices(self, heads: np.ndarray, groups: np.ndarray) -> None:
        """Per (step, layer): the layer's parameters and, for the attention and the MLP call,
        the kept indices and their validity (0 = padding), on device once per distinct set."""
        start = time.perf_counter()
        plan = self.plan
        indices = {"attn": heads, "mlp": groups}
        active = {"attn": plan.heads.sum(-1), "mlp": plan.groups.sum(-1)}
        self.step_states: list[list[tuple[tuple, tuple]]] = []
        for s in range(plan.num_steps):
            row = []
            for layer in range(plan.depth):
                block = self.params["blocks"][layer]
                calls = []
                for module in ("attn", "mlp"):
                    chosen = np.asarray(indices[module][s, layer], np.int32)
                    count = int(active[module][s, layer])
                    key = (chosen.tobytes(), count)
                    if key not in self._index_arrays:
                        valid = (np.arange(len(chosen)) < count).astype(np.float32)
                        self._index_arrays[key] = jax.device_put((chosen, valid), self._rep)
                    calls.append((block, *self._index_arrays[key]))
                row.append(tuple(calls))
            self.step_states.append(row)
        self.slice_seconds += time.perf_counter() - start

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
        self.capacity = caps.astype(np.int64)  # as asked; `capacity_run` is what runs
        self._schedule()

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
        self.step_rows = np.zeros(self.plan.num_steps, np.int64)  # network rows per step
        self.sample_seconds = 0.0

    def _guidance_variants(self) -> list[bool]:
        """The guidance settings the steps run with (True: the doubled batch)."""
        return sorted({bool(g) for g in self.guided_steps})

    def _rows_per_step(self, batch: int) -> np.ndarray:
        """(S,) network rows of each step for `batch` images: both guidance halves on the
        guided steps."""
        return batch * np.where(self.guided_steps, 2, 1)

    def _compile(self, key: tuple, fn, *args):
        """`fn` compiled for these arguments' shapes (once per key, timed)."""
        if key not in self.compiled:
            start = time.perf_counter()
            self.compiled[key] = fn.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - start
        return self.compiled[key]

    def prepare(self, key, indices, labels) -> dict:
        """Compile every shape signature the plan and capacities need for this batch shape
        (before sampling, so that sampling times exclude compilation); returns the program:
        per step its block calls in order, (kind, first layer, compiled fn, its arguments
        before the tokens), plus the initial function and, per guidance variant (True: the
        doubled batch), the embedding and final functions."""
        program_key = (
            indices.shape, self.capacity_run.tobytes(), self.width_counts[1].tobytes()
        )
        if program_key in self._programs:
            return self._programs[program_key]
        params, shape = self.params, indices.shape
        initial = self._compile(("initial", shape), self._initial, key, indices, labels)
        carry, keys = initial(key, indices, labels)
        t0 = jnp.int32(self.plan.timesteps[0])
        embeds, finishes, examples = {}, {}, {}
        for guided in self._guidance_variants():
            embed = self._compile(("embed", shape, guided), self._embed, params, carry[0], t0,
                                  labels, guided)
            tokens, c = embed(params, carry[0], t0, labels)
            mods = None  # an example of the adaLN chunks, the token-MLP call's input
            if self.layers_per_call == 1:
                attn_args, _ = self.step_states[0][0]
                example_attention = self._compile(
                    ("attn", attn_args[1].shape[0], tokens.shape), self._attention,
                    *attn_args, tokens, c,
                )
                _, mods = example_attention(*attn_args, tokens, c)
            # These example runs carry collectives (guidance concatenates the halves across
            # the batch shards); finish them before sampling dispatches its own: XLA:CPU can
            # deadlock when two independent programs with collectives are in flight at once.
            jax.block_until_ready((carry, keys, tokens, mods))
            embeds[guided] = embed
            finishes[guided] = self._compile(
                ("finish", shape, guided), self._finish, params, tokens, c, carry,
                jnp.int32(0), keys, guided,
            )
            examples[guided] = (tokens, c, mods)
        steps = []
        n, k = self.config.num_tokens, self.layers_per_call
        for s in range(self.plan.num_steps):
            tokens, c, mods = examples[bool(self.guided_steps[s])]
            calls = []  # (kind, first layer, compiled fn, its arguments before tokens)
            states = self.step_states[s]
            capacities = [min(int(cap), n) for cap in self.capacity_run[s]]
            for first in range(0, len(states), k):
                chunk = range(first, min(first + k, len(states)))
                if k > 1:
                    # (the blocks' parameters, their (heads, valid), their (groups, valid))
                    args = (
                        tuple(states[i][0][0] for i in chunk),
                        tuple(states[i][0][1:] for i in chunk),
                        tuple(states[i][1][1:] for i in chunk),
                    )
                    caps = tuple(capacities[i] for i in chunk)
                    shapes = tuple(
                        (states[i][0][1].shape[0], states[i][1][1].shape[0], capacities[i])
                        for i in chunk
                    )
                    fn = self._compile(("blocks", shapes, tokens.shape), self._blocks,
                                       *args, tokens, c, caps)
                    calls.append(("blocks", first, fn, args))
                    continue
                attn_args, mlp_args = states[first]
                attention = self._compile(
                    ("attn", attn_args[1].shape[0], tokens.shape), self._attention,
                    *attn_args, tokens, c,
                )
                token_mlp = self._compile(
                    ("mlp", mlp_args[1].shape[0], capacities[first], tokens.shape),
                    self._token_mlp, *mlp_args, tokens, mods, capacities[first],
                )
                calls += [("attention", first, attention, attn_args),
                          ("token_mlp", first, token_mlp, mlp_args)]
            steps.append(calls)
        program = {"initial": initial, "embed": embeds, "finish": finishes, "steps": steps}
        self._programs[program_key] = program
        return program

    def lowered_programs(self, mesh, param_shardings, batch: int) -> list[tuple[str, Any]]:
        """Every distinct program the schedule runs for `batch` images per call (one block
        per call), lowered for `mesh` from shapes alone: the planner compiles them for a TPU
        topology (`python -m dydit_jax.plan --what=engine`). `param_shardings`: the model's
        (per-layer) parameter shardings on `mesh`. The engine's functions are rebuilt for
        `mesh`, so afterwards it serves planning only."""
        self.mesh = mesh
        self._rows, self._rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
        self._build_functions()
        rows, rep = self._rows, self._rep

        def on(x, sharding):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        def on_rows(tree):
            return jax.tree.map(lambda x: on(x, rows), tree)

        params = jax.tree.map(on, self.params, param_shardings)
        block = params["blocks"][0]
        key = on(jax.eval_shape(lambda: jax.random.key(0)), rep)
        indices = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
        carry, keys = on_rows(jax.eval_shape(self._initial, key, indices, indices))

        def kept(count):  # index and validity arrays of `count` heads (groups)
            return (jax.ShapeDtypeStruct((count,), jnp.int32, sharding=rep),
                    jax.ShapeDtypeStruct((count,), jnp.float32, sharding=rep))

        out = [("initial", self._initial.lower(key, indices, indices))]
        n = self.config.num_tokens
        variants = self._guidance_variants()
        for guided in variants:
            # both batch sizes in use (a guidance interval): name them apart
            tag = f",rows={batch * (2 if guided else 1)}" if len(variants) > 1 else ""
            where = self.guided_steps == guided
            heads_run, groups_run = (counts[where] for counts in self.width_counts)
            capacity_run = self.capacity_run[where]
            tokens, c = on_rows(
                jax.eval_shape(self._embed, params, carry[0], scalar, indices, guided)
            )
            out.append((f"embed{tag}",
                        self._embed.lower(params, carry[0], scalar, indices, guided)))
            mods = None
            for count in sorted(set(heads_run.ravel().tolist())):
                args = (block, *kept(count), tokens, c)
                out.append((f"attention:heads={count}{tag}", self._attention.lower(*args)))
                mods = mods or on_rows(jax.eval_shape(self._attention, *args)[1])
            shapes = {(int(g), min(int(cap), n))
                      for g, cap in zip(groups_run.ravel(), capacity_run.ravel(), strict=True)}
            for groups, capacity in sorted(shapes):
                out.append((
                    f"token_mlp:groups={groups},capacity={capacity}{tag}",
                    self._token_mlp.lower(block, *kept(groups), tokens, mods, capacity),
                ))
            out.append((f"finish{tag}", self._finish.lower(
                params, tokens, c, carry, scalar, keys, guided)))
        return out

    def __call__(self, key, indices, labels) -> jax.Array:
        if self.calibration is not None:
            options, self.calibration = self.calibration, None
            return self.calibrate(key, indices, labels, **options)
        program = self.prepare(key, indices, labels)
        start = time.perf_counter()
        x, stats = self._run(program, key, indices, labels, lambda _kind, _where, fn, *a: fn(*a))
        # Wait for the batch: the timing covers all of it, and no program with collectives
        # is left in flight when the caller dispatches another (see `prepare`).
        out = jax.block_until_ready(x)
        # One transfer after the batch. Each call's stats are (rows, 2) for one block or
        # (rows, k, 2) for k, rows depending on the step's guidance: per (step, layer), the
        # tokens selected and dropped summed over the rows, and the most one row selected.
        per_call = [np.asarray(st).reshape(st.shape[0], -1, 2) for st in jax.device_get(stats)]
        shape = self.selected.shape
        self.selected += np.concatenate([st[..., 0].sum(0) for st in per_call]).reshape(shape)
        self.overflow += np.concatenate([st[..., 1].sum(0) for st in per_call]).reshape(shape)
        self._last_max = np.concatenate([st[..., 0].max(0) for st in per_call]).reshape(shape)
        self.step_rows += self._rows_per_step(labels.shape[0])
        self.sample_seconds += time.perf_counter() - start
        return out

    def _run(self, program: dict, key, indices, labels, call) -> tuple[jax.Array, list]:
        """The sampling loop of one batch over a prepared program: (the final x, per block
        its token statistics). Every compiled call goes through `call(kind, (step, layer),
        fn, *args)` (kind: "embed", "attention", "token_mlp", "blocks" (layers_per_call > 1:
        layer is the chunk's first), "finish"; layer -1 for embed and finish); `profile`
        times them."""
        params = self.params
        carry, keys = program["initial"](key, indices, labels)
        stats, in_flight = [], 0
        for s in range(self.plan.num_steps):
            guided = bool(self.guided_steps[s])
            embed, finish = program["embed"][guided], program["finish"][guided]
            tokens, c = call("embed", (s, -1), embed, params, carry[0], self._timesteps[s],
                             labels)
            for kind, layer, fn, args in program["steps"][s]:
                if kind == "attention":
                    tokens, mods = call(kind, (s, layer), fn, *args, tokens, c)
                else:  # "token_mlp" after its attention, or "blocks"
                    second = mods if kind == "token_mlp" else c
                    tokens, block_stats = call(kind, (s, layer), fn, *args, tokens, second)
                    stats.append(block_stats)
                in_flight += 1
                if self._pace_every and in_flight >= self._pace_every:
                    tokens.block_until_ready()
                    in_flight = 0
            carry = call("finish", (s, -1), finish, params, tokens, c, carry, self._steps[s],
                         keys)
            if self._pace_every:
                jax.block_until_ready(carry)
                in_flight = 0
        return carry[0], stats

    def profile(self, key, indices, labels) -> list[dict]:
        """One batch that waits after every compiled call (so slower than `__call__`, which
        never waits), to find where the time goes: per call its kind ("embed", "attention",
        "token_mlp", "blocks", "finish"), step, layer, shape (heads / groups and capacity as
        run, padding included; "blocks": "layers", their count), seconds, and the
        multiply-adds of the block branches it executes (`flops.block_costs` scaled to the
        shapes). Token statistics are not accumulated."""
        program = self.prepare(key, indices, labels)
        cfg = self.config
        attn_macs, _ = flops.block_costs(cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden)
        group_width = cfg.mlp_hidden // cfg.num_heads
        step_rows = self._rows_per_step(indices.shape[0])
        records: list[dict] = []

        def attention_macs(heads: int, step: int) -> int:
            return int(step_rows[step]) * attn_macs * heads // cfg.num_heads

        def mlp_macs(groups: int, step: int, layer: int) -> tuple[int, int]:
            capacity = min(int(self.capacity_run[step, layer]), cfg.num_tokens)
            rows = int(step_rows[step])
            return capacity, rows * 2 * capacity * cfg.hidden_size * groups * group_width

        def timed(kind, where, fn, *args):
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            step, layer = where
            record = {"kind": kind, "step": step, "layer": layer, "macs": 0,
                      "seconds": time.perf_counter() - start}
            # the shape as run: the length of the kept index array (padding included)
            if kind == "attention":
                heads = args[1].shape[0]
                record |= {"heads": heads, "macs": attention_macs(heads, step)}
            elif kind == "token_mlp":
                groups = args[1].shape[0]
                capacity, macs = mlp_macs(groups, step, layer)
                record |= {"groups": groups, "capacity": capacity, "macs": macs}
            elif kind == "blocks":
                heads = [index.shape[0] for index, _ in args[1]]
                groups = [index.shape[0] for index, _ in args[2]]
                macs = sum(attention_macs(h, step) for h in heads) + sum(
                    mlp_macs(g, step, layer + i)[1] for i, g in enumerate(groups)
                )
                record |= {"layers": len(heads), "macs": macs}
            records.append(record)
            return out

        jax.block_until_ready(self._run(program, key, indices, labels, timed))
        return records

    # -------------------------------------------------------------------------- report

    def report(self) -> dict:
        """Achieved FLOPs ratios, compile counts and times, and token overflow so far."""
        plan, n = self.plan, self.config.num_tokens
        heads_run, groups_run = self.width_counts
        capacity_run = np.minimum(self.capacity_run, n) / n
        out = {
            "sampler": self.sampler,
            "sampling_steps": self.sampling_steps,
            "guided_steps": int(self.guided_steps.sum()),
            "plan_flops_ratio": plan.flops_ratio(),
            "signatures": sum(1 for k in self.compiled if k[0] in ("attn", "mlp", "blocks")),
            "layers_per_call": self.layers_per_call,
            "compile_seconds": self.compile_seconds,
            "slice_seconds": self.slice_seconds,
            "mean_capacity_fraction": float(capacity_run.mean()),
            "executed_flops_ratio": float(
                flops.fraction_ratio(
                    heads_run / plan.heads.shape[-1], groups_run / plan.groups.shape[-1],
                    capacity_run, n, plan.hidden, plan.mlp_hidden,
                ).mean()
            ),
        }
        if self.step_rows.any():
            run = (self.selected - self.overflow) / (self.step_rows[:, None] * n)
            out |= {
                "achieved_flops_ratio": plan.flops_ratio(run),
                "token_fraction": float(run.mean()),
                "tokens_selected": int(self.selected.sum()),
                "tokens_overflow": int(self.overflow.sum()),
                "overflow_fraction": float(self.overflow.sum() / max(1, self.selected.sum())),
                "sample_seconds": self.sample_seconds,
            }
        return out
