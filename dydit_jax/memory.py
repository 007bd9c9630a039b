r"""Memory per device of a training run: a plan for a config on a mesh, without devices.

  python -m dydit_jax.memory --config=configs/dit.py:XL/2 --mesh=1,8,1 --devices=8 \
      [--config.global_batch_size=512 --config.model_overrides.remat=full]

`--mesh` is (data, fsdp, tensor) with at most one -1 (the remaining devices); without it the
config's `mesh_shape` is used.

Where libtpu is installed (`pip install -e '.[tpu]'`), the answer is the compiler's: the
train step that `train.py` runs, compiled for a TPU slice with that many devices
(`--topology=v5e-64` to choose it; a v5p slice by default), per-device arguments,
temporaries and code from XLA's buffer assignment. The fitted formula below is the fallback
(no libtpu, `--formula`, or a device count no slice has), and the output says which
answered. `--devices` is the planned device count (default: the product
of the mesh; required when the mesh has a -1). Nothing runs on an accelerator: the tool uses
JAX's CPU backend for shapes only, so it is safe next to a running job.

Exact (from the parameter shapes and the config's sharding rules, as the trainer shards them):
parameters (float32), AdamW state (first and second moments like the parameters, plus step
counters), EMA (like the parameters) and gradients (like the parameters; transient, alive
during the update). A leaf's bytes per device are its bytes divided by the product of the
mesh sizes of the axes its spec uses (`parallel.logical_to_mesh_spec`).

Estimated: activations of one train step at the per-device batch B = global_batch_size /
(data * fsdp), N tokens, width D, MLP width M, H heads, compute dtype of s bytes. What a
pre-LN adaLN block keeps for the backward pass, per token (coefficients fitted to XLA's
buffer assignment of our float32 train step on CPU; JAX's autodiff picks the residuals, so
they do not depend on the backend; bfloat16 sizes are scaled from float32, not measured):

  replicated over `tensor`:  (16 + 4 s) D  the two LayerNorms (float32), block input,
                                           modulated inputs, branch outputs, residuals
  split over `tensor`:       4 s D         q, k, v and the attention output (heads)
                             5.5 s M       fc1 output and the tanh-GELU intermediates
  attention probabilities:   H N (8 + s)   per token: float32 softmax values (two copies)
                                           and their compute-dtype copy when s < 4
                                           (einsum, xla); cudnn (flash) keeps 4 H bytes

  remat=none:  depth * block + block (backward workspace) + embed/head (3 s + 4) D per token
  remat=dots:  depth * (block input and matmul outputs: (6 D + M) s per token) + block
               + embed/head
  remat=full:  depth * (block input: s D per token) + block + embed/head

The `tensor` split applies only when tensor divides the heads (resp. M). Not counted: XLA
temporaries of the optimizer update and fragmentation, compute-dtype copies of weights, the
input pipeline, sampling. Treat the activation number as an estimate (tens of percent).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import flags
from jax.sharding import PartitionSpec

from dydit_jax import cli, config_lib, model_parts, parallel, tpu, update_step
from dydit_jax import plan as plan_lib

GIB = 1024**3


def _shard_factor(spec: PartitionSpec, mesh_sizes: dict[str, int]) -> int:
    """How many ways a leaf with this mesh spec is split (product of the sizes of its axes)."""
    factor = 1
    for entry in spec:
        for axis in (entry if isinstance(entry, tuple) else (entry,)):
            if axis is not None:
                factor *= mesh_sizes[axis]
    return factor


def _nbytes(x: Any) -> int:
    return int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize


def activation_bytes(model_config, batch: int, tensor: int = 1) -> int:
    """Estimated activation bytes of one train step for `batch` samples (module docstring)."""
    mc = model_config
    s = np.dtype(mc.dtype).itemsize
    n, d, m, h = mc.num_tokens, mc.hidden_size, mc.mlp_hidden, mc.num_heads
    t_heads = tensor if h % tensor == 0 else 1
    t_mlp = tensor if m % tensor == 0 else 1
    per_token = (16 + 4 * s) * d + 4 * s * d / t_heads + 5.5 * s * m / t_mlp
    if mc.attention == "cudnn":
        per_token += 4 * h / t_heads  # softmax statistics only
    else:
        per_token += h * n * (8 + (s if s < 4 else 0)) / t_heads
    block = batch * n * per_token
    embed_head = batch * n * (3 * s + 4) * d
    kept = {
        "none": block,
        "dots": batch * n * s * (6 * d + m),
        "full": batch * n * s * d,
    }[mc.remat]
    return int(mc.depth * kept + block + embed_head)


def memory_plan(
    config: ml_collections.ConfigDict, mesh_shape: Sequence[int], num_devices: int
) -> dict:
    """Bytes per device of parameters, optimizer state, EMA, gradients and activations.

    Raises ValueError for a mesh that does not fit `num_devices` or a global batch that the
    data-parallel devices do not divide.
    """
    model_config = config_lib.validate_config(config, training=False)
    shape = parallel.resolve_mesh_shape(mesh_shape, num_devices)
    sizes = dict(zip(parallel.MESH_AXES, shape, strict=True))
    mesh = SimpleNamespace(shape=sizes)  # all that the stored forms read
    rules = parallel.rules_dict(config.sharding_rules)

    _, shapes, logical = model_parts.abstract_model(model_config)
    # as the trainer keeps them: each parameter in its stored form (padded where needed)
    storage = parallel.ParamStorage(logical, shapes, mesh, rules)
    stored = storage.shapes
    factors = jax.tree.map(lambda f: _shard_factor(f.spec, sizes), storage.forms)
    per_device = jax.tree.map(lambda x, f: _nbytes(x) // f, stored, factors)
    params = sum(jax.tree.leaves(per_device))

    # AdamW state laid out as the trainer shards it: moments like their parameters, the rest
    # (step counters) replicated.
    tx = update_step.make_optimizer(config)
    opt_shapes = jax.eval_shape(tx.init, stored)
    opt_bytes = optax.tree_map_params(
        tx, lambda x, f: _nbytes(x) // f, opt_shapes, factors, transform_non_params=_nbytes
    )
    optimizer = sum(jax.tree.leaves(opt_bytes))

    ways = sizes["data"] * sizes["fsdp"]
    if config.global_batch_size % ways:
        raise ValueError(
            f"global_batch_size {config.global_batch_size} is not divisible by the {ways} "
            "data-parallel devices (data x fsdp); change global_batch_size or the mesh"
        )
    batch = config.global_batch_size // ways
    activations = activation_bytes(model_config, batch, sizes["tensor"])
    plan = dict(
        model=config.model,
        model_config=model_config,
        param_count=int(sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))),
        mesh=sizes,
        num_devices=num_devices,
        batch_per_device=batch,
        tensor_divides_heads=model_config.num_heads % sizes["tensor"] == 0,
        tensor_divides_mlp=model_config.mlp_hidden % sizes["tensor"] == 0,
        params_bytes=params,
        optimizer_bytes=optimizer,
        ema_bytes=params,
        grads_bytes=params,
        activation_bytes=activations,
    )
    plan["total_bytes"] = params * 3 + optimizer + activations
    return plan


def compiled_bytes(config: ml_collections.ConfigDict, mesh_shape: Sequence[int],
                   num_devices: int, topology: str | None = None) -> dict:
    """The train step's bytes per device as XLA's TPU compiler lays it out (libtpu, no TPU
    needed): on `topology`, or a v5p slice of `num_devices` chips (its 95 GiB let big
    programs compile; per-device bytes depend little on the chip generation). Raises
    RuntimeError without libtpu, ValueError for a device count that no slice has."""

    if topology is None:
        grid = tpu.chip_grid(num_devices, 3)
        topo = tpu.Topology(f"v5p:{'x'.join(map(str, grid))}", tpu.CHIPS["v5p"], grid)
    else:
        topo = tpu.parse_topology(topology)
    devices = tpu.devices(topo)
    if len(devices) != num_devices:
        raise ValueError(f"topology {topo.name} has {len(devices)} devices, the plan "
                         f"{num_devices}")
    trial = ml_collections.ConfigDict(config.to_dict())
    trial.mesh_shape = tuple(mesh_shape)
    model_config = config_lib.validate_config(trial, training=False)
    mesh = parallel.make_mesh(mesh_shape, devices=devices)
    entry = plan_lib.compile_program(
        "train_step", plan_lib.train_program(trial, model_config, mesh), topo.chip.hbm_bytes)
    entry["topology"] = topo.libtpu_name
    return entry


def format_compiled(entry: dict) -> str:
    if entry.get("temp_bytes_per_chip") is None:
        return (f"compiled for {entry['topology']}: does not fit its HBM; the compiler asked "
                f"for {(entry['bytes_per_chip'] or 0) / GIB:.3f} GiB")
    rows = [("arguments (params, EMA, AdamW state, batch)", entry["argument_bytes_per_chip"]),
            ("outputs (the new state, aliased)", entry["output_bytes_per_chip"]
             - entry["alias_bytes_per_chip"]),
            ("temporaries (activations, gradients, ...)", entry["temp_bytes_per_chip"]),
            ("generated code", entry["code_bytes_per_chip"])]
    lines = [f"compiled by XLA for TPU ({entry['topology']}, libtpu): per device"]
    lines += [f"  {name:<44}{b / GIB:>10.3f} GiB" for name, b in rows]
    lines.append(f"  {'total':<44}{entry['bytes_per_chip'] / GIB:>10.3f} GiB")
    return "\n".join(lines)


def format_plan(plan: dict) -> str:
    mc = plan["model_config"]
    mesh = plan["mesh"]
    lines = [
        f"{plan['model']} at latent {mc.input_size}x{mc.input_size} ({mc.num_tokens} tokens): "
        f"{plan['param_count']:,} trainable parameters",
        "mesh " + " ".join(f"{k}={v}" for k, v in mesh.items())
        + f" on {plan['num_devices']} devices; {plan['batch_per_device']} samples per device "
        f"per step (global batch / (data x fsdp))",
        f"compute dtype {mc.dtype}, attention {mc.attention}, remat {mc.remat}",
        f"tensor={mesh['tensor']} divides the {mc.num_heads} heads: "
        f"{'yes' if plan['tensor_divides_heads'] else 'NO (attention is not split)'}; "
        f"the MLP width {mc.mlp_hidden}: {'yes' if plan['tensor_divides_mlp'] else 'NO'}",
        "",
        f"{'per device':<34}{'GiB':>10}",
    ]
    rows = [
        ("parameters (float32)", plan["params_bytes"]),
        ("optimizer state (AdamW m, v)", plan["optimizer_bytes"]),
        ("EMA parameters (float32)", plan["ema_bytes"]),
        ("gradients (transient)", plan["grads_bytes"]),
        ("activations (estimate)", plan["activation_bytes"]),
    ]
    lines += [f"  {name:<32}{b / GIB:>10.3f}" for name, b in rows]
    lines.append(f"  {'total (estimate)':<32}{plan['total_bytes'] / GIB:>10.3f}")
    lines.append(
        "Activations are an estimate (see dydit_jax/memory.py); XLA temporaries, "
        "fragmentation and the input pipeline come on top."
    )
    return "\n".join(lines)


def _parse_mesh(values: Sequence[str]) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(f"--mesh takes 3 integers data,fsdp,tensor, got {values}") from None


def main(argv) -> None:
    flags_ = flags.FLAGS
    if len(argv) > 1:
        sys.exit(cli.fail(ValueError(f"unexpected arguments {argv[1:]}")))
    jax.config.update("jax_platforms", "cpu")  # shapes only: never claim an accelerator
    try:
        mesh = _parse_mesh(flags_.mesh) if flags_.mesh else tuple(flags_.config.mesh_shape)
        devices = flags_.devices
        if devices is None:
            if -1 in mesh:
                raise ValueError(
                    f"mesh {mesh} has a -1 (the remaining devices): say how many devices "
                    "the run will have with --devices=N"
                )
            devices = math.prod(mesh)
        estimate = memory_plan(flags_.config, mesh, devices)
        compiled, why = None, "--formula given"
        if not flags_.formula:
            try:
                compiled = compiled_bytes(flags_.config, mesh, devices, flags_.topology)
            except RuntimeError:
                why = "libtpu is not installed (pip install -e '.[tpu]')"
            except ValueError as e:
                if flags_.topology:
                    raise
                why = f"no TPU slice to compile for ({e})"
    except (ValueError, RuntimeError) as e:
        sys.exit(cli.fail(e))
    print(format_plan(estimate))
    print()
    if compiled is not None:
        print(format_compiled(compiled))
        print("answered by: the compiler (the estimate above is the fallback formula)")
    else:
        print(f"answered by: the fitted formula above ({why})")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:VARIANT]).")
    flags.DEFINE_list("mesh", None, "data,fsdp,tensor (one -1 allowed); default: config's")
    flags.DEFINE_integer("devices", None, "planned device count (default: the mesh product)")
    flags.DEFINE_string("topology", None, "compile for this TPU topology (default: a v5p "
                        "slice with the planned device count)")
    flags.DEFINE_bool("formula", False, "only the fitted formula, no compile")
    flags.mark_flags_as_required(["config"])
    app.run(main)
