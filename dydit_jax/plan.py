r"""Compile a config's training and sampling programs for a TPU topology, on a CPU.

  python -m dydit_jax.plan --config=configs/dit.py:XL/2 --topology=v5p-128 \
      --config.global_batch_size=256 --config.mesh_shape='(1,-1,1)' [--what=train,sample] \
      [--json=plan.json] [--search]

Needs libtpu (`pip install -e '.[tpu]'`), which compiles for any named topology without a
TPU ("deviceless"). The programs are the ones `train.py` and `sample.py` run (the same step
function, shardings, donation, dtype, remat and scan), lowered from abstract state: nothing
is allocated, and the models' fixed buffers are computed here on the CPU. Per program the
report gives the compiler's bytes per chip (arguments, outputs, aliased, temporaries,
generated code, and the total), whether it fits the chip's HBM, the collectives in the
optimized program (a scanned loop's body counted once), the compile time, the analytic
FLOPs per image (`dydit_jax.flops`) and the images/s/chip that the chip's peak would allow
at those FLOPs: a ceiling, not a prediction. A program that does not fit is reported with
`fits: false` and the bytes the compiler asked for.

`--search` compiles the training step for several meshes, remat policies, scan on/off and
per-chip batches and lists those that fit, best ceiling first (`--search_batches=2,4,8`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from jax._src import config as jax_config  # no public switch for one compile

from dydit_jax import (
    cli,
    config_lib,
    files,
    flops,
    model_parts,
    models,
    parallel,
    sample_lib,
    tpu,
    update_step,
)
from dydit_jax import diffusion as diffusion_lib
from dydit_jax.dynamic import DyDiTEngine

GIB = 1024**3
PROGRAMS = ("train", "sample", "engine")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


# ------------------------------------------------------------------------ building


def cpu_mesh():
    return parallel.make_mesh((1, 1, 1), devices=jax.devices("cpu")[:1])


def host_parts(model_config, mesh, rules=None) -> model_parts.ModelParts:
    """`ModelParts` for `mesh` without parameters: shapes and shardings from the abstract
    model, the fixed buffers computed on this machine's CPU (constants of the program)."""
    graphdef, shapes, logical = model_parts.abstract_model(model_config)
    cpu = cpu_mesh()
    with jax.set_mesh(cpu):  # whatever mesh the caller has set
        cpu_parts = model_parts.build_model(model_config, cpu, init_params=False)
    buffers = jax.tree.map(np.asarray, cpu_parts.buffers)
    rules = parallel.rules_dict(rules)
    shardings = parallel.tree_shardings(logical, shapes, mesh, rules)
    return model_parts.ModelParts(graphdef, None, buffers, model_config, shapes, shardings,
                                  parallel.ParamStorage(logical, shapes, mesh, rules))


def abstract_like(shapes, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )


