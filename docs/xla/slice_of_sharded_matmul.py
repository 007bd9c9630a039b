"""XLA SPMD partitioner: wrong gradient through a slice of a matmul whose output dim is sharded.

Standalone (no project imports). f(x, W) = sum(sin(x + (x @ W)[:, :64])) with the batch of
x sharded over ('data', 'fsdp') and W sharded ('fsdp', 'tensor') on a 2 x 2 x 2 mesh of CPU
devices. The loss is right; the gradient with respect to x is not.

  python docs/xla/slice_of_sharded_matmul.py

Seen with jax/jaxlib 0.10.2 on XLA:CPU (8 host devices), with the Shardy and with the GSPMD
propagation alike: relative error of dx 0.546 on mesh (2, 2, 2); 0 on (4, 2, 1), (1, 4, 2),
1e-7 on (2, 1, 4) and (1, 2, 4). Pinning the matmul output to the batch sharding before the
slice (with_sharding_constraint(y, P(('data', 'fsdp')))) gives the right gradient: that is
what the models do (dydit_jax/parallel.py: constrain, the "qkv" and "modulation" axes).
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
B, C = 16, 64
rng = np.random.default_rng(0)
x = rng.normal(size=(B, C)).astype(np.float32)
W = rng.normal(size=(C, 2 * C)).astype(np.float32) / 8


def loss(x, W, pin=False):
    y = x @ W
    if pin:
        y = jax.lax.with_sharding_constraint(y, P(("data", "fsdp")))
    return jnp.sum(jnp.sin(x + y[:, :C]))


expected = np.asarray(jax.jit(jax.grad(loss))(x, W))  # one device
print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, {jax.devices()[0].platform}")
for shape in ((2, 2, 2), (4, 2, 1), (2, 1, 4), (1, 2, 4)):
    mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
        ws = jax.device_put(W, NamedSharding(mesh, P("fsdp", "tensor")))
        for pin in (False, True):
            got = np.asarray(jax.jit(jax.grad(lambda a, b, p=pin: loss(a, b, p)))(xs, ws))
            err = np.linalg.norm(got - expected) / np.linalg.norm(expected)
            print(f"mesh {shape} pinned={pin!s:5}: relative error of dx {err:.3g}"
                  + ("  <- wrong" if err > 1e-5 else ""))
