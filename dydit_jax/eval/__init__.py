"""Evaluation of sample batches: FID, sFID, Inception Score, precision/recall (the standard
ImageNet suite's definitions) on Inception features or on our digits classifier."""

from dydit_jax.eval.evaluate import (
    evaluate_arrays,
    evaluate_features,
    evaluate_files,
    make_extractor,
    reference_statistics,
)
from dydit_jax.eval.features import EvalInputError, FeatureExtractor, InceptionGraph

__all__ = [
    "EvalInputError",
    "FeatureExtractor",
    "InceptionGraph",
    "evaluate_arrays",
    "evaluate_features",
    "evaluate_files",
    "make_extractor",
    "reference_statistics",
]
