r"""One command that measures an accelerator: training MFU, sampling, the DyDiT speedup.

  python bench/gpu_suite.py --out=gpu_suite.json            # ~8 min on one H100/H200
  python bench/gpu_suite.py --quick --out=gpu_suite.json    # ~4 min: fewer variants
  python bench/gpu_suite.py --dry-run                       # the same code, toy sizes, CPU

Three parts, each printed as a markdown table and written to `--out` (JSON):

1. Training, DiT-XL/2 at 256 px (32x32x4 synthetic latents, 1000 classes, bfloat16 compute,
   scanned blocks): the real train step (`update_step.make_train_step`) for attention
   `cudnn` and `xla` x remat `none` and `dots`, each at the largest per-device batch among
   32/64/128/256 whose compiled program fits the device's memory (the compiler's memory
   analysis at the two smallest sizes predicts the rest; the chosen size is compiled to
   confirm). images/s, MFU (model FLOPs = 3 x the analytic forward, `dydit_jax.flops`,
   against the device's peak dense bfloat16 FLOP/s, named in the output), compile seconds,
   peak device memory.
2. U-DiT-B (training form) against DiT-XL/2: train-step images/s at one batch, and the
   ratio (the U-DiT paper: vanilla U-DiT-B runs 1.84x DiT-XL/2's steps/s).
3. Sampling with guidance 1.5 at batch 32 (64 network rows): DiT-XL/2 and U-DiT-B (fused
   inference form) through the one-program sampler, DyDiT-XL/2 at lambda 0.5 through the
   inference engine (synthetic routers at the paper's plan, as `bench/dydit_speedup.py`),
   over 25 steps spread evenly over the 1000 timesteps (every ~10th step of the 250-step
   schedule: the plan's width changes are all visited); compile excluded; images/s
   extrapolated to 250 steps; DyDiT's wall ratio against DiT-XL/2 next to its FLOPs ratio
   (the paper: 1.73x for 2.05x on a V100).

Every timed call runs under `jax.transfer_guard("disallow")`: a train step or a sampling
batch that moved data between host and device inside it would stop the suite. Every row
carries the device, jax/jaxlib versions, XLA_FLAGS, the date and the command.
`--dry-run` runs the same code on tiny models (2 blocks, 8x8 latents, batches 2/4, 4
sampling steps, one remat) on whatever device is present, in about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402

from bench import dydit_speedup, throughput  # noqa: E402
from bench.common import machine  # noqa: E402
from dydit_jax import (  # noqa: E402
    config_lib,
    files,
    flops,
    model_parts,
    parallel,
    plan,
    sample_lib,
    update_step,
)
from dydit_jax.diffusion import create_diffusion  # noqa: E402
from dydit_jax.dynamic import DyDiTEngine  # noqa: E402

FULL = dict(
    image_size=32, batches=(32, 64, 128, 256), attentions=("cudnn", "xla"),
    remats=("none", "dots"), udit_batch=64, sample_batch=32, sample_steps=25, overrides={},
    iters=5, warmup=2, total_steps=250,
)
QUICK = FULL | dict(attentions=("cudnn",), batches=(32, 64, 128), iters=3, warmup=1)
# toy sizes: the same code in seconds (CPU); `attention` falls back where cudnn is absent
DRY = FULL | dict(
    image_size=8, batches=(2, 4), attentions=("xla",), remats=("dots",), udit_batch=4,
    sample_batch=2, sample_steps=4, iters=1, warmup=0,
    overrides={"DiT": dict(depth=2, hidden_size=64, num_heads=2),
               "DyDiT": dict(depth=2, hidden_size=64, num_heads=2),
               # (the plain baseline, XLA's grouped conv for its depthwise kernels: the
               # U-DiT that compiles fastest)
               "U-DiT": dict(hidden_size=16, num_heads=2, depth_level1=1, depth_level2=1,
                             depth_latent=1, depthwise="xla", vanilla=True)},
)
GUIDANCE = 1.5
DYDIT_LAMBDA = 0.5


def family(name: str) -> str:
    return "U-DiT" if name.startswith("U-DiT") else name.split("-")[0]


def run_config(name: str, sizes: dict, batch: int, **model):
    """The trainer's config of `name` (bfloat16 compute) at the suite's latent size."""
    config = config_lib.base_config()
    config.model = name
    config.model_overrides.update(dict(dtype="bfloat16") | sizes["overrides"].get(
        family(name), {}) | model)
    config.image_size, config.in_channels = sizes["image_size"], throughput.LATENT_CHANNELS
    config.num_classes = throughput.NUM_CLASSES
    config.global_batch_size = batch
    config.dataset = "latents"
    return config


def device_memory_limit() -> float | None:
    """Bytes one device can hold (None where the backend does not say, e.g. a CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def peak_memory() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def timed(fn, args, *, warmup: int, iters: int, carry=None) -> float:
    """Median seconds of `fn(*args)` over `iters` calls after `warmup`, under a transfer
    guard (no implicit host <-> device copies inside a call)."""
    seconds, _ = throughput.median_call_seconds(fn, args, warmup=warmup, iters=iters,
                                                carry=carry, transfer_guard="disallow")
    return seconds


class TrainStep:
    """A model's train step at one global batch, compiled from abstract shapes (what the pod
    planner compiles; timed), with the compiler's memory analysis."""

    def __init__(self, name: str, sizes: dict, batch: int, mesh, **model):
        self.config = run_config(name, sizes, batch, **model)
        self.name, self.batch, self.mesh = name, batch, mesh
        self.model_config = config_lib.validate_config(self.config)
        step, state, self.batch_spec = plan.train_step_and_args(self.config,
                                                                self.model_config, mesh)
        start = time.perf_counter()
        self.compiled = step.lower(state, self.batch_spec).compile()
        self.compile_s = time.perf_counter() - start
        self.mem, self.mem_text = throughput.memory_bytes(self.compiled)

    def run(self, *, warmup: int, iters: int) -> float:
        """Median seconds per step from a real initial state (donated from step to step)
        on synthetic VAE moments."""
        parts = model_parts.build_model(self.model_config, self.mesh, seed=0,
                                        rules=self.config.sharding_rules)
        tx = update_step.make_optimizer(self.config)
        state = update_step.init_state(parts, tx, self.mesh)
        rng = np.random.default_rng(0)
        host = {
            key: (rng.integers(0, throughput.NUM_CLASSES, spec.shape) if key == "label"
                  else rng.standard_normal(spec.shape)).astype(spec.dtype)
            for key, spec in self.batch_spec.items()
        }
        batch = parallel.global_batch(host, self.mesh)
        return timed(self.compiled, (state, batch), warmup=warmup, iters=iters,
                     carry=lambda out, a: (out[0], a[1]))

    def model_flops_per_image(self) -> float:
        return 3 * 2 * throughput.analytic_macs(self.model_config)  # fwd + bwd, 2 per MAC


def largest_fitting(name, sizes, mesh, limit, start_at=None, **model) -> TrainStep:
    """The train step at the largest per-device batch of `sizes['batches']` whose program
    fits `limit` bytes (the largest where the limit is unknown). Without `start_at`, two
    compiles predict the memory of the larger sizes (it grows linearly with the batch) and
    one confirms the choice; with it (a size found for a similar setting), the search starts
    there and steps down until a program fits."""
    n = mesh.size
    candidates = list(sizes["batches"])
    if limit is None:
        return TrainStep(name, sizes, candidates[-1] * n, mesh, **model)
    fits = lambda step: step.mem is not None and step.mem <= 0.95 * limit
    if start_at is None:
        first = TrainStep(name, sizes, candidates[0] * n, mesh, **model)
        if not fits(first) or len(candidates) == 1:
            return first
        second = TrainStep(name, sizes, candidates[1] * n, mesh, **model)
        if not fits(second):
            return first
        slope = (second.mem - first.mem) / (candidates[1] - candidates[0])
        larger = [b for b in candidates[2:]
                  if first.mem + slope * (b - candidates[0]) <= 0.95 * limit]
        if not larger:
            return second
        start_at, fallback = larger[-1], second
    else:
        fallback = None
    for b in reversed([b for b in candidates if b <= start_at]):
        if fallback is not None and b * n <= fallback.batch:
            return fallback
        step = TrainStep(name, sizes, b * n, mesh, **model)
        if fits(step):
            return step
    return step


def training(sizes, mesh, peak, meta) -> list[dict]:
    rows = []
    limit = device_memory_limit()
    for remat in sizes["remats"]:
        found = None  # the batch found for this remat's first attention
        for attention in sizes["attentions"]:
            start = time.perf_counter()
            step = largest_fitting("DiT-XL/2", sizes, mesh, limit, start_at=found,
                                   remat=remat, attention=attention, scan_blocks=True)
            found = step.batch // mesh.size
            seconds = step.run(warmup=sizes["warmup"], iters=sizes["iters"])
            img_s = step.batch / seconds
            achieved = img_s * step.model_flops_per_image()
            rows.append(meta | dict(
                part="train", model="DiT-XL/2", attention=attention, remat=remat,
                batch_per_device=found, images_per_s=img_s,
                mfu=achieved / (peak * 1e12 * mesh.size) if peak else None,
                compile_s=step.compile_s, program_bytes=step.mem, peak_bytes=peak_memory(),
                wall_s=time.perf_counter() - start,
            ))
            print(row_line(rows[-1]), flush=True)
            del step
    return rows


def udit_vs_dit(sizes, mesh, meta) -> list[dict]:
    rows, speeds = [], {}
    batch = sizes["udit_batch"] * mesh.size
    # both with the first training row's attention (and, for DiT, its remat)
    attention, remat = sizes["attentions"][0], sizes["remats"][0]
    for name, model in (("DiT-XL/2", dict(scan_blocks=True, remat=remat, attention=attention)),
                        ("U-DiT-B", dict(attention=attention))):
        step = TrainStep(name, sizes, batch, mesh, **model)
        seconds = step.run(warmup=sizes["warmup"], iters=sizes["iters"])
        speeds[name] = batch / seconds
        rows.append(meta | dict(part="udit_vs_dit", model=name, batch_per_device=batch //
                                mesh.size, images_per_s=speeds[name], compile_s=step.compile_s,
                                program_bytes=step.mem))
        del step
    rows[-1]["udit_over_dit"] = speeds["U-DiT-B"] / speeds["DiT-XL/2"]
    for r in rows:
        print(row_line(r), flush=True)
    return rows


def sampling(sizes, mesh, meta) -> list[dict]:
    """DiT-XL/2 and U-DiT-B through the one-program sampler, DyDiT-XL/2 through the engine,
    same labels and steps; images/s extrapolated from the step slice to 250 steps."""
    steps = str(sizes["sample_steps"])
    batch = mesh.size * -(-sizes["sample_batch"] // mesh.size)  # a multiple of the devices
    scale = sizes["total_steps"] / sizes["sample_steps"]
    labels = np.arange(batch, dtype=np.int32) % throughput.NUM_CLASSES
    rows_in = parallel.global_batch({"i": np.arange(batch, dtype=np.int32), "y": labels}, mesh)
    key = jax.random.key(0)
    options = dict(mesh=mesh, sampling_steps=steps, cfg_scale=GUIDANCE, guided_channels=-1)
    rows = []

    def record(name, fn, compile_s, macs, extra=None):
        seconds = timed(fn, (key, rows_in["i"], rows_in["y"]), warmup=1, iters=sizes["iters"])
        rows.append(meta | dict(
            part="sampling", model=name, batch=batch, steps_timed=sizes["sample_steps"],
            images_per_s_250=batch / (seconds * scale), compile_s=compile_s,
            gmacs_per_forward=macs / 1e9) | (extra or {}))
        print(row_line(rows[-1]), flush=True)

    for name in ("DiT-XL/2", "U-DiT-B"):
        config = run_config(name, sizes, batch)
        parts = model_parts.build_model(config_lib.validate_config(config), mesh, seed=0)
        parts, params = sample_lib.inference_form(parts, parts.params, mesh)
        sampler = sample_lib.make_batch_sampler(parts, **options)
        start = time.perf_counter()
        compiled = sampler.lower(params, key, rows_in["i"], rows_in["y"]).compile()
        compile_s = time.perf_counter() - start
        fn = lambda k, i, y, c=compiled, p=params: c(p, k, i, y)
        record(name, fn, compile_s, throughput.analytic_macs(parts.config))
        del parts, params, compiled, fn
    # DyDiT-XL/2: DiT-XL/2's size, routers set to the paper's plan at lambda 0.5
    config = run_config("DyDiT-XL/2", sizes, batch)
    parts = model_parts.build_model(config_lib.validate_config(config), mesh, seed=0)
    router_args = argparse.Namespace(token_keep=0.8, seed=0, steps_spec=steps,
                                     cfg_scale=GUIDANCE, token_rounds=1, sampler="ddpm")
    backbone = dydit_speedup.random_backbone(parts.params, 0)
    timesteps = create_diffusion(steps).timestep_map[::-1]
    # toy sizes have no paper row: any plan that cuts FLOPs exercises the same code
    ratio = 0.6 if sizes["overrides"] else dydit_speedup.target_ratio(
        parts.config, "XL/2", DYDIT_LAMBDA)
    routed = dydit_speedup.synthetic_routers(parts, backbone, ratio, timesteps, router_args)
    routed = jax.device_put(routed, parts.param_shardings)
    engine = DyDiTEngine(parts, routed, capacity="calibrate", capacity_margin=0.05,
                         capacity_step_buckets=4, **options)
    engine(key, rows_in["i"], rows_in["y"])  # calibrates the token capacities (compiles)
    engine.prepare(key, rows_in["i"], rows_in["y"])  # the calibrated shapes, compiled
    engine.reset_stats()
    record("DyDiT-XL/2 lambda 0.5, engine", engine, engine.compile_seconds,
           flops.dynamic_macs(parts.config, engine.plan.flops_ratio(), dydit_convention=True))
    report = engine.report()
    rows[-1] |= dict(wall_ratio=rows[-1]["images_per_s_250"] / rows[0]["images_per_s_250"],
                     flops_ratio=1.0 / report["achieved_flops_ratio"],
                     tokens_overflow=report["tokens_overflow"])
    return rows


def row_line(r: dict) -> str:
    keys = [k for k in r if k not in ("device", "jax", "jaxlib", "xla_flags", "date",
                                      "command", "machine")]
    return "  " + ", ".join(f"{k}={fmt(r[k])}" for k in keys)


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def tables(rows: list[dict]) -> str:
    gib = 2.0**30
    out = []
    train = [r for r in rows if r["part"] == "train"]
    if train:
        out += ["| model | attention | remat | batch/device | img/s | MFU | compile s | "
                "program GiB | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in train:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            prog = f"{r['program_bytes'] / gib:.2f}" if r["program_bytes"] else "n/a"
            peak = f"{r['peak_bytes'] / gib:.2f}" if r["peak_bytes"] else "n/a"
            out.append(f"| {r['model']} | {r['attention']} | {r['remat']} | "
                       f"{r['batch_per_device']} | {r['images_per_s']:.1f} | {mfu} | "
                       f"{r['compile_s']:.0f} | {prog} | {peak} |")
        out.append("")
    pair = [r for r in rows if r["part"] == "udit_vs_dit"]
    if pair:
        out += ["| model (train step) | batch/device | img/s | U-DiT-B / DiT-XL/2 |",
                "|---|---|---|---|"]
        for r in pair:
            ratio = f"{r['udit_over_dit']:.2f}x" if "udit_over_dit" in r else ""
            out.append(f"| {r['model']} | {r['batch_per_device']} | {r['images_per_s']:.1f} "
                       f"| {ratio} |")
        out.append("")
    samp = [r for r in rows if r["part"] == "sampling"]
    if samp:
        out += ["| sampling (guidance 1.5) | batch | img/s at 250 steps | compile s | "
                "wall x vs DiT | FLOPs x vs DiT |", "|---|---|---|---|---|---|"]
        for r in samp:
            wall = f"{r['wall_ratio']:.2f}" if "wall_ratio" in r else ""
            fl = f"{r['flops_ratio']:.2f}" if "flops_ratio" in r else ""
            out.append(f"| {r['model']} | {r['batch']} | {r['images_per_s_250']:.2f} | "
                       f"{r['compile_s']:.0f} | {wall} | {fl} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="", help="write the rows (JSON) here")
    p.add_argument("--quick", action="store_true", help="fewer variants (~4 min on a GPU)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="the same code on toy sizes, on any device (CPU: about a minute)")
    p.add_argument("--parts", default="train,udit,sampling",
                   help="which parts to run (train, udit, sampling)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's peak dense bfloat16 TFLOP/s (default: from the table)")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = set(parts) - {"train", "udit", "sampling"}
    if unknown:
        p.error(f"--parts: unknown {sorted(unknown)}; choose from train, udit, sampling")
    sizes = DRY if args.dry_run else QUICK if args.quick else FULL
    device = jax.devices()[0]
    peak, peak_source = throughput.peak_tflops(device.device_kind, "bfloat16", args.peak_tflops)
    meta = dict(
        device=f"{jax.device_count()} x {device.device_kind} ({device.platform})",
        jax=jax.__version__, jaxlib=jaxlib.__version__,
        xla_flags=os.environ.get("XLA_FLAGS", ""), date=datetime.date.today().isoformat(),
        command="python bench/gpu_suite.py " + " ".join(argv if argv is not None
                                                        else sys.argv[1:]),
    )
    print(f"machine: {machine()}")
    print(f"peak bfloat16: {peak} TFLOP/s per device ({peak_source})", flush=True)
    mesh = parallel.make_mesh((-1, 1, 1))
    rows = []
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        if "train" in parts:
            rows += training(sizes, mesh, peak, meta)
        if "udit" in parts:
            rows += udit_vs_dit(sizes, mesh, meta)
        if "sampling" in parts:
            rows += sampling(sizes, mesh, meta)
    result = dict(meta=meta | dict(peak_bf16_tflops=peak, peak_source=peak_source,
                                   dry_run=args.dry_run, quick=args.quick,
                                   seconds=time.perf_counter() - start), rows=rows)
    print(tables(rows))
    if args.out:
        files.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
