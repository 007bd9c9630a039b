r"""DyDiT wall-clock speedup: DiT vs DyDiT (the inference engine), side by side.

Same size, same sampler, same batch, same process; the two alternate, batch by batch, so
that machine noise hits both. Compile time is excluded from the per-image times and printed
separately. The last line reads `wall_speedup=<x> flops_speedup=<y>` (of the last variant).

Paper sizes (random backbone, synthetic routers, 32x32x4 latents, 1000 classes):

  python bench/dydit_speedup.py --model=B/2 --lambdas=0.7,0.5 --steps=10 --batch=8
  python bench/dydit_speedup.py --model=B/2 --sampler=dpmpp2m --steps=20   # few-step sampling
  python bench/dydit_speedup.py --quick                       # ~3.5 min on 2 CPU cores
  python bench/dydit_speedup.py --quick --profile             # + where the engine's time goes
  python bench/dydit_speedup.py --quick --layers_per_call=1,12  # engine calls of 1 / 12 blocks
  python bench/dydit_speedup.py --steps=250 --shapes_only      # compiled shapes per budget
  python bench/dydit_speedup.py --model=XL/2 --steps=250 --batch=32 --dtype=bfloat16  # GPU

A trained digits DyDiT against its own backbone run as a DiT (routers off):

  python bench/dydit_speedup.py --workdir=workdirs/dydit_digits --steps=50 --batch=100

Synthetic routers: for a target FLOPs ratio r (from the paper's GFLOPs at lambda 0.7 / 0.5,
e.g. DyDiT-B 16.28 / 11.90 of DiT-B's 23.02, converted with flops.dynamic_macs), the width
routers of every layer read one random direction of the timestep embedding: head h of layer
l is on at a fraction q_lh of the sampler's timesteps (the highest projections), the q_lh
spread evenly by +-0.3 around a mean that is corrected until the width plan's own FLOPs
ratio is w = r / (a + (1 - a) k) (a: attention's share of a block's FLOPs, k =
`--token_keep`). So the active width changes from step to step and from layer to layer, as
a trained DyDiT's does. Then every token router gets the bias that keeps a fraction k of
the tokens, layer by layer (each changes what the next one sees), first on noise and then
on the inputs the model sees along the benchmark's own sampler trajectory, which the biases
change in turn (`--token_rounds` rounds). The achieved ratio then lands within a few % of r.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import machine  # noqa: E402
from dydit_jax import config_lib, flops, model_parts, parallel, sample_lib  # noqa: E402
from dydit_jax.diffusion import (  # noqa: E402
    SAMPLERS,
    classifier_free_guidance,
    create_diffusion,
    init_carry,
    initial_noise,
    sampler_step,
)
from dydit_jax.dynamic import DyDiTEngine  # noqa: E402
from dydit_jax.dynamic.plan import width_plan  # noqa: E402
from dydit_jax.models import model_config  # noqa: E402

# The DyDiT paper's GFLOPs (ImageNet 256, docs/dydit.md) per size and lambda.
PAPER_GFLOPS = {
    "S/2": {1.0: 6.07, 0.7: 4.34, 0.5: 3.16},
    "B/2": {1.0: 23.02, 0.7: 16.28, 0.5: 11.90},
    "XL/2": {1.0: 118.69, 0.7: 84.33, 0.5: 57.88},
}
WIDTH_SPREAD = 0.3


def target_ratio(config, size: str, lam: float) -> float:
    """The DyDiT FLOPs ratio whose dynamic_macs equal the paper's GFLOPs at this lambda."""
    blocks = flops.routed_block_macs(config)
    constant = flops.dit_macs(config, dydit_convention=True) - blocks
    return (PAPER_GFLOPS[size][lam] * 1e9 - constant) / blocks