def abstract_batch(config, model_config, mesh) -> dict:
    """The batch a training step receives: VAE moments (float16, as extracted) for
    `dataset=latents`, float32 images otherwise; int32 labels."""
    rows = parallel.batch_sharding(mesh)
    b, s, c = config.global_batch_size, model_config.input_size, model_config.in_channels
    if config.dataset == "latents":
        x = jax.ShapeDtypeStruct((b, 2, s, s, 2 * c), jnp.float16, sharding=rows)
        key = "moments"
    else:
        x, key = jax.ShapeDtypeStruct((b, s, s, c), jnp.float32, sharding=rows), "image"
    return {key: x, "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows)}


def train_step_and_args(config, model_config, mesh):
    """(the jitted train step `train.py` runs on `mesh`, abstract state, abstract batch)."""
    ways = parallel.batch_size_per_step(mesh)
    if config.global_batch_size % ways:
        raise ValueError(
            f"global_batch_size {config.global_batch_size} is not divisible by the {ways} "
            "data-parallel devices (data x fsdp); change it or the mesh"
        )
    parts = host_parts(model_config, mesh, config.sharding_rules)
    tx = update_step.make_optimizer(config)
    step = update_step.make_train_step(parts, tx, config, mesh)
    state = update_step.abstract_state(parts, tx, mesh)
    return step, state, abstract_batch(config, model_config, mesh)


def train_program(config, model_config, mesh):
    """The train step lowered for abstract state and batch on `mesh`."""
    step, state, batch = train_step_and_args(config, model_config, mesh)
    return step.lower(state, batch)


def sample_batch(config, mesh) -> int:
    """The rows one sampling call takes: sample.batch_size rounded up to the devices."""
    n = mesh.size
    return n * math.ceil(int(config.sample.batch_size) / n)


def sample_program(config, model_config, mesh):
    """The one-program sampler `sample.py` runs (the fused inference form), lowered."""
    fused_config, _ = models.fuse_model_params(model_config, {})
    parts = host_parts(fused_config, mesh, config.sharding_rules)
    s = config.sample
    sampler = sample_lib.make_batch_sampler(
        parts, mesh=mesh, sampling_steps=s.steps, sampler=s.sampler,
        cfg_scale=float(s.cfg_scale), guided_channels=s.guided_channels,
        cfg_interval=config_lib.cfg_interval(s),
        compiler_options=config.get("compiler_options"),
    )
    rows, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    b = sample_batch(config, mesh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    return sampler.lower(
        abstract_like(parts.param_shapes, parts.param_shardings),
        jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep),
        jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows),
        jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows),
    )


def synthetic_router_params(parts, lambda_target: float) -> dict:
    """Zero weights whose width routers fix a plan around `lambda_target`: layer l keeps
    k_l heads and MLP groups at every timestep, k_l spread evenly around lambda x heads (a
    trained plan's signatures come from the same range); token routers keep every token."""
    cfg = parts.config
    h, depth = cfg.num_heads, cfg.depth
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), parts.param_shapes)
    spread = np.linspace(-0.5, 0.5, depth) * h / 2 if depth > 1 else np.zeros(1)
    first = 1 if cfg.router_layout == "first_on" else 0
    for layer, block in params["blocks"].items():
        on = int(np.clip(round(lambda_target * h + spread[int(layer)]), 1, h))
        bias = np.where(np.arange(cfg.num_router_logits) < on - first, 1.0, -1.0)
        for router in ("attn_rate", "mlp_rate"):
            block[router]["bias"] = bias.astype(np.float32)
        block["token_fc2"]["bias"] = np.ones_like(block["token_fc2"]["bias"])
    return params


