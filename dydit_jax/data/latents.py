"""Pre-extracted VAE latents on disk: ArrayRecord shards, a random-access source, and sampling.

Encoding the images once (`docs/vae.md`, "Cost") saves ~38% of a DiT-XL/2 training step. Two
kinds of example are stored:

* ``"moments"``: float16 ``(2, H, W, 2C)``: ``[0]`` is the VAE posterior of the image and
  ``[1]`` of its horizontal flip, channels last, the first C channels the mean and the last C
  the log-variance. `sample_from_moments` draws the flip and the posterior sample in the train
  step, so both augmentations stay alive.
* ``"latents"``: float16 or float32 ``(H, W, C)``: latents sampled (and scaled) beforehand.

Directory layout written by `write_latent_shards`::

    out_dir/shard-00000-of-00004.array_record ... shard-00003-of-00004.array_record
    out_dir/labels.npy       int32 labels of all examples, in order (so no record is read to
                             get them)
    out_dir/manifest.json    written last: a directory without it is an incomplete write

Record encoding (one ArrayRecord record per example, ``group_size:1``, uncompressed; no pickle)::

    bytes 0..3   magic b"DYL1"
    bytes 4..7   label, int32 little-endian
    bytes 8..    the array, C order, little-endian, of the manifest's "shape" and "dtype"

so every record is exactly ``8 + prod(shape) * itemsize`` bytes; any other length is an error.

`write_latent_shards` writes a whole directory from one process. Its two halves are public for
streamed, resumable or multi-process writers (`dydit_jax.data.extract_latents`): `write_shard`
(one shard, under a temporary name renamed when complete) and `write_manifest` (labels.npy and
the manifest, once every shard is in place; `extra` adds fields such as the extraction's
settings, which readers ignore).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import operator
import os
import re
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from array_record.python import array_record_module
from array_record.python.array_record_data_source import ArrayRecordDataSource

from dydit_jax import files

FORMAT = "dydit-latents-v1"
MANIFEST = "manifest.json"
LABELS_FILE = "labels.npy"
MAGIC = b"DYL1"
HEADER_BYTES = 8
KINDS = ("moments", "latents")
_DTYPES = ("float16", "float32")
_WRITER_OPTIONS = "group_size:1,uncompressed"
_SHARD_RE = re.compile(r"shard-\d{5}-of-\d{5}\.array_record(\.tmp)?")
LATENT_SCALE = 0.18215  # the SD VAE's latent scale factor


def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}.array_record"


def encode_record(label: int, array: np.ndarray) -> bytes:
    """One record: magic, int32 LE label, the array's little-endian C-order bytes."""
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return MAGIC + np.array(label, "<i4").tobytes() + little.tobytes()


def decode_record(record: bytes, shape: tuple[int, ...], dtype: str) -> tuple[int, np.ndarray]:
    """(label, array) of a record; ValueError on a wrong length or magic."""
    dt = np.dtype(dtype).newbyteorder("<")
    expected = HEADER_BYTES + int(np.prod(shape)) * dt.itemsize
    if len(record) != expected:
        raise ValueError(
            f"record is {len(record)} bytes but a {dtype} {tuple(shape)} example takes "
            f"{expected}: truncated or corrupt"
        )
    if record[:4] != MAGIC:
        raise ValueError(f"record does not start with {MAGIC!r}: not a {FORMAT} record")
    label = int(np.frombuffer(record, "<i4", count=1, offset=4)[0])
    array = np.frombuffer(record, dt, offset=HEADER_BYTES).reshape(shape)
    return label, array.astype(np.dtype(dtype))  # a writable copy in native byte order


# ----------------------------------------------------------------------------------- writing