def spread_fractions(mean: float, count: int) -> np.ndarray:
    """`count` fractions in [0, 1] evenly spread by +-WIDTH_SPREAD whose mean is `mean`."""
    offsets = np.linspace(-WIDTH_SPREAD, WIDTH_SPREAD, count) if count > 1 else np.zeros(1)
    lo, hi = -1.0, 2.0
    for _ in range(60):  # bisection on the centre (clipping makes it non-linear)
        mid = (lo + hi) / 2
        if np.clip(mid + offsets, 0, 1).mean() < mean:
            lo = mid
        else:
            hi = mid
    return np.clip((lo + hi) / 2 + offsets, 0, 1)


def random_backbone(params, seed: int):
    """Initialised weights plus small random adaLN / final layers (zero-init would make
    every block an identity, which no trained model is)."""
    params = jax.device_get(params)
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        names = jax.tree_util.keystr(path)
        if "adaLN" in names or "final_layer" in names:
            return (0.02 * rng.standard_normal(x.shape)).astype(np.float32)
        return np.asarray(x)

    return jax.tree_util.tree_map_with_path(perturb, params)


def dit_subset(dydit_params):
    """DiT's parameters out of a DyDiT's: the same tree without the routers."""
    params = dict(dydit_params)
    params["blocks"] = {
        i: {m: p for m, p in b.items() if m in ("attn", "mlp", "adaLN")}
        for i, b in params["blocks"].items()
    }
    return params


def token_biases(parts, params, inputs, token_keep: float):
    """Per layer, the token-router bias that keeps `token_keep` of the tokens of the DyDiT
    (its width masks on, earlier layers' token masks applied) on the model inputs
    `(x, t, y)`; set layer by layer since each changes what the next one sees."""
    model = nnx.merge(parts.graphdef, params, parts.buffers)
    block_graphdef = nnx.graphdef(model.blocks[0])
    # Weights as arguments, not closed over (XLA would embed them as constants: 2.7 GB at
    # XL); one compiled call per half, shared by every layer.
    embed_all = jax.jit(
        lambda p, *a: nnx.merge(parts.graphdef, p, parts.buffers).embed_all(*a)
    )

    @jax.jit
    def attention_half(state, tokens, t_emb, c):
        block = nnx.merge(block_graphdef, state)
        head_logits, group_logits = block.width_logits(t_emb)
        heads = block.full_width((head_logits > 0).astype(jnp.float32))
        groups = block.full_width((group_logits > 0).astype(jnp.float32))
        mods = block.adaLN(c)
        tokens = block.attention_residual(tokens, mods, heads)
        return tokens, block.token_logits(tokens) - block.token_fc2.bias[0], mods, groups

    @jax.jit
    def mlp_half(state, tokens, mods, groups, keep):
        block = nnx.merge(block_graphdef, state)
        return tokens + keep * mods[5][:, None] * block.mlp_branch(tokens, mods, groups)

    tokens, t_emb, c = embed_all(params, *inputs)
    biases = []
    for layer in range(len(model.blocks)):
        state = jax.device_put(params["blocks"][layer])
        tokens, logits, mods, groups = attention_half(state, tokens, t_emb, c)
        logits = np.asarray(logits)
        biases.append(-np.quantile(logits, 1 - token_keep))
        keep = jnp.asarray(logits + biases[-1] > 0, jnp.float32)[..., None]
        tokens = mlp_half(state, tokens, mods, groups, keep)
    return biases


def noise_inputs(cfg, timesteps, batch: int, seed: int):
    """(x, t, y): Gaussian noise at four of the sampler's timesteps, random labels."""
    rng = np.random.default_rng(seed)
    ts = np.asarray(timesteps)[np.linspace(0, len(timesteps) - 1, 4).astype(int)]
    shape = (len(ts) * batch, cfg.input_size, cfg.input_size, cfg.in_channels)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    t = jnp.asarray(np.repeat(ts, batch), jnp.int32)
    return x, t, jnp.asarray(rng.integers(0, cfg.num_classes, len(t)), jnp.int32)


