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
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image
from tqdm.auto import tqdm

from dydit_jax import checkpoint as ckpt_lib
from dydit_jax import config_lib, files, model_parts, models, parallel
from dydit_jax import diffusion as diffusion_lib
from dydit_jax import dynamic as dynamic_lib
from dydit_jax import vae as vae_lib


def make_batch_sampler(
    parts: Any,
    *,
    mesh,
    sampling_steps: str = "250",
    sampler: str = "ddpm",
    cfg_scale: float = 1.0,
    guided_channels: int | None = None,
    cfg_interval=(0.0, 1.0),
    eta: float = 0.0,
    compiler_options=None,
) -> Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]:
    """A jitted fn(params, key, indices, labels) -> float32 samples (B, H, W, C), model space,
    for a model split as `model_parts.ModelParts` (graphdef, buffers, shardings, config).

    Row r is image number indices[r] of the run (see `initial_noise`).
    `cfg_scale` 1.0 samples without guidance; otherwise the network sees [x; x] with labels
    [y; null] (reference behaviour) at the steps inside `cfg_interval` (`guidance_steps`) and
    the conditional rows alone elsewhere. `guided_channels` None or -1 guides every eps
    channel; 3 reproduces the reference's 3-of-4-channel quirk.
    """
    graphdef, buffers, config = parts.graphdef, parts.buffers, parts.config
    image_shape = (config.input_size, config.input_size, config.in_channels)
    guided_channels = diffusion_lib.check_sampler(sampler, guided_channels, sampling_steps)
    diffusion = diffusion_lib.create_diffusion(sampling_steps)
    guided = cfg_scale != 1.0
    guided_steps = diffusion_lib.guidance_steps(diffusion, cfg_interval)

    def sample(params, key, indices, labels):
        model = nnx.merge(graphdef, params, buffers)
        z, loop_keys = diffusion_lib.initial_noise(key, indices, image_shape)
        model_fn = lambda x, t: model(x, t, labels)
        guided_fn = None
        if guided:
            guided_fn = diffusion_lib.classifier_free_guidance(
                model, labels, config.num_classes, cfg_scale, guided_channels
            )
        return diffusion_lib.sample_loop(
            diffusion, model_fn, z, loop_keys, sampler=sampler, eta=eta,
            guided_fn=guided_fn, guided_steps=guided_steps,
        )

    rows = parallel.batch_sharding(mesh)
    rep = parallel.replicated(mesh)
    return parallel.jit(
        sample, mesh=mesh, compiler_options=compiler_options,
        in_shardings=(parts.param_shardings, rep, rows, rows), out_shardings=rows,
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
        try:
            values = [int(v) for v in (spec.split(",") if isinstance(spec, str) else spec)]
        except ValueError:
            raise ValueError(
                f"--labels {spec!r} is not balanced, random or class ids like 0,3,7"
            ) from None
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
    decode: Callable[[jax.Array], jax.Array] | None = None,
) -> np.ndarray:
    """Sample len(labels) images in batches; returns float32 (N, H, W, C) on the host.

    `batch_sampler(key, indices, labels)`: e.g. `functools.partial(make_batch_sampler(...),
    params)`, or a `dynamic.DyDiTEngine`. `decode`: applied to each sampled batch on the
    devices (e.g. the VAE decoder).
    """
    batches = iter_batches(
        batch_sampler, labels, np.arange(len(labels)), batch_size=batch_size, seed=seed,
        mesh=mesh, progress=progress, decode=decode,
    )
    return np.concatenate([x for _, x in batches], axis=0)


