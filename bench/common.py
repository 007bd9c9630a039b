"""What the benchmarks share: the machine line every result is printed with."""

import os
import platform

import jax


def machine() -> str:
    """Host, CPU, devices, jax, and the environment switches that change CPU speed (see the
    README's "CPU speed" section): glibc's huge-page tunable and XLA_FLAGS."""
    devices = jax.devices()
    huge = "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "")
    flags = os.environ.get("XLA_FLAGS", "").strip()
    return (
        f"{platform.node()} | {platform.processor() or platform.machine()} | "
        f"{os.cpu_count()} CPU cores | {len(devices)} x {devices[0].device_kind} "
        f"({devices[0].platform}) | jax {jax.__version__} | malloc huge pages "
        f"{'on' if huge else 'off'}" + (f" | XLA_FLAGS {flags}" if flags else "")
    )
