"""What the benchmarks share: the machine line every result is printed with."""

import os
import platform

import jax


def machine() -> str:
    devices = jax.devices()
    return (
        f"{platform.node()} | {platform.processor() or platform.machine()} | "
        f"{os.cpu_count()} CPU cores | {len(devices)} x {devices[0].device_kind} "
        f"({devices[0].platform}) | jax {jax.__version__}"
    )
