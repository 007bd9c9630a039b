"""Gaussian diffusion as DiT uses it: schedule, respacing, losses, samplers, guidance."""

from .gaussian import GaussianDiffusion, create_diffusion
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .respace import space_timesteps
from .samplers import (
    SAMPLERS,
    check_sampler,
    classifier_free_guidance,
    combine_guided,
    guidance_steps,
    guided_inputs,
    init_carry,
    initial_noise,
    parse_cfg_interval,
    sample_loop,
    sampler_step,
)

__all__ = [
    "SAMPLERS",
    "GaussianDiffusion",
    "check_sampler",
    "classifier_free_guidance",
    "combine_guided",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "guidance_steps",
    "guided_inputs",
    "init_carry",
    "initial_noise",
    "parse_cfg_interval",
    "mean_flat",
    "normal_kl",
    "sample_loop",
    "sampler_step",
    "space_timesteps",
]
