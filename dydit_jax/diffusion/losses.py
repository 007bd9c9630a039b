"""Likelihood helpers for the variational bound (IDDPM formulas, elementwise, jittable)."""

import math

import jax
import jax.numpy as jnp


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over every axis but the batch axis: per-example losses of shape (B,)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(
    mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array
) -> jax.Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats, elementwise (broadcasts)."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """Tanh approximation of the standard normal CDF (what IDDPM uses, so NLLs match it)."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: jax.Array, means: jax.Array, log_scales: jax.Array
) -> jax.Array:
    """Log-probability (nats) of x under a Gaussian discretized into bins of width 2/255.

    The data is treated as 8-bit values scaled to [-1, 1]; the two outermost bins extend to
    -inf / +inf. DiT keeps this decoder term for latents too, so we reproduce it exactly.
    """
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999,
        log_cdf_plus,
        jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )
