"""The paper-size training programs compiled for TPU pods on this CPU (libtpu, deviceless).

  python bench/pod_plans.py [--out=pod_plans.jsonl] [--models=dit_xl2,...] [--topologies=...]

For each model and topology it compiles `train.py`'s step (`dydit_jax.plan`) with 4 images
per chip, scan over blocks where the model has it, on the mesh that lets fsdp divide the
model width with the least data parallelism, and takes the first remat policy that fits in
none, dots, full (the order of falling ceilings). Each finished row is appended to --out at
once, and rows already there are skipped, so an interrupted run continues where it stopped.
Prints the markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine  # noqa: E402
from configs import dit, dydit, udit  # noqa: E402
from dydit_jax import config_lib, parallel, plan, tpu  # noqa: E402

MODELS = {
    "dit_xl2": ("DiT-XL/2 256", lambda: dit.get_config("XL/2")),
    "dydit_xl2": ("DyDiT-XL/2 256, lambda 0.5", lambda: dydit.get_config("XL/2,0.5")),
    "udit_b": ("U-DiT-B 256", lambda: udit.get_config("B")),
    "udit_l": ("U-DiT-L 256", lambda: udit.get_config("L")),
    "dit_xl2_512": ("DiT-XL/2 512", lambda: dit.get_config("XL/2,512")),
}
TOPOLOGIES = ("v5e-64", "v5p-128", "v6e-64")
PER_CHIP = 4


def fsdp_mesh(devices: int, width: int) -> tuple[int, int, int]:
    """(data, fsdp, 1) with the largest fsdp that divides both the devices and the width."""
    fsdp = devices
    while fsdp > 1 and width % fsdp:
        fsdp //= 2
    return (devices // fsdp, fsdp, 1)


def one_row(key: str, topology: str, log) -> dict:
    label, make = MODELS[key]
    topo = tpu.parse_topology(topology)
    devices = tpu.devices(topo)
    tried = []
    for remat in ("none", "dots", "full"):
        config = make()
        config.model_overrides.remat = remat
        model_config = config_lib.validate_config(config, training=False)
        config.mesh_shape = fsdp_mesh(len(devices), model_config.hidden_size)
        config.global_batch_size = PER_CHIP * len(devices)
        model_config = config_lib.validate_config(config, training=False)
        mesh = parallel.make_mesh(config.mesh_shape, devices=devices)
        log(f"{label} on {topology}: mesh {config.mesh_shape}, remat {remat} ...")
        entry = plan.compile_program("train_step", plan.train_program(config, model_config, mesh),
                                     topo.chip.hbm_bytes)
        tried.append(remat)
        if entry["fits"]:
            break
    flops_per_image = plan.train_flops_per_image(model_config)
    return dict(
        key=key, model=label, topology=topology, chips=topo.chips, mesh=config.mesh_shape,
        images_per_chip=PER_CHIP, remat=remat, tried=tried,
        scan_blocks=bool(getattr(model_config, "scan_blocks", False)), fits=entry["fits"],
        bytes_per_chip=entry["bytes_per_chip"], compile_seconds=entry["compile_seconds"],
        ceiling=round(topo.chip.peak_bf16_flops / flops_per_image, 1),
        date=datetime.date.today().isoformat(),
    )


def table(rows: list[dict]) -> str:
    lines = ["| date | model | topology | mesh (data, fsdp, tensor) | img/chip | remat | scan | "
             "GiB/chip | compile s | ceiling img/s/chip | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = f"{r['bytes_per_chip'] / 2**30:.2f}" if r["bytes_per_chip"] else "?"
        fits = "" if r["fits"] else " (does not fit)"
        lines.append(
            f"| {r['date']} | {r['model']} | {r['topology']} | {tuple(r['mesh'])} | "
            f"{r['images_per_chip']} | {r['remat']}{fits} | "
            f"{'yes' if r['scan_blocks'] else 'no'} | {size} | {r['compile_seconds']:.0f} | "
            f"{r['ceiling']} | `python bench/pod_plans.py --models={r['key']} "
            f"--topologies={r['topology']}` |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="pod_plans.jsonl")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--topologies", default=",".join(TOPOLOGIES))
    args = p.parse_args()
    print(machine())
    done = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = [json.loads(line) for line in f if line.strip()]
    have = {(r["key"], r["topology"]) for r in done}
    for key in args.models.split(","):
        for topology in args.topologies.split(","):
            if (key, topology) in have:
                continue
            row = one_row(key, topology, log=lambda m: print(m, flush=True))
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            done.append(row)
    print(table(done))


if __name__ == "__main__":
    main()
