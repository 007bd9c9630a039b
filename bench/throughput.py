r"""Forward and train-step throughput of DiT, DyDiT and U-DiT at 256px (32x32x4 latents).

Per model: images/s of the forward (`model(x, t, y)`, the call path of the samplers) and of
the real train step (`update_step.make_train_step`: diffusion loss, backward, AdamW, EMA);
lower and compile time (timed apart from the runs); device memory of the compiled program;
analytic GMACs per image next to XLA's FLOPs per image; MFU on GPU/TPU. U-DiT's forward is
measured twice: the training form and the fused inference form (`sample_lib.inference_form`,
what sample.py runs). DyDiT runs its training form, the masked model (full shapes).

CPU (2 cores: DiT-XL/2's train step left out, ~15-20 min; U-DiT-B's train step needs 24 GiB
of host memory at batch 8 and is skipped, with a message, where less is available):

  python bench/throughput.py --models=DiT-B/2,U-DiT-B,DiT-XL/2 --batch=8 \
      --train_models=DiT-B/2,U-DiT-B
  python bench/throughput.py --quick            # DiT-S/2 + U-DiT-S forward, DiT-S/2 train

One GPU (batch 32 per device by default) or a TPU host (data parallel over its chips):

  python bench/throughput.py --models=DiT-XL/2,DyDiT-XL/2,U-DiT-B,U-DiT-L --dtype=bfloat16 \
      --attention=cudnn --scan=on
  python bench/throughput.py --models=DiT-XL/2 --dtype=bfloat16 --remat=dots --batch=512

`--override=KEY=VALUE,...` replaces model config fields of every model (`depth=2` for a
smoke test, `depthwise=xla` for U-DiT's grouped-conv depthwise kernels); `--devices=N` uses
the first N devices; `--image_size=64` is 512px.

Timing: per model and measurement, lower + compile, then `--warmup` untimed and `--iters`
timed batches, each ended by `jax.block_until_ready`; the median time per batch gives
images/s. Models run one after another in one process (alternating would keep every model's
train state in memory at once), so the ratios to the first model ("x first", and the summary
lines at the end) share the process but not the exact moment: on a shared machine, repeat.

FLOPs. `GMACs/img` is analytic (`dydit_jax.flops`), multiply-adds of one forward at batch 1
in the papers' convention: their "GFLOPs" are multiply-adds (DiT: `flops.dit_macs`, matmuls
and the patch conv only; DyDiT: the same + its routers, `flops.router_macs`, since the masked
model runs every width; U-DiT: `flops.udit_macs` of the form that runs, training or fused).
XLA counts 2 FLOPs per multiply-add and also counts elementwise work (softmax, layer norms,
GELU, modulation, the loss, AdamW, EMA), so `XLA/2MAC` = XLA FLOPs per image / (2 x analytic
MACs) for a forward and / (6 x analytic MACs) for a train step (backward = 2 x forward;
model FLOPs of a train step = 3 x forward, also what MFU uses). Measured on CPU at 256px:

- DiT forward ~1.00-1.01: the elementwise work is < 1% of the matmuls.
- DiT train ~1.02-1.07 (B/2 at batch 8: 1.019; S/4 at batch 2: 1.068): the backward's
  elementwise work (layer-norm, softmax and GELU derivatives; ~1.5-2% of the total) and the
  AdamW update + EMA + gradient norm: 18 FLOPs per parameter per step, not per image, so
  more per image at small batch and for few tokens (S/4 at batch 2: ~3.5%; B/2 at batch 8:
  0.2%). On a data-parallel mesh every device updates the whole replicated parameter set, so
  with D devices that part counts D times (XLA's count is per device; per image =
  per-device FLOPs / per-device batch).
- DyDiT forward ~1.01 (the eval-mode masks: every width runs, as in training).
- U-DiT ~1.02-1.08: the depthwise convs run as shifted multiply-adds (2 FLOPs per tap and
  element for XLA, one MAC for the analytic count: the same), but the FFN's exact GELU costs
  XLA 64 FLOPs per element (erf), which the paper's torchprofile convention leaves free
  (~1.02-1.03 in the HLO as written, printed on each detail line), and XLA:CPU's fusion then
  duplicates that GELU into its consumer fusions (the training form's identity + 5x5 + 3x3
  + 1x1 branches: ~3x; the fused form's one 5x5 conv: ~2x), i.e. the compiled program really
  evaluates it several times: 1.06-1.08 compiled for U-DiT-S at batch 2, 1.03-1.04 for B.
- DyDiT train ~2: XLA's cost analysis adds both branches of a `lax.cond`, and the DyDiT
  loss has one: the warm-up stage's complete-model loss (`dydit.complete_model_steps`), a
  second forward + backward that runs only during the warm-up (never with the default 0).
- `--scan=on`: XLA counts the body of the block loop (a while loop) once, not depth times,
  so its FLOPs are not comparable: printed as n/a.

MFU = achieved model FLOPs/s (analytic: 2 x MACs per image forward, 6 x train) over the
devices' peak dense FLOPs/s: bfloat16 peaks for `--dtype=bfloat16`; for float32 the TF32
tensor-core peak on NVIDIA (XLA's default matmul precision uses TF32 there) and the bfloat16
peak on TPU (default precision = one bf16 pass). With `jax_default_matmul_precision=highest`
the float32 peaks are far lower; pass `--peak_tflops`. CPU: no MFU unless `--peak_tflops`.

Memory: `compiled.memory_analysis()` per device, temp + arguments + outputs - aliased
(donated) bytes: the train state is donated, so its outputs reuse the argument buffers.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import machine  # noqa: E402
from dydit_jax import (  # noqa: E402
    config_lib,
    flops,
    model_parts,
    models,
    parallel,
    sample_lib,
    update_step,
)

LATENT_SIZE, LATENT_CHANNELS, NUM_CLASSES = 32, 4, 1000  # ImageNet 256px through the KL-f8 VAE
DEFAULT_MODELS = "DiT-B/2,U-DiT-B,DiT-XL/2"
QUICK_MODELS = "DiT-S/2,U-DiT-S"
QUICK_TRAIN_MODELS = "DiT-S/2"  # U-DiT-S's train step alone compiles for ~3 min on 2 cores

# Peak dense TFLOP/s per device: (bfloat16, float32 at XLA's default precision). Matched in
# order against `device_kind` (case-insensitive substring). NVIDIA float32 = TF32 tensor cores.
PEAK_TFLOPS = (
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.0, 494.5)),  # SXM
    ("H200", (989.0, 494.5)),
    ("A100", (312.0, 156.0)),
    ("TPU v4", (275.0, 275.0)),
    ("TPU v5 lite", (197.0, 197.0)),  # v5e
    ("TPU v5e", (197.0, 197.0)),
    ("TPU v5p", (459.0, 459.0)),
    ("TPU v5", (459.0, 459.0)),  # v5p reports "TPU v5"
    ("TPU v6 lite", (918.0, 918.0)),  # v6e (Trillium)
    ("TPU v6e", (918.0, 918.0)),
)

COLUMNS = (
    "date", "machine", "model", "what", "settings", "batch", "ms/batch", "img/s", "x first",
    "lower s", "compile s", "mem GiB", "GMACs/img", "XLA GFLOP/img", "XLA/2MAC", "MFU",
    "command",
)


def peak_tflops(device_kind: str, dtype: str, override: float | None) -> tuple[float | None, str]:
    """(peak dense TFLOP/s per device or None, where it came from)."""
    if override:
        return override, "--peak_tflops"
    for key, (bf16, fp32) in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            peak = bf16 if dtype == "bfloat16" else fp32
            return peak, f"table entry {key!r}, {dtype}"
    return None, f"unknown for {device_kind!r}: no MFU (pass --peak_tflops)"


def analytic_macs(config) -> float:
    """Multiply-adds of one forward at batch 1 of the form that runs (module docstring)."""
    if isinstance(config, models.UDiTConfig):
        return flops.udit_macs(config)
    macs = flops.dit_macs(config)
    if isinstance(config, models.DyDiTConfig):
        macs += flops.router_macs(config, num_logits=config.num_router_logits)
    return macs


def model_settings(name: str, args) -> tuple[dict, str]:
    """(model_overrides for this model, the settings column): switches a model does not have
    (scan for U-DiT and DyDiT, remat for DyDiT) read n/a."""
    overrides = {"dtype": args.dtype, "attention": args.attention}
    family = "U-DiT" if name.startswith("U-DiT") else name.split("-")[0]
    remat = scan = "n/a"
    if family != "DyDiT":  # DyDiT runs its own block loop (no scan, no remat)
        overrides["remat"] = remat = args.remat
    if family == "DiT":
        overrides["scan_blocks"] = args.scan == "on"
        scan = args.scan
    text = f"{args.dtype}, attn {args.attention}, remat {remat}, scan {scan}"
    for key, value in args.override.items():
        overrides[key] = value
        text += f", {key}={value}"
    return overrides, text


def run_config(name: str, overrides: dict, args):
    """The trainer's run config for `name` at the benchmark's latent size and batch."""
    config = config_lib.base_config()
    config.model = name
    config.model_overrides.update(overrides)
    config.image_size, config.in_channels = args.image_size, LATENT_CHANNELS
    config.num_classes = NUM_CLASSES
    config.global_batch_size = args.batch
    config.dataset = "latents"
    return config


def memory_bytes(compiled) -> tuple[float | None, str]:
    """(temp + arguments + outputs - aliased bytes per device, breakdown) or (None, why)."""
    try:
        stats = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001  (backends without it raise various errors)
        return None, f"memory_analysis failed: {type(e).__name__}"
    if stats is None:
        return None, "memory_analysis: none on this backend"
    get = lambda field: float(getattr(stats, field, 0) or 0)
    temp, arg, out = get("temp_size_in_bytes"), get("argument_size_in_bytes"), get(
        "output_size_in_bytes")
    alias = get("alias_size_in_bytes")
    gib = 2.0**30
    text = (f"temp {temp / gib:.2f} + args {arg / gib:.2f} + out {out / gib:.2f} - aliased "
            f"{alias / gib:.2f} GiB")
    return temp + arg + out - alias, text


def xla_flops(program) -> float | None:
    """XLA's FLOPs of a compiled program (per device) or of a lowered one (the HLO as
    written, before fusion), or None."""
    try:
        cost = program.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def available_host_bytes() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure(fn, args, *, warmup: int, iters: int, carry=None):
    """(lower s, compile s, compiled, median s per batch, per-device memory, memory text).

    `carry(out, args) -> args` threads outputs into the next call (the donated train state).
    Returns a median of None when the compiled program would not fit in host memory (CPU)."""
    start = time.perf_counter()
    lowered = fn.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    mem, mem_text = memory_bytes(compiled)
    result = dict(lower_s=lowered_at - start, compile_s=compiled_at - lowered_at,
                  compiled=compiled, mem=mem, mem_text=mem_text, median_s=None, args=args,
                  hlo_flops=xla_flops(lowered))
    free = available_host_bytes() if jax.devices()[0].platform == "cpu" else None
    # Host bytes the run adds: the share of every device it runs on, less the arguments
    # (parameters, train state), which are resident already.
    arrays = [x for x in jax.tree.leaves(args) if isinstance(x, jax.Array)]
    devices = {d for x in arrays for d in x.devices()}
    resident = sum(x.nbytes for x in arrays)
    new_bytes = None if mem is None else mem * max(1, len(devices)) - resident
    if new_bytes is not None and free is not None and new_bytes > 0.9 * free:
        result["skipped"] = (f"needs {new_bytes / 2**30:.1f} GiB more, {free / 2**30:.1f} GiB "
                             "available")
        return result
    result["median_s"], result["args"] = median_call_seconds(
        compiled, args, warmup=warmup, iters=iters, carry=carry)
    return result


def median_call_seconds(fn, args, *, warmup: int, iters: int, carry=None,
                        transfer_guard: str | None = None):
    """(median seconds of `fn(*args)` over `iters` calls after `warmup`, each ended by
    `jax.block_until_ready`; the arguments after the last call). `carry(out, args) -> args`
    threads outputs into the next call; `transfer_guard` (e.g. "disallow") wraps each call
    in `jax.transfer_guard`."""
    times = []
    for i in range(warmup + iters):
        guard = (jax.transfer_guard(transfer_guard) if transfer_guard
                 else contextlib.nullcontext())
        t0 = time.perf_counter()
        with guard:
            out = fn(*args)
            jax.block_until_ready(out)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if carry is not None:
            args = carry(out, args)
    return statistics.median(times), args


def random_inputs(batch: int, size: int, num_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((batch, size, size, LATENT_CHANNELS)).astype(np.float32),
        "t": rng.integers(0, 1000, batch).astype(np.int32),
        "y": rng.integers(0, num_classes, batch).astype(np.int32),
    }


def forward_fn(parts, mesh):
    """jit(params, x, t, y) -> model output: the samplers' call path (nnx.merge inside)."""
    def forward(params, x, t, y):
        return nnx.merge(parts.graphdef, params, parts.buffers)(x, t, y)

    rows = parallel.batch_sharding(mesh)
    return parallel.jit(forward, mesh=mesh,
                        in_shardings=(parts.param_shardings, rows, rows, rows), out_shardings=rows)


