r"""U-DiT on ImageNet VAE latents: the recipe of Tian et al. (NeurIPS 2024), and a digits demo.

Variants (`configs/udit.py:VARIANT`): `SIZE[,RES][,SCHEDULE][,vanilla]` with SIZE in S, B, L;
RES the image resolution, 256 (default; latent 32x32) or 512 (latent 64x64); SCHEDULE 400K
(default, the paper's main table) or 1M; `vanilla` for the plain baseline (dot-product
attention, no RoPE, Linear-GELU MLP). Examples: `B`, `B,512`, `B,256,1M`, `L,1M`, `S,vanilla`.
`digits` is a CPU-sized U-DiT on the embedded 8x8 digits. U-DiT needs a side divisible by 8
(two 2x downsamplings, then 2x2 token sub-grids), which 8x8 already is: the stages run at 8x8,
4x4 and 2x2, so the 1/4-resolution stage attends within 1x1 sub-grids (one token each). For
real attention there, resize the digits (bilinear, in the data source):
`--config.image_size=16` (about 4x the compute).

ImageNet latents come from our extraction tool (`dydit_jax.data.write_latent_shards`); point
`--config.data_dir` at their directory. One GPU, or all GPUs of a host (data parallel):

  python train.py --config=configs/udit.py:B --workdir=workdirs/udit_b \
      --config.data_dir=/data/imagenet256_latents

FSDP over the local devices (parameters, EMA and optimizer state sharded):

  python train.py --config=configs/udit.py:L,256,1M --workdir=workdirs/udit_l_1m \
      --config.data_dir=/data/imagenet256_latents --config.mesh_shape='(1,-1,1)'

512px:

  python train.py --config=configs/udit.py:B,512 --workdir=workdirs/udit_b_512 \
      --config.data_dir=/data/imagenet512_latents

Several hosts: the same command on every host with JAX_COORDINATOR_ADDRESS=host0:1234
JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i in the environment (or DYDIT_DISTRIBUTED=1 on a TPU pod),
as in configs/dit.py.

Digits on a CPU, then samples from the EMA weights:

  python train.py --config=configs/udit.py:digits --workdir=workdirs/udit_digits
  python sample.py --workdir=workdirs/udit_digits --out=workdirs/udit_digits/samples \
      --num_samples=100

Reference checkpoints: `python -m dydit_jax.convert udit --src U-DiT-B-400k.pt --dst DIR`
(add `--input-size 64` for 512px files). Sampling uses the fused FFN form:
`dydit_jax.models.fuse_model_params(config, params)`.

Fields not set here keep the DiT recipe of `dydit_jax.config_lib.base_config()`, which is
U-DiT's: AdamW lr 1e-4 constant, no weight decay, EMA 0.9999, global batch 256, label dropout
0.1 (each of U-DiT's three label embedders drops independently), learned sigma with the
hybrid loss. Override any field: `--config.global_batch_size=512
--config.model_overrides.remat=full`.
"""

import ml_collections

from dydit_jax import models, parallel
from dydit_jax.config_lib import base_config, model_overrides

# image resolution -> latent size (the KL-f8 VAE downsamples by 8)
RESOLUTIONS = {256: 32, 512: 64}
SCHEDULES = {"400K": 400_000, "1M": 1_000_000}


def sizes() -> list[str]:
    """The model sizes, from the registry: S, B, L."""
    return [name.removeprefix("U-DiT-") for name in models.model_names("U-DiT")]


def _usage(arg) -> ValueError:
    return ValueError(
        f"unknown U-DiT variant {arg!r}; use SIZE[,RES][,SCHEDULE][,vanilla] with SIZE one "
        f"of {', '.join(sizes())}, RES one of {', '.join(map(str, RESOLUTIONS))} and SCHEDULE "
        f"one of {', '.join(SCHEDULES)} (e.g. 'B', 'B,512', 'B,256,1M'), or 'digits'"
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tokens = [p.strip() for p in (arg or "B").split(",")]
    if tokens == ["digits"]:
        return digits_config()
    size, options = tokens[0], tokens[1:]
    if size not in sizes():
        raise _usage(arg)
    res, steps, vanilla = 256, "400K", False
    for option in options:
        if option in map(str, RESOLUTIONS):
            res = int(option)
        elif option.upper() in SCHEDULES:
            steps = option.upper()
        elif option == "vanilla":
            vanilla = True
        else:
            raise _usage(arg)
    if len(options) != len(set(options)):
        raise _usage(arg)

    config = base_config()
    # --- model
    config.model = f"U-DiT-{size}"
    config.model_overrides = model_overrides(
        **dict(
            vanilla=vanilla,  # plain baseline: dot-product attention, no RoPE, plain MLP
            dtype="bfloat16",  # compute dtype; parameters, optimizer and EMA stay float32
            attention="xla",  # einsum (f32 softmax, reference numerics) | xla | cudnn (flash)
            remat="none",  # none | dots | full: trade recompute for activation memory
        )
    )
    # --- data: precomputed VAE latents (z * 0.18215), 4 channels, ImageNet's 1000 classes
    config.dataset = "latents"
    config.data_dir = ""  # required: --config.data_dir=/path/to/latents
    config.image_size = RESOLUTIONS[res]  # latent size
    config.in_channels = 4
    config.num_classes = 1000
    config.num_steps = SCHEDULES[steps]
    # --- parallelism: data parallel over every device; '(1,-1,1)' for FSDP
    config.mesh_shape = (-1, 1, 1)
    config.sharding_rules = parallel.DEFAULT_RULES
    # --- sampling: 250 DDPM steps, guidance 1.5 on 3 of 4 eps channels (reference)
    config.sample.update(sampler="ddpm", steps="250", cfg_scale=1.5, guided_channels=3)
    config.sample.update(num_images=16, batch_size=16)
    # --- bookkeeping
    config.log_every_steps = 100
    config.checkpoint_every_steps = 10_000
    config.keep_checkpoints = 3
    config.sample_every_steps = 50_000
    return config


def digits_config() -> ml_collections.ConfigDict:
    """A small U-DiT on the native 8x8 digits (see the module docstring for 16x16)."""
    config = base_config()
    # --- model: U-DiT-S shrunk to a CPU budget (widths 32 / 64 / 128, head widths 16 / 32 /
    # 64, blocks 1 / 1 / 2 / 1 / 1)
    config.model = "U-DiT-S"
    config.model_overrides = model_overrides(
        **dict(
            hidden_size=32, num_heads=2, depth_level1=1, depth_level2=1, depth_latent=2,
            dtype="float32",
        )
    )
    # --- data: native 8x8 grey digits (other sizes that are multiples of 8 resize bilinearly)
    config.dataset = "digits"
    config.image_size = 8
    config.in_channels = 1
    config.num_classes = 10
    # --- optimisation: as configs/digits.py (short run: larger lr, warm-up, clipping), half
    # the batch: U-DiT's many small ops are slow on a CPU
    config.num_steps = 1200
    config.global_batch_size = 64
    config.learning_rate = 1e-3
    config.warmup_steps = 100
    config.grad_clip_norm = 1.0
    config.ema_decay = 0.995
    # --- sampling: 1 grey channel, so guide it
    config.sample.update(steps="100", cfg_scale=2.0, guided_channels=-1)
    config.sample.update(num_images=100, batch_size=100)
    # --- bookkeeping
    config.log_every_steps = 50
    config.checkpoint_every_steps = 400
    config.sample_every_steps = 400
    return config
