"""dydit-jax: DiT, DyDiT and U-DiT in JAX/Flax NNX."""
