"""Batched, sharded sampling and export (.npz in the evaluation-suite format, PNG grids).

One batch is one compiled call: noise, the whole sampler loop (guidance included) and the
final [-1, 1] output. Image i of a run draws all its noise from fold_in(seed, i), so an image
depends on (seed, i, label) only: not on the batch size, the device count or the mesh.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image
from tqdm.auto import tqdm

from dydit_jax import diffusion as diffusion_lib
from dydit_jax import parallel

SAMPLERS = diffusion_lib.SAMPLERS


def initial_noise(
    key: jax.Array, indices: jax.Array, image_shape: tuple[int, ...], guided: bool
) -> tuple[jax.Array, jax.Array]:
    """(x_T, per-row sampler keys) of a batch. Row r is image number indices[r] of the run:
    its noise comes from fold_in(key, indices[r]). Under guidance the batch is doubled as
    [z; z] (the second half's keys are folded once more; its state is never used)."""
    row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    noise_keys, loop_keys = jax.vmap(jax.random.split, out_axes=1)(row_keys)
    z = jax.vmap(lambda k: jax.random.normal(k, image_shape, jnp.float32))(noise_keys)
    if guided:
        z = jnp.concatenate([z, z], axis=0)
        uncond_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(loop_keys)
        loop_keys = jnp.concatenate([loop_keys, uncond_keys], axis=0)
    return z, loop_keys


def check_sampler(sampler: str, guided_channels: int | None) -> int | None:
    """Refuse an unknown sampler; returns guided_channels with -1 (all channels) as None."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    return None if guided_channels is not None and guided_channels < 0 else guided_channels


def make_batch_sampler(
    parts: Any,
    *,
    mesh,
    sampling_steps: str = "250",
    sampler: str = "ddpm",
    cfg_scale: float = 1.0,
    guided_channels: int | None = None,
    eta: float = 0.0,
) -> Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]:
    """A jitted fn(params, key, indices, labels) -> float32 samples (B, H, W, C), model space,
    for a model split as `train_lib.ModelParts` (graphdef, buffers, shardings, config).

    Row r is image number indices[r] of the run (see `initial_noise`).
    `cfg_scale` 1.0 samples without guidance; otherwise the batch is doubled as [z; z] with
    labels [y; null] and the first half is returned (reference behaviour). `guided_channels`
    None or -1 guides every eps channel; 3 reproduces the reference's 3-of-4-channel quirk.
    """
    graphdef, buffers, config = parts.graphdef, parts.buffers, parts.config
    image_shape = (config.input_size, config.input_size, config.in_channels)
    guided_channels = check_sampler(sampler, guided_channels)
    diffusion = diffusion_lib.create_diffusion(sampling_steps)
    guided = cfg_scale != 1.0

    def sample(params, key, indices, labels):
        model = nnx.merge(graphdef, params, buffers)
        z, loop_keys = initial_noise(key, indices, image_shape, guided)
        if guided:
            model_fn = diffusion_lib.classifier_free_guidance(
                model, labels, config.num_classes, cfg_scale, guided_channels
            )
        else:
            model_fn = lambda x, t: model(x, t, labels)
        out = diffusion_lib.sample_loop(
            diffusion, model_fn, z, loop_keys, sampler=sampler, eta=eta
        )
        return out[: labels.shape[0]]

    rows = parallel.batch_sharding(mesh)
    rep = parallel.replicated(mesh)
    return jax.jit(
        sample, in_shardings=(parts.param_shardings, rep, rows, rows), out_shardings=rows
    )


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 as the reference does: clip(127.5 * x + 128, 0, 255)."""
    return np.clip(127.5 * np.asarray(x, np.float32) + 128.0, 0, 255).astype(np.uint8)


def make_labels(spec: str | Sequence[int] | None, n: int, num_classes: int, seed: int = 0):
    """Labels for n samples: "balanced" (0..K-1 repeated), "random" (uniform) or a cycled list."""
    if spec is None or spec == "balanced":
        labels = np.arange(n) % num_classes
    elif spec == "random":
        labels = np.random.default_rng(seed).integers(0, num_classes, n)
    else:
        values = [int(v) for v in (spec.split(",") if isinstance(spec, str) else spec)]
        if not values:
            raise ValueError("--labels is empty; give class ids like 0,3,7 or balanced/random")
        bad = [v for v in values if not 0 <= v < num_classes]
        if bad:
            raise ValueError(f"labels {bad} are outside 0..{num_classes - 1} of this model")
        labels = np.resize(np.asarray(values), n)
    return labels.astype(np.int32)


def generate(
    batch_sampler: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    labels: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    mesh,
    progress: bool = True,
) -> np.ndarray:
    """Sample len(labels) images in batches; returns float32 (N, H, W, C) on the host.

    `batch_sampler(key, indices, labels)`: e.g. `functools.partial(make_batch_sampler(...),
    params)`, or a `dynamic.DyDiTEngine`.
    """
    ways = parallel.batch_size_per_step(mesh)
    batch_size = max(ways, math.ceil(batch_size / ways) * ways)
    base = jax.random.key(seed)
    outputs = []
    starts = range(0, len(labels), batch_size)
    bar = tqdm(starts, desc="sampling", unit="batch", disable=not progress)
    for start in bar:
        chunk = labels[start : start + batch_size]
        padded = np.resize(chunk, batch_size).astype(np.int32)  # last batch: pad, then trim
        rows = {"y": padded, "i": np.arange(start, start + batch_size, dtype=np.int32)}
        rows = parallel.global_batch(rows, mesh)
        x = batch_sampler(base, rows["i"], rows["y"])
        if jax.process_count() > 1:
            x = multihost_utils.process_allgather(x, tiled=True)
        outputs.append(np.asarray(jax.device_get(x))[: len(chunk)])
        bar.set_postfix(images=start + len(chunk))
    return np.concatenate(outputs, axis=0)


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 image (rows of `ncol` tiles) with a black border."""
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h,
             pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    return grid


def save_png(image: np.ndarray, path: str, upscale: int = 1) -> None:
    """Write a uint8 HWC image atomically (tmp file + rename); small images can be upscaled."""
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    with _atomic(path) as tmp:
        img.save(tmp, format="PNG")


def save_npz(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    """`arr_0` uint8 NHWC and `arr_1` int labels, written atomically."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"samples must be uint8 NHWC, got {images.dtype} {images.shape}")
    with _atomic(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images, np.asarray(labels, np.int64))


class _atomic:
    """Context manager yielding a temp path in the target's folder, renamed on success."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> str:
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)


def grid_upscale(image_size: int) -> int:
    """Tiny images (digits) are enlarged in PNG grids so that they can be read by eye."""
    return max(1, 64 // image_size)


def inference_form(parts, weights, mesh, rules=None):
    """(parts, weights) of the model's inference form: U-DiT's re-parameterised FFNs fused
    (`models.fuse_model_params`, a pure function jitted straight into the new shardings);
    every other model comes back as it is."""
    from dydit_jax import models, train_lib

    fused_config, _ = models.fuse_model_params(parts.config, {})
    if fused_config == parts.config:
        return parts, weights
    fused_parts = train_lib.build_model(fused_config, mesh, rules=rules, init_params=False)
    fuse = jax.jit(
        lambda p: models.fuse_model_params(parts.config, p)[1],
        out_shardings=fused_parts.param_shardings,
    )
    return fused_parts, fuse(weights)


def sample_from_workdir(
    workdir: str,
    out: str,
    *,
    num_samples: int,
    sampling_steps: str | None = None,
    sampler: str | None = None,
    cfg_scale: float | None = None,
    guided_channels: int | None = None,
    seed: int = 0,
    labels: str | None = None,
    batch_size: int | None = None,
    use_ema: bool = True,
    step: int | None = None,
    progress: bool = True,
    dynamic: bool | None = None,
    token_capacity: str | None = None,
    width_multiple: int | None = None,
) -> dict:
    """Load the latest (or given) checkpoint of a training workdir and export samples.

    Options left as None take the values of the run's config (`config.sample`). Writes
    OUT/samples.npz (arr_0 uint8 NHWC, arr_1 labels) and OUT/grid.png; returns a summary.
    U-DiT runs in its fused inference form (`inference_form`).
    DyDiT checkpoints run the inference engine (dydit_jax/dynamic) unless `dynamic` is
    False (the masked model); its report (achieved FLOPs ratio, compiles, token overflow)
    goes into the summary and OUT/dynamic.json.
    """
    import ml_collections

    from dydit_jax import checkpoint as ckpt_lib
    from dydit_jax import dynamic as dynamic_lib
    from dydit_jax import models, train_lib

    if num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {num_samples}")
    step, meta = ckpt_lib.read_meta(workdir, step)
    config = ml_collections.ConfigDict(meta["config"])
    sample_cfg = config.sample
    sampling_steps = sample_cfg.steps if sampling_steps is None else sampling_steps
    sampler = sample_cfg.sampler if sampler is None else sampler
    cfg_scale = sample_cfg.cfg_scale if cfg_scale is None else cfg_scale
    if guided_channels is None:
        guided_channels = sample_cfg.guided_channels
    batch_size = sample_cfg.batch_size if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    diffusion_lib.space_timesteps(config.diffusion_steps, sampling_steps)  # validates
    model_config = train_lib.validate_config(config)
    label_array = make_labels(labels, num_samples, model_config.num_classes, seed)
    if dynamic is None:
        dynamic = sample_cfg.get("dynamic", True)
    dynamic = dynamic and isinstance(model_config, models.DyDiTConfig)
    engine_opts = train_lib.engine_options(
        sample_cfg, token_capacity=token_capacity, width_multiple=width_multiple
    )

    mesh = parallel.make_mesh(config.mesh_shape)
    item = "ema_params" if use_ema else "params"
    with jax.set_mesh(mesh):
        _, _, parts, weights = train_lib.restore_weights(workdir, mesh, item=item, step=step)
        parts, weights = inference_form(parts, weights, mesh, config.get("sharding_rules"))
        options = dict(
            mesh=mesh, sampling_steps=sampling_steps, sampler=sampler, cfg_scale=cfg_scale,
            guided_channels=guided_channels,
        )
        if dynamic:
            engine = dynamic_lib.DyDiTEngine(parts, weights, **options, **engine_opts)
            batch_sampler = engine
        else:
            engine = None
            batch_sampler = functools.partial(make_batch_sampler(parts, **options), weights)
        images = to_uint8(
            generate(
                batch_sampler, label_array, batch_size=batch_size, seed=seed, mesh=mesh,
                progress=progress,
            )
        )
    report = engine.report() if engine is not None else None
    if jax.process_index() == 0 and report is not None:
        with _atomic(os.path.join(out, "dynamic.json")) as tmp, open(tmp, "w") as f:
            json.dump(report | {"plan": engine.plan.summary(engine.width_multiple)}, f, indent=1)
    if jax.process_index() == 0:
        save_npz(os.path.join(out, "samples.npz"), images, label_array)
        ncol = model_config.num_classes if labels in (None, "balanced") else None
        grid = make_grid(images[: min(len(images), 400)], ncol=ncol)
        save_png(grid, os.path.join(out, "grid.png"), upscale=grid_upscale(model_config.input_size))
    return {
        "step": step,
        "num_samples": num_samples,
        "out": out,
        "weights": item,
        "fused": getattr(parts.config, "fused", False),  # U-DiT's inference form
        "sampler": sampler,
        "sampling_steps": sampling_steps,
        "cfg_scale": cfg_scale,
        "dynamic": report,
    }