def trajectory_inputs(parts, params, args, batch: int, rows: int):
    """(x, t, y) the masked DyDiT sees along the benchmark's own sampler (guidance:
    both halves) on `batch` images of the benchmark's labels: at most `rows` of them, spread
    evenly over the steps (each row costs a forward in `token_biases`)."""
    cfg = parts.config
    graphdef, buffers = parts.graphdef, parts.buffers
    forward = jax.jit(lambda p, x, t, y: nnx.merge(graphdef, p, buffers)(x, t, y))
    weights = jax.device_put(params)  # once, not per call; an argument, not a constant
    seen = []

    def apply_fn(x, t, y):
        seen.append((x, t, y))
        return forward(weights, x, t, y)

    diffusion = create_diffusion(args.steps_spec)
    labels = jnp.arange(batch, dtype=jnp.int32) % cfg.num_classes
    shape = (cfg.input_size, cfg.input_size, cfg.in_channels)
    x, keys = initial_noise(jax.random.key(args.seed), jnp.arange(batch), shape)
    if args.cfg_scale != 1.0:
        model_fn = classifier_free_guidance(apply_fn, labels, cfg.num_classes, args.cfg_scale,
                                            None)
    else:
        model_fn = lambda x, t: apply_fn(x, t, labels)
    carry = init_carry(x)
    for i in range(diffusion.num_timesteps):
        step = jnp.asarray(diffusion.num_timesteps - 1 - i, jnp.int32)
        carry = sampler_step(diffusion, model_fn, carry, step, keys, sampler=args.sampler)
    seen = [jnp.concatenate(parts_, axis=0) for parts_ in zip(*seen, strict=True)]
    chosen = np.unique(np.linspace(0, len(seen[0]) - 1, min(rows, len(seen[0]))).astype(int))
    return tuple(part[chosen] for part in seen)


def synthetic_routers(parts, params, ratio: float, timesteps, args):
    """Router weights for a plan with FLOPs ratio ~`ratio` (see the module docstring)."""
    token_keep, seed = args.token_keep, args.seed
    cfg = parts.config
    params = jax.tree.map(np.array, params)
    rng = np.random.default_rng(seed)
    attn, mlp = flops.block_costs(cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden)
    attn_frac = attn / (attn + mlp)
    width = ratio / (attn_frac + (1 - attn_frac) * token_keep)
    if not 0 < width <= 1:
        raise ValueError(f"ratio {ratio} cannot be reached with token_keep {token_keep}")
    model = nnx.merge(parts.graphdef, params, parts.buffers)
    t_emb = np.asarray(model.t_embedder(jnp.asarray(timesteps, jnp.int32)), np.float64)
    k = cfg.num_router_logits
    always_on = cfg.num_heads - k  # head/group 0 in the training release's layout
    draws = [(rng.standard_normal(cfg.hidden_size), rng.permutation(k), rng.uniform(-.5, .5, k))
             for _ in range(2 * cfg.depth)]
    # Few sampler steps quantise each router's on-fraction (to 1/steps; a random rounding
    # offset per router smooths the mean): bisect the mean for the intended width.
    def plan_ratio(routed_mean):
        on_heads, on_groups = set_width_routers(params, t_emb, draws, routed_mean, k)
        heads, groups = ((always_on + k * on) / cfg.num_heads for on in (on_heads, on_groups))
        return attn_frac * heads + (1 - attn_frac) * groups

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if plan_ratio(mid) < width else (lo, mid)
    expected = plan_ratio(hi)
    got = width_plan(parts.graphdef, params, parts.buffers, cfg, timesteps).flops_ratio()
    assert abs(got - expected) < 1e-6, (got, expected)  # the routers do what was planned
    # Token biases last (the router input depends on the widths just set): first on noise,
    # then on the sampler's own trajectory, which the biases change in turn (a few rounds).
    inputs = noise_inputs(cfg, timesteps, 4, seed)
    for round_ in range(1 + args.token_rounds):
        for layer, bias in enumerate(token_biases(parts, params, inputs, token_keep)):
            params["blocks"][layer]["token_fc2"]["bias"] = np.float32([bias])
        if round_ < args.token_rounds:
            inputs = trajectory_inputs(parts, params, args, batch=2, rows=32)
    return params


