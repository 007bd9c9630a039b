"""grain pipelines over random-access sources.

A batch is a pure function of the step: `batches[step]` with a per-epoch reshuffle. Resuming
at step s therefore reads exactly the batches an uninterrupted run would have read, with no
iterator state to save. Each process reads only its own share of every global batch.
"""

from __future__ import annotations

import grain
import jax
import numpy as np


class ArraySource:
    """Random-access source over in-memory arrays: item i -> {"image": x[i], "label": y[i]}."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": self.labels[index]}


def load_source(config) -> ArraySource:
    """The training source named by `config.dataset`."""
    if config.dataset == "digits":
        from dydit_jax.data.digits import load_digits

        return ArraySource(*load_digits(config.image_size))
    raise ValueError(f"unknown dataset {config.dataset!r}; available: 'digits'")


def make_batches(
    source,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """Infinite MapDataset of this process's rows of each global batch, indexed by step."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by the "
            f"{process_count} processes"
        )
    if len(source) < global_batch_size:
        raise ValueError(
            f"the dataset has {len(source)} examples, fewer than global_batch_size "
            f"{global_batch_size}; lower global_batch_size"
        )
    per_process = global_batch_size // process_count
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    ds = ds.batch(global_batch_size, drop_remainder=True, batch_fn=_stack)
    lo = process_index * per_process
    return ds.map(lambda batch: {k: v[lo : lo + per_process] for k, v in batch.items()})


def _stack(items) -> dict:
    return {k: np.stack([item[k] for item in items]) for k in items[0]}
