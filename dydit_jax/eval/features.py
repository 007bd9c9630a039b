"""Feature extractors for the metrics, behind one interface, and batched extraction.

An extractor maps uint8 NHWC images to a dict of float arrays:
  pool    (N, D)  features for FID and precision/recall,
  spatial (N, S)  features for sFID,
  probs   (N, C)  class probabilities for the Inception Score (and class accuracy).
`name` names the stats cache, `identity` keys it (a changed extractor invalidates it),
`channels` is the channel count it accepts and `class_labels` says whether its classes are the
sampler's labels (then the class accuracy of labelled samples is reported).

`InceptionGraph` runs the suite's TensorFlow Inception graph; the digits classifier lives in
`digits_classifier.py`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np
from tqdm.auto import tqdm

from dydit_jax import files

GRAPH_HELP = (
    "use the standard evaluation suite's Inception graph `classify_image_graph_def.pb` (linked "
    "from the README of guided-diffusion's evaluations/ folder) and pass --inception_graph PATH"
)


class EvalInputError(ValueError):
    """Bad input to the evaluation; the message says what is wrong and what to do."""


class FeatureExtractor:
    """Interface: name, identity, channels and __call__(uint8 NHWC) -> {pool, spatial, probs}."""

    name: str = ""
    channels: int = 3
    class_labels: bool = False  # probs' classes are the sampler's labels: class accuracy

    @property
    def identity(self) -> str:
        return self.name

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError


def extract_features(
    extractor: FeatureExtractor,
    batches: Iterable[np.ndarray],
    total: int | None = None,
    desc: str = "features",
) -> dict[str, np.ndarray]:
    """Runs the extractor over uint8 batches (tqdm bar) and concatenates its outputs."""
    parts: dict[str, list[np.ndarray]] = {}
    with tqdm(total=total, desc=desc, unit="img") as bar:
        for batch in batches:
            for key, value in extractor(batch).items():
                parts.setdefault(key, []).append(np.asarray(value))
            bar.update(len(batch))
    if not parts:
        raise EvalInputError(f"{desc}: no images to extract features from")
    return {key: np.concatenate(values, axis=0) for key, values in parts.items()}


class InceptionGraph(FeatureExtractor):
    """The suite's Inception-v3 GraphDef (`classify_image_graph_def.pb`), run with TF1-style
    graph import (tf.compat.v1) on the CPU.

    float32 images (0..255, NHWC, any size; the graph resizes to 299x299 itself) are fed into
    `ExpandDims:0`; pool = `pool_3:0` (N, 2048); spatial = the first 7 channels of
    `mixed_6/conv:0`, flattened (7 x 17 x 17 = 2023); probs = softmax(pool @ W) with W the
    weight input of `softmax/logits/MatMul` (the logits without bias, as in the suite).
    """

    name = "inception"
    channels = 3
    INPUT = "ExpandDims"
    POOL = "pool_3"
    SPATIAL = "mixed_6/conv"
    LOGITS = "softmax/logits/MatMul"
    SPATIAL_CHANNELS = 7

    def __init__(self, path: str | None):
        if not path:
            raise EvalInputError(f"no Inception graph given: {GRAPH_HELP}")
        if not os.path.isfile(path):
            raise EvalInputError(f"Inception graph {path} not found: {GRAPH_HELP}")
        self.path = path
        self._identity = f"inception:{files.sha256_file(path)}"
        self._build()

    @property
    def identity(self) -> str:
        return self._identity

    def _build(self) -> None:
        try:  # TensorFlow, the imagenet extra, is needed (and imported) for this extractor only
            import tensorflow as tf
            from google.protobuf.message import DecodeError  # comes with TensorFlow
        except ImportError as e:
            raise EvalInputError(
                "--features=inception runs the Inception graph with TensorFlow, the imagenet "
                "extra: pip install -e '.[imagenet]'"
            ) from e

        try:  # keep TensorFlow off the accelerators: they belong to JAX
            tf.config.set_visible_devices([], "GPU")
        except (RuntimeError, ValueError):
            pass  # devices already initialised, or no GPU support in this build
        v1 = tf.compat.v1
        graph_def = v1.GraphDef()
        with open(self.path, "rb") as f:
            data = f.read()
        try:
            graph_def.ParseFromString(data)
        except (DecodeError, RuntimeError, ValueError) as e:
            raise EvalInputError(
                f"{self.path} is not a TensorFlow GraphDef ({e}): {GRAPH_HELP}"
            ) from e
        names = {node.name for node in graph_def.node}
        needed = (self.INPUT, self.POOL, self.SPATIAL, self.LOGITS)
        missing = [name for name in needed if name not in names]
        if missing:
            raise EvalInputError(
                f"{self.path} lacks the graph nodes {', '.join(missing)} "
                f"(needs {', '.join(needed)}): {GRAPH_HELP}"
            )
        self.graph = v1.Graph()
        with self.graph.as_default():
            self.images = v1.placeholder(tf.float32, [None, None, None, 3], name="images")
            try:
                pool, spatial, matmul = v1.import_graph_def(
                    graph_def,
                    input_map={f"{self.INPUT}:0": self.images},
                    return_elements=[f"{self.POOL}:0", f"{self.SPATIAL}:0", self.LOGITS],
                    name="inception",
                )
            except (ValueError, TypeError, tf.errors.OpError) as e:
                raise EvalInputError(f"cannot import {self.path}: {e}: {GRAPH_HELP}") from e
        self.pool, self.spatial = pool, spatial
        config = v1.ConfigProto(device_count={"GPU": 0})
        self.session = v1.Session(graph=self.graph, config=config)
        try:
            self.weights = np.asarray(self.session.run(matmul.inputs[1]), np.float64)
        except tf.errors.OpError as e:
            raise EvalInputError(
                f"{self.path}: the weight of {self.LOGITS} cannot be evaluated: {e.message}"
            ) from e

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        pool, spatial = self.session.run(
            [self.pool, self.spatial], {self.images: np.asarray(images, np.float32)}
        )
        n = len(images)
        pool = pool.reshape(n, -1)
        spatial = spatial[..., : self.SPATIAL_CHANNELS].reshape(n, -1)
        logits = pool.astype(np.float64) @ self.weights
        return {"pool": pool, "spatial": spatial, "probs": softmax(logits)}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- atomic files


def save_npz(path: str, **arrays: np.ndarray) -> None:
    files.atomic_write(path, lambda f: np.savez(f, **arrays), suffix=".npz")


def save_json(path: str, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    files.atomic_write(path, lambda f: f.write(text.encode()), suffix=".json")
