r"""Class-conditional DiT on scikit-learn's embedded digits (no download; CPU in minutes).

Train, then sample from the EMA weights:

  python train.py --config=configs/digits.py --workdir=workdirs/digits
  python sample.py --workdir=workdirs/digits --out=workdirs/digits/samples --num_samples=100

Variants (`configs/digits.py:VARIANT`):
  default  the demo: a 4-block DiT (hidden 192) at 8x8, patch 2, under 10 minutes on 2 cores
  tiny     a few-second smoke run for tests

Override any field: `--config.num_steps=500 --config.model_overrides.depth=4`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # --- model
    config.model = "DiT-S/2"  # a registry name; the overrides below shrink it for digits
    config.model_overrides = ml_collections.ConfigDict(
        dict(depth=4, hidden_size=192, num_heads=3, dtype="float32")
    )
    # --- data
    config.dataset = "digits"
    config.image_size = 8  # native 8x8; other sizes resize bilinearly
    config.in_channels = 1
    config.num_classes = 10
    config.label_dropout = 0.1  # classifier-free guidance training
    # --- optimisation
    config.num_steps = 1200
    config.global_batch_size = 128
    config.learning_rate = 1e-3
    config.warmup_steps = 100  # linear lr warm-up (0 = constant, the DiT recipe)
    config.weight_decay = 0.0
    config.grad_clip_norm = 1.0  # 0 = no clipping (the DiT recipe)
    config.ema_decay = 0.995  # per-step EMA of the weights used for sampling (short run)
    config.seed = 0
    # --- parallelism: mesh over ('data', 'fsdp', 'tensor'); -1 = the remaining devices
    config.mesh_shape = (-1, 1, 1)
    # --- diffusion and sampling
    config.diffusion_steps = 1000
    config.sample = ml_collections.ConfigDict(
        dict(
            sampler="ddpm",  # ddpm | ddim
            steps="100",  # respacing: "250", "ddim50", ...
            cfg_scale=2.0,  # classifier-free guidance scale (1.0 = none)
            guided_channels=-1,  # -1: guide all eps channels; 3: reference ImageNet quirk
            num_images=100,  # images in each periodic grid
            batch_size=100,
        )
    )
    # --- bookkeeping
    config.log_every_steps = 50
    config.checkpoint_every_steps = 400
    config.keep_checkpoints = 3
    config.sample_every_steps = 400

    if arg == "tiny":
        config.model_overrides.update(depth=2, hidden_size=64, num_heads=2)
        config.image_size = 8
        config.num_steps = 20
        config.global_batch_size = 32
        config.log_every_steps = 5
        config.checkpoint_every_steps = 10
        config.sample_every_steps = 20
        config.sample.update(steps="10", num_images=20, batch_size=20)
    elif arg not in (None, "", "default"):
        raise ValueError(f"unknown digits variant {arg!r}; use 'default' or 'tiny'")
    return config