def write_latent_shards(
    out_dir: str | os.PathLike,
    examples: Mapping[str, np.ndarray] | Iterable[Mapping],
    *,
    num_shards: int,
    num_examples: int | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Write examples as `num_shards` ArrayRecord shards plus labels.npy and manifest.json.

    `examples` is either a mapping of stacked arrays, ``{"moments": (N, 2, H, W, 2C),
    "label": (N,)}`` or ``{"latents": (N, H, W, C), "label": (N,)}``, or an iterable of
    per-example dicts with the same keys (a generator needs `num_examples`, since shards are
    written one after another, each a contiguous run of examples). `dtype` defaults to float16
    for moments and to the input's float16/float32 for latents. Each shard is written under a
    temporary name and renamed when complete; the manifest is written last, atomically.
    Returns the manifest.
    """
    out_dir = os.fspath(out_dir)
    if isinstance(examples, Mapping):
        examples, total = _examples_from_arrays(examples)
    else:
        total = len(examples) if hasattr(examples, "__len__") else None
    if num_examples is None:
        if total is None:
            raise ValueError("pass num_examples= when `examples` is an iterator without len()")
        num_examples = total
    elif total is not None and total != num_examples:
        raise ValueError(f"num_examples={num_examples} but the input holds {total} examples")
    if num_examples < 1:
        raise ValueError("no examples to write")
    shard_sizes(num_examples, num_shards)  # checks num_shards
    if dtype is not None and np.dtype(dtype).name not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")

    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):
        if not overwrite:
            raise FileExistsError(
                f"{manifest_path} exists: {out_dir} already holds latents; pass overwrite=True "
                "or choose another directory"
            )
        os.remove(manifest_path)  # from here on the directory reads as incomplete
    for name in os.listdir(out_dir):  # stale shards of an earlier (incomplete) write
        if _SHARD_RE.fullmatch(name):
            os.remove(os.path.join(out_dir, name))

    sizes = shard_sizes(num_examples, num_shards)
    it = iter(examples)
    spec: dict = {}
    labels: list[int] = []
    shards = []
    for k, size in enumerate(sizes):
        name = shard_name(k, num_shards)
        labels += write_shard(
            os.path.join(out_dir, name), it, size, spec=spec, dtype=dtype,
            first_index=len(labels), expected_total=num_examples,
        )
        shards.append({"file": name, "num_examples": size})
    if next(it, None) is not None:
        raise ValueError(f"the input holds more than num_examples={num_examples} examples")
    return write_manifest(out_dir, shards, labels, spec)


def shard_sizes(num_examples: int, num_shards: int) -> list[int]:
    """Examples per shard: contiguous runs, the first ``num_examples % num_shards`` shards one
    longer than the rest (shard k starts at ``sum(sizes[:k])``)."""
    if not 1 <= num_shards <= num_examples:
        raise ValueError(f"num_shards must be in [1, {num_examples}], got {num_shards}")
    return [
        num_examples // num_shards + (k < num_examples % num_shards) for k in range(num_shards)
    ]


def write_shard(
    path: str | os.PathLike,
    examples: Iterable[Mapping],
    num_examples: int,
    *,
    spec: dict,
    dtype: str | None = None,
    first_index: int = 0,
    expected_total: int | None = None,
) -> list[int]:
    """Write the next `num_examples` examples of `examples` as one ArrayRecord shard at `path`.

    The shard is written to ``path + ".tmp"`` and renamed to `path` only when complete; on any
    error (or interruption) the temporary file is removed and `path` is left as it was.
    Exactly `num_examples` items are taken from the iterator. `spec` ({"kind", "shape",
    "dtype"}) is filled from the first example when empty and checked against every later one:
    pass the same dict for all shards of a directory. `first_index` (the examples before this
    shard) and `expected_total` only shape error messages. Returns the shard's labels.
    """
    path = os.fspath(path)
    tmp = path + ".tmp"
    it = iter(examples)
    labels: list[int] = []
    writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    try:
        if not writer.ok():
            raise OSError(f"cannot open {tmp} for writing")
        for _ in range(num_examples):
            try:
                example = next(it)
            except StopIteration:
                expected = first_index + num_examples if expected_total is None else expected_total
                raise ValueError(
                    f"the input ran out after {first_index + len(labels)} examples; expected "
                    f"{expected}"
                ) from None
            label, array = _check_example(example, spec, dtype, first_index + len(labels))
            writer.write(encode_record(label, array))
            labels.append(label)
        if not writer.ok():
            raise OSError(f"the ArrayRecord writer failed on {tmp}")
        writer.close()
    except BaseException:
        try:
            if writer.is_open():
                writer.close()
        except Exception:  # a failed writer raises on close; keep the first error
            pass
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)
    return labels


def write_manifest(
    out_dir: str | os.PathLike,
    shards: list[dict],
    labels: Iterable[int],
    spec: Mapping,
    *,
    num_classes: int | None = None,
    extra: Mapping | None = None,
) -> dict:
    """Write labels.npy and then manifest.json (both atomically) for shards already in place.

    `shards`: ``[{"file": name, "num_examples": n}, ...]`` in example order; `labels`: the
    labels of all examples in that order; `spec`: {"kind", "shape", "dtype"} of the records.
    `num_classes` defaults to ``max(label) + 1``; `extra` adds fields to the manifest (a
    reader ignores fields it does not know). Returns the manifest.
    """
    out_dir = os.fspath(out_dir)
    labels_arr = np.asarray(labels if isinstance(labels, np.ndarray) else list(labels), "<i4")
    total = sum(int(s["num_examples"]) for s in shards)
    if labels_arr.shape != (total,):
        raise ValueError(f"{labels_arr.shape[0]} labels for {total} examples in the shards")
    if total < 1:
        raise ValueError("no examples to write")
    files.atomic_write(
        os.path.join(out_dir, LABELS_FILE), lambda f: np.save(f, labels_arr, allow_pickle=False)
    )
    manifest = {
        "format": FORMAT,
        "num_examples": total,
        "num_shards": len(shards),
        "shards": [{"file": s["file"], "num_examples": int(s["num_examples"])} for s in shards],
        "kind": spec["kind"],
        "shape": [int(d) for d in spec["shape"]],
        "dtype": np.dtype(spec["dtype"]).name,
        "num_classes": int(labels_arr.max()) + 1 if num_classes is None else int(num_classes),
        "labels_file": LABELS_FILE,
        "record": "b'DYL1' + int32 LE label + array bytes (C order, little-endian)",
    }
    if extra:
        clash = set(extra) & set(manifest)
        if clash:
            raise ValueError(f"extra manifest fields {sorted(clash)} clash with the format's")
        manifest.update(extra)
    text = json.dumps(manifest, indent=1)
    files.atomic_write(os.path.join(out_dir, MANIFEST), lambda f: f.write(text.encode()))
    return manifest


def _examples_from_arrays(arrays: Mapping[str, np.ndarray]):
    kinds = [k for k in KINDS if k in arrays]
    extra = set(arrays) - set(KINDS) - {"label"}
    if len(kinds) != 1 or "label" not in arrays or extra:
        raise ValueError(
            f"arrays need 'label' and exactly one of {KINDS}; got keys {sorted(arrays)}"
        )
    kind = kinds[0]
    data, labels = arrays[kind], np.asarray(arrays["label"])
    if labels.ndim != 1 or len(data) != len(labels):
        raise ValueError(
            f"{kind} has {len(data)} examples but label has shape {labels.shape}; "
            "expected one label per example"
        )
    return ({kind: data[i], "label": labels[i]} for i in range(len(labels))), len(labels)


def _check_example(example: Mapping, spec: dict, dtype: str | None, index: int):
    """(label, array cast to the stored dtype); fixes kind/shape/dtype from the first example."""
    kinds = [k for k in KINDS if k in example]
    if len(kinds) != 1 or "label" not in example:
        raise ValueError(
            f"example {index} needs 'label' and exactly one of {KINDS}; got {sorted(example)}"
        )
    kind = kinds[0]
    array = np.asarray(example[kind])
    if not spec:
        if kind == "moments" and (array.ndim != 4 or array.shape[0] != 2 or array.shape[-1] % 2):
            raise ValueError(
                f"moments must be (2, H, W, 2C) (image and flip; mean then logvar), got "
                f"{array.shape}"
            )
        if kind == "latents" and array.ndim != 3:
            raise ValueError(f"latents must be (H, W, C), got {array.shape}")
        if dtype is None:
            dtype = array.dtype.name if kind == "latents" else "float16"
            dtype = dtype if dtype in _DTYPES else "float32"
        spec.update(kind=kind, shape=array.shape, dtype=np.dtype(dtype).name)
    if kind != spec["kind"] or array.shape != spec["shape"]:
        raise ValueError(
            f"example {index} is {kind} {array.shape} but the first was {spec['kind']} "
            f"{spec['shape']}"
        )
    label = np.asarray(example["label"])
    if label.shape != () or not np.issubdtype(label.dtype, np.integer) or label < 0:
        raise ValueError(f"example {index}: label must be a non-negative integer, got {label!r}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"example {index}: {kind} must be floating point, got {array.dtype}")
    with np.errstate(over="ignore"):  # overflow is reported just below
        stored = array.astype(spec["dtype"])
    if not np.isfinite(stored).all():
        raise ValueError(
            f"example {index}: {kind} has non-finite values as {spec['dtype']} (overflow?)"
        )
    return int(label), stored


# ----------------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class _Shard:
    """A whole shard, in the FileInstruction form ArrayRecordDataSource takes."""

    filename: str
    skip: int
    take: int
    examples_in_shard: int


class LatentSource:
    """Random-access grain source over a directory written by `write_latent_shards`.

    Item i -> ``{"moments" | "latents": array, "label": np.int32}``. Opening checks the
    manifest and every shard's record count; reading checks every record's length.
    """

    def __init__(self, data_dir: str | os.PathLike):
        data_dir = os.fspath(data_dir)
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(
                f"latent directory {data_dir!r} does not exist; write it with "
                "dydit_jax.data.write_latent_shards (or fix config.data_dir)"
            )
        manifest_path = os.path.join(data_dir, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise FileNotFoundError(
                f"no {MANIFEST} in {data_dir!r}: an incomplete write (rerun "
                "write_latent_shards) or not a latent directory"
            )
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{manifest_path} is not valid JSON ({e}); rewrite the latents") from e
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        if fmt != FORMAT:
            raise ValueError(
                f"unknown format {fmt!r} in {manifest_path}; expected {FORMAT!r} (written by "
                "dydit_jax.data.write_latent_shards)"
            )
        try:
            kind, shape = manifest["kind"], tuple(int(d) for d in manifest["shape"])
            dtype, num_examples = str(manifest["dtype"]), int(manifest["num_examples"])
            # [(file, count)] of the shards: {"file": name, "num_examples": n} each
            shard_entries = [(str(e["file"]), int(e["num_examples"])) for e in manifest["shards"]]
            labels_file = str(manifest.get("labels_file", LABELS_FILE))
            num_classes = manifest.get("num_classes")
            num_classes = None if num_classes is None else int(num_classes)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{manifest_path} lacks or mangles a field: {e!r}; rewrite the latents"
            ) from e
        if kind not in KINDS or dtype not in _DTYPES:
            raise ValueError(
                f"{manifest_path}: kind {kind!r} / dtype {dtype!r} not in {KINDS} / {_DTYPES}"
            )
        if not shape or min(shape) < 1:
            raise ValueError(
                f"{manifest_path}: shape {list(shape)} is not an array shape (sizes >= 1); "
                "rewrite the latents"
            )

        shards = []
        for file, expected in shard_entries:
            path = os.path.join(data_dir, file)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"shard {path} listed in {manifest_path} is missing; rewrite the latents"
                )
            count = count_records(path)
            if count != expected:
                raise ValueError(
                    f"shard {path} holds {count} records but {manifest_path} says {expected}; "
                    "the directory is inconsistent, rewrite the latents"
                )
            shards.append(_Shard(path, 0, count, count))
        if not shards or sum(s.take for s in shards) != num_examples:
            raise ValueError(
                f"{manifest_path}: the shards hold {sum(s.take for s in shards)} examples but "
                f"num_examples is {num_examples}"
            )
        labels_path = os.path.join(data_dir, labels_file)
        if not os.path.isfile(labels_path):
            raise FileNotFoundError(f"{labels_path} is missing; rewrite the latents")
        try:
            labels = np.load(labels_path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            labels = None  # not a .npy file (np.load's own message suggests unpickling it)
        if not isinstance(labels, np.ndarray):
            raise ValueError(
                f"{labels_path} is not a .npy array of {num_examples} integer labels; rewrite "
                "the latents"
            )
        if labels.shape != (num_examples,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{labels_path} has {labels.dtype} {labels.shape}; expected {num_examples} "
                "integer labels"
            )

        self.data_dir = data_dir
        self.manifest = manifest
        self.kind: str = kind
        self.dtype: str = dtype
        self.example_shape: dict[str, tuple[int, ...]] = {kind: shape, "label": ()}
        self.labels: np.ndarray = labels.astype(np.int32)
        self.num_classes = int(self.labels.max()) + 1 if num_classes is None else num_classes
        self._shape = shape
        self._files = [s.filename for s in shards]
        self._ends = list(itertools.accumulate(s.take for s in shards))
        self._records = ArrayRecordDataSource(shards)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"LatentSource({self.data_dir!r}: {len(self)} {self.kind} "
            f"{self._shape} {self.dtype}, {len(self._files)} shards)"
        )

    def __getitem__(self, index) -> dict:
        i = self._check_index(index)
        try:
            record = self._records[i]
        except Exception as e:
            raise ValueError(f"cannot read {self._where(i)}: {e}") from e
        return self._decode(record, i)

    def __getitems__(self, indices) -> list[dict]:
        indices = [self._check_index(i) for i in indices]
        try:
            records = self._records.__getitems__(indices)
        except Exception:
            return [self[i] for i in indices]  # re-read one by one to name the bad record
        return [self._decode(r, i) for r, i in zip(records, indices, strict=True)]

    def _check_index(self, index) -> int:
        i = operator.index(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} examples")
        return i % n

    def _where(self, i: int) -> str:
        k = bisect.bisect_right(self._ends, i)
        start = self._ends[k - 1] if k else 0
        return f"record {i - start} of {self._files[k]} (example {i})"

    def _decode(self, record: bytes, i: int) -> dict:
        try:
            label, array = decode_record(record, self._shape, self.dtype)
        except ValueError as e:
            raise ValueError(f"{self._where(i)}: {e}; rewrite the latents") from e
        if label != self.labels[i]:
            raise ValueError(
                f"{self._where(i)} has label {label} but {LABELS_FILE} says {self.labels[i]}"
            )
        return {self.kind: array, "label": np.int32(label)}


def count_records(path: str) -> int:
    """The shard's record count; ValueError naming it when ArrayRecord cannot read it."""
    problem = None
    try:
        reader = array_record_module.ArrayRecordReader(path)
        try:
            count = reader.num_records() if reader.ok() else None
        finally:
            reader.close()  # raises on a reader that failed
    except Exception as e:  # the C++ reader's errors are RuntimeErrors with a Riegeli message
        count, problem = None, e
    if count is None:
        detail = f": {problem}" if problem else ""
        raise ValueError(
            f"shard {path} is truncated or corrupt (ArrayRecord cannot read it{detail}); "
            "rewrite the latents"
        ) from problem
    return count


# ---------------------------------------------------------------------------------- sampling


def sample_from_moments(
    key: jax.Array, moments: jax.Array, scale: float = LATENT_SCALE
) -> jax.Array:
    """Scaled posterior samples (B, H, W, C) float32 from stored moments (B, 2, H, W, 2C).

    Per example, takes the image's or its flip's moments with probability 1/2 each (the flip
    augmentation), clips the logvar to [-30, 20] and returns
    ``scale * (mean + exp(logvar / 2) * N(0, 1))``. Jittable; deterministic given `key`.
    """
    moments = jnp.asarray(moments, jnp.float32)
    if moments.ndim != 5 or moments.shape[1] != 2 or moments.shape[-1] % 2:
        raise ValueError(f"moments must be (B, 2, H, W, 2C), got {moments.shape}")
    flip_key, noise_key = jax.random.split(key)
    flip = jax.random.bernoulli(flip_key, 0.5, (moments.shape[0],))
    chosen = jnp.where(flip[:, None, None, None], moments[:, 1], moments[:, 0])
    mean, logvar = jnp.split(chosen, 2, axis=-1)
    logvar = jnp.clip(logvar, -30.0, 20.0)
    noise = jax.random.normal(noise_key, mean.shape, jnp.float32)
    return scale * (mean + jnp.exp(0.5 * logvar) * noise)
