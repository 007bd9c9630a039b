"""What the benchmarks share: the machine line every result is printed with."""

import os
import platform

import jax

from dydit_jax import hugepages


def machine() -> str:
    devices = jax.devices()
    return (
        f"{platform.node()} | {platform.processor() or platform.machine()} | "
        f"{os.cpu_count()} CPU cores | {len(devices)} x {devices[0].device_kind} "
        f"({devices[0].platform}) | jax {jax.__version__} | malloc huge pages "
        f"{'on' if hugepages.enabled() else 'off'}"
    )
