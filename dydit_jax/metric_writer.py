"""The training loop's metric writer: log lines plus TensorBoard event files, without TensorFlow.

clu's `metric_writers` package imports TensorFlow when it is imported (its summary writer),
seconds of every `train.py` start and every resume. This writer keeps clu's interface
(`write_scalars`, `write_images`, `flush`, `close`) and writes the event file itself:
`tensorboard`'s protobufs and record framing (what `tensorboard --logdir` reads); its own
event-file writer would import TensorFlow again, for file access.
"""

from __future__ import annotations

import io
import os
import socket
import time
from collections.abc import Mapping

import numpy as np
from absl import logging
from etils import epath
from PIL import Image


def _number(value) -> str:
    if isinstance(value, float | np.floating):
        return f"{float(value):.4g}"
    return str(value)


class MetricWriter:
    """Scalars and images per step: one log line each, and (unless `just_logging`, as for
    the non-primary processes of a multi-host run) TensorBoard events in `logdir`."""

    def __init__(self, logdir: str, *, just_logging: bool = False):
        self._events = None
        if not just_logging:
            # imported here: only the writing process needs them (none imports TensorFlow)
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.record_writer import RecordWriter  # as above

            self._summary, self._event = summary_pb2, event_pb2
            name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
            path = epath.Path(logdir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            self._events = RecordWriter(path.open("wb"))
            self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        first = [k for k in ("loss", "mse", "vb") if k in scalars]  # then by name
        names = first + sorted(k for k in scalars if k not in first)
        logging.info("step %d: %s", step, "  ".join(f"{k} {_number(scalars[k])}" for k in names))
        if self._events is not None:
            summary = self._summary.Summary(value=[
                self._summary.Summary.Value(tag=k, simple_value=float(v))
                for k, v in sorted(scalars.items())
            ])
            self._add(step, summary)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """`images`: name -> (N, H, W, C) uint8 (C = 1 or 3), or floats in [0, 1]."""
        if self._events is None:
            return
        values = []
        for name, batch in sorted(images.items()):
            batch = np.asarray(batch)
            if batch.dtype != np.uint8:
                batch = np.round(np.clip(batch, 0, 1) * 255).astype(np.uint8)
            for i, image in enumerate(batch):
                png = io.BytesIO()
                Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
                    png, format="PNG"
                )
                encoded = self._summary.Summary.Image(
                    height=image.shape[0], width=image.shape[1], colorspace=image.shape[2],
                    encoded_image_string=png.getvalue(),
                )
                tag = name if len(batch) == 1 else f"{name}/{i}"
                values.append(self._summary.Summary.Value(tag=tag, image=encoded))
        self._add(step, self._summary.Summary(value=values))

    def _add(self, step: int, summary) -> None:
        self._write(self._event.Event(wall_time=time.time(), step=step, summary=summary))

    def _write(self, event) -> None:
        self._events.write(event.SerializeToString())
        self._events.flush()  # a few small records per log interval: readable at once

    def flush(self) -> None:
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
