"""Input data: sources and grain pipelines."""

from dydit_jax.data.digits import load_digits
from dydit_jax.data.latents import LatentSource, sample_from_moments, write_latent_shards
from dydit_jax.data.pipeline import ArraySource, load_source, make_batches

__all__ = [
    "ArraySource",
    "LatentSource",
    "load_digits",
    "load_source",
    "make_batches",
    "sample_from_moments",
    "write_latent_shards",
]
