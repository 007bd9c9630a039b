"""XLA SPMD partitioner: the kernel gradient of a grouped (depthwise) convolution comes out
multiplied by the size of a mesh axis over which the input is replicated.

Standalone (no project imports). A 5x5 depthwise `lax.conv_general_dilated`
(feature_group_count = channels) on x of shape (16, 4, 4, 32), the batch sharded over
('data', 'fsdp'), the kernel replicated. The gradient with respect to the kernel is
'tensor' times the right one; the gradient with respect to x is right.

  python docs/xla/grouped_conv_kernel_grad.py

Seen with jax/jaxlib 0.10.2 on XLA:CPU (8 host devices): kernel gradient norm ratio 4.0 on
mesh (2, 1, 4), 2.0 on (2, 2, 2), 1.0 on (8, 1, 1) and (4, 2, 1). The kernel gradient is
computed as a convolution with batch_group_count; its partial sums are reduced over the
replicated axis as well as over the batch axes. The models refuse U-DiT training with
`depthwise="xla"` on a mesh whose 'tensor' axis is larger than 1 (the default "shifted"
depthwise form has no convolution and is right on every mesh).
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
C = 32
rng = np.random.default_rng(0)
x = rng.normal(size=(16, 4, 4, C)).astype(np.float32)
kernel = rng.normal(size=(5, 5, 1, C)).astype(np.float32) / 5


def loss(x, kernel):
    y = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((2, 2), (2, 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=C,
    )
    return jnp.sum(jnp.sin(y + x))


grad = jax.grad(loss, argnums=1)
expected = np.asarray(jax.jit(grad)(x, kernel))  # one device
print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, {jax.devices()[0].platform}")
for shape in ((2, 1, 4), (2, 2, 2), (8, 1, 1), (4, 2, 1)):
    mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
        ks = jax.device_put(kernel, NamedSharding(mesh, P()))
        got = np.asarray(jax.jit(grad)(xs, ks))
    ratio = np.linalg.norm(got) / np.linalg.norm(expected)
    err = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    print(f"mesh {shape}: kernel gradient norm ratio {ratio:.3f}, relative error {err:.3g}"
          + ("  <- wrong" if err > 1e-5 else ""))