def engine_programs(config, model_config, mesh, log=print):
    """(name, lowered, FLOPs per image of the whole engine run) for every program the DyDiT
    engine compiles, on a synthetic plan at `config.dydit.lambda_target` (token capacity:
    the config's, or per layer from 50% to 100% of the tokens for "calibrate"/"all")."""

    flat = dataclasses.replace(model_config, scan_blocks=False)  # the engine's layout
    cpu = cpu_mesh()
    with jax.set_mesh(cpu):
        cpu_parts = model_parts.build_model(flat, cpu, init_params=False)
    lam = float(config.dydit.lambda_target)
    params = jax.device_put(synthetic_router_params(cpu_parts, lam), cpu_parts.param_shardings)
    options = config_lib.engine_options(config.sample)
    capacity = options.pop("capacity")
    if capacity is None or isinstance(capacity, str):
        n = flat.num_tokens
        capacity = np.linspace(n // 2, n, flat.depth).round().astype(int)
    for unused in ("capacity_margin", "capacity_step_buckets", "layers_per_call"):
        options.pop(unused)
    s = config.sample
    log(f"building the DyDiT engine's schedule (synthetic plan at lambda {lam}) ...")
    with jax.set_mesh(cpu):
        engine = DyDiTEngine(
            cpu_parts, params, mesh=cpu, sampling_steps=s.steps, sampler=s.sampler,
            cfg_scale=float(s.cfg_scale), guided_channels=s.guided_channels,
            cfg_interval=config_lib.cfg_interval(s), capacity=capacity, **options,
        )
    report = engine.report()
    ratio = report.get("executed_flops_ratio", engine.plan.flops_ratio())
    per_image = ratio * sample_flops_per_image(config, flat)
    tpu_parts = host_parts(flat, mesh, config.sharding_rules)
    for name, lowered in engine.lowered_programs(mesh, tpu_parts.param_shardings,
                                                 sample_batch(config, mesh)):
        log(f"compiling engine:{name} ...")
        yield f"engine:{name}", lowered, per_image


# ------------------------------------------------------------------------ compiling


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} of the collectives in an optimized HLO module's text (each
    instruction once, so a loop body's collectives count once; bytes of the result)."""
    found: dict[str, dict[str, int]] = {}
    pattern = re.compile(
        r"=\s*(?P<shape>\S.*?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\("
    )
    for line in hlo_text.splitlines():
        m = pattern.search(line)
        if not m:
            continue
        shapes = re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m["shape"])
        if not shapes:
            continue
        dtype, dims = shapes[-1]  # async starts carry (operand, result): the result
        size = math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 4)
        entry = found.setdefault(m["op"], {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += int(size)
    return dict(sorted(found.items()))


def _bytes_asked(message: str) -> int | None:
    """The bytes a RESOURCE_EXHAUSTED compile asked for ('requires 155.47G', 'memory required
    for HLO temporaries (63.29G)'; XLA's K/M/G are powers of 1024)."""
    m = (re.search(r"requires\s+([\d.]+)([KMGT]?)", message)
         or re.search(r"required for [^(]*\(([\d.]+)([KMGT]?)\)", message))
    if not m:
        return None
    return int(float(m[1]) * 1024 ** " KMGT".index(m[2] or " "))


def compile_lowered(lowered):
    """`lowered.compile()` past the persistent compilation cache (deviceless executables
    cannot be read back from it). JAX decides once per process whether the cache is used,
    so after any earlier compile only the write threshold keeps the entry out."""
    with jax_config.enable_compilation_cache(False), \
            jax_config.persistent_cache_min_compile_time_secs(float("inf")):
        return lowered.compile()


def compile_program(name: str, lowered, hbm_bytes: int) -> dict:
    """Compile one lowered program; its per-chip memory, collectives and compile time."""
    start = time.perf_counter()
    try:
        compiled = compile_lowered(lowered)
    except Exception as e:  # noqa: BLE001 - only the out-of-memory refusal is a result
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return dict(name=name, fits=False, bytes_per_chip=_bytes_asked(str(e)),
                    compile_seconds=round(time.perf_counter() - start, 1),
                    error=str(e).splitlines()[0][:300])
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    parts = dict(
        argument_bytes_per_chip=int(mem.argument_size_in_bytes),
        output_bytes_per_chip=int(mem.output_size_in_bytes),
        alias_bytes_per_chip=int(mem.alias_size_in_bytes),
        temp_bytes_per_chip=int(mem.temp_size_in_bytes),
        code_bytes_per_chip=int(mem.generated_code_size_in_bytes),
    )
    total = (parts["argument_bytes_per_chip"] + parts["output_bytes_per_chip"]
             - parts["alias_bytes_per_chip"] + parts["temp_bytes_per_chip"]
             + parts["code_bytes_per_chip"])
    return dict(name=name, fits=total <= hbm_bytes, bytes_per_chip=total, **parts,
                compile_seconds=round(seconds, 1), collectives=collectives(compiled.as_text()))


# ------------------------------------------------------------------------ FLOPs


def forward_flops(model_config) -> float:
    """FLOPs (2 x multiply-adds) of one forward for one image, the papers' convention."""
    if isinstance(model_config, models.UDiTConfig):
        return 2 * flops.udit_macs(model_config)
    return 2 * flops.dit_macs(model_config)


RECOMPUTE = {"none": 0.0, "dots": 0.0, "full": 1.0}  # extra forwards per step (matmuls)


def train_flops_per_image(model_config) -> float:
    """Forward + backward (2x forward) + what remat recomputes; DyDiT trains the masked
    complete model, so it costs a DiT's FLOPs."""
    return (3 + RECOMPUTE[model_config.remat]) * forward_flops(model_config)


def sample_flops_per_image(config, model_config) -> float:
    """Network FLOPs of one image: a forward per step, two at the guided steps."""
    s = config.sample
    diffusion = diffusion_lib.create_diffusion(s.steps, config.diffusion_steps)
    guided = 0
    if float(s.cfg_scale) != 1.0:
        first, stop = diffusion_lib.guidance_steps(diffusion, config_lib.cfg_interval(s))
        guided = stop - first
    return (diffusion.num_timesteps + guided) * forward_flops(model_config)


# ------------------------------------------------------------------------ report


def plan(config: ml_collections.ConfigDict, topology: str, what=("train", "sample"),
         log=print) -> dict:
    """Compile the programs in `what` for `topology`; the report as a dict (see module)."""
    topo = tpu.parse_topology(topology)
    unknown = sorted(set(what) - set(PROGRAMS))
    if unknown:
        raise ValueError(f"--what {unknown}: choose from {', '.join(PROGRAMS)}")
    model_config = config_lib.validate_config(config, training=False)
    devices = tpu.devices(topo)
    mesh = parallel.make_mesh(config.mesh_shape, devices=devices)
    rules = parallel.rules_dict(config.sharding_rules)
    _, shapes, logical = model_parts.abstract_model(model_config)
    whole = parallel.replicated_leaves(logical, shapes, mesh, rules)
    report: dict[str, Any] = dict(
        config=config.model, topology=topo.name, libtpu_topology=topo.libtpu_name,
        chips=topo.chips, devices=len(devices),
        hosts=len({d.process_index for d in devices}), chip=devices[0].device_kind,
        hbm_bytes_per_chip=topo.chip.hbm_bytes, peak_flops_per_chip=topo.chip.peak_bf16_flops,
        mesh=dict(mesh.shape), sample_mesh=dict(
            zip(parallel.MESH_AXES, parallel.resolve_mesh_shape(parallel.INFERENCE_MESH,
                                                                len(devices)), strict=True)),
        remat=model_config.remat,
        scan_blocks=bool(getattr(model_config, "scan_blocks", False)),
        dtype=model_config.dtype,
        replicated_param_bytes=sum(b for _, b in whole),
        replicated_params=[p for p, _ in whole[:8]],
        programs=[],
    )
    per_chip_rows = config.global_batch_size / len(devices)
    hbm = topo.chip.hbm_bytes
    chips_per_device = topo.chips / len(devices)  # v4 is compiled per TensorCore
    if "train" in what:
        log(f"compiling train_step for {topo.name} ({len(devices)} devices) ...")
        entry = compile_program("train_step", train_program(config, model_config, mesh), hbm)
        entry["images_per_chip"] = per_chip_rows / chips_per_device
        entry["flops_per_image"] = train_flops_per_image(model_config)
        report["programs"].append(entry)
    # sample.py's own mesh: every device, data parallel (it never uses the training mesh)
    infer = parallel.make_mesh(parallel.INFERENCE_MESH, devices=devices)
    if "sample" in what:
        log(f"compiling sample_step for {topo.name} ...")
        entry = compile_program("sample_step", sample_program(config, model_config, infer), hbm)
        entry["images_per_chip"] = sample_batch(config, infer) / len(devices) / chips_per_device
        entry["flops_per_image"] = sample_flops_per_image(config, model_config)
        report["programs"].append(entry)
    if "engine" in what:
        if not isinstance(model_config, models.DyDiTConfig):
            raise ValueError("--what=engine is the DyDiT inference engine: use a DyDiT config")
        for name, lowered, flops_per_image in engine_programs(config, model_config, infer,
                                                              log=log):
            entry = compile_program(name, lowered, hbm)
            entry["images_per_chip"] = sample_batch(config, infer) / len(devices)
            entry["flops_per_image"] = flops_per_image
            report["programs"].append(entry)
    for entry in report["programs"]:
        entry["ceiling_images_per_second_per_chip"] = round(
            topo.chip.peak_bf16_flops / entry["flops_per_image"], 2)
    return report


def format_report(report: dict) -> str:
    mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
    lines = [
        f"{report['config']} on {report['topology']} ({report['libtpu_topology']}): "
        f"{report['chips']} chips of {report['chip']}, {report['hosts']} hosts, "
        f"{report['hbm_bytes_per_chip'] / GIB:.2f} GiB HBM per chip",
        f"training mesh {mesh}; remat {report['remat']}, scan {report['scan_blocks']}, "
        f"dtype {report['dtype']}; sampling: every device data parallel, as sample.py",
    ]
    if report["replicated_param_bytes"]:
        lines.append(
            "parameters whole on every chip (the rules split none of their dimensions over "
            f"fsdp): {report['replicated_param_bytes'] / 2**20:.1f} MiB per copy, e.g. "
            + ", ".join(report["replicated_params"][:4])
        )
    engine = [p for p in report["programs"] if p["name"].startswith("engine:")]
    for p in report["programs"]:
        if p in engine:
            continue
        lines.append("")
        if p["bytes_per_chip"] is None:
            lines.append(f"{p['name']}: fits False ({p.get('error', '')})")
            continue
        fits = "fits" if p["fits"] else "DOES NOT FIT"
        lines.append(f"{p['name']}: {fits}, {p['bytes_per_chip'] / GIB:.2f} GiB per chip"
                     + ("" if p["fits"] else " asked by the compiler")
                     + f", compiled in {p['compile_seconds']:.0f} s")
        if "temp_bytes_per_chip" in p:
            lines.append(
                "  per chip: " + ", ".join(
                    f"{k} {p[f'{k}_bytes_per_chip'] / GIB:.2f}"
                    for k in ("argument", "output", "alias", "temp", "code")) + " GiB")
            coll = ", ".join(f"{k} x{v['count']} ({v['bytes'] / 2**20:.1f} MiB)"
                             for k, v in p["collectives"].items()) or "none"
            lines.append(f"  collectives (loop bodies once): {coll}")
        lines.append(
            f"  {p['images_per_chip']:g} images per chip, {p['flops_per_image'] / 1e9:.1f} "
            f"GFLOP per image: ceiling {p['ceiling_images_per_second_per_chip']:.1f} "
            "images/s/chip at peak")
    if engine:
        lines += ["", f"DyDiT engine: {len(engine)} programs (synthetic plan at the config's "
                  f"lambda), {engine[0]['flops_per_image'] / 1e9:.1f} GFLOP per image: "
                  f"ceiling {engine[0]['ceiling_images_per_second_per_chip']:.1f} "
                  "images/s/chip at peak"]
        for p in engine:
            size = "?" if p["bytes_per_chip"] is None else f"{p['bytes_per_chip'] / GIB:.3f}"
            lines.append(f"  {p['name']:<44} {'fits' if p['fits'] else 'DOES NOT FIT':<13}"
                         f"{size:>8} GiB/chip {p['compile_seconds']:>5.1f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------------ search


def mesh_candidates(num_devices: int, model_config) -> list[tuple[int, int, int]]:
    """FSDP over everything, the least data parallelism that lets fsdp divide the width,
    pure data parallelism, and FSDP with tensor = 4 where the heads allow it."""
    out = [(1, num_devices, 1)]
    width = model_config.hidden_size
    for d in (2**k for k in range(1, 12)):
        if d < num_devices and num_devices % d == 0 and width % (num_devices // d) == 0:
            out.append((d, num_devices // d, 1))
            break
    out.append((num_devices, 1, 1))
    heads = getattr(model_config, "num_heads", 0)
    if num_devices >= 8 and heads and heads % 4 == 0:
        out.append((1, num_devices // 4, 4))
    return list(dict.fromkeys(out))


def search(config, topology: str, batches=(4, 8, 16), remats=("none", "dots", "full"),
           scans=(True, False), log=print) -> list[dict]:
    """Compile the train step over meshes x remat x scan x per-chip batch; fitting ones
    first, by ceiling, then larger batch, then fewer bytes."""
    topo = tpu.parse_topology(topology)
    devices = tpu.devices(topo)
    base = config_lib.validate_config(config, training=False)
    scans = scans if hasattr(base, "scan_blocks") else (False,)  # U-DiT has no scan
    results = []
    for mesh_shape, remat, scan, per_chip in itertools.product(
        mesh_candidates(len(devices), base), remats, scans, batches
    ):
        trial = ml_collections.ConfigDict(config.to_dict())
        trial.mesh_shape = mesh_shape
        trial.global_batch_size = per_chip * len(devices) // mesh_shape[2]
        trial.model_overrides.remat = remat
        if hasattr(base, "scan_blocks"):
            trial.model_overrides.scan_blocks = scan
        log(f"  mesh {mesh_shape} remat {remat} scan {scan} batch/chip {per_chip} ...")
        try:
            model_config = config_lib.validate_config(trial, training=False)
            mesh = parallel.make_mesh(mesh_shape, devices=devices)
            lowered = train_program(trial, model_config, mesh)
            entry = compile_program("train_step", lowered, topo.chip.hbm_bytes)
        except ValueError as e:
            log(f"    skipped: {e}")
            continue
        flops_per_image = train_flops_per_image(model_config)
        results.append(dict(
            mesh=mesh_shape, remat=remat, scan_blocks=scan, images_per_chip=per_chip,
            fits=entry["fits"], bytes_per_chip=entry["bytes_per_chip"],
            compile_seconds=entry["compile_seconds"],
            ceiling_images_per_second_per_chip=round(
                topo.chip.peak_bf16_flops / flops_per_image, 2),
        ))
    return sorted(results, key=lambda r: (
        not r["fits"], -r["ceiling_images_per_second_per_chip"], -r["images_per_chip"],
        r["bytes_per_chip"] or 0))


def format_search(results: list[dict]) -> str:
    lines = [f"{'mesh':<14}{'remat':<7}{'scan':<7}{'img/chip':>9}{'GiB/chip':>10}"
             f"{'compile s':>11}{'ceiling img/s/chip':>20}"]
    for r in results:
        if not r["fits"]:
            continue
        lines.append(
            f"{str(tuple(r['mesh'])):<14}{r['remat']:<7}{str(r['scan_blocks']):<7}"
            f"{r['images_per_chip']:>9}{r['bytes_per_chip'] / GIB:>10.2f}"
            f"{r['compile_seconds']:>11.0f}{r['ceiling_images_per_second_per_chip']:>20.1f}")
    misses = sum(not r["fits"] for r in results)
    lines.append(f"({len(results) - misses} settings fit; {misses} did not)")
    return "\n".join(lines)


# ------------------------------------------------------------------------ command line


def main(argv) -> None:
    f = flags.FLAGS
    if len(argv) > 1:
        sys.exit(cli.fail(ValueError(f"unexpected arguments {argv[1:]}")))
    cli.start(log_info=False)
    try:
        if f.search:
            batches = tuple(int(b) for b in f.search_batches)
            results = search(f.config, f.topology, batches=batches)
            print(format_search(results))
            if f.json:
                files.write_json(f.json, {"topology": f.topology, "search": results})
            return
        report = plan(f.config, f.topology, what=tuple(f.what))
    except (ValueError, RuntimeError) as e:
        sys.exit(cli.fail(e))
    print(format_report(report))
    if f.json:
        files.write_json(f.json, report)


if __name__ == "__main__":
    from absl import app
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:VARIANT]).")
    flags.DEFINE_string("topology", None, f"TPU topology, e.g. {tpu.EXAMPLES}")
    flags.DEFINE_list("what", ["train", "sample"], f"programs: {', '.join(PROGRAMS)}")
    flags.DEFINE_string("json", None, "also write the report to this JSON file")
    flags.DEFINE_bool("search", False, "try meshes, remat, scan and per-chip batches")
    flags.DEFINE_list("search_batches", ["4", "8", "16"], "per-chip batches for --search")
    flags.mark_flags_as_required(["config", "topology"])
    app.run(main, flags_parser=cli.parse_flags)
