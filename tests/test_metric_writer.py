"""The training loop's metric writer: TensorBoard event files without importing TensorFlow."""

import io
import os
import struct
import subprocess
import sys

import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

from dydit_jax.metric_writer import MetricWriter
from tests.helpers import REPO


def read_events(path):
    """Every record of a TFRecord event file, its two checksums verified."""
    data, events, at = open(path, "rb").read(), [], 0
    while at < len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked_crc32c(header)
        body = data[at + 12:at + 12 + length]
        assert struct.unpack("<I", data[at + 12 + length:at + 16 + length])[0] == (
            masked_crc32c(body)
        )
        events.append(event_pb2.Event.FromString(body))
        at += 16 + length
    return events


def test_scalars_and_images_reach_the_event_file(tmp_path, caplog):
    writer = MetricWriter(str(tmp_path))
    writer.write_scalars(4, {"loss": 0.25, "steps": 3})
    grid = np.arange(6 * 5, dtype=np.uint8).reshape(1, 6, 5, 1)
    writer.write_images(4, {"ema_samples": grid})
    writer.write_images(5, {"pair": np.ones((2, 3, 3, 3), np.float32)})
    writer.close()
    (name,) = os.listdir(tmp_path)
    assert name.startswith("events.out.tfevents.")  # what `tensorboard --logdir` looks for
    first, scalars, image, pair = read_events(tmp_path / name)
    assert first.file_version == "brain.Event:2"
    assert scalars.step == 4
    assert {v.tag: v.simple_value for v in scalars.summary.value} == {"loss": 0.25, "steps": 3}
    (value,) = image.summary.value
    assert value.tag == "ema_samples" and (value.image.height, value.image.width) == (6, 5)
    decoded = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
    np.testing.assert_array_equal(decoded, grid[0, ..., 0])
    assert [v.tag for v in pair.summary.value] == ["pair/0", "pair/1"]
    decoded = np.asarray(Image.open(io.BytesIO(pair.summary.value[1].image.encoded_image_string)))
    assert decoded.shape == (3, 3, 3) and (decoded == 255).all()


def test_just_logging_writes_no_file(tmp_path):
    writer = MetricWriter(str(tmp_path / "logs"), just_logging=True)
    writer.write_scalars(1, {"loss": 1.0})
    writer.close()
    assert not os.path.exists(tmp_path / "logs")


def test_the_writer_does_not_import_tensorflow(tmp_path):
    # clu's writers import TensorFlow (~7 s per train.py start on 2 cores); this one must not
    code = (
        "import sys; from dydit_jax import train_lib; from dydit_jax.metric_writer import "
        f"MetricWriter; w = MetricWriter({str(tmp_path)!r}); w.write_scalars(1, {{'a': 1.0}}); "
        "w.close(); assert 'tensorflow' not in sys.modules, 'tensorflow was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
