r"""The papers' FLOPs-vs-FID comparison in miniature, on the embedded digits (2-core CPU).

  python -m dydit_jax.experiments.digits_paper --workdir=workdirs/digits_paper

Trains a DiT (configs/digits.py:long), fine-tunes it into DyDiTs at each lambda
(configs/dydit.py:digits), trains a U-DiT of about the DiT's FLOPs (configs/udit.py:digits,
hidden 40), samples each with the same sampler and labels (DyDiT through the inference
engine), evaluates the samples against the real digits held out from our digits
classifier's training (digits-FID on its features, class accuracy) and writes
WORKDIR/results.md (the table), results.json and flops_vs_fid.png (the papers' figure:
FLOPs per image against FID).

Resumable: every stage lives in its own workdir (WORKDIR/dit, dydit_0.7, ...); a finished
one is not trained again and its samples and metrics (STAGE/samples.npz, result.json) are
reused while the checkpoint and the sampling settings match; rerun the same command after
an interruption. `--scale=tiny` is a
seconds-long smoke run (tests).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import dataclass

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from dydit_jax import checkpoint as ckpt_lib
from dydit_jax import (
    cli,
    files,
    flops,
    model_parts,
    models,
    parallel,
    sample_lib,
    train_lib,
)
from dydit_jax.dynamic import DyDiTEngine
from dydit_jax.eval import digits_classifier
from dydit_jax.eval import evaluate as eval_lib

UDIT_HIDDEN = 40  # U-DiT widths 40/80/160: 31 MFLOPs per image vs the DiT's 30

SCALES = {
    # steps: DiT, DyDiT fine-tuning (each lambda), U-DiT; then samples and sampler steps
    "full": dict(dit=1200, dydit=800, udit=1200, samples=500, sampling="50"),
    "tiny": dict(dit=12, dydit=6, udit=6, samples=20, sampling="4"),
}


@dataclass
class Stage:
    name: str  # "DiT", "DyDiT lambda=0.7", "U-DiT"
    key: str  # workdir name
    config: ml_collections.ConfigDict


# configs/ lives at the repository root, next to the package (see the README's commands).
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_configs():
    if _REPO not in sys.path:
        sys.path.insert(0, _REPO)
    try:  # configs/ is beside the package in a checkout, not in an installed wheel
        from configs import digits, dydit, udit
    except ImportError as err:  # pragma: no cover - only outside a checkout
        raise SystemExit(
            f"error: the experiment needs the repository's configs/ folder ({err}); run it "
            "from a checkout of dydit-jax"
        ) from err
    return digits, dydit, udit


def stages(workdir: str, scale: str, lambdas: list[float]) -> list[Stage]:
    digits, dydit, udit = _load_configs()
    steps = SCALES[scale]
    tiny = scale == "tiny"

    def shorten(config, num_steps):
        config.num_steps = num_steps
        every = max(1, num_steps // 3)
        config.log_every_steps = min(config.log_every_steps, every)
        config.checkpoint_every_steps = num_steps  # one checkpoint at the end
        config.sample_every_steps = num_steps  # one grid at the end; the experiment samples
        if tiny:  # no grid (a sampler compile per model); the experiment still samples
            config.global_batch_size = 32
            config.sample_every_steps = 0
        return config

    dit = shorten(digits.get_config("tiny" if tiny else "long"), steps["dit"])
    out = [Stage("DiT", "dit", dit)]
    for lam in lambdas:
        config = shorten(dydit.get_config(f"digits,{lam}"), steps["dydit"])
        config.model_overrides = ml_collections.ConfigDict(dit.model_overrides.to_dict())
        config.init_from = os.path.join(workdir, "dit")
        if tiny:
            config.dydit.update(hold_steps=0, warmup_steps=2)
        out.append(Stage(f"DyDiT lambda={lam}", f"dydit_{lam}", config))
    u = shorten(udit.get_config("digits"), steps["udit"])
    u.model_overrides.hidden_size = 16 if tiny else UDIT_HIDDEN
    if tiny:  # one block per stage, XLA's grouped conv, the plain baseline's MLP: the smoke
        # run is mostly compilation
        u.model_overrides.update(depth_latent=1, depthwise="xla", vanilla=True)
    out.append(Stage("U-DiT", "udit", u))
    return out


def finished(workdir: str, num_steps: int) -> bool:
    try:
        step, _ = ckpt_lib.read_meta(workdir, None)
    except (FileNotFoundError, ValueError):
        return False
    return step >= num_steps


def train(stage: Stage, workdir: str) -> float | None:
    """Train (or resume) one stage; seconds spent, None if it was already finished."""
    if finished(workdir, stage.config.num_steps):
        print(f"[{stage.name}] already trained ({workdir})")
        return None
    print(f"[{stage.name}] training {stage.config.num_steps} steps in {workdir}")
    start = time.perf_counter()
    train_lib.train_and_evaluate(stage.config, workdir)
    return time.perf_counter() - start


def sample(workdir: str, labels: np.ndarray, *, sampling_steps: str, seed: int,
           batch_size: int, sampler: str | None = None) -> dict:
    """Samples of a trained stage and the wall-clock cost: the first batch compiles (and, for
    DyDiT, calibrates the token capacities); images/s is timed over the other batches.
    `sampler`: default the run config's."""
    mesh = parallel.make_mesh((-1, 1, 1))
    with jax.set_mesh(mesh):
        _, config, parts, weights = model_parts.restore_weights(workdir, mesh)
        parts, weights = sample_lib.inference_form(parts, weights, mesh,
                                                   config.get("sharding_rules"))
        options = dict(mesh=mesh, sampling_steps=sampling_steps,
                       sampler=sampler or config.sample.sampler,
                       cfg_scale=config.sample.cfg_scale,
                       guided_channels=config.sample.guided_channels,
                       compiler_options=config.get("compiler_options"))
        engine = None
        if isinstance(parts.config, models.DyDiTConfig):
            engine = DyDiTEngine(parts, weights, capacity="calibrate", **options)
            batch_sampler = engine
        else:
            batch_sampler = functools.partial(sample_lib.make_batch_sampler(parts, **options),
                                              weights)
        images, times = [], []
        start = time.perf_counter()
        for _, x in sample_lib.iter_batches(
            batch_sampler, labels, np.arange(len(labels)), batch_size=batch_size, seed=seed,
            mesh=mesh, progress=False,
        ):
            times.append(time.perf_counter() - start)
            images.append(sample_lib.to_uint8(x))
            start = time.perf_counter()
    timed = times[1:] or times  # one batch only: compile included, say so in the table
    timed_images = len(labels) - batch_size if len(times) > 1 else len(labels)
    result = {
        "images": np.concatenate(images)[: len(labels)],
        "images_per_s": timed_images / sum(timed),
        "first_batch_s": times[0],
        "model_config": parts.config,
    }
    if engine is not None:
        report = engine.report()
        result["engine"] = {k: report[k] for k in (
            "plan_flops_ratio", "achieved_flops_ratio", "executed_flops_ratio", "signatures",
            "compile_seconds", "tokens_overflow", "token_fraction")}
    return result


