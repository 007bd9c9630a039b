r"""Samplers side by side on trained digits models: digits-FID, class accuracy, images/s.

The three digits models (the quick start's DiT, a DyDiT at lambda 0.5 fine-tuned from it, a
U-DiT), trained with the repository's own commands:

  python train.py --config=configs/digits.py --workdir=workdirs/digits
  python train.py --config=configs/dydit.py:digits,0.5 --workdir=workdirs/dydit_digits \
      --config.init_from=workdirs/digits
  python train.py --config=configs/udit.py:digits --workdir=workdirs/udit_digits

then every model samples the same labels with each sampler and step count:

  python bench/samplers.py \
      --workdirs=DiT=workdirs/digits,DyDiT=workdirs/dydit_digits,U-DiT=workdirs/udit_digits

Default runs: DDPM-250, DDIM-50 and DPM-Solver++(2M) at 10/20/25 steps, both time-uniform
("20") and log-SNR-uniform ("logsnr20"). Each model's guidance is its run config's. DyDiT
samples through the inference engine (token capacities calibrated on the first batch). The
first batch of each run compiles and is not timed. Rows go to `--out` (JSON lines) as they
finish; a rerun skips the rows already there (same model, sampler, steps, images, seed).
Prints a markdown table at the end (`--table` also writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine  # noqa: E402
from dydit_jax import files, sample_lib  # noqa: E402
from dydit_jax.diffusion import SAMPLERS, check_sampler, space_timesteps  # noqa: E402
from dydit_jax.experiments import digits_paper  # noqa: E402

RUNS = ("ddpm:250,ddim:ddim50,dpmpp2m:10,dpmpp2m:20,dpmpp2m:25,"
        "dpmpp2m:logsnr10,dpmpp2m:logsnr20,dpmpp2m:logsnr25")


def parse_runs(spec: str) -> list[tuple[str, str]]:
    """'ddpm:250,dpmpp2m:logsnr20' -> [(sampler, steps), ...], each checked."""
    runs = []
    for item in spec.split(","):
        sampler, _, steps = item.strip().partition(":")
        if not steps:
            raise ValueError(f"--runs entry {item!r} is not SAMPLER:STEPS (e.g. dpmpp2m:20)")
        check_sampler(sampler, None, steps)
        runs.append((sampler, steps))
    return runs


def parse_workdirs(spec: str) -> dict[str, str]:
    """'DiT=workdirs/digits,...' -> {name: workdir}, each holding a checkpoint."""
    out = {}
    for item in spec.split(","):
        name, _, path = item.strip().partition("=")
        if not path:
            raise ValueError(f"--workdirs entry {item!r} is not NAME=WORKDIR")
        if not os.path.isdir(os.path.join(path, "checkpoints")):
            raise ValueError(f"--workdirs {name}={path}: no checkpoints/ there; train it first "
                             "(see this script's docstring)")
        out[name] = path
    return out


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def table(rows: list[dict]) -> str:
    lines = ["| model | sampler | steps | spacing | digits-FID | class accuracy | images/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        spacing = ("log-SNR" if r["steps"].startswith("logsnr") else
                   "DDIM stride" if r["steps"].startswith("ddim") else "time-uniform")
        lines.append(
            f"| {r['model']} | {r['sampler']} | {r['num_steps']} | {spacing} | {r['fid']:.2f} "
            f"| {100 * r['class_accuracy']:.1f}% | {r['images_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdirs", required=True, help="NAME=WORKDIR,... of trained digits runs")
    p.add_argument("--runs", default=RUNS, help=f"SAMPLER:STEPS,... (samplers: {SAMPLERS})")
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier_dir", default="workdirs/digits_classifier",
                   help="where the digits classifier is trained once and cached")
    p.add_argument("--out", default="workdirs/samplers.jsonl")
    p.add_argument("--table", default="", help="also write the markdown table here")
    args = p.parse_args(argv)
    try:
        runs, workdirs = parse_runs(args.runs), parse_workdirs(args.workdirs)
    except ValueError as e:
        p.error(str(e))
    if args.num_samples < 1 or args.batch_size < 1:
        p.error("--num_samples and --batch_size must be >= 1")
    print(f"machine: {machine()}", flush=True)
    labels = sample_lib.make_labels("balanced", args.num_samples, 10)
    done = read_rows(args.out)
    rows = []
    for name, workdir in workdirs.items():
        for sampler, steps in runs:
            key = {"model": name, "workdir": os.path.abspath(workdir), "sampler": sampler,
                   "steps": steps, "num_samples": args.num_samples, "seed": args.seed}
            found = [r for r in done if all(r.get(k) == v for k, v in key.items())]
            if found:
                rows.append(found[-1])
                continue
            start = time.perf_counter()
            result = digits_paper.sample(workdir, labels, sampling_steps=steps, seed=args.seed,
                                         batch_size=args.batch_size, sampler=sampler)
            metrics = digits_paper.evaluate(result["images"], labels, args.classifier_dir)
            row = key | {
                "num_steps": len(space_timesteps(1000, steps)), "fid": metrics["fid"],
                "class_accuracy": metrics["class_accuracy"],
                "images_per_s": result["images_per_s"], "first_batch_s": result["first_batch_s"],
                "engine": result.get("engine"), "machine": machine(),
                "date": time.strftime("%Y-%m-%d"),
            }
            rows.append(row)
            with open(args.out, "a") as f:  # one line per finished row: a rerun resumes
                f.write(json.dumps(row) + "\n")
            print(f"[{name}] {sampler} {steps}: FID {row['fid']:.2f}, accuracy "
                  f"{100 * row['class_accuracy']:.1f}%, {row['images_per_s']:.1f} images/s "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    text = table(rows)
    if args.table:
        files.write_text(args.table, text)
    print(text)


if __name__ == "__main__":
    main()
