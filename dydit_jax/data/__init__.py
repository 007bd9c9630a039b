"""Input data: sources and grain pipelines."""

from dydit_jax.data.digits import load_digits
from dydit_jax.data.pipeline import ArraySource, load_source, make_batches

__all__ = ["ArraySource", "load_digits", "load_source", "make_batches"]