def iter_batches(
    batch_sampler: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    labels: np.ndarray,
    indices: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    mesh,
    progress: bool = True,
    decode: Callable[[jax.Array], jax.Array] | None = None,
):
    """Yield (image numbers, float32 host images) batch by batch for the image numbers
    `indices` of a run (labels[k] is the label of image indices[k]); every process gets every
    batch. Image i depends on (seed, i, its label) only, so any subset and any batch size
    give the same images."""
    ways = parallel.batch_size_per_step(mesh)
    batch_size = max(ways, math.ceil(batch_size / ways) * ways)
    base = jax.random.key(seed)
    starts = range(0, len(indices), batch_size)
    bar = tqdm(total=len(indices), desc="sampling", unit="img", disable=not progress)
    for start in starts:
        idx = np.asarray(indices[start : start + batch_size], np.int32)
        padded = {  # last batch: pad, then trim
            "y": np.resize(np.asarray(labels[start : start + batch_size]), batch_size),
            "i": np.resize(idx, batch_size),
        }
        rows = parallel.global_batch_from_full(
            {k: v.astype(np.int32) for k, v in padded.items()}, mesh
        )
        x = batch_sampler(base, rows["i"], rows["y"])
        if decode is not None:
            x = decode(x)
        if jax.process_count() > 1:
            x = multihost_utils.process_allgather(x, tiled=True)
        bar.update(len(idx))
        yield idx, np.asarray(jax.device_get(x))[: len(idx)]
    bar.close()


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
    with files.atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def save_npz(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    """`arr_0` uint8 NHWC and `arr_1` int labels, written atomically."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"samples must be uint8 NHWC, got {images.dtype} {images.shape}")
    files.atomic_write(path, lambda f: np.savez(f, images, np.asarray(labels, np.int64)))


def grid_upscale(image_size: int) -> int:
    """Tiny images (digits) are enlarged in PNG grids so that they can be read by eye."""
    return max(1, 64 // image_size)


def inference_form(parts, weights, mesh, rules=None):
    """(parts, weights) of the model's inference form: U-DiT's re-parameterised FFNs fused
    (`models.fuse_model_params`, a pure function jitted straight into the new shardings);
    every other model comes back as it is."""

    fused_config, _ = models.fuse_model_params(parts.config, {})
    if fused_config == parts.config:
        return parts, weights
    fused_parts = model_parts.build_model(fused_config, mesh, rules=rules, init_params=False)
    fuse = jax.jit(
        lambda p: models.fuse_model_params(parts.config, p)[1],
        out_shardings=fused_parts.param_shardings,
    )
    return fused_parts, fuse(weights)


class SampleRun:
    """The files of one sampling run in OUT, so that a long run survives interruption.

    Finished batches go to OUT/parts/part-<first image>-<count>.npz (uint8 images, labels,
    image numbers), each written atomically; OUT/parts/run.json holds the settings they
    belong to. A rerun with the same settings samples only the images no part holds (image
    i depends on (seed, i, label) only, so batch size and device count may change);
    `finish` assembles OUT/samples.npz (exactly N images, each once), OUT/grid.png and
    OUT/run.json, then removes the parts. Finished samples are never overwritten: other
    settings for an OUT that holds them (or holds parts) are refused.
    """

    PARTS, RUN = "parts", "run.json"

    def __init__(self, out: str, settings: dict):
        self.out, self.settings = out, json.loads(json.dumps(settings))
        self.parts_dir = os.path.join(out, self.PARTS)
        self.writer = jax.process_index() == 0

    def _differences(self, path: str) -> list[str]:
        try:
            with open(path) as f:
                found = json.load(f)["settings"]
        except (OSError, ValueError, KeyError) as e:
            return [f"unreadable {path}: {e}"]
        keys = sorted(set(found) | set(self.settings))
        return [f"{k}: {found.get(k)!r} there, {self.settings.get(k)!r} now" for k in keys
                if found.get(k) != self.settings.get(k)]

    def completed(self) -> dict | None:
        """The summary of a finished run of these settings in OUT (None: not finished);
        ValueError if OUT holds samples of other settings or of an unknown run."""
        final = os.path.join(self.out, "samples.npz")
        if not os.path.exists(final):
            return None
        record = os.path.join(self.out, self.RUN)
        if not os.path.exists(record):
            raise ValueError(
                f"{final} exists and is not from a run of sample.py with these settings; "
                "choose another --out (nothing is overwritten)"
            )
        differences = self._differences(record)
        if differences:
            raise ValueError(
                f"{self.out} already holds the samples of another run "
                f"({'; '.join(differences[:4])}); choose another --out"
            )
        with open(record) as f:
            return json.load(f)["summary"]

    def start(self) -> np.ndarray:
        """Open (or resume) the run; returns a bool mask over images: True = already done."""
        record = os.path.join(self.parts_dir, self.RUN)
        if os.path.exists(record):
            differences = self._differences(record)
            if differences:
                raise ValueError(
                    f"{self.parts_dir} holds an unfinished run with other settings "
                    f"({'; '.join(differences[:4])}); resume it with the same flags, or "
                    "choose another --out"
                )
        elif self.writer:
            os.makedirs(self.parts_dir, exist_ok=True)
            files.write_json(record, {"settings": self.settings})
        done = np.zeros(self.settings["num_samples"], bool)
        for _, indices in self._parts():
            done[indices] = True
        if jax.process_count() > 1:  # everyone has read the parts before any is written
            multihost_utils.sync_global_devices("sample-run-start")
        return done

    def _parts(self):
        """(path, image numbers) of every finished part."""
        if not os.path.isdir(self.parts_dir):
            return
        for name in sorted(os.listdir(self.parts_dir)):
            if name.startswith("part-") and name.endswith(".npz"):
                path = os.path.join(self.parts_dir, name)
                try:
                    with np.load(path) as f:
                        indices = f["indices"]
                except (OSError, ValueError, KeyError) as e:
                    raise ValueError(
                        f"{path} is unreadable ({e}); delete it and run again to resample "
                        "its images"
                    ) from e
                yield path, indices

    def add(self, indices: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        if not self.writer:
            return
        path = os.path.join(self.parts_dir, f"part-{int(indices[0]):08d}-{len(indices)}.npz")
        files.atomic_write(
            path, lambda f: np.savez(f, images=images, labels=labels, indices=indices)
        )

    def finish(self, summary: dict, grid_columns: int | None, upscale: int) -> None:
        """Assemble OUT/samples.npz from the parts, write the grid and OUT/run.json, and
        remove the parts (process 0; the others wait)."""
        if self.writer:
            n = self.settings["num_samples"]
            images = labels = None
            seen = np.zeros(n, bool)
            for path, _ in self._parts():
                with np.load(path) as f:
                    part, idx = f["images"], f["indices"]
                    if images is None:
                        images = np.zeros((n, *part.shape[1:]), np.uint8)
                        labels = np.zeros(n, np.int64)
                    fresh = ~seen[idx]
                    images[idx[fresh]], labels[idx[fresh]] = part[fresh], f["labels"][fresh]
                    seen[idx] = True
            if images is None or not seen.all():
                missing = n if images is None else int((~seen).sum())
                raise ValueError(f"{self.parts_dir}: {missing} of {n} images have no part")
            save_npz(os.path.join(self.out, "samples.npz"), images, labels)
            grid = make_grid(images[: min(n, grid_count(images.shape[1]))], ncol=grid_columns)
            save_png(grid, os.path.join(self.out, "grid.png"), upscale=upscale)
            files.write_json(
                os.path.join(self.out, self.RUN), {"settings": self.settings, "summary": summary}
            )
            shutil.rmtree(self.parts_dir)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("sample-run-finish")


def grid_count(image_size: int) -> int:
    """Images in the PNG grid: up to 400 small ones, 64 of ImageNet size."""
    return 400 if image_size <= 64 else 64


def sample_from_workdir(
    workdir: str,
    out: str,
    *,
    num_samples: int,
    sampling_steps: str | None = None,
    sampler: str | None = None,
    cfg_scale: float | None = None,
    guided_channels: int | None = None,
    cfg_interval=None,
    seed: int = 0,
    labels: str | None = None,
    batch_size: int | None = None,
    use_ema: bool = True,
    step: int | None = None,
    progress: bool = True,
    dynamic: bool | None = None,
    token_capacity: str | None = None,
    width_multiple: int | None = None,
    layers_per_call: int | None = None,
    vae: str | None = None,
    mesh_shape=None,
) -> dict:
    """Load the latest (or given) checkpoint of a training workdir and export samples.

    Options left as None take the values of the run's config (`config.sample`). Writes
    OUT/samples.npz (arr_0 uint8 NHWC, arr_1 labels; the evaluation suite's format),
    OUT/grid.png and OUT/run.json; returns a summary. `vae`: a directory written by
    `python -m dydit_jax.convert vae`; latent models' samples are decoded to RGB with it
    (without it they are exported in model space). Resumable: see `SampleRun`.
    U-DiT runs in its fused inference form (`inference_form`). DyDiT checkpoints run the
    inference engine (dydit_jax/dynamic) unless `dynamic` is False (the masked model); its
    report (achieved FLOPs ratio, compiles, token overflow) goes into the summary and
    OUT/dynamic.json. The mesh is this machine's, never the training run's: `mesh_shape`
    (sizes or a string like '(2,4,1)'; default every device, data parallel); the weights
    are restored onto it whatever mesh wrote them.
    """

    if num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {num_samples}")
    if sampler is not None:
        # before --out is created (the model is built later)
        diffusion_lib.check_sampler(sampler, None)
    if cfg_interval is not None:
        try:
            cfg_interval = diffusion_lib.parse_cfg_interval(cfg_interval)
        except ValueError as e:
            raise ValueError(f"--cfg_interval: {e}") from None
    dynamic_flag = dynamic
    if isinstance(mesh_shape, str):
        mesh_shape = parallel.parse_mesh_shape(mesh_shape)
    mesh_shape = tuple(parallel.INFERENCE_MESH if mesh_shape is None else mesh_shape)
    try:
        parallel.resolve_mesh_shape(mesh_shape, jax.device_count())
    except ValueError as e:
        raise ValueError(f"--mesh_shape: {e}") from None
    if "://" not in out and (
        os.path.isdir(ckpt_lib.checkpoint_dir(out))
        or os.path.realpath(out) == os.path.realpath(workdir)
    ):
        raise ValueError(
            f"--out {out} is a training run's workdir (it holds checkpoints/, and sampling "
            "would overwrite its grid.png and run files); choose another --out, e.g. "
            f"{os.path.join(workdir, 'samples')}"
        )
    step, meta = ckpt_lib.read_meta(workdir, step)
    config = ml_collections.ConfigDict(meta["config"])
    sample_cfg = config.sample
    sampling_steps = sample_cfg.steps if sampling_steps is None else sampling_steps
    sampler = sample_cfg.sampler if sampler is None else sampler
    cfg_scale = sample_cfg.cfg_scale if cfg_scale is None else cfg_scale
    if not float(cfg_scale) >= 1.0:
        raise ValueError(f"--cfg_scale must be >= 1 (1 = no guidance), got {cfg_scale}")
    guided_flag = guided_channels is not None
    if guided_channels is None:
        guided_channels = sample_cfg.guided_channels
    batch_size = sample_cfg.batch_size if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    # the spacing, and a step count the sampler can run
    diffusion_lib.check_sampler(sampler, None, sampling_steps, config.diffusion_steps)
    if cfg_interval is None:
        cfg_interval = config_lib.cfg_interval(sample_cfg)
    model_config = config_lib.validate_config(config, training=False)
    label_array = make_labels(labels, num_samples, model_config.num_classes, seed)
    if dynamic is None:
        dynamic = sample_cfg.get("dynamic", True)
    channels_in = model_config.in_channels
    if guided_flag and not (guided_channels == -1 or 1 <= guided_channels <= channels_in):
        raise ValueError(
            f"--guided_channels={guided_channels}: this model has {channels_in} channel"
            f"{'s' if channels_in > 1 else ''}; use -1 (all) or 1..{channels_in}"
        )
    engine_flags = {"--dynamic": dynamic_flag, "--token_capacity": token_capacity,
                    "--width_multiple": width_multiple, "--layers_per_call": layers_per_call}
    given = [name for name, value in engine_flags.items() if value]
    if given and not isinstance(model_config, models.DyDiTConfig):
        logging.warning(
            "%s: DyDiT engine option%s ignored, %s is a %s run", ", ".join(given),
            "s" if len(given) > 1 else "", workdir, config.model,
        )
    dynamic = dynamic and isinstance(model_config, models.DyDiTConfig)
    engine_opts = config_lib.engine_options(
        sample_cfg, token_capacity=token_capacity, width_multiple=width_multiple,
        layers_per_call=layers_per_call,
    )
    decoder = LatentDecoder(vae, model_config) if vae else None
    item = "ema_params" if use_ema else "params"
    settings = {
        "workdir": os.path.abspath(workdir), "step": step, "weights": item,
        "num_samples": num_samples, "seed": seed, "labels": labels or "balanced",
        "sampling_steps": str(sampling_steps), "sampler": sampler, "cfg_scale": cfg_scale,
        "guided_channels": guided_channels, "dynamic": bool(dynamic),
        # how many blocks run per compiled call changes no image (only the run time): a run
        # may resume with another value, and runs from before the option match
        "engine": {k: v for k, v in engine_opts.items() if k != "layers_per_call"}
        if dynamic else None,
        "vae": os.path.abspath(vae) if vae else None,
    }
    if cfg_interval != (0.0, 1.0):  # (runs from before the option have no entry)
        settings["cfg_interval"] = list(cfg_interval)
    # uint8 images twice (finished batches, then samples.npz), checked before any sampling
    side = model_config.input_size * (8 if decoder else 1)
    channels = 3 if decoder else model_config.in_channels
    ckpt_lib.check_writable(out, 2 * num_samples * side * side * channels, what="--out")
    run = SampleRun(out, settings)
    finished = run.completed()
    if finished is not None:
        logging.info("%s already holds these samples; nothing to do", out)
        return finished | {"already_complete": True}
    if config.get("dataset") == "latents" and decoder is None:
        logging.warning(
            "this model samples VAE latents; without --vae they are exported in model space, "
            "not as RGB images (convert a VAE with: python -m dydit_jax.convert vae)"
        )
    done = run.start()
    todo = np.flatnonzero(~done)

    mesh = parallel.make_mesh(mesh_shape)
    report = None
    with jax.set_mesh(mesh):
        if len(todo):
            _, _, parts, weights = model_parts.restore_weights(
                workdir, mesh, item=item, step=step
            )
            parts, weights = inference_form(parts, weights, mesh, config.get("sharding_rules"))
            options = dict(
                mesh=mesh, sampling_steps=sampling_steps, sampler=sampler,
                cfg_scale=cfg_scale, guided_channels=guided_channels,
                cfg_interval=cfg_interval, compiler_options=config.get("compiler_options"),
            )
            if dynamic:
                engine = dynamic_lib.DyDiTEngine(parts, weights, **options, **engine_opts)
                batch_sampler = engine
            else:
                engine = None
                batch_sampler = functools.partial(make_batch_sampler(parts, **options), weights)
            decode = None
            if decoder is not None:
                decode = decoder(mesh)
            for idx, x in iter_batches(
                batch_sampler, label_array[todo], todo, batch_size=batch_size, seed=seed,
                mesh=mesh, progress=progress, decode=decode,
            ):
                run.add(idx, to_uint8(x), label_array[idx])
            report = engine.report() if engine is not None else None
            if jax.process_index() == 0 and report is not None:
                files.write_json(
                    os.path.join(out, "dynamic.json"),
                    report | {"plan": engine.plan.summary(engine.width_multiple)},
                )
    summary = {
        "step": step,
        "num_samples": num_samples,
        "resumed_with": int(done.sum()),
        "out": out,
        "weights": item,
        "sampler": sampler,
        "sampling_steps": sampling_steps,
        "cfg_scale": cfg_scale,
        "cfg_interval": list(cfg_interval),
        "fused": getattr(models.fuse_model_params(model_config, {})[0], "fused", False),
        "vae": settings["vae"],
        "dynamic": report,
    }
    image_size = model_config.input_size * (decoder.factor if decoder else 1)
    columns = model_config.num_classes if labels in (None, "balanced") else None
    run.finish(
        summary, columns if columns is not None and columns <= 20 else None,
        grid_upscale(image_size),
    )
    return summary


class LatentDecoder:
    """The VAE of a `--vae` directory, as `decoder(mesh)` -> a jitted latents -> [-1, 1]
    RGB function sharded like the samples; `factor` is its upsampling."""

    def __init__(self, path: str, model_config):
        if not os.path.isdir(path):
            raise ValueError(
                f"--vae {path}: no such directory; write one with python -m dydit_jax.convert "
                "vae --src FILE --dst DIR"
            )
        self.model = vae_lib.load(path)
        latent = self.model.config.latent_channels
        if latent != model_config.in_channels:
            raise ValueError(
                f"--vae {path} has {latent} latent channels but the model samples "
                f"{model_config.in_channels}; it is not this model's autoencoder"
            )
        self.factor = self.model.config.downsample_factor

    def __call__(self, mesh):
        return vae_lib.ShardedVAE(self.model, mesh).decode_latents
