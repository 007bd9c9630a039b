r"""XLA's CPU defaults against `dydit_jax.xla_cpu`'s options, on one model, in one process.

The forward and the train step (the trainer's, scan over blocks) are compiled twice, with
XLA's defaults (as with DYDIT_XLA_CPU_DEFAULTS=1) and with `xla_cpu.OPTIONS`; the two
executables then alternate, `--iters` times each, and the medians are compared. The two
forwards' outputs are compared too (random weights, adaLN included, so that the blocks do
something).

  python bench/xla_cpu_options.py --model=DiT-B/2 --batch=8
  python bench/xla_cpu_options.py --model=DiT-B/2 --batch=8 --dtype=bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
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
from bench.throughput import forward_fn, parse_overrides, random_inputs, run_config  # noqa: E402
from dydit_jax import parallel, train_lib, xla_cpu  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="DiT-B/2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--image_size", type=int, default=32, help="latent side")
    p.add_argument("--iters", type=int, default=3, help="timed runs of each variant")
    p.add_argument("--what", default="forward,train")
    p.add_argument("--override", type=parse_overrides, default={},
                   help="model options, e.g. depth=2 (as bench/throughput.py's)")
    args = p.parse_args(argv)
    overrides = {"dtype": args.dtype, **args.override}
    if not args.model.startswith("U-DiT"):
        overrides["scan_blocks"] = True  # configs/dit.py's default
    config = run_config(args.model, overrides, args)
    variants = {"XLA defaults": None, "xla_cpu options": dict(xla_cpu.OPTIONS)}
    print(f"machine: {machine()}")
    print(f"settings: {vars(args)}; options: {xla_cpu.OPTIONS}")
    mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    runs, results = {}, {}
    with jax.set_mesh(mesh):
        parts = train_lib.build_model(train_lib.validate_config(config), mesh, seed=0)
        rng = np.random.default_rng(0)
        weights = jax.tree.map(
            lambda a: jnp.asarray(0.02 * rng.standard_normal(a.shape), a.dtype), parts.params
        )
        host = random_inputs(args.batch, args.image_size, config.num_classes, 0)
        inputs = parallel.global_batch(host, mesh)
        xyt = (inputs["x"], inputs["t"], inputs["y"])
        if "forward" in args.what:
            outputs = {}
            for name, options in variants.items():
                with xla_options(options):
                    compiled = forward_fn(parts, mesh).lower(weights, *xyt).compile()
                check_options(compiled, options)
                outputs[name] = np.asarray(compiled(weights, *xyt), np.float32)
                runs[f"forward, {name}"] = lambda c=compiled: c(weights, *xyt)
            diff = float(np.abs(outputs["XLA defaults"] - outputs["xla_cpu options"]).max())
            print(f"forward outputs: max |difference| {diff:.2e} "
                  f"(max |output| {np.abs(outputs['XLA defaults']).max():.2f})")
            results["forward_max_diff"] = diff
        if "train" in args.what:
            tx = train_lib.make_optimizer(config)
            batch = parallel.global_batch({"latents": host["x"], "label": host["y"]}, mesh)
            # the step donates its state: each variant starts from its own copy
            fresh_state = lambda: train_lib.init_state(with_params(parts, weights), tx, mesh)
            for name, options in variants.items():
                state = [fresh_state()]
                with xla_options(options):
                    step = train_lib.make_train_step(parts, tx, config, mesh)
                    compiled = step.lower(state[0], batch).compile()
                check_options(compiled, options)

                def run(c=compiled, state=state):
                    state[0] = c(state[0], batch)[0]
                    return state[0]

                runs[f"train step, {name}"] = run
        for run in runs.values():  # warm-up
            jax.block_until_ready(run())
        times = {name: [] for name in runs}
        for _ in range(args.iters):
            for name, run in runs.items():
                start = time.perf_counter()
                jax.block_until_ready(run())
                times[name].append(time.perf_counter() - start)
    for what in ("forward", "train step"):
        default = times.get(f"{what}, XLA defaults")
        if default is None:
            continue
        ours = times[f"{what}, xla_cpu options"]
        ratio = statistics.median(default) / statistics.median(ours)
        print(f"[{args.model} {what}, batch {args.batch}, {args.dtype}] XLA defaults "
              f"{statistics.median(default):.3f} s, xla_cpu options {statistics.median(ours):.3f} "
              f"s: {ratio:.2f}x (runs: {[round(t, 2) for t in default]} vs "
              f"{[round(t, 2) for t in ours]})")
        results[what] = ratio
    print(" ".join(f"speedup_{k.replace(' ', '_')}={v:.2f}" for k, v in results.items()
                   if k != "forward_max_diff"))
    return results


@contextlib.contextmanager
def xla_options(options):
    """The library's jits built inside get `options` (None: XLA's defaults)."""
    saved = os.environ.get(xla_cpu.OPT_OUT)
    if options is None:
        os.environ[xla_cpu.OPT_OUT] = "1"
    else:
        os.environ.pop(xla_cpu.OPT_OUT, None)
    xla_cpu.compiler_options.cache_clear()
    try:
        yield
    finally:
        os.environ.pop(xla_cpu.OPT_OUT, None)
        if saved is not None:
            os.environ[xla_cpu.OPT_OUT] = saved
        xla_cpu.compiler_options.cache_clear()


def check_options(compiled, options) -> None:
    """The executable was built as intended (YNNPACK fusions only with XLA's defaults)."""
    if ("ynn" in compiled.as_text()) != (options is None):
        raise RuntimeError(f"compiled with the wrong options (wanted {options})")


def with_params(parts, params):
    """`parts` holding a fresh copy of `params`."""
    parts.params = jax.tree.map(jnp.copy, params)
    return parts


if __name__ == "__main__":
    main()
