"""DiT's noise schedule (float64, so that respacing and the tiny early betas are exact)."""

import numpy as np


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """DiT's linear schedule, float64: linspace(1e-4, 0.02, T) (scaled for T != 1000)."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def log_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """lambda = log(alpha / sigma) with alpha = sqrt(abar), sigma = sqrt(1 - abar)."""
    abar = np.asarray(alphas_cumprod, np.float64)
    return 0.5 * (np.log(abar) - np.log1p(-abar))