def set_width_routers(params, t_emb, draws, routed_mean: float, k: int) -> float:
    """Each block's head and group routers read one random direction of the timestep
    embedding; router j is on at a fraction q_j of the sampler's timesteps (the highest
    projections), the q_j spread around `routed_mean` (module docstring). Returns the
    realised mean on-fractions of the routed heads and of the routed groups."""
    blocks = [block[name] for block in params["blocks"].values()
              for name in ("attn_rate", "mlp_rate")]
    on = {"attn_rate": [], "mlp_rate": []}
    names = [name for _ in params["blocks"] for name in ("attn_rate", "mlp_rate")]
    for name, router, (direction, order_of_fractions, jitter) in zip(
        names, blocks, draws, strict=True
    ):
        proj = t_emb @ direction
        order = np.sort(proj)
        fractions = spread_fractions(routed_mean, k)[order_of_fractions]
        # on iff proj > threshold; thresholds halfway between trajectory values
        cut = np.round((1 - fractions) * len(order) + jitter).astype(int)
        cut = np.clip(cut, 0, len(order))
        on[name].append(1 - cut / len(order))
        padded = np.concatenate([[order[0] - 1.0], order, [order[-1] + 1.0]])
        thresholds = (padded[cut] + padded[cut + 1]) / 2
        scale = 10.0 / max(np.ptp(proj), 1e-6)
        router["kernel"] = np.repeat(scale * direction[:, None], k, 1).astype(np.float32)
        router["bias"] = (-scale * thresholds).astype(np.float32)
    return float(np.mean(on["attn_rate"])), float(np.mean(on["mlp_rate"]))