def _stage_result(stage_dir: str, settings: dict) -> dict | None:
    """A stage's row from an earlier run with the same checkpoint and sampling settings."""
    try:
        with open(os.path.join(stage_dir, "result.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved["row"] if saved.get("settings") == settings else None


def gflops(model_config, engine: dict | None) -> float:
    """Forward GFLOPs per image (the papers' convention: multiply-adds)."""
    if isinstance(model_config, models.UDiTConfig):
        return flops.udit_macs(model_config) / 1e9
    if engine is not None:
        return flops.dynamic_macs(model_config, engine["achieved_flops_ratio"],
                                  dydit_convention=True) / 1e9
    return flops.dit_macs(model_config, dydit_convention=True) / 1e9


def evaluate(images: np.ndarray, labels: np.ndarray, workdir: str) -> dict:
    """digits-FID (and precision/recall) against held-out real digits, class accuracy."""

    extractor = digits_classifier.DigitsClassifier(workdir)  # trained once, cached there
    reference, _ = digits_classifier.digits_uint8(images.shape[1], "test")
    return eval_lib.evaluate_arrays(images, reference, extractor, labels=labels)


def write_table(rows: list[dict], path: str, header: str) -> str:
    lines = [
        header, "",
        "| model | GFLOPs/img | FLOPs ratio | images/s | digits-FID | precision | recall "
        "| class accuracy | train time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['flops_ratio']:.3f}" if r.get("flops_ratio") is not None else "1 (DiT)" \
            if r["name"] == "DiT" else "-"
        train_s = f"{r['train_s'] / 60:.1f} min" if r.get("train_s") else "-"
        lines.append(
            f"| {r['name']} | {r['gflops']:.4f} | {ratio} | {r['images_per_s']:.1f} "
            f"| {r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} "
            f"| {100 * r['class_accuracy']:.1f}% | {train_s} |"
        )
    text = "\n".join(lines) + "\n"
    files.write_text(path, text)
    return text


def plot(rows: list[dict], path: str, title: str) -> None:
    """FLOPs (x) against digits-FID (y), one labelled point per model, as a PNG (PIL only)."""

    width, height, margin = 720, 480, 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs = np.array([r["gflops"] * 1e3 for r in rows])  # MFLOPs: digits models are tiny
    ys = np.array([r["fid"] for r in rows])
    x_lo, x_hi = _axis_range(xs)
    y_lo, y_hi = _axis_range(ys)

    def to_px(x, y):
        px = margin + (x - x_lo) / (x_hi - x_lo) * (width - 2 * margin)
        py = height - margin - (y - y_lo) / (y_hi - y_lo) * (height - 2 * margin)
        return px, py

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for tick in np.linspace(x_lo, x_hi, 5):
        px, _ = to_px(tick, y_lo)
        draw.line([px, height - margin, px, height - margin + 5], fill="black")
        draw.text((px - 15, height - margin + 8), f"{tick:.1f}", fill="black")
    for tick in np.linspace(y_lo, y_hi, 5):
        _, py = to_px(x_lo, tick)
        draw.line([margin - 5, py, margin, py], fill="black")
        draw.text((margin - 45, py - 6), f"{tick:.2f}", fill="black")
    draw.text((width / 2 - 80, height - margin + 30), "MFLOPs per image (MACs)", fill="black")
    draw.text((10, margin - 30), "digits-FID (lower is better)", fill="black")
    draw.text((margin, 15), title, fill="black")
    colours = {"DiT": "black", "U-DiT": "green"}
    for r, x, y in zip(rows, xs, ys, strict=True):
        px, py = to_px(x, y)
        colour = colours.get(r["name"], "red")
        draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=colour)
        draw.text((px + 8, py - 14), r["name"], fill=colour)
    dydit = [(x, y) for r, x, y in zip(rows, xs, ys, strict=True) if r["name"].startswith("DyDiT")]
    dit = [(x, y) for r, x, y in zip(rows, xs, ys, strict=True) if r["name"] == "DiT"]
    line = sorted(dydit + dit)
    if len(line) > 1:
        draw.line([to_px(x, y) for x, y in line], fill="red", width=1)
    with files.atomic_path(path, suffix=".png") as tmp:
        image.save(tmp)


def _axis_range(values: np.ndarray) -> tuple[float, float]:
    lo, hi = float(values.min()), float(values.max())
    pad = 0.1 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.1
    return max(0.0, lo - pad), hi + pad


def run(workdir: str, *, scale: str = "full", lambdas=(0.7, 0.5), num_samples: int | None = None,
        sampling_steps: str | None = None, seed: int = 0, batch_size: int = 100) -> list[dict]:
    if scale not in SCALES:
        raise ValueError(f"--scale must be one of {sorted(SCALES)}, got {scale!r}")
    for lam in lambdas:
        if not 0 < lam <= 1:
            raise ValueError(f"--lambdas must be in (0, 1], got {lam}")
    setting = SCALES[scale]
    num_samples = num_samples or setting["samples"]
    sampling_steps = sampling_steps or setting["sampling"]
    os.makedirs(workdir, exist_ok=True)
    labels = np.arange(num_samples, dtype=np.int32) % 10  # balanced, as sample.py's default
    batch_size = min(batch_size, num_samples)
    rows = []
    for stage in stages(workdir, scale, list(lambdas)):
        stage_dir = os.path.join(workdir, stage.key)
        train_s = train(stage, stage_dir)
        step, _ = ckpt_lib.read_meta(stage_dir, None)
        settings = dict(step=step, num_samples=num_samples, sampling_steps=sampling_steps,
                        seed=seed)
        row = _stage_result(stage_dir, settings)
        if row is not None:
            print(f"[{stage.name}] already sampled and evaluated ({stage_dir}/result.json)")
            rows.append(row)
            continue
        print(f"[{stage.name}] sampling {num_samples} images, {sampling_steps} steps")
        s = sample(stage_dir, labels, sampling_steps=sampling_steps, seed=seed,
                   batch_size=batch_size)
        sample_lib.save_npz(os.path.join(stage_dir, "samples.npz"), s["images"], labels)
        metrics = evaluate(s["images"], labels, workdir)
        engine = s.get("engine")
        row = {
            "name": stage.name,
            "gflops": gflops(s["model_config"], engine),
            "flops_ratio": engine["achieved_flops_ratio"] if engine else None,
            "images_per_s": s["images_per_s"],
            "first_batch_s": s["first_batch_s"],
            "fid": metrics["fid"],
            "precision": metrics["precision"],
            "recall": metrics["recall"],
            "class_accuracy": metrics["class_accuracy"],
            "train_s": train_s,
            "engine": engine,
        }
        print(f"[{stage.name}] {json.dumps({k: v for k, v in row.items() if k != 'engine'})}")
        files.write_text(os.path.join(stage_dir, "result.json"),
                     json.dumps({"settings": settings, "row": row}, indent=1))
        rows.append(row)
    guidance = stages(workdir, scale, [])[0].config.sample.cfg_scale
    header = (
        f"Digits, {num_samples} samples per model (balanced labels, seed {seed}), "
        f"{sampling_steps} DDPM steps, guidance {guidance}; "
        f"digits-FID on our digits classifier's features against the digits held out from its "
        "training; "
        f"images/s excludes the first (compiling) batch; machine: {_machine()}."
    )
    write_table(rows, os.path.join(workdir, "results.md"), header)
    plot(rows, os.path.join(workdir, "flops_vs_fid.png"),
         "Digits: FLOPs vs FID (DiT, DyDiT, U-DiT)")
    files.write_text(os.path.join(workdir, "results.json"), json.dumps(rows, indent=1))
    return rows


def _machine() -> str:
    platform = jax.devices()[0].platform
    return f"{os.cpu_count()} CPU cores, {jax.device_count()} x {platform}, jax {jax.__version__}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="workdirs/digits_paper")
    p.add_argument("--scale", default="full", choices=sorted(SCALES))
    p.add_argument("--lambdas", default="0.7,0.5",
                   type=lambda s: [float(v) for v in s.split(",") if v])
    p.add_argument("--num_samples", type=int, default=None)
    p.add_argument("--sampling_steps", default=None, help="respacing, e.g. 50 or ddim25")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cli.start()  # with the trainer's progress lines
    try:
        start = time.perf_counter()
        rows = run(args.workdir, scale=args.scale, lambdas=args.lambdas,
                   num_samples=args.num_samples, sampling_steps=args.sampling_steps,
                   seed=args.seed)
    except ValueError as err:
        return cli.fail(err)
    print(open(os.path.join(args.workdir, "results.md")).read())
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min; {len(rows)} models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
