r"""DiT on ImageNet VAE latents: the recipe of Peebles & Xie (ICCV 2023), every size.

Variants (`configs/dit.py:VARIANT`): `SIZE/PATCH[,RES]` with SIZE in S, B, L, XL, PATCH in
2, 4, 8 and RES the image resolution, 256 (default; latent 32x32) or 512 (latent 64x64):
`XL/2`, `XL/2,512`, `B/4`, `S/8,256`, ... The latents come from our extraction tool
(`dydit_jax.data.write_latent_shards`); point `--config.data_dir` at their directory.

One GPU (or CPU):

  python train.py --config=configs/dit.py:XL/2 --workdir=workdirs/dit_xl2 \
      --config.data_dir=/data/imagenet256_latents

One multi-GPU host: the same command. The default mesh_shape=(-1,1,1) is data parallel over
all local GPUs; FSDP (parameters, EMA and optimizer state sharded over the GPUs) is

  python train.py --config=configs/dit.py:XL/2 --workdir=workdirs/dit_xl2 \
      --config.data_dir=/data/imagenet256_latents --config.mesh_shape='(1,-1,1)'

Several GPU hosts: the same command on every host, with the coordinator's address, the number
of hosts and this host's index (0..N-1) in the environment; train.py then calls
jax.distributed.initialize() before touching a device:

  JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i \
  python train.py --config=configs/dit.py:XL/2 --workdir=/shared/workdirs/dit_xl2 \
      --config.data_dir=/shared/imagenet256_latents

A TPU pod (every worker runs the same command; DYDIT_DISTRIBUTED=1 makes train.py call
jax.distributed.initialize(), which needs no arguments on TPU):

  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd dydit-jax && \
DYDIT_DISTRIBUTED=1 python train.py --config=configs/dit.py:XL/2 --workdir=gs://BUCKET/dit_xl2 \
--config.data_dir=gs://BUCKET/imagenet256_latents"

Memory per device of a config on a mesh (parameters, AdamW state, EMA, gradients and an
activation estimate; no devices needed):

  python -m dydit_jax.memory --config=configs/dit.py:XL/2 --mesh=1,8,1 --devices=8

Fields not set here keep the recipe of `dydit_jax.config_lib.base_config()`: AdamW lr 1e-4
constant, weight decay 0, EMA 0.9999, global batch 256, label dropout 0.1, 400K steps (the
paper's ablations; its headline XL/2 ran 7M steps: `--config.num_steps=7000000`). Override any
field: `--config.global_batch_size=512 --config.model_overrides.remat=full`.
"""

import ml_collections

from dydit_jax import models, parallel
from dydit_jax.config_lib import base_config, model_overrides

# image resolution -> latent size (the KL-f8 VAE downsamples by 8)
RESOLUTIONS = {256: 32, 512: 64}


def variants() -> list[str]:
    """The model variants, from the registry: S/2, S/4, ..., XL/8."""
    return [name.removeprefix("DiT-") for name in models.model_names("DiT")]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = [p.strip() for p in (arg or "XL/2").split(",")]
    variant, res = parts[0], (parts[1] if len(parts) > 1 else "256")
    if len(parts) > 2 or variant not in variants() or res not in map(str, RESOLUTIONS):
        raise ValueError(
            f"unknown DiT variant {arg!r}; use SIZE/PATCH[,RES] with SIZE/PATCH one of "
            f"{', '.join(variants())} and RES one of {', '.join(map(str, RESOLUTIONS))} "
            "(e.g. 'XL/2' or 'XL/2,512')"
        )
    config = base_config()
    # --- model
    config.model = f"DiT-{variant}"
    config.model_overrides = model_overrides(
        **dict(
            dtype="bfloat16",  # compute dtype; parameters, optimizer and EMA stay float32
            attention="xla",  # einsum (f32 softmax, reference numerics) | xla | cudnn (flash)
            remat="none",  # none | dots | full: trade recompute for activation memory
            scan_blocks=True,  # lax.scan over the blocks: compile one block, not depth
        )
    )
    # --- data: precomputed VAE latents (z * 0.18215), 4 channels, ImageNet's 1000 classes
    config.dataset = "latents"
    config.data_dir = ""  # required: --config.data_dir=/path/to/latents
    config.image_size = RESOLUTIONS[int(res)]  # latent size
    config.in_channels = 4
    config.num_classes = 1000
    # --- parallelism: data parallel over every device; '(1,-1,1)' for FSDP
    config.mesh_shape = (-1, 1, 1)
    config.sharding_rules = parallel.DEFAULT_RULES
    # --- sampling: the reference's 250 DDPM steps, guidance 1.5 on 3 of 4 eps channels
    config.sample.update(sampler="ddpm", steps="250", cfg_scale=1.5, guided_channels=3)
    config.sample.update(num_images=16, batch_size=16)
    # --- bookkeeping
    config.log_every_steps = 100
    config.checkpoint_every_steps = 10_000
    config.keep_checkpoints = 3
    config.sample_every_steps = 50_000
    return config
