r"""FID, sFID, Inception Score, precision and recall of a sample batch against a reference
batch, as the standard ImageNet evaluation suite (guided-diffusion `evaluations/`) computes
them; `--features digits` gives the same metrics on our digits classifier plus class accuracy.

  python evaluate.py --samples S.npz --reference VIRTUAL_imagenet256_labeled.npz \
      --inception_graph classify_image_graph_def.pb [--num_samples 50000] [--out results.json]
  python evaluate.py --samples S.npz --reference digits_ref.npz --features digits --workdir DIR

Both files hold `arr_0`: uint8 NHWC images (the sampler's format); digits samples may hold
`arr_1`, their labels, for the class accuracy. The reference statistics are cached next to the
reference as `<reference>.<features>.stats.npz` (the only file written besides --out); a
reference npz holding `mu`, `sigma`, `mu_s`, `sigma_s` (the suite's reference batches) has its
own statistics used for FID / sFID.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import zipfile
from collections.abc import Iterator

import numpy as np

from dydit_jax import cli
from dydit_jax.eval import metrics
from dydit_jax.eval.digits_classifier import DigitsClassifier
from dydit_jax.eval.features import (
    EvalInputError,
    FeatureExtractor,
    InceptionGraph,
    extract_features,
    save_json,
    save_npz,
)

log = logging.getLogger(__name__)

CHANNELS = {"inception": 3, "digits": 1}  # what each extractor accepts
K_NEIGHBOURS = 3
MIN_IMAGES = K_NEIGHBOURS + 1  # the k-NN radius of a point needs k other points
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
CACHE_FORMAT = 1


# ----------------------------------------------------------------------------- inputs


def check_images(shape: tuple, dtype, what: str, channels: int) -> None:
    """One clear error for images that are not uint8 N x H x W x `channels` with N >= 4."""
    if np.dtype(dtype) != np.uint8:
        raise EvalInputError(
            f"{what}: arr_0 has dtype {np.dtype(dtype)}; the evaluation takes uint8 images "
            "0..255 (from [-1, 1] floats: np.clip(127.5 * x + 128, 0, 255).astype(np.uint8))"
        )
    if len(shape) != 4:
        raise EvalInputError(
            f"{what}: arr_0 has shape {tuple(shape)}; expected 4-D images N x H x W x C (NHWC)"
        )
    if shape[-1] != channels:
        hint = {
            1: "grey digits take --features digits",
            3: "RGB images take --features inception",
        }.get(shape[-1], "images must be NHWC, channels last")
        raise EvalInputError(
            f"{what}: arr_0 has {shape[-1]} channels (shape {tuple(shape)}) but these features "
            f"take {channels}; {hint}"
        )
    if shape[0] == 0 or shape[1] == 0 or shape[2] == 0:
        raise EvalInputError(f"{what}: arr_0 is empty (shape {tuple(shape)})")
    if shape[0] < MIN_IMAGES:
        raise EvalInputError(
            f"{what}: {shape[0]} images; the metrics need at least {MIN_IMAGES} "
            f"(k={K_NEIGHBOURS} nearest neighbours for precision/recall)"
        )


class NpzImages:
    """`arr_0` of an npz, validated from its header and read batch by batch (50k samples of
    256 x 256 x 3 are 10 GB: never loaded at once)."""

    def __init__(self, path: str, what: str, channels: int, count: int | None = None):
        self.path, self.what = path, what
        if not os.path.isfile(path):
            raise EvalInputError(f"{what}: {path} not found")
        try:
            with zipfile.ZipFile(path) as zf:
                self.members = set(zf.namelist())
                if "arr_0.npy" not in self.members:
                    keys = sorted(name.removesuffix(".npy") for name in self.members)
                    raise EvalInputError(
                        f"{what}: {path} has no arr_0 (it holds {keys}); save the images as "
                        "the first positional array: np.savez(path, images)"
                    )
                with zf.open("arr_0.npy") as f:
                    shape, fortran, dtype = _read_npy_header(f)
        except EvalInputError:
            raise
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise EvalInputError(f"{what}: {path} is not a readable .npz file ({e})") from e
        check_images(shape, dtype, f"{what} {path}", channels)
        if count is not None:
            if count < 1:
                raise EvalInputError(f"--num_samples must be positive, got {count}")
            if count > shape[0]:
                raise EvalInputError(
                    f"{what}: {path} holds {shape[0]} images but --num_samples asks for "
                    f"{count}; sample more or lower --num_samples"
                )
            if count < MIN_IMAGES:
                check_images((count, *shape[1:]), dtype, f"{what} {path}", channels)
        self.shape, self.fortran = tuple(shape), fortran
        self.count = shape[0] if count is None else count

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        image_shape = self.shape[1:]
        if self.fortran:  # rare: no streaming layout, so read it whole
            with np.load(self.path, allow_pickle=False) as data:
                images = data["arr_0"][: self.count]
            for start in range(0, self.count, batch_size):
                yield np.ascontiguousarray(images[start : start + batch_size])
            return
        per_image = int(np.prod(image_shape))
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            _read_npy_header(f)
            for start in range(0, self.count, batch_size):
                n = min(batch_size, self.count - start)
                data = f.read(n * per_image)
                if len(data) != n * per_image:
                    raise EvalInputError(f"{self.what}: {self.path} is truncated")
                yield np.frombuffer(data, np.uint8).reshape(n, *image_shape)

    def labels(self) -> np.ndarray | None:
        """`arr_1` (int labels, one per image) when present."""
        if "arr_1.npy" not in self.members:
            return None
        with np.load(self.path, allow_pickle=False) as data:
            labels = data["arr_1"]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise EvalInputError(
                f"{self.what}: arr_1 of {self.path} should be int labels (N,), got "
                f"{labels.dtype} {labels.shape}"
            )
        if len(labels) < self.count:
            raise EvalInputError(
                f"{self.what}: {self.path} has {len(labels)} labels (arr_1) for "
                f"{self.count} images"
            )
        return labels[: self.count]


def _read_npy_header(f) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def _array_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


# ----------------------------------------------------------------------------- metrics


def reference_statistics(
    images: np.ndarray | Iterator[np.ndarray],
    extractor: FeatureExtractor,
    batch_size: int = 64,
    total: int | None = None,
) -> dict[str, np.ndarray]:
    """What the metrics need of a reference batch: mu, sigma (pool), mu_s, sigma_s (spatial)
    and the pool features for precision/recall. `images`: uint8 NHWC or an iterator of batches."""
    if isinstance(images, np.ndarray):
        check_images(images.shape, images.dtype, "reference", extractor.channels)
        total = len(images)
        images = _array_batches(images, batch_size)
    features = extract_features(extractor, images, total, desc="reference features")
    mu, sigma = metrics.fit_gaussian(features["pool"])
    mu_s, sigma_s = metrics.fit_gaussian(features["spatial"])
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s, "pool": features["pool"]}


def evaluate_features(
    samples: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    labels: np.ndarray | None = None,
    *,
    split_size: int = 5000,
    block_size: int = 10000,
) -> dict[str, float]:
    """The metrics from sample features (pool, spatial, probs) and `reference_statistics`."""
    sample_fit = metrics.fit_gaussian(samples["pool"])
    spatial_fit = metrics.fit_gaussian(samples["spatial"])
    try:
        fid = metrics.frechet_distance(*sample_fit, reference["mu"], reference["sigma"])
        sfid = metrics.frechet_distance(*spatial_fit, reference["mu_s"], reference["sigma_s"])
    except ValueError as e:
        raise EvalInputError(
            f"cannot compare the samples with the reference statistics: {e} (statistics "
            "stored in the reference npz must come from the same feature extractor)"
        ) from e
    precision, recall = metrics.precision_recall(
        reference["pool"], samples["pool"], K_NEIGHBOURS, block_size, block_size
    )
    results = {
        "inception_score": metrics.inception_score(samples["probs"], split_size),
        "fid": fid,
        "sfid": sfid,
        "precision": precision,
        "recall": recall,
        "num_samples": int(len(samples["pool"])),
        "num_reference": int(len(reference["pool"])),
    }
    if labels is not None:
        results["class_accuracy"] = metrics.class_accuracy(samples["probs"], labels)
    return results


def evaluate_arrays(
    samples: np.ndarray,
    reference: np.ndarray | dict[str, np.ndarray],
    extractor: FeatureExtractor,
    labels: np.ndarray | None = None,
    batch_size: int = 64,
) -> dict:
    """The metrics of uint8 NHWC `samples` against uint8 NHWC `reference` images, or against
    `reference_statistics(...)` computed once for many sample sets. `labels` (N,) adds the
    class accuracy (meaningful where the extractor's classes are the labels: digits)."""
    check_images(samples.shape, samples.dtype, "samples", extractor.channels)
    if labels is not None and len(labels) != len(samples):
        raise EvalInputError(f"{len(labels)} labels for {len(samples)} samples")
    if not isinstance(reference, dict):
        reference = reference_statistics(reference, extractor, batch_size)
    features = extract_features(
        extractor, _array_batches(samples, batch_size), len(samples), desc="sample features"
    )
    return {"features": extractor.name, **evaluate_features(features, reference, labels)}


# ----------------------------------------------------------------------------- files


def stats_cache_path(reference_path: str, features_name: str) -> str:
    """R.npz -> R.<features>.stats.npz, beside the reference."""
    base = reference_path[:-4] if reference_path.endswith(".npz") else reference_path
    return f"{base}.{features_name}.stats.npz"


def _cache_key(reference_path: str, extractor: FeatureExtractor) -> str:
    st = os.stat(reference_path)
    return json.dumps(
        {
            "format": CACHE_FORMAT,
            "reference_size": st.st_size,
            "reference_mtime_ns": st.st_mtime_ns,
            "extractor": extractor.identity,
        },
        sort_keys=True,
    )


def load_reference(
    reference: NpzImages,
    extractor: FeatureExtractor,
    batch_size: int = 64,
    use_cache: bool = True,
) -> dict[str, np.ndarray]:
    """Reference statistics from the cache beside the reference file when it matches the
    file (size, mtime) and the extractor; else computed and cached (atomically)."""
    cache = stats_cache_path(reference.path, extractor.name)
    key = _cache_key(reference.path, extractor)
    if use_cache and os.path.exists(cache):
        try:
            with np.load(cache, allow_pickle=False) as data:
                if str(data["key"]) == key:
                    return {name: data[name] for name in (*STATS_KEYS, "pool")}
        except (OSError, ValueError, KeyError):
            pass  # damaged or from another version: recompute and replace
    stats = reference_statistics(reference.batches(batch_size), extractor, total=reference.count)
    if STATS_KEYS[0] in {m.removesuffix(".npy") for m in reference.members}:
        # The suite's reference batches carry their own FID statistics: those are the ones.
        with np.load(reference.path, allow_pickle=False) as data:
            missing = [name for name in STATS_KEYS if name not in data.files]
            if missing:
                raise EvalInputError(
                    f"reference {reference.path} holds mu but not {', '.join(missing)}"
                )
            stats.update({name: np.asarray(data[name], np.float64) for name in STATS_KEYS})
    if use_cache:
        try:
            save_npz(cache, key=np.array(key), **stats)
        except OSError as e:
            log.warning("cannot write the reference statistics cache %s: %s", cache, e)
    return stats


def evaluate_files(
    samples_path: str,
    reference_path: str,
    extractor: FeatureExtractor,
    num_samples: int | None = None,
    batch_size: int = 64,
    use_cache: bool = True,
) -> dict:
    """The metrics of the first `num_samples` (default: all) images of samples_path's arr_0."""
    samples = NpzImages(samples_path, "samples", extractor.channels, num_samples)
    reference = NpzImages(reference_path, "reference", extractor.channels)
    return _evaluate_npz(samples, reference, extractor, batch_size, use_cache)


def _evaluate_npz(samples, reference, extractor, batch_size, use_cache) -> dict:
    labels = samples.labels() if extractor.class_labels else None
    ref_stats = load_reference(reference, extractor, batch_size, use_cache)
    features = extract_features(
        extractor, samples.batches(batch_size), samples.count, desc="sample features"
    )
    return {
        "features": extractor.name,
        "samples": samples.path,
        "reference": reference.path,
        **evaluate_features(features, ref_stats, labels),
    }


def make_extractor(
    features: str, inception_graph: str | None = None, workdir: str | None = None
) -> FeatureExtractor:
    if features == "inception":
        return InceptionGraph(inception_graph)
    if features == "digits":

        return DigitsClassifier(workdir)
    raise EvalInputError(f"unknown features {features!r}; choose one of {sorted(CHANNELS)}")


def format_table(results: dict) -> str:
    rows = [
        ("Inception Score", "inception_score", "{:.4f}"),
        ("FID", "fid", "{:.4f}"),
        ("sFID", "sfid", "{:.4f}"),
        ("Precision", "precision", "{:.4f}"),
        ("Recall", "recall", "{:.4f}"),
        ("Class accuracy", "class_accuracy", "{:.4f}"),
    ]
    lines = [
        f"{results['features']} features: {results['num_samples']} samples vs "
        f"{results['num_reference']} reference images",
        f"{'metric':<16} {'value':>12}",
    ]
    lines += [f"{label:<16} {fmt.format(results[key]):>12}" for label, key, fmt in rows
              if key in results]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="FID, sFID, Inception Score, precision and recall of a sample batch.",
    )
    parser.add_argument("--samples", required=True, help="npz with arr_0: uint8 NHWC samples.")
    parser.add_argument("--reference", required=True, help="npz with arr_0: reference images.")
    parser.add_argument("--features", choices=sorted(CHANNELS), default="inception",
                        help="inception: the suite's graph (RGB); digits: our classifier (grey).")
    parser.add_argument("--inception_graph", help="The suite's classify_image_graph_def.pb.")
    parser.add_argument("--workdir", help="digits: where the classifier is trained and cached.")
    parser.add_argument("--num_samples", type=int, help="Evaluate the first N samples only.")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per feature batch.")
    parser.add_argument("--out", help="Also write the results as JSON here.")
    parser.add_argument("--no_cache", action="store_true",
                        help="Neither read nor write the reference statistics cache.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI: prints the table (and writes --out); bad input: `error: ...` on stderr, exit 2."""
    args = parse_args(argv)
    cli.start(log_info=False)
    try:
        if args.batch_size < 1:
            raise EvalInputError(f"--batch_size must be positive, got {args.batch_size}")
        if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
            raise EvalInputError(f"--out {args.out}: its folder does not exist")
        channels = CHANNELS[args.features]
        samples = NpzImages(args.samples, "samples", channels, args.num_samples)
        reference = NpzImages(args.reference, "reference", channels)
        extractor = make_extractor(args.features, args.inception_graph, args.workdir)
        results = _evaluate_npz(samples, reference, extractor, args.batch_size, not args.no_cache)
    except EvalInputError as e:
        return cli.fail(e)
    print(format_table(results))
    if args.out:
        save_json(args.out, results)
        print(f"wrote {args.out}")
    return 0