def bench_model(name: str, args, mesh) -> list[dict]:
    """Rows of one model: forward (U-DiT: training form and fused), then the train step."""
    overrides, settings = model_settings(name, args)
    config = run_config(name, overrides, args)
    model_config = config_lib.validate_config(config)
    n_dev = mesh.size
    per_device = args.batch // n_dev
    host = random_inputs(args.batch, args.image_size, NUM_CLASSES, args.seed)
    inputs = parallel.global_batch(host, mesh)
    start = time.perf_counter()
    parts = model_parts.build_model(model_config, mesh, seed=args.seed, rules=config.sharding_rules)
    jax.block_until_ready(parts.params)
    print(f"[{name}] {sum(x.size for x in jax.tree.leaves(parts.param_shapes)) / 1e6:.2f}M "
          f"parameters, built (jitted random init, compile included) in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    rows = []

    def row(what, cfg, res, model_flops_factor):
        macs = analytic_macs(cfg)
        xla = xla_flops(res["compiled"])
        xla_img = None if xla is None else xla / per_device
        comparable = xla_img is not None and not getattr(cfg, "scan_blocks", False)
        hlo_img = None if res["hlo_flops"] is None else res["hlo_flops"] / per_device
        r = dict(model=name, what=what, settings=settings, batch=args.batch,
                 lower_s=res["lower_s"], compile_s=res["compile_s"], mem=res["mem"],
                 mem_text=res["mem_text"], gmacs=macs / 1e9, xla_gflop=xla_img and xla_img / 1e9,
                 xla_ratio=xla_img / (2 * model_flops_factor * macs) if comparable else None,
                 hlo_ratio=(hlo_img / (2 * model_flops_factor * macs)
                            if comparable and hlo_img is not None else None),
                 median_s=res["median_s"], skipped=res.get("skipped"))
        if res["median_s"] is not None:
            r["img_s"] = args.batch / res["median_s"]
            achieved = r["img_s"] * 2 * model_flops_factor * macs
            r["mfu"] = achieved / (args.peak * 1e12 * n_dev) if args.peak else None
        rows.append(r)
        print_detail(r)

    xyt = (inputs["x"], inputs["t"], inputs["y"])
    if "forward" in args.what:
        res = measure(forward_fn(parts, mesh), (parts.params, *xyt), warmup=args.warmup,
                      iters=args.iters)
        row("forward (masked)" if isinstance(model_config, models.DyDiTConfig) else "forward",
            model_config, res, 1)
        del res
        fused_parts, fused_params = sample_lib.inference_form(parts, parts.params, mesh,
                                                              rules=config.sharding_rules)
        if fused_parts is not parts:
            res = measure(forward_fn(fused_parts, mesh), (fused_params, *xyt),
                          warmup=args.warmup, iters=args.iters)
            row("forward (fused)", fused_parts.config, res, 1)
            del res
        del fused_parts, fused_params
    if "train" in args.what and name in args.train_models:
        tx = update_step.make_optimizer(config)
        state = update_step.init_state(parts, tx, mesh)
        parts.params = None  # the state owns (and the step donates) the parameters
        step = update_step.make_train_step(parts, tx, config, mesh)
        batch = parallel.global_batch({"latents": host["x"], "label": host["y"]}, mesh)
        res = measure(step, (state, batch), warmup=args.warmup, iters=args.iters,
                      carry=lambda out, a: (out[0], a[1]))
        del state
        row("train step", model_config, res, 3)
        del res
    return rows


def fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def print_detail(r: dict) -> None:
    if r["skipped"]:
        speed = f"skipped ({r['skipped']})"
    else:
        speed = f"{1e3 * r['median_s']:.1f} ms/batch, {r['img_s']:.2f} img/s"
    print(
        f"[{r['model']} {r['what']}] {speed}; lower {r['lower_s']:.1f} s, compile "
        f"{r['compile_s']:.1f} s; memory/device {r['mem_text']}; analytic "
        f"{r['gmacs']:.2f} GMACs/img, XLA {fmt(r['xla_gflop'], '.2f')} GFLOP/img, "
        f"XLA/2MAC {fmt(r['xla_ratio'], '.3f')} (HLO as written, before fusion: "
        f"{fmt(r['hlo_ratio'], '.3f')}); MFU {fmt(r.get('mfu'), '.1%')}",
        flush=True,
    )


def table(rows: list[dict], machine_short: str, command: str) -> list[str]:
    """Markdown rows for BENCHMARKS.md; img/s ratios to the first model, same measurement
    (the fused forward against the first model's forward)."""
    first = {}
    for r in rows:
        kind = "train" if r["what"].startswith("train") else "forward"
        if r["model"] == rows[0]["model"] and kind not in first and r.get("img_s"):
            first[kind] = r["img_s"]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    today = datetime.date.today().isoformat()
    for r in rows:
        kind = "train" if r["what"].startswith("train") else "forward"
        ratio = r["img_s"] / first[kind] if r.get("img_s") and kind in first else None
        r["x_first"] = ratio
        mem = None if r["mem"] is None else r["mem"] / 2**30
        cells = [
            today, machine_short, r["model"], r["what"], r["settings"], str(r["batch"]),
            fmt(r["median_s"] and 1e3 * r["median_s"], ".1f", "skipped"),
            fmt(r.get("img_s"), ".2f", "skipped"), fmt(ratio, ".2f"),
            f"{r['lower_s']:.1f}", f"{r['compile_s']:.1f}", fmt(mem, ".2f"),
            f"{r['gmacs']:.2f}", fmt(r["xla_gflop"], ".2f"), fmt(r["xla_ratio"], ".3f"),
            fmt(r.get("mfu"), ".1%"), f"`{command}`",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def parse_overrides(text: str) -> dict:
    """'depth=2,depthwise=xla' -> {'depth': 2, 'depthwise': 'xla'} (Python literals or str)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=None,
                   help=f"comma list of registry names (default {DEFAULT_MODELS}); names: "
                        f"{', '.join(models.model_names())}")
    p.add_argument("--what", default="forward,train", help="comma list: forward, train")
    p.add_argument("--train_models", default=None,
                   help="comma list: measure the train step of these of --models only "
                        "(default all; U-DiT's train step compiles for minutes on CPU)")
    p.add_argument("--batch", type=int, default=None,
                   help="global batch (default 8 on CPU, 32 per device on GPU/TPU)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (parameters, optimizer and EMA stay float32)")
    p.add_argument("--attention", default="einsum", choices=("einsum", "xla", "cudnn"),
                   help="einsum (f32 softmax) | xla | cudnn: jax.nn.dot_product_attention")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"),
                   help="per-block rematerialisation (DiT, U-DiT; n/a for DyDiT)")
    p.add_argument("--scan", default="off", choices=("on", "off"),
                   help="lax.scan over the DiT blocks (DiT only; XLA FLOPs then n/a)")
    p.add_argument("--iters", type=int, default=None, help="timed batches (CPU 3, else 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches (CPU 1, else 3)")
    p.add_argument("--image_size", type=int, default=LATENT_SIZE,
                   help="latent side (32 = 256px images; 64 = 512px)")
    p.add_argument("--devices", type=int, default=0,
                   help="use the first N devices (default all): data parallel over them")
    p.add_argument("--override", default="", type=parse_overrides,
                   help="model config fields for every model: depth=2,depthwise=xla")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="peak dense TFLOP/s per device for MFU (overrides the table)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_MODELS} at batch 2 (per device), 1 warm-up, 2 timed batches; "
                        f"train step of {QUICK_TRAIN_MODELS} only")
    args = p.parse_args(argv)
    cpu = jax.devices()[0].platform == "cpu"
    n_dev = args.devices or len(jax.devices())
    if args.quick:
        args.models = args.models or QUICK_MODELS
        args.train_models = args.train_models or QUICK_TRAIN_MODELS
        args.batch = args.batch or 2 * n_dev
        args.iters = 2 if args.iters is None else args.iters
        args.warmup = 1 if args.warmup is None else args.warmup
    args.models = [m.strip() for m in (args.models or DEFAULT_MODELS).split(",") if m.strip()]
    unknown = [m for m in args.models if m not in models.model_names()]
    if args.train_models is None:
        args.train_models = list(args.models)
    else:
        args.train_models = [m.strip() for m in args.train_models.split(",") if m.strip()]
        outside = sorted(set(args.train_models) - set(args.models))
        if outside:
            p.error(f"--train_models {outside} are not in --models {args.models}")
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(models.model_names())}")
    args.what = [w.strip() for w in args.what.split(",") if w.strip()]
    if not args.what or set(args.what) - {"forward", "train"}:
        p.error(f"--what takes a comma list of forward, train; got {args.what}")
    if not 1 <= n_dev <= len(jax.devices()):
        p.error(f"--devices={args.devices}: this machine has {len(jax.devices())} devices")
    args.batch = args.batch or (8 if cpu else 32 * n_dev)
    if args.batch % n_dev:
        p.error(f"--batch={args.batch} is not divisible by the {n_dev} devices; pass a multiple")
    args.iters = (3 if cpu else 20) if args.iters is None else args.iters
    args.warmup = (1 if cpu else 3) if args.warmup is None else args.warmup
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> list[dict]:
    """Run the benchmark; returns one dict per (model, measurement) (also printed)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    devices = jax.devices()[: args.devices or None]
    mesh = parallel.make_mesh((-1, 1, 1), devices=devices)
    kind = devices[0].device_kind
    args.peak, peak_source = peak_tflops(kind, args.dtype, args.peak_tflops)
    command = " ".join(["python bench/throughput.py", *argv])
    print(f"machine: {machine()}")
    print(f"mesh: {dict(mesh.shape)} over {len(devices)} x {kind}; batch {args.batch} "
          f"({args.batch // len(devices)} per device), latents {args.image_size}x"
          f"{args.image_size}x{LATENT_CHANNELS}, {NUM_CLASSES} classes")
    print(f"peak for MFU: {fmt(args.peak, '.1f')} TFLOP/s per device ({peak_source}); model "
          "FLOPs = 2 x analytic MACs per image forward, 3 x that per train step")
    print(f"settings: warmup {args.warmup}, iters {args.iters}, what {args.what}, "
          f"models {args.models}, train step of {args.train_models}")
    rows = []
    with jax.set_mesh(mesh):
        for name in args.models:
            rows.extend(bench_model(name, args, mesh))
    machine_short = (f"{len(devices)} x {kind} ({devices[0].platform}), {os.cpu_count()} CPU "
                     f"cores, jax {jax.__version__}")
    lines = table(rows, machine_short, command)
    print("\n" + "\n".join(lines) + "\n")
    base = rows[0]["model"]
    for r in rows:
        if r["model"] != base and r.get("x_first") is not None:
            print(f"{r['model']} {r['what']}: {r['x_first']:.2f}x the img/s of {base}")
    return rows


if __name__ == "__main__":
    main()