def time_batch(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def run_variant(name, dit_fn, engines: dict, rows, repeats: int, batch: int, config):
    """Warm up the DiT and every engine (compile, calibration), then alternate timed batches
    (DiT, each engine, DiT, ...); one result per engine (`engines`: label -> engine)."""
    key = jax.random.key(0)
    start = time.perf_counter()
    jax.block_until_ready(dit_fn(key, rows["i"], rows["y"]))
    dit_first = time.perf_counter() - start
    compile_before = {}
    for engine in engines.values():
        jax.block_until_ready(engine(key, rows["i"], rows["y"]))  # calibrates capacities
        engine.prepare(key, rows["i"], rows["y"])  # compiles the calibrated capacities' shapes
        engine.reset_stats()
        compile_before[engine] = engine.compile_seconds
    dit_times, dydit_times = [], {label: [] for label in engines}
    for r in range(repeats):
        k = jax.random.fold_in(key, r + 1)
        dit_times.append(time_batch(dit_fn, k, rows["i"], rows["y"]))
        for label, engine in engines.items():
            dydit_times[label].append(time_batch(engine, k, rows["i"], rows["y"]))
    dit_img = np.median(dit_times) / batch
    dit_macs = flops.dit_macs(config, dydit_convention=True)
    results = []
    for label, engine in engines.items():
        report = engine.report()
        dydit_img = np.median(dydit_times[label]) / batch
        dydit_macs = flops.dynamic_macs(config, report["achieved_flops_ratio"],
                                        dydit_convention=True)
        results.append({
            "name": f"{name}, {label}" if len(engines) > 1 else name,
            "dit_s_per_img": dit_img,
            "dydit_s_per_img": dydit_img,
            "wall_speedup": dit_img / dydit_img,
            "flops_speedup": dit_macs / dydit_macs,
            "dydit_gflops": dydit_macs / 1e9,
            "dit_compile_plus_first_batch_s": dit_first,
            "dydit_compile_s": engine.compile_seconds,
            "late_compiles_s": engine.compile_seconds - compile_before[engine],
            **{k: report[k] for k in ("plan_flops_ratio", "achieved_flops_ratio",
                                      "executed_flops_ratio", "signatures", "token_fraction",
                                      "tokens_overflow", "overflow_fraction", "slice_seconds")},
        })
    return results


SHAPE_BUDGETS = (8, 16, 24, 32, 48, 64, 0)  # 0: unbounded


def shape_budgets(name, engine: DyDiTEngine, rows, args) -> dict:
    """Compiled token-MLP shapes and executed FLOPs ratio per shape budget, after the
    capacity calibration batch; then compiles the chosen budget's schedule (timed)."""
    key = jax.random.key(0)
    engine(key, rows["i"], rows["y"])  # calibrates the capacities
    achieved = engine.report()["achieved_flops_ratio"]
    print(f"[{name}] calibration batch: achieved FLOPs ratio {achieved:.3f}")
    most = engine.config.depth * engine.plan.num_steps
    table = {}
    for budget in SHAPE_BUDGETS:
        engine.set_shape_budget(budget or most)
        table[budget] = (engine.mlp_shapes(), engine.report()["executed_flops_ratio"])
        label = budget or "unbounded"
        print(f"    budget {label}: {table[budget][0]} MLP shapes, executed FLOPs ratio "
              f"{table[budget][1]:.3f}")
    engine.set_shape_budget(args.mlp_shape_budget)
    before = engine.compile_seconds
    engine.prepare(key, rows["i"], rows["y"])
    report = engine.report()
    print(f"    budget {args.mlp_shape_budget}: {report['signatures']} block signatures "
          f"(calibration pass included), compile {engine.compile_seconds - before:.1f} s "
          f"after calibration, {engine.compile_seconds:.1f} s in all")
    return {"name": name, "achieved_flops_ratio": achieved, "budgets": table, **report}


def print_profile(engine: DyDiTEngine, rows, result: dict, batch: int) -> None:
    """Where the engine's time goes: one batch with a wait after every call
    (`DyDiTEngine.profile`), per call kind and per shape, against the rate at which the DiT
    sampler ran its blocks' multiply-adds (what the engine's calls would need to match)."""
    records = engine.profile(jax.random.key(0), rows["i"], rows["y"])

    def rate(calls) -> float:  # GMAC/s
        return sum(r["macs"] for r in calls) / sum(r["seconds"] for r in calls) / 1e9

    total = sum(r["seconds"] for r in records)
    print(f"    profile (one batch, a wait after each call): {total:.2f} s, unprofiled "
          f"{result['dydit_s_per_img'] * batch:.2f} s")
    for kind in ("attention", "token_mlp", "blocks", "embed", "finish"):
        calls = [r for r in records if r["kind"] == kind]
        if not calls:
            continue
        seconds, macs = sum(r["seconds"] for r in calls), sum(r["macs"] for r in calls)
        shown = f"  {rate(calls):6.1f} GMAC/s" if macs else ""
        print(f"      {kind:9s} {len(calls):4d} calls {seconds:7.2f} s {macs / 1e9:8.1f} GMACs"
              f"{shown}")
    for kind, field in (("attention", "heads"), ("token_mlp", "groups")):
        by_width: dict[int, list] = {}
        for r in records:
            if r["kind"] == kind:
                by_width.setdefault(r[field], []).append(r)
        if not by_width:  # several layers per call: no per-width split
            continue
        rates = ", ".join(
            f"{w}: {len(rs)}x {rate(rs):.1f}" for w, rs in sorted(by_width.items())
        )
        print(f"      {kind} GMAC/s by {field} ({field}: calls x rate): {rates}")
    cfg = engine.config
    attn, mlp = flops.block_costs(cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden)
    guided_rows = batch * (2 if engine.guided else 1)
    dit_macs = engine.plan.num_steps * cfg.depth * guided_rows * (attn + mlp)
    print(f"      DiT sampler: {dit_macs / (result['dit_s_per_img'] * batch) / 1e9:.1f} GMAC/s "
          f"over its blocks (whole batch time)")


def print_result(r, steps: int) -> None:
    print(
        f"[{r['name']}] DiT {r['dit_s_per_img']:.3f} s/img  DyDiT {r['dydit_s_per_img']:.3f} "
        f"s/img  wall x{r['wall_speedup']:.2f}  FLOPs x{r['flops_speedup']:.2f} "
        f"({r['dydit_gflops']:.2f} GFLOPs; ratio plan-width {r['plan_flops_ratio']:.3f}, "
        f"achieved {r['achieved_flops_ratio']:.3f}, executed {r['executed_flops_ratio']:.3f}); "
        f"wall/FLOPs {r['wall_speedup'] / r['flops_speedup']:.2f}"
    )
    print(
        f"    compile: DiT sampler + first batch {r['dit_compile_plus_first_batch_s']:.1f} s; "
        f"DyDiT {r['signatures']} block signatures + 3 fns {r['dydit_compile_s']:.1f} s "
        f"(slicing {r['slice_seconds']:.1f} s); tokens kept {r['token_fraction']:.3f}, "
        f"overflow {r['tokens_overflow']} ({100 * r['overflow_fraction']:.2f}% of selected)"
    )
    per_image_250 = r["dydit_s_per_img"] * 250 / steps
    fifty_k = 50_000 * per_image_250
    print(
        f"    50K images at 250 steps: ~{fifty_k / 3600:.1f} h of sampling here; compile "
        f"{r['dydit_compile_s']:.0f} s = {100 * r['dydit_compile_s'] / fifty_k:.3f}% of it"
    )


def paper_size(args) -> list[dict]:
    size = args.model
    results = []
    for lam in args.lambdas:
        dit_config = model_config(f"DiT-{size}", input_size=32, in_channels=4,
                                  num_classes=1000, dtype=args.dtype)
        dydit_config = model_config(f"DyDiT-{size}", input_size=32, in_channels=4,
                                    num_classes=1000, dtype=args.dtype)
        mesh = parallel.make_mesh((-1, 1, 1))
        with jax.set_mesh(mesh):
            # Only the DyDiT is initialised (on device: 10-20 s of compile at B/2 on CPU);
            # the DiT runs its backbone.
            dit_parts = model_parts.build_model(dit_config, mesh, seed=0, init_params=False)
            dydit_parts = model_parts.build_model(dydit_config, mesh, seed=0)
            full = random_backbone(dydit_parts.params, args.seed)
            backbone = dit_subset(full)
            timesteps = create_diffusion(args.steps_spec).timestep_map[::-1]
            ratio = target_ratio(dydit_config, size, lam)
            start = time.perf_counter()
            routed = synthetic_routers(dydit_parts, full, ratio, timesteps, args)
            print(f"[{size} lambda={lam}] synthetic routers set in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            results.append(compare(f"{size} lambda={lam} (target ratio {ratio:.3f})",
                                   dit_parts, backbone, dydit_parts, routed, mesh, args))
    return results


