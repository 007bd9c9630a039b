"""XLA:CPU compile options for the library's model programs, and `jit`, which applies them.

XLA:CPU (jaxlib 0.10) hands dots, with the elementwise work around them, to YNNPACK fusions.
On the 2-core x86 machines this project is tested on, the DiT programs ran faster with those
fusions off (XLA's own dot emitter instead): DiT-B/2 at batch 8, same process, alternating,
float32 forward 1.00-1.13x, train step 1.06-1.11x, the guided DiT sampler 1.24x and the DyDiT
engine 1.15x (BENCHMARKS.md, `bench/xla_cpu_options.py`). Attention's batched (256 x 64) x
(64 x 256) products gain most: 43 -> 66-74 GFLOP/s.

The option is experimental, so it is used only where the backend is CPU and the installed
XLA accepts it (checked once, by compiling a trivial program); anywhere else `jit` is
`jax.jit`. Set DYDIT_XLA_CPU_DEFAULTS=1 to keep XLA's defaults. U-DiT keeps them too: its
programs compiled 1.2-1.6x longer without the fusions (U-DiT-S train step > 700 s instead
of 440 s), and what it would gain at run time was not measured.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from dydit_jax import parallel
from dydit_jax.models import UDiTConfig

OPT_OUT = "DYDIT_XLA_CPU_DEFAULTS"
OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # no fusion type goes to YNNPACK


@functools.cache
def compiler_options() -> dict | None:
    """The options for this process's backend, or None (XLA's defaults)."""
    if os.environ.get(OPT_OUT) or jax.default_backend() != "cpu":
        return None
    try:
        jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(compiler_options=OPTIONS)
    except Exception:  # noqa: BLE001 - an XLA without the option: keep its defaults
        return None
    return dict(OPTIONS)


def jit(fn, *, model, mesh=None, **kwargs):
    """`jax.jit(fn, **kwargs)` with `compiler_options()` for a program of `model` (its
    config; U-DiT's keep XLA's defaults, see above). With `mesh`, `fn` is traced under it
    (`parallel.on_mesh`) and the CPU options apply only when the mesh's devices are CPUs
    (a program built here for a TPU topology gets XLA's defaults)."""
    options = None if isinstance(model, UDiTConfig) else compiler_options()
    if mesh is not None:
        fn = parallel.on_mesh(fn, mesh)
        if mesh.devices.flat[0].platform != "cpu":
            options = None
    return jax.jit(fn, compiler_options=options, **kwargs)
