"""Gaussian diffusion with eps prediction and learned-range variance (IDDPM as DiT uses it).

Schedule tables live in float64 numpy (so respacing and the tiny early betas are exact) and are
cast to float32 only when gathered for a batch of timesteps, which keeps everything jittable
under JAX's default float32.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .respace import space_timesteps
from .schedule import linear_betas, log_snr

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def gather(table: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
    """table[t] as float32, shaped (B, 1, ..., 1) to broadcast against an ndim-rank batch."""
    vals = jnp.asarray(table, jnp.float32)[t]
    return vals.reshape(vals.shape + (1,) * (ndim - vals.ndim))


class GaussianDiffusion:
    """Precomputed schedule plus the q / posterior / p computations of one (respaced) diffusion.

    All `t` arguments are step indices into THIS diffusion's steps; `timestep_map[t]` is the
    original 0..T-1 timestep that the network must see.
    """

    def __init__(
        self, betas: np.ndarray, timestep_map: np.ndarray | None = None,
        train_timesteps: int | None = None,
    ):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        n = betas.shape[0]
        self.num_timesteps: int = int(n)
        if timestep_map is None:
            timestep_map = np.arange(n)
        self.timestep_map: np.ndarray = np.asarray(timestep_map, dtype=np.int32)
        # the unrespaced diffusion's step count (timestep_map's range)
        self.train_timesteps: int = int(train_timesteps or n)
        if self.timestep_map.shape != (n,):
            raise ValueError("timestep_map must have one entry per step")

        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        self.log_betas = np.log(betas)

        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # Entry 0 of the posterior variance is 0; its log is clipped by reusing entry 1. A
        # single-step diffusion has no entry 1, so fall back to log(beta_0) (any finite value
        # works there: step 0 never adds noise and its KL is replaced by the decoder NLL).
        if n > 1:
            clipped = np.append(self.posterior_variance[1], self.posterior_variance[1:])
            self.posterior_log_variance_clipped = np.log(clipped)
        else:
            self.posterior_log_variance_clipped = np.log(betas.copy())
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)
        )

        # DPM-Solver++(2M), data prediction, from step i to step i-1 (the clean image at
        # i = 0): x <- sigma_ratio x + x0_coef (x0 + x0_weight (x0 - x0_before)), x0_before
        # being the prediction of the step before (i+1). lambda = log(alpha / sigma); the
        # first step (no earlier prediction) and the last (to sigma = 0) are first order.
        lam = log_snr(self.alphas_cumprod)
        h = np.append(np.inf, lam[:-1]) - lam  # lambda(target) - lambda(here), > 0
        self.dpm_sigma_ratio = np.sqrt(
            (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.dpm_x0_coef = np.sqrt(self.alphas_cumprod_prev) * -np.expm1(-h)
        self.dpm_x0_weight = np.zeros(n)
        if n > 2:  # h over twice the previous step's h
            self.dpm_x0_weight[1:-1] = h[1:-1] / (2.0 * (lam[1:-1] - lam[2:]))

    def original_timesteps(self, t: jax.Array) -> jax.Array:
        """Map step indices to the original timesteps the network was trained on."""
        return jnp.asarray(self.timestep_map, jnp.int32)[t]

    def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I) with the given noise."""
        nd = x0.ndim
        return (
            gather(self.sqrt_alphas_cumprod, t, nd) * x0
            + gather(self.sqrt_one_minus_alphas_cumprod, t, nd) * noise
        )

    def q_posterior_mean_variance(
        self, x0: jax.Array, x_t: jax.Array, t: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        nd = x_t.ndim
        mean = gather(self.posterior_mean_coef1, t, nd) * x0 + gather(
            self.posterior_mean_coef2, t, nd
        ) * x_t
        variance = jnp.broadcast_to(gather(self.posterior_variance, t, nd), x_t.shape)
        log_variance = jnp.broadcast_to(
            gather(self.posterior_log_variance_clipped, t, nd), x_t.shape
        )
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
        """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), written with the precomputed tables."""
        nd = x_t.ndim
        return (
            gather(self.sqrt_recip_alphas_cumprod, t, nd) * x_t
            - gather(self.sqrt_recipm1_alphas_cumprod, t, nd) * eps
        )

    def predict_eps_from_xstart(
        self, x_t: jax.Array, t: jax.Array, pred_xstart: jax.Array
    ) -> jax.Array:
        """Inverse of `predict_xstart_from_eps` (DDIM re-derives eps this way, as IDDPM does)."""
        nd = x_t.ndim
        return (gather(self.sqrt_recip_alphas_cumprod, t, nd) * x_t - pred_xstart) / gather(
            self.sqrt_recipm1_alphas_cumprod, t, nd
        )

    def p_mean_variance(
        self, model_out: jax.Array, x_t: jax.Array, t: jax.Array
    ) -> dict[str, jax.Array]:
        """p(x_{t-1} | x_t) from an already computed model output [eps, v].

        Variance is learned-range: log_var interpolates between log(beta_t) and the clipped
        posterior log-variance with frac = (v + 1) / 2. No clipping of x0 (DiT samples with
        clip_denoised=False).
        """
        c = x_t.shape[-1]
        if model_out.shape[-1] != 2 * c:
            raise ValueError(f"model output must have {2 * c} channels, got {model_out.shape}")
        eps, v = model_out[..., :c], model_out[..., c:]
        nd = x_t.ndim
        min_log = gather(self.posterior_log_variance_clipped, t, nd)
        max_log = gather(self.log_betas, t, nd)
        frac = (v + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {
            "mean": mean,
            "variance": jnp.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
        }

    def vb_terms_bpd(
        self, model_out: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array
    ) -> jax.Array:
        """Per-example VLB term in bits: KL to the true posterior, or decoder NLL at t == 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_out, x_t, t)
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(
            x0, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        nll = mean_flat(nll) / math.log(2.0)
        return jnp.where(t == 0, nll, kl)

    def training_losses(
        self, model_fn: ModelFn, x0: jax.Array, t: jax.Array, noise: jax.Array
    ) -> dict[str, jax.Array]:
        """Per-example DiT loss terms: mse on eps + vb (bits) that trains only the variance.

        The eps channels are stop-gradiented inside the VLB so it cannot pull the mean, which
        is trained by the simple mse alone (IDDPM hybrid loss, unscaled as in DiT).
        """
        x_t = self.q_sample(x0, t, noise)
        model_out = model_fn(x_t, self.original_timesteps(t))
        c = x0.shape[-1]
        eps, v = model_out[..., :c], model_out[..., c:]
        frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=-1)
        vb = self.vb_terms_bpd(frozen, x0, x_t, t)
        mse = mean_flat(jnp.square(noise - eps))
        return {"loss": mse + vb, "mse": mse, "vb": vb}


def create_diffusion(
    timestep_respacing: str | None = None, num_timesteps: int = 1000
) -> GaussianDiffusion:
    """Build DiT's diffusion; a respacing string keeps a subset of steps for sampling.

    Respaced betas are rebuilt from the kept alpha_bars, beta_i = 1 - abar_{k_i}/abar_{k_{i-1}}
    (abar_{k_{-1}} = 1), so the kept marginals q(x_{k_i} | x_0) are exactly the original ones.
    """
    base_betas = linear_betas(num_timesteps)
    if not timestep_respacing:
        return GaussianDiffusion(base_betas)
    kept = space_timesteps(num_timesteps, timestep_respacing)
    abar = np.cumprod(1.0 - base_betas)
    kept_abar = abar[kept]
    prev = np.append(1.0, kept_abar[:-1])
    return GaussianDiffusion(
        1.0 - kept_abar / prev, timestep_map=np.asarray(kept), train_timesteps=num_timesteps
    )
