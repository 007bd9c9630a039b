"""grain pipelines over random-access sources.

A batch is a pure function of the step: `batches[step]` with a per-epoch reshuffle. Resuming
at step s therefore reads exactly the batches an uninterrupted run would have read, with no
iterator state to save. Each process reads only its own share of every global batch.
"""

from __future__ import annotations

import grain
import jax
import numpy as np

from dydit_jax.data.digits import load_digits
from dydit_jax.data.latents import LatentSource


class ArraySource:
    """Random-access source over in-memory arrays: item i -> {"image": x[i], "label": y[i]}.

    `.images` and `.labels` are the whole arrays (as `LatentSource.labels`)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    @property
    def example_shape(self) -> dict[str, tuple[int, ...]]:
        return {"image": tuple(self.images.shape[1:]), "label": ()}

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": self.labels[index]}


def load_source(config) -> ArraySource | LatentSource:
    """The training source named by `config.dataset`: "digits", or "latents" (a directory of
    latent shards written by `write_latent_shards`, at `config.data_dir`)."""
    if config.dataset == "digits":

        return ArraySource(*load_digits(config.image_size))
    if config.dataset == "latents":
        data_dir = getattr(config, "data_dir", None)
        if not data_dir:
            raise ValueError(
                "config.dataset='latents' reads a directory written by write_latent_shards; "
                "set --config.data_dir=/path/to/latents"
            )
        return LatentSource(data_dir)
    raise ValueError(f"unknown dataset {config.dataset!r}; available: 'digits', 'latents'")


def make_batches(
    source,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """Infinite MapDataset of this process's rows of each global batch, indexed by step.

    Global batch `step` is positions ``step * G .. step * G + G - 1`` of the index stream
    ``MapDataset.range(len(source)).shuffle(seed).repeat()`` (G = global_batch_size: a
    reshuffle every epoch, batches straddling epoch ends). A process reads only its own
    ``G / process_count`` consecutive positions of it, so the processes' rows of a step,
    concatenated in process order, are exactly the single-process batch of that step.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by the "
            f"{process_count} processes"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if len(source) < global_batch_size:
        raise ValueError(
            f"the dataset has {len(source)} examples, fewer than global_batch_size "
            f"{global_batch_size}; lower global_batch_size"
        )
    per_process = global_batch_size // process_count
    order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
    read = _ReadRows(source, order, global_batch_size, process_index * per_process, per_process)
    return grain.MapDataset.range(len(order) // global_batch_size).map(read)


class _ReadRows:
    """step -> this process's rows of global batch `step`, read from the source alone."""

    def __init__(self, source, order, global_batch_size: int, lo: int, count: int):
        self.source, self.order = source, order
        self.global_batch_size, self.lo, self.count = global_batch_size, lo, count

    def __call__(self, step: int) -> dict:
        start = int(step) * self.global_batch_size + self.lo
        indices = [int(self.order[start + j]) for j in range(self.count)]
        if hasattr(self.source, "__getitems__"):
            items = self.source.__getitems__(indices)
        else:
            items = [self.source[i] for i in indices]
        return _stack(items)


def _stack(items) -> dict:
    return {k: np.stack([item[k] for item in items]) for k in items[0]}
