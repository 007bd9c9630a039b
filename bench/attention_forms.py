r"""Softmax attention: the strided (B, N, H, Dh) einsum form against `layers.dot_product_attention`
(heads-major), forward and forward + backward, alternating in one process.

  python bench/attention_forms.py            # digits size and DiT-B/2 size (batch 8)

The heads-major form is 3x faster forward at DiT-B/2 size on XLA:CPU; its gradient program is
slower than the strided form's (XLA re-lays the strided forward inside the gradient), by ~1%
of a digits train step and ~2% of a DiT-B/2 one (BENCHMARKS.md).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dydit_jax import hugepages  # noqa: E402

if __name__ == "__main__":  # before JAX: glibc reads the huge-page tunable only at start
    hugepages.reexec()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import machine  # noqa: E402
from dydit_jax.models.layers import dot_product_attention  # noqa: E402

SHAPES = {"digits (128 x 16 tokens, 3 heads)": ((128, 16, 3, 64), 200),
          "DiT-B/2 batch 8 (8 x 256 tokens, 12 heads)": ((8, 256, 12, 64), 10)}


def strided(q, k, v):
    """The layout of the reference code: products on (B, N, H, Dh) operands."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * q.shape[-1] ** -0.5, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v).astype(v.dtype)


def main() -> None:
    print(f"machine: {machine()}")
    for label, (shape, iters) in SHAPES.items():
        keys = jax.random.split(jax.random.key(0), 4)
        q, k, v, g = (jax.random.normal(key, shape) for key in keys)
        fns = {}
        for name, f in (("strided", strided), ("heads-major", dot_product_attention)):
            fns[f"{name} fwd"] = jax.jit(f)
            loss = lambda q, k, v, f=f, g=g: (f(q, k, v) * g).sum()
            fns[f"{name} fwd+bwd"] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        for fn in fns.values():
            jax.block_until_ready(fn(q, k, v))
        times = {name: [] for name in fns}
        for _ in range(iters):
            for name, fn in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(q, k, v))
                times[name].append(time.perf_counter() - start)
        cells = "  ".join(f"{n} {1e3 * np.median(t):.2f} ms" for n, t in times.items())
        print(f"{label}: {cells}")


if __name__ == "__main__":
    main()
