r"""Class-conditional DiT on scikit-learn's embedded digits (no download; CPU in minutes).

Train, then sample from the EMA weights:

  python train.py --config=configs/digits.py --workdir=workdirs/digits
  python sample.py --workdir=workdirs/digits --out=workdirs/digits/samples --num_samples=100

Variants (`configs/digits.py:VARIANT`):
  default  the quick start: a 4-block DiT (hidden 128) at 8x8, patch 2; 3-4 minutes on 2 CPU
           cores with the sampling above
  long     the best-quality demo: hidden 192, twice the batch, 1200 steps, 10-15 minutes
  tiny     a few-second smoke run for tests

Fields not set here keep the DiT recipe of `dydit_jax.config_lib.base_config()`. Override
any field: `--config.num_steps=3000 --config.model_overrides.depth=6`.
"""

import ml_collections

from dydit_jax.config_lib import base_config, model_overrides


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_config()
    # --- model: DiT-S/2 shrunk to fit a few minutes of a 2-core CPU
    config.model = "DiT-S/2"
    config.model_overrides = model_overrides(
        **dict(depth=4, hidden_size=128, num_heads=4, dtype="float32")
    )
    # --- data: native 8x8 grey digits (other image sizes resize bilinearly)
    config.dataset = "digits"
    config.image_size = 8
    config.in_channels = 1
    config.num_classes = 10
    # --- optimisation: a minutes-long run needs a larger lr (with warm-up and clipping to
    # keep it stable) and a shorter EMA horizon than the paper's 400K-step recipe
    config.num_steps = 1200
    config.global_batch_size = 64
    config.learning_rate = 2e-3
    config.warmup_steps = 50
    config.grad_clip_norm = 1.0
    config.ema_decay = 0.995
    # --- sampling: 1 grey channel, so guide it (the 3-channel quirk is for SD latents)
    config.sample.update(steps="100", cfg_scale=2.0, guided_channels=-1)
    config.sample.update(num_images=100, batch_size=100)
    # --- bookkeeping: one sample grid, at the end (each costs a sampling run)
    config.log_every_steps = 50
    config.checkpoint_every_steps = 600
    config.sample_every_steps = config.num_steps

    if arg == "long":
        config.model_overrides.update(hidden_size=192, num_heads=3)
        config.num_steps = 1200
        config.global_batch_size = 128
        config.learning_rate = 1e-3
        config.warmup_steps = 100
        config.checkpoint_every_steps = 400
        config.sample_every_steps = 400
    elif arg == "tiny":
        config.model_overrides.update(depth=2, hidden_size=64, num_heads=2)
        config.num_steps = 20
        config.global_batch_size = 32
        config.log_every_steps = 5
        config.checkpoint_every_steps = 10
        config.sample_every_steps = 20
        config.sample.update(steps="10", num_images=20, batch_size=20)
    elif arg not in (None, "", "default"):
        raise ValueError(f"unknown digits variant {arg!r}; use 'default', 'long' or 'tiny'")
    return config
