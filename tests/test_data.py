"""Digits source, step-indexed batches and mesh helpers."""

import numpy as np
import pytest

from dydit_jax import parallel
from dydit_jax.data import ArraySource, load_digits, make_batches


def test_digits_are_embedded_scaled_and_resizable():
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
    assert images.min() == -1.0 and images.max() == 1.0
    assert set(labels.tolist()) == set(range(10))
    # read from the data file directly (no scikit-learn import): the same as its loader
    from sklearn.datasets import load_digits as sk_load_digits

    reference = sk_load_digits()
    np.testing.assert_array_equal(labels, reference.target)
    np.testing.assert_array_equal(images[..., 0], reference.images / 16.0 * 2.0 - 1.0)
    big, _ = load_digits(16)
    assert big.shape == (1797, 16, 16, 1) and -1.0 <= big.min() and big.max() <= 1.0


def test_batches_are_a_function_of_the_step_and_split_across_processes():
    source = ArraySource(np.arange(20, dtype=np.float32)[:, None], np.arange(20) % 3)
    whole = make_batches(source, global_batch_size=8, seed=1, process_index=0, process_count=1)
    again = make_batches(source, global_batch_size=8, seed=1, process_index=0, process_count=1)
    np.testing.assert_array_equal(whole[5]["image"], again[5]["image"])
    parts = [
        make_batches(source, global_batch_size=8, seed=1, process_index=i, process_count=2)
        for i in range(2)
    ]
    for step in range(6):
        joined = np.concatenate([p[step]["image"] for p in parts])
        np.testing.assert_array_equal(joined, whole[step]["image"])
    # every epoch visits each example once (within the first 2 full epochs of 20)
    seen = np.concatenate([whole[s]["image"][:, 0] for s in range(5)])
    assert sorted(seen[:20].tolist()) == list(range(20))


def test_mesh_shape_resolution_and_errors():
    assert parallel.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert parallel.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="does not divide"):
        parallel.resolve_mesh_shape((3, -1, 1), 8)
    with pytest.raises(ValueError, match="devices but 8 are present"):
        parallel.resolve_mesh_shape((2, 2, 1), 8)
    with pytest.raises(ValueError, match="3 entries"):
        parallel.resolve_mesh_shape((8,), 8)
