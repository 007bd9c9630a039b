"""Extract VAE posterior moments of an image dataset into latent shards (the training input).

    python -m dydit_jax.data.extract_latents --source tfds:imagenet2012 --split train \\
        --image_size 256 --vae vae/ema --out data/imagenet256 [--tfds_data_dir DIR]
    python -m dydit_jax.data.extract_latents --source folder:/data/imagenet/train \\
        --image_size 256 --vae vae/ema --out data/imagenet256

    python train.py --config=... --config.dataset=latents --config.data_dir=data/imagenet256

Every image gets the ADM centre crop (`dydit_jax.data.images`), goes to [-1, 1], and the VAE
(`--vae`: a directory written by ``python -m dydit_jax.convert vae``) encodes it and its
horizontal flip. Each example is stored as float16 moments (2, h, w, 8) (image, flip; mean
then log-variance after quant_conv) with its int label, in the format of
`dydit_jax.data.latents` (`LatentSource` reads it unchanged). The manifest holds the
extraction's settings under "extraction".

Sources:

* ``tfds:NAME`` - a prepared tensorflow-datasets dataset with "image" and "label" features
  (`--split`, `--tfds_data_dir`). Nothing is downloaded: ImageNet needs the manual download
  and ``tfds build imagenet2012 --manual_dir DIR``. Prepared with
  ``--file_format=array_record`` it is read by random access; the default TFRecord format is
  read shard by shard with absolute slices of the split (``train[1000:2000]``).
* ``folder:PATH`` - one subfolder per class (classes = sorted subfolder names -> labels
  0..K-1), images found recursively in each; see `dydit_jax.data.images`.

Shards, processes, devices: the first `--limit` examples (default all) are cut into
`--num_shards` contiguous shards (default: about 1000 examples each). Process p of P
(`jax.process_index()` / `jax.process_count()`; start several with the variables that
`dydit_jax.parallel.initialize_distributed` reads) writes shards p, p + P, ...; in a process the
batch (`--batch_size` images, so twice that many VAE inputs) is sharded over the local devices.

With several processes (hosts), --out must be one directory that all of them see (a shared
file system), and every process runs the same command.

Resuming: settings are recorded first in OUT/extraction.json; a shard is written to a ``.tmp``
name and renamed when complete (its labels go to ``shard-...labels.npy`` next to it). Run the
same command again after an interruption: finished shards (checked by their record count) are
kept, partial ones rewritten. When every shard exists, process 0 writes labels.npy and
manifest.json (last: a directory without a manifest is an incomplete extraction) and removes
the bookkeeping files. An output directory holding a different extraction is refused.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import itertools
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from array_record.python import array_record_module
from jax.experimental import multihost_utils
from tqdm import tqdm

from dydit_jax import checkpoint as ckpt_lib
from dydit_jax import cli, files, parallel, vae
from dydit_jax.data import images as images_lib
from dydit_jax.data.latents import (
    HEADER_BYTES,
    MAGIC,
    MANIFEST,
    count_records,
    shard_name,
    shard_sizes,
    write_manifest,
    write_shard,
)
from dydit_jax.vae import folder as vae_folder

EXTRACTION_FILE = "extraction.json"  # the settings of an extraction in progress
EXAMPLES_PER_SHARD = 1000  # the default shard size
TOOL = "dydit_jax.data.extract_latents"
# settings that must agree for a directory to be resumed (or to count as already done)
IDENTITY_KEYS = (
    "tool", "source", "split", "source_id", "source_examples", "num_examples", "num_shards",
    "image_size", "crop", "vae_sha256", "vae_config", "vae_dtype", "kind", "shape", "dtype",
)
_VAE_DTYPES = ("float32", "bfloat16")


def shards_of_process(num_shards: int, process_index: int, process_count: int) -> range:
    """The shards process `process_index` of `process_count` writes: p, p + P, p + 2P, ..."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return range(process_index, num_shards, process_count)


def labels_name(index: int, num_shards: int) -> str:
    """The labels of a finished shard, kept until the manifest is written."""
    return shard_name(index, num_shards).replace(".array_record", ".labels.npy")


