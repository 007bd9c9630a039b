"""scikit-learn's embedded digits: 1797 grey 8x8 images of 10 classes (no download)."""

from __future__ import annotations

import jax
import numpy as np


def load_digits(image_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Images NHWC float32 in [-1, 1] of shape (1797, S, S, 1) and int32 labels 0..9.

    Pixels are 0..16 in the source; `image_size` other than 8 resizes bilinearly.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    data = sk_load_digits()
    images = (data.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[..., None]
    if image_size != images.shape[1]:
        shape = (images.shape[0], image_size, image_size, 1)
        images = np.asarray(jax.image.resize(images, shape, "bilinear"), np.float32)
        images = np.clip(images, -1.0, 1.0)
    return images, data.target.astype(np.int32)
