"""dydit-jax: DiT, DyDiT and U-DiT in JAX/Flax NNX."""

from dydit_jax import logs as _logs
from dydit_jax import tpu as _tpu

_tpu.quiet_absent_tpu()  # before any JAX backend starts
_logs.drop_known_noise()  # before Orbax is imported