def trained_digits(args) -> list[dict]:
    mesh = parallel.make_mesh((-1, 1, 1))
    with jax.set_mesh(mesh):
        _, config, dydit_parts, weights = model_parts.restore_weights(args.workdir, mesh)
        dit_config = model_config(
            config.model.replace("DyDiT", "DiT"), input_size=config.image_size,
            in_channels=config.in_channels, num_classes=config.num_classes,
            **config_lib.active_overrides(config),
        )
        dit_parts = model_parts.build_model(dit_config, mesh, seed=0, init_params=False)
        backbone = dit_subset(jax.device_get(weights))
        return [compare(f"trained digits DyDiT ({args.workdir})", dit_parts, backbone,
                        dydit_parts, weights, mesh, args)]


def compare(name, dit_parts, dit_params, dydit_parts, dydit_params, mesh, args) -> dict:
    cfg = dydit_parts.config
    options = dict(mesh=mesh, sampling_steps=args.steps_spec, sampler=args.sampler,
                   cfg_scale=args.cfg_scale, guided_channels=-1)
    dit_params = jax.device_put(dit_params, dit_parts.param_shardings)
    dit_fn = functools.partial(sample_lib.make_batch_sampler(dit_parts, **options), dit_params)
    dydit_params = jax.device_put(dydit_params, dydit_parts.param_shardings)
    engines = {}
    for k in args.layers_per_call:
        engine = DyDiTEngine(
            dydit_parts, dydit_params, width_multiple=args.width_multiple,
            capacity="calibrate", capacity_margin=args.capacity_margin,
            capacity_multiple=args.capacity_multiple,
            capacity_step_buckets=args.capacity_step_buckets,
            mlp_shape_budget=args.mlp_shape_budget, layers_per_call=k, **options,
        )
        k = engine.layers_per_call  # at most the depth
        engines[f"{k} layer{'s' if k > 1 else ''} per call"] = engine
    labels = np.arange(args.batch, dtype=np.int32) % cfg.num_classes
    rows = parallel.global_batch({"i": np.arange(args.batch, dtype=np.int32), "y": labels}, mesh)
    if args.shapes_only:
        return shape_budgets(name, next(iter(engines.values())), rows, args)
    results = run_variant(name, dit_fn, engines, rows, args.repeats, args.batch, cfg)
    for result, engine in zip(results, engines.values(), strict=True):
        print_result(result, args.steps)
        if args.profile:
            print_profile(engine, rows, result, args.batch)
    return results[-1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="B/2", choices=sorted(PAPER_GFLOPS))
    p.add_argument("--lambdas", default="0.5", type=lambda s: [float(v) for v in s.split(",")])
    p.add_argument("--workdir", default="", help="a trained DyDiT workdir instead of a size")
    p.add_argument("--steps", type=int, default=10, help="sampling steps (respaced)")
    p.add_argument("--sampler", default="ddpm", choices=SAMPLERS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cfg_scale", type=float, default=1.5)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=2, help="timed batches per model")
    p.add_argument("--token_keep", type=float, default=0.8, help="synthetic token routers")
    p.add_argument("--token_rounds", type=int, default=2,
                   help="rounds of setting the token biases on the sampler's trajectory")
    p.add_argument("--width_multiple", type=int, default=1)
    p.add_argument("--capacity_margin", type=float, default=0.05)
    p.add_argument("--capacity_multiple", type=int, default=8)
    p.add_argument("--capacity_step_buckets", type=int, default=4)
    p.add_argument("--mlp_shape_budget", type=int, default=32,
                   help="most (groups, capacity) token-MLP shapes compiled")
    p.add_argument("--layers_per_call", default="1",
                   type=lambda s: [int(v) for v in s.split(",")],
                   help="blocks per compiled engine call; a list (1,12) compares them, "
                        "each alternating with the DiT (the last line: the last one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="B/2, lambda 0.5, 4 steps, 1 repeat, 1 token round")
    p.add_argument("--profile", action="store_true",
                   help="after the timing, one engine batch timed call by call")
    p.add_argument("--shapes_only", action="store_true",
                   help="no timing: compiled token-MLP shapes and executed FLOPs per budget")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.lambdas, args.steps, args.repeats = "B/2", [0.5], 4, 1
        args.token_rounds = 1
    for lam in args.lambdas:
        if not args.workdir and lam not in PAPER_GFLOPS[args.model]:
            known = sorted(PAPER_GFLOPS[args.model])
            p.error(f"--lambdas: the paper's GFLOPs are known for lambda in {known}")
    if min(args.layers_per_call) < 1:
        p.error("--layers_per_call: counts must be >= 1")
    args.steps_spec = str(args.steps)
    print(f"machine: {machine()}")
    print(f"settings: {vars(args)}")
    results = trained_digits(args) if args.workdir else paper_size(args)
    last = results[-1]
    if args.shapes_only:
        print(f"signatures={last['signatures']} "
              f"executed_flops_ratio={last['executed_flops_ratio']:.3f}")
        return
    print(f"wall_speedup={last['wall_speedup']:.2f} flops_speedup={last['flops_speedup']:.2f}")


if __name__ == "__main__":
    main()
