"""sample.py: determinism, the .npz format, labels, and clear errors."""

import os

import numpy as np
import pytest
from PIL import Image

from dydit_jax import checkpoint as ckpt_lib
from dydit_jax import sample_lib, train_lib
from tests.helpers import run_entry_point, tiny_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("trained"))
    train_lib.train_and_evaluate(tiny_config(num_steps=4), path)
    return path


def test_same_seed_same_images_and_npz_format(workdir, tmp_path):
    kwargs = dict(num_samples=13, sampling_steps="5", batch_size=8)
    sample_lib.sample_from_workdir(workdir, str(tmp_path / "a"), seed=3, **kwargs)
    # image i depends on (seed, i, label) only: another batch size gives the same images
    sample_lib.sample_from_workdir(
        workdir, str(tmp_path / "b"), seed=3, **(kwargs | {"batch_size": 16})
    )
    sample_lib.sample_from_workdir(workdir, str(tmp_path / "c"), seed=4, **kwargs)
    a, b, c = (np.load(tmp_path / d / "samples.npz") for d in "abc")
    assert sorted(a.files) == ["arr_0", "arr_1"]
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (13, 8, 8, 1)
    np.testing.assert_array_equal(a["arr_1"], np.arange(13) % 10)  # balanced labels
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    assert not np.array_equal(a["arr_0"], c["arr_0"])
    grid = Image.open(tmp_path / "a" / "grid.png")
    assert grid.size[0] > 8 * 10  # ten columns of (upscaled) images


def test_sample_cli_with_ddim_and_labels(workdir, tmp_path):
    out = tmp_path / "out"
    proc = run_entry_point(
        "sample.py", f"--workdir={workdir}", f"--out={out}", "--num_samples=5",
        "--sampler=ddim", "--sampling_steps=ddim10", "--labels=1,2", "--cfg_scale=1.0",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = np.load(out / "samples.npz")
    np.testing.assert_array_equal(data["arr_1"], [1, 2, 1, 2, 1])
    assert data["arr_0"].shape == (5, 8, 8, 1)
    assert (out / "grid.png").exists()


def test_sample_without_checkpoint_is_one_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ckpt_lib.CheckpointNotFoundError, match="train first"):
        sample_lib.sample_from_workdir(str(empty), str(tmp_path / "o"), num_samples=2)
    proc = run_entry_point(
        "sample.py", f"--workdir={empty}", f"--out={tmp_path / 'o'}", "--num_samples=2"
    )
    assert proc.returncode != 0
    assert "no checkpoint found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
    assert os.listdir(empty) == []


def test_bad_labels_are_refused(workdir, tmp_path):
    with pytest.raises(ValueError, match="outside 0..9"):
        sample_lib.sample_from_workdir(workdir, str(tmp_path / "o"), num_samples=2, labels="3,12")
    assert not (tmp_path / "o").exists()
