"""TPU topologies by the names users write, and their devices without any TPU (libtpu's
deviceless compiler, `pip install -e '.[tpu]'`).

A name is a cloud accelerator type, `v4-32`, `v5e-256` / `v5litepod-256`, `v5p-128`,
`v6e-64` (the number counts TensorCores as the cloud does: two per v4 / v5p chip, one per
v5e / v6e chip), or a chip grid, `v5p:4x4x4`, `v5e:2x2`.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import math
import os
import re

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # the generation as libtpu names it
    cores_per_chip: int  # TensorCores per chip in the cloud's accelerator-type count
    hbm_bytes: int
    peak_bf16_flops: float  # dense bf16 FLOP/s per chip (published peak)
    dims: int  # chip-grid dimensions (3: torus, 2: slice of a 2D mesh)
    chips_per_host: int


CHIPS = {
    "v4": Chip("v4", 2, 32 * GIB, 275e12, 3, 4),
    "v5e": Chip("v5e", 1, 16 * GIB, 197e12, 2, 4),
    "v5p": Chip("v5p", 2, 95 * GIB, 459e12, 3, 4),
    "v6e": Chip("v6e", 1, 32 * GIB, 918e12, 2, 4),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
EXAMPLES = "v4-32, v5e-256 (or v5litepod-256), v5p-128, v6e-64, v5p:4x4x4, v5e:2x2"


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as the user wrote it
    chip: Chip
    grid: tuple[int, ...]  # chips along each dimension

    @property
    def chips(self) -> int:
        return math.prod(self.grid)

    @property
    def libtpu_name(self) -> str:
        return f"{self.chip.name}:{'x'.join(str(d) for d in self.grid)}"


def chip_grid(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape the cloud uses for a chip count: powers of two, as even as possible,
    ascending with unit sizes last (v5p-128 = 64 chips = 4x4x4; v5p-8 = 2x2x1; v5e-32 = 4x8)."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chips} chips: only powers of two have a standard slice shape")
    grid = [1] * dims
    i = 0
    while math.prod(grid) < chips:
        grid[i % dims] *= 2
        i += 1
    return tuple(sorted(grid, key=lambda d: (d == 1, d)))


def parse_topology(name: str) -> Topology:
    """A Topology from a cloud accelerator type or a `gen:AxBxC` grid; ValueError with the
    accepted forms otherwise."""
    text = name.strip().lower()
    grid_form = re.fullmatch(r"(v\w+?):(\d+(?:x\d+)*)", text)
    cloud_form = re.fullmatch(r"(v\w+?)-(\d+)", text)
    match = grid_form or cloud_form
    gen = ALIASES.get(match[1], match[1]) if match else None
    if gen not in CHIPS:
        raise ValueError(
            f"unknown TPU topology {name!r}; use a cloud accelerator type or a chip grid, "
            f"e.g. {EXAMPLES} (generations: {', '.join(CHIPS)})"
        )
    chip = CHIPS[gen]
    if grid_form:
        grid = tuple(int(d) for d in match[2].split("x"))
        if len(grid) not in (2, 3) or min(grid) < 1:
            raise ValueError(f"topology {name!r}: a chip grid has 2 or 3 positive sizes")
        return Topology(name, chip, grid)
    cores = int(match[2])
    if cores % chip.cores_per_chip:
        raise ValueError(
            f"topology {name!r}: {gen} counts {chip.cores_per_chip} TensorCores per chip, so "
            f"the number must be a multiple of {chip.cores_per_chip}"
        )
    try:
        grid = chip_grid(cores // chip.cores_per_chip, chip.dims)
    except ValueError as e:
        raise ValueError(f"topology {name!r}: {e}") from None
    return Topology(name, chip, grid)


def has_tpu_chips() -> bool:
    """Whether this machine has TPU chips (v4/v5p: /dev/accel*, v5e/v6e: /dev/vfio)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def quiet_absent_tpu() -> None:
    """With libtpu installed, every JAX start probes for a TPU and, on a machine without one,
    logs errors about unknown worker hostnames and accelerator type. Where no TPU chip exists,
    name a local one-chip slice (the variables are left alone when set, and on TPU hosts)."""
    if has_tpu_chips():
        return
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    # pytest workers and the planner may each load libtpu (deviceless: no chip to share)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # and JAX's INFO line that the probe found no TPU ("No jellyfish device found")
    bridge = logging.getLogger("jax._src.xla_bridge")
    if bridge.level == logging.NOTSET and libtpu_installed():
        bridge.setLevel(logging.WARNING)


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def devices(topology: Topology) -> list:
    """The topology's devices, for compiling only (libtpu; no TPU needed)."""
    if not libtpu_installed():
        raise RuntimeError(
            "compiling for a TPU topology needs libtpu: pip install -e '.[tpu]' "
            "(or pip install \"jax[tpu]\" at the installed jax version)"
        )

    from jax.experimental import topologies  # loads libtpu, only for a topology

    kwargs = {}
    if topology.chips < topology.chip.chips_per_host:  # a slice smaller than one host
        kwargs["chips_per_host_bounds"] = topology.grid + (1,) * (3 - len(topology.grid))
    desc = topologies.get_topology_desc(topology.libtpu_name, "tpu", **kwargs)
    return list(desc.devices)
