"""scikit-learn's embedded digits: 1797 grey 8x8 images of 10 classes (no download)."""

from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np


def _digits_table() -> np.ndarray:
    """The (1797, 65) table of scikit-learn's digits.csv.gz: 64 pixels, then the label.

    Read straight from the installed package's data file: importing scikit-learn itself
    takes ~2 s, paid again by every train/sample process; its loader is the fallback.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.exists(path):
            return np.loadtxt(path, delimiter=",")
    from sklearn.datasets import load_digits as sk_load_digits  # heavy (scipy): once

    data = sk_load_digits()
    return np.concatenate([data.data, data.target[:, None]], axis=1)


def load_digits(image_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Images NHWC float32 in [-1, 1] of shape (1797, S, S, 1) and int32 labels 0..9.

    Pixels are 0..16 in the source; `image_size` other than 8 resizes bilinearly.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    table = _digits_table()
    pixels, target = table[:, :64].reshape(-1, 8, 8), table[:, 64]
    images = (pixels.astype(np.float32) / 16.0 * 2.0 - 1.0)[..., None]
    if image_size != images.shape[1]:
        shape = (images.shape[0], image_size, image_size, 1)
        images = np.asarray(jax.image.resize(images, shape, "bilinear"), np.float32)
        images = np.clip(images, -1.0, 1.0)
    return images, target.astype(np.int32)
