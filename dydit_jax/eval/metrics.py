"""The metrics of the standard ImageNet evaluation suite (guided-diffusion's
`evaluations/evaluator.py`) on precomputed features: FID / sFID (Frechet distance of Gaussian
fits), Inception Score, and k-nearest-neighbour precision and recall.

Pure numpy/scipy: no model, no files. Statistics are float64.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
from scipy import linalg, special


class Gaussian(NamedTuple):
    """Mean (D,) and covariance (D, D) of a feature set."""

    mu: np.ndarray
    sigma: np.ndarray


def fit_gaussian(features: np.ndarray) -> Gaussian:
    """Mean and covariance (np.cov, rowvar=False) of (N, D) features, in float64."""
    features = np.asarray(features, np.float64).reshape(len(features), -1)
    return Gaussian(features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False)))


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    # `disp=False` (the suite's call) is deprecated since SciPy 1.16 and removed in 1.18; the
    # default call returns the same matrix, plus an error estimate before 1.16 with disp=False.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old SciPy warns "Matrix is singular" here
        result = linalg.sqrtm(matrix)
    return result[0] if isinstance(result, tuple) else result


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2)), as the suite computes it.

    A non-finite square root (singular product) is retried with eps * I added to both
    covariances; a complex one must have a ~0 imaginary diagonal and its real part is used.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"sqrtm(sigma1 sigma2) has an imaginary component of "
                f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are not valid"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """Mean over consecutive splits of exp(mean_i KL(p_i || mean_j p_j)) of (N, C) class
    probabilities; the last split may be shorter. 0 log 0 counts as 0."""
    probs = np.asarray(probs, np.float64)
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = special.xlogy(part, part) - special.xlogy(part, marginal)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def pairwise_sq_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(len(u), len(v)) squared Euclidean distances in float32, clamped at 0 (the suite's
    |u|^2 - 2 u.v + |v|^2 expansion: one matrix product per block)."""
    u, v = np.asarray(u, np.float32), np.asarray(v, np.float32)
    norm_u = np.square(u).sum(axis=1)[:, None]
    norm_v = np.square(v).sum(axis=1)[None, :]
    return np.maximum(norm_u - 2 * (u @ v.T) + norm_v, 0.0)


def manifold_radii(
    features: np.ndarray, k: int = 3, row_block: int = 10000, col_block: int = 10000
) -> np.ndarray:
    """(N,) squared distance of each point to its k-th nearest neighbour in its own set (the
    point itself, at distance 0, is neighbour 0). Memory: one row_block x col_block block."""
    n = len(features)
    if n <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {n}")
    radii = np.zeros(n, np.float32)
    for r0 in range(0, n, row_block):
        rows = features[r0 : r0 + row_block]
        # The k+1 smallest distances seen so far per row: the k-th NN is among them.
        nearest = np.full((len(rows), 0), np.inf, np.float32)
        for c0 in range(0, n, col_block):
            block = pairwise_sq_distances(rows, features[c0 : c0 + col_block])
            candidates = np.concatenate([nearest, block], axis=1)
            keep = min(k + 1, candidates.shape[1])
            nearest = np.partition(candidates, keep - 1, axis=1)[:, :keep]
        radii[r0 : r0 + row_block] = np.partition(nearest, k, axis=1)[:, k]
    return radii


def precision_recall(
    reference: np.ndarray,
    samples: np.ndarray,
    k: int = 3,
    row_block: int = 10000,
    col_block: int = 10000,
) -> tuple[float, float]:
    """(precision, recall) of k-NN manifolds (Kynkaanniemi et al. 2019, as in the suite).

    precision: fraction of samples inside (<=) the k-NN ball of at least one reference point;
    recall: fraction of reference points inside the ball of at least one sample.
    """
    ref_radii = manifold_radii(reference, k, row_block, col_block)
    sample_radii = manifold_radii(samples, k, row_block, col_block)
    ref_covered = np.zeros(len(reference), bool)
    sample_covered = np.zeros(len(samples), bool)
    for r0 in range(0, len(reference), row_block):
        r1 = r0 + row_block
        for c0 in range(0, len(samples), col_block):
            c1 = c0 + col_block
            d = pairwise_sq_distances(reference[r0:r1], samples[c0:c1])
            ref_covered[r0:r1] |= (d <= sample_radii[None, c0:c1]).any(axis=1)
            sample_covered[c0:c1] |= (d <= ref_radii[r0:r1, None]).any(axis=0)
    return float(sample_covered.mean()), float(ref_covered.mean())


def class_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose most probable class is the label."""
    return float(np.mean(np.argmax(probs, axis=1) == np.asarray(labels).reshape(-1)))