# ----------------------------------------------------------------------------------- sources


class FolderSource:
    """``folder:PATH``: an image folder with one subfolder per class."""

    def __init__(self, path: str):
        self.folder = images_lib.ImageFolder(path)
        self.classes = self.folder.classes
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.folder)

    def identity(self) -> dict:
        return {"source": "folder", "split": None, "source_id": self.folder.fingerprint()}

    def info(self) -> dict:
        return {"source_path": self.folder.root, "classes": self.classes}

    def read(self, start: int, end: int) -> Iterator[tuple[object, int, str]]:
        """(raw image, label, name) of examples start..end-1, in order."""
        for i in range(start, end):
            yield self.folder.path(i), int(self.folder.labels[i]), self.folder.path(i)


class TfdsSource:
    """``tfds:NAME``: a prepared tensorflow-datasets dataset (never downloaded here)."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        try:
            import tensorflow_datasets as tfds  # heavy: tfds sources only
        except ImportError as e:
            raise ValueError(
                "--source tfds:... needs TensorFlow Datasets, the imagenet extra: "
                "pip install -e '.[imagenet]'"
            ) from e
        self._tfds = tfds
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # DatasetNotFoundError and friends
            raise ValueError(f"tfds cannot open dataset {name!r}: {e}") from e
        root = data_dir or "~/tensorflow_datasets"
        if not builder.is_prepared():
            manual = (
                " ImageNet needs the manual download: put ILSVRC2012_img_train.tar and "
                "ILSVRC2012_img_val.tar from image-net.org in a folder MANUAL and run"
                if name.split("/")[0] == "imagenet2012" else " Run"
            )
            raise ValueError(
                f"tfds dataset {name} is not prepared in {root} (this tool never downloads)."
                f"{manual} `tfds build {name} --data_dir {root} --manual_dir MANUAL` (add "
                "--file_format=array_record for random access), then rerun with "
                f"--tfds_data_dir {root}"
            )
        features = builder.info.features
        missing = [k for k in ("image", "label") if k not in features]
        if missing:
            raise ValueError(
                f"tfds dataset {name} has no {missing} feature(s) (it has {sorted(features)}); "
                "the extraction reads 'image' and 'label'"
            )
        try:
            self.num_examples = int(builder.info.splits[split].num_examples)
            absolute = tfds.core.ReadInstruction.from_spec(split).to_absolute(
                builder.info.splits
            )
        except (ValueError, KeyError, AssertionError) as e:
            raise ValueError(
                f"bad --split {split!r} for tfds dataset {name} (splits: "
                f"{sorted(builder.info.splits)}): {e}"
            ) from e
        self.name, self.split, self.builder, self.data_dir = name, split, builder, root
        label = features["label"]
        self.num_classes = int(getattr(label, "num_classes", 0) or 0) or None
        self.classes = list(getattr(label, "names", None) or []) or None
        random_access = tfds.core.file_adapters.FileFormat.with_random_access()
        self._data_source = None
        if builder.info.available_file_formats() & set(random_access):
            self._data_source = builder.as_data_source(
                split, decoders={"image": tfds.decode.SkipDecoding()}
            )
            self.num_examples = len(self._data_source)
        elif len(absolute) == 1:
            self._split_name = absolute[0].splitname
            self._offset = absolute[0].from_ or 0
        else:
            raise ValueError(
                f"--split {split!r} combines several splits, which needs random access: "
                f"prepare {name} with `tfds build --file_format=array_record`"
            )

    def __len__(self) -> int:
        return self.num_examples

    def identity(self) -> dict:
        return {"source": f"tfds:{self.name}", "split": self.split,
                "source_id": self.builder.info.full_name}

    def info(self) -> dict:
        return {"tfds_data_dir": os.path.abspath(os.path.expanduser(self.data_dir)),
                "classes": self.classes}

    def read(self, start: int, end: int) -> Iterator[tuple[object, int, str]]:
        where = lambda i: f"{self.name} {self.split} example {i}"
        if self._data_source is not None:
            for lo in range(start, end, 64):
                indices = list(range(lo, min(lo + 64, end)))
                if hasattr(self._data_source, "__getitems__"):
                    rows = self._data_source.__getitems__(indices)
                else:
                    rows = [self._data_source[i] for i in indices]
                for i, row in zip(indices, rows, strict=True):
                    yield row["image"], int(row["label"]), where(i)
            return
        tfds = self._tfds
        _hide_gpus_from_tensorflow()
        a, b = self._offset + start, self._offset + end
        ds = self.builder.as_dataset(
            split=f"{self._split_name}[{a}:{b}]",
            decoders={"image": tfds.decode.SkipDecoding()},
            shuffle_files=False,
            read_config=tfds.ReadConfig(try_autocache=False),
        )
        count = 0
        for i, row in zip(itertools.count(start), tfds.as_numpy(ds)):
            count += 1
            yield row["image"], int(row["label"]), where(i)
        if count != end - start:
            raise ValueError(f"{self.name} {self.split}[{start}:{end}] gave {count} examples")


def _hide_gpus_from_tensorflow() -> None:
    """tf.data only reads files here: keep a GPU build of TensorFlow off the accelerators
    that JAX uses (tensorflow-cpu has none to hide)."""
    try:
        import tensorflow as tf  # heavy: tfds sources only

        tf.config.set_visible_devices([], "GPU")
    except (ImportError, RuntimeError, ValueError):  # RuntimeError: TF already initialised
        pass


def open_source(source: str, *, split: str = "train", tfds_data_dir: str | None = None):
    """A FolderSource or TfdsSource from ``folder:PATH`` or ``tfds:NAME``."""
    kind, sep, rest = source.partition(":")
    if not sep or not rest or kind not in ("folder", "tfds"):
        raise ValueError(
            f"--source {source!r}: use tfds:NAME (e.g. tfds:imagenet2012) or folder:PATH"
        )
    if kind == "folder":
        return FolderSource(rest)
    return TfdsSource(rest, split, tfds_data_dir)


# --------------------------------------------------------------------------------- settings


def _differences(found: dict, wanted: dict) -> str:
    diffs = [
        f"{k}: {found.get(k)!r} there, {wanted[k]!r} now"
        for k in IDENTITY_KEYS if found.get(k) != wanted[k]
    ]
    return "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")


def _write_npy(path: str, arr: np.ndarray) -> None:
    files.atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))


def _check_out(out: str, settings: dict) -> dict | None:
    """The manifest when `out` already holds this very extraction (complete), None when it is
    new or an unfinished run of it; ValueError when it holds something else."""
    ckpt_lib.check_writable(out, what="--out")  # a file, below a file, read-only
    manifest_path = os.path.join(out, MANIFEST)
    if os.path.exists(manifest_path):
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
            found = manifest.get("extraction")
        except (OSError, ValueError, AttributeError):
            found = manifest = None
        if not isinstance(found, dict):
            raise ValueError(
                f"--out {out} already holds a latent directory that this tool did not write; "
                "choose another --out"
            )
        if any(found.get(k) != settings[k] for k in IDENTITY_KEYS):
            raise ValueError(
                f"--out {out} already holds a complete, different extraction "
                f"({_differences(found, settings)}); choose another --out or delete it"
            )
        return manifest
    pending = os.path.join(out, EXTRACTION_FILE)
    if os.path.exists(pending):
        try:
            with open(pending) as f:
                found = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{pending} is unreadable ({e}); delete {out} and start again") from e
        if any(found.get(k) != settings[k] for k in IDENTITY_KEYS):
            raise ValueError(
                f"--out {out} holds an unfinished extraction with other settings "
                f"({_differences(found, settings)}); rerun it with its own settings to finish "
                "it, or choose another --out (or delete it)"
            )
    elif os.path.isdir(out):
        ours = [n for n in os.listdir(out) if n.startswith("shard-") or n == "labels.npy"]
        if ours:
            raise ValueError(
                f"--out {out} holds shard files ({ours[0]}, ...) but no {EXTRACTION_FILE} or "
                f"{MANIFEST}: not an extraction that can be resumed; choose another --out"
            )
    return None


# ---------------------------------------------------------------------------------- encoding


def _crop_batches(
    items: Iterator[tuple[object, int, str]],
    image_size: int,
    batch_size: int,
    pool: concurrent.futures.Executor,
    prefetch: int = 2,
) -> Iterator[tuple[np.ndarray, list[int]]]:
    """(uint8 crops (b, s, s, 3), labels) per batch, decoded in `pool` `prefetch` batches
    ahead."""
    pending: collections.deque = collections.deque()

    def submit() -> bool:
        chunk = list(itertools.islice(items, batch_size))
        if chunk:
            futures = [pool.submit(images_lib.load_crop, raw, image_size, name)
                       for raw, _, name in chunk]
            pending.append((futures, [label for _, label, _ in chunk]))
        return bool(chunk)

    for _ in range(prefetch):
        if not submit():
            break
    while pending:
        futures, labels = pending.popleft()
        try:
            crops = np.stack([f.result() for f in futures])
        except BaseException:
            for fs, _ in pending:
                for f in fs:
                    f.cancel()
            raise
        submit()
        yield crops, labels


def _encoded_examples(
    batches: Iterator[tuple[np.ndarray, list[int]]], vae, batch_size: int,
    on_batch: Callable[[int], None] = lambda n: None,
) -> Iterator[dict]:
    """{"moments": (2, h, w, 2C) float32, "label"} per example: each batch padded to
    `batch_size`, encoded with its flip in one call; the device works on batch t while batch
    t + 1 is decoded on the host."""

    def finish(out, labels):
        moments = np.asarray(out)
        n = len(labels)
        both = np.stack([moments[:n], moments[batch_size : batch_size + n]], axis=1)
        on_batch(n)
        for m, label in zip(both, labels, strict=True):
            yield {"moments": m, "label": label}

    previous = None
    for crops, labels in batches:
        x = images_lib.to_unit_range(crops)
        if len(x) < batch_size:  # one compiled shape for every batch
            x = np.concatenate([x, np.repeat(x[-1:], batch_size - len(x), axis=0)])
        out = vae.encode(np.concatenate([x, x[:, :, ::-1]]))  # dispatched, not awaited
        if previous is not None:
            yield from finish(*previous)
        previous = (out, labels)
    if previous is not None:
        yield from finish(*previous)


def _shard_labels(out: str, k: int, num_shards: int, expected: int) -> np.ndarray:
    """A finished shard's labels: its labels file, or (that missing) its records' headers."""
    path = os.path.join(out, labels_name(k, num_shards))
    if os.path.isfile(path):
        labels = np.load(path, allow_pickle=False)
        if labels.shape == (expected,):
            return labels.astype(np.int32)
    reader = array_record_module.ArrayRecordReader(os.path.join(out, shard_name(k, num_shards)))
    try:
        records = reader.read_all()
    finally:
        reader.close()
    if len(records) != expected or any(r[:4] != MAGIC or len(r) < HEADER_BYTES for r in records):
        raise ValueError(f"shard {shard_name(k, num_shards)} in {out} is corrupt; delete it "
                         "and rerun to rewrite it")
    labels = np.array([int.from_bytes(r[4:8], "little", signed=True) for r in records], np.int32)
    _write_npy(path, labels)
    return labels


def _is_finished(path: str, expected: int) -> bool:
    if not os.path.isfile(path):
        return False
    try:
        return count_records(path) == expected
    except ValueError:  # truncated or corrupt
        return False


def _barrier(name: str, process_count: int) -> None:
    if process_count > 1 and jax.process_count() > 1:

        multihost_utils.sync_global_devices(name)


# -------------------------------------------------------------------------------------- main


def extract(
    source: str,
    out: str,
    *,
    vae_dir: str,
    image_size: int = 256,
    split: str = "train",
    tfds_data_dir: str | None = None,
    num_shards: int | None = None,
    batch_size: int = 32,
    dtype: str = "float32",
    limit: int | None = None,
    num_workers: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    progress: bool = True,
    on_shard_done: Callable[[int], None] | None = None,
) -> dict | None:
    """Run (or resume) an extraction; see the module docstring. Returns the manifest, or None
    on a process other than 0. Bad settings raise ValueError before anything is written.

    `process_index`/`process_count` default to JAX's; `on_shard_done(k)` is called after
    shard k is written (a progress hook)."""
    # ---- settings: every check before anything is written
    if image_size < 8 or image_size % 8:
        raise ValueError(f"--image_size {image_size} must be a positive multiple of 8")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {batch_size}")
    if dtype not in _VAE_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {_VAE_DTYPES}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be positive, got {limit}")
    if num_shards is not None and num_shards < 1:
        raise ValueError(f"--num_shards must be positive, got {num_shards}")
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    shards_of_process(1, p, count)  # checks the pair
    out = os.path.abspath(out)
    vae_dir = os.path.abspath(vae_dir)
    config_path, params_path = vae_folder.folder_files(vae_dir)
    vae_config = dataclasses.replace(vae_folder.read_config(config_path), dtype=dtype)
    factor = vae_config.downsample_factor
    if image_size % factor:
        raise ValueError(
            f"--image_size {image_size} is not a multiple of the VAE's downsampling factor "
            f"{factor}"
        )
    src = open_source(source, split=split, tfds_data_dir=tfds_data_dir)
    n = len(src) if limit is None else min(limit, len(src))
    if n < 1:
        raise ValueError(f"{source} {split} holds no examples")
    if num_shards is None:
        num_shards = math.ceil(n / EXAMPLES_PER_SHARD)
    if num_shards > n:
        raise ValueError(f"--num_shards {num_shards} is more than the {n} examples")
    sizes = shard_sizes(n, num_shards)
    starts = [0, *itertools.accumulate(sizes)]
    latent = image_size // factor
    spec = {"kind": "moments", "shape": [2, latent, latent, 2 * vae_config.latent_channels],
            "dtype": "float16"}
    settings = {
        "tool": TOOL, **src.identity(), "source_examples": len(src), "num_examples": n,
        "num_shards": num_shards, "image_size": image_size, "crop": "adm-center-crop",
        "vae_sha256": files.sha256_file(params_path),
        "vae_config": {k: v for k, v in vae_config.to_dict().items() if k != "dtype"},
        "vae_dtype": dtype, **spec,
    }
    record = {**settings, "flip": "moments[1] is the horizontal flip of the crop",
              "vae_dir": vae_dir, "limit": limit, **src.info()}
    say = lambda msg: print(msg if count == 1 else f"[process {p}/{count}] {msg}", flush=True)

    done = _check_out(out, settings)
    if done is not None:
        if p == 0:
            _cleanup(out, num_shards)
        say(f"{out} already holds this extraction ({n} examples); nothing to do")
        return done if p == 0 else None
    os.makedirs(out, exist_ok=True)
    if p == 0:
        files.write_json(os.path.join(out, EXTRACTION_FILE), record)
    _barrier("extract_latents:start", count)

    # ---- this process's shards
    mine = list(shards_of_process(num_shards, p, count))
    todo = [k for k in mine
            if not _is_finished(os.path.join(out, shard_name(k, num_shards)), sizes[k])]
    what = f"{source} {split}" if source.startswith("tfds:") else source
    say(f"{what}: {n} examples -> {out} in {num_shards} shards; this process writes "
        f"{len(mine)} of them, {len(mine) - len(todo)} already finished")
    if todo:

        model = vae.load(vae_dir, dtype=dtype)
        mesh = parallel.make_mesh((-1, 1, 1), devices=jax.local_devices())
        sharded = vae.ShardedVAE(model, mesh)
        workers = num_workers or min(16, os.cpu_count() or 1)
        bar = tqdm(total=sum(sizes[k] for k in todo), unit="img",
                   disable=not progress, desc="extract", dynamic_ncols=True)
        with bar, concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for k in todo:
                path = os.path.join(out, shard_name(k, num_shards))
                for stale in (path, path + ".tmp"):
                    if os.path.exists(stale):  # an interrupted or corrupt write of this shard
                        os.remove(stale)
                items = src.read(starts[k], starts[k + 1])
                batches = _crop_batches(items, image_size, batch_size, pool)
                examples = _encoded_examples(batches, sharded, batch_size, bar.update)
                shard_spec = {"kind": "moments", "shape": tuple(spec["shape"]),
                              "dtype": "float16"}
                labels = write_shard(path, examples, sizes[k], spec=shard_spec,
                                     dtype="float16", first_index=starts[k])
                _write_npy(os.path.join(out, labels_name(k, num_shards)),
                            np.asarray(labels, np.int32))
                if on_shard_done is not None:
                    on_shard_done(k)

    # ---- the manifest, last
    _barrier("extract_latents:shards", count)
    if p != 0:
        say("done; process 0 writes the manifest")
        return None
    missing = [k for k in range(num_shards)
               if not _is_finished(os.path.join(out, shard_name(k, num_shards)), sizes[k])]
    if missing:
        shown = ", ".join(shard_name(k, num_shards) for k in missing[:3])
        raise ValueError(
            f"{len(missing)} shards are missing or incomplete in {out} ({shown}"
            f"{', ...' if len(missing) > 3 else ''}) after this process finished: are all "
            f"{count} processes running? Rerun the same command to finish them"
        )
    labels = np.concatenate([_shard_labels(out, k, num_shards, sizes[k])
                             for k in range(num_shards)])
    shards = [{"file": shard_name(k, num_shards), "num_examples": sizes[k]}
              for k in range(num_shards)]
    num_classes = src.num_classes or int(labels.max()) + 1
    manifest = write_manifest(out, shards, labels, spec, num_classes=num_classes,
                              extra={"extraction": record})
    _cleanup(out, num_shards)
    say(f"wrote {out}: {n} examples in {num_shards} shards, moments {tuple(spec['shape'])} "
        f"float16, {num_classes} classes; train with --config.dataset=latents "
        f"--config.data_dir={out}")
    return manifest


def _cleanup(out: str, num_shards: int) -> None:
    """Remove the bookkeeping files of a finished extraction."""
    names = [labels_name(k, num_shards) for k in range(num_shards)] + [EXTRACTION_FILE]
    for name in names:
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dydit_jax.data.extract_latents",
        description="VAE moments of a dataset (ADM centre crop, image + flip) as latent "
        "shards for --config.dataset=latents.",
    )
    parser.add_argument("--source", required=True,
                        help="tfds:NAME (a prepared tfds dataset with 'image' and 'label') "
                        "or folder:PATH (one subfolder per class = sorted labels 0..K-1, images "
                        "searched recursively in each)")
    parser.add_argument("--split", default="train", help="tfds split (default train)")
    parser.add_argument("--tfds_data_dir", default=None,
                        help="tfds data_dir (default ~/tensorflow_datasets)")
    parser.add_argument("--image_size", type=int, default=256,
                        help="crop size in pixels, a multiple of 8 (default 256)")
    parser.add_argument("--vae", required=True,
                        help="converted VAE directory (python -m dydit_jax.convert vae)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num_shards", type=int, default=None,
                        help=f"number of shards (default: about {EXAMPLES_PER_SHARD} examples "
                        "each)")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="images per VAE call and process; each call also encodes their "
                        "flips (default 32)")
    parser.add_argument("--dtype", choices=_VAE_DTYPES, default="float32",
                        help="VAE compute dtype (default float32)")
    parser.add_argument("--limit", type=int, default=None,
                        help="extract only the first N examples")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="image decoding threads (default: CPU count, at most 16)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    cli.start(distributed=True, log_info=False)
    try:
        extract(
            args.source, args.out, vae_dir=args.vae, image_size=args.image_size,
            split=args.split, tfds_data_dir=args.tfds_data_dir, num_shards=args.num_shards,
            batch_size=args.batch_size, dtype=args.dtype, limit=args.limit,
            num_workers=args.num_workers,
        )
    except ValueError as e:
        return cli.fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
