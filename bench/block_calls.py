r"""How many DiT blocks one compiled call should run: a DyDiT-B/2's 12 full-width blocks at
guided batch 8 (16 x 256 tokens), each layer with its own weights, run as one program of 12
blocks, as 3 programs of 4, as 12 programs of one block, as the engine's 24 calls (attention,
token MLP: `DyDiTEngine` with `layers_per_call=1`) and as its one call (`layers_per_call=12`),
alternating in one process. Every variant computes the same full-width blocks.

  python bench/block_calls.py [--repeats=5]

On the 2-core CPU a program of many blocks runs faster per block than the same blocks one
call each (BENCHMARKS.md, DyDiT rows (j)): the reason for the engine's `layers_per_call`.
"""

import argparse
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
from flax import nnx  # noqa: E402

from bench.common import machine  # noqa: E402
from bench.dydit_speedup import random_backbone  # noqa: E402
from dydit_jax import parallel, train_lib, xla_cpu  # noqa: E402
from dydit_jax.dynamic import DyDiTEngine  # noqa: E402
from dydit_jax.models import model_config  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up)")
    p.add_argument("--rows", type=int, default=16, help="batch rows (guided batch 8 = 16)")
    args = p.parse_args(argv)
    print(f"machine: {machine()}")
    cfg = model_config("DyDiT-B/2", input_size=32, in_channels=4, num_classes=1000)
    mesh = parallel.make_mesh((-1, 1, 1))
    with jax.set_mesh(mesh):
        parts = train_lib.build_model(cfg, mesh, seed=0)
        params = jax.device_put(random_backbone(parts.params, 0))
        blocks = [params["blocks"][layer] for layer in range(cfg.depth)]
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((args.rows, cfg.num_tokens, cfg.hidden_size)),
                        jnp.float32)
        c = jnp.asarray(rng.standard_normal((args.rows, cfg.hidden_size)), jnp.float32)
        block_graphdef = nnx.graphdef(nnx.merge(parts.graphdef, params, parts.buffers).blocks[0])

        def run_blocks(states, x, c):  # full width, every token
            for state in states:
                block = nnx.merge(block_graphdef, state)
                x, mods = block.attention_step(x, c)
                x = x + mods[5][:, None] * block.mlp_branch(x, mods)
            return x

        def compiled(n):
            return xla_cpu.jit(run_blocks, model=cfg).lower(blocks[:n], x, c).compile()

        whole, four, one = compiled(cfg.depth), compiled(4), compiled(1)

        # The engine's own calls at full width and capacity (2 steps: the plan is irrelevant,
        # the calls are taken from its programs with every head and group kept).
        def engine_calls(k):
            engine = DyDiTEngine(parts, params, mesh=mesh, sampling_steps="2", cfg_scale=1.5,
                                 guided_channels=-1, layers_per_call=k)
            full = jnp.arange(cfg.num_heads, dtype=jnp.int32), jnp.ones(cfg.num_heads)
            if k == 1:
                attention = engine._attention.lower(blocks[0], *full, x, c).compile()
                _, mods = attention(blocks[0], *full, x, c)
                token_mlp = engine._token_mlp.lower(
                    blocks[0], *full, x, mods, cfg.num_tokens).compile()

                def run(x):
                    for state in blocks:
                        x, mods = attention(state, *full, x, c)
                        x, _ = token_mlp(state, *full, x, mods)
                    return x
                return run
            caps = (cfg.num_tokens,) * cfg.depth
            indices = (full,) * cfg.depth
            program = engine._blocks.lower(blocks, indices, indices, x, c, caps).compile()
            return lambda x: program(blocks, indices, indices, x, c)[0]

        variants = {
            f"one program of {cfg.depth} blocks": lambda x: whole(blocks, x, c),
            f"{cfg.depth // 4} programs of 4 blocks": lambda x: _chain(four, blocks, 4, x, c),
            f"{cfg.depth} programs of 1 block": lambda x: _chain(one, blocks, 1, x, c),
            "engine, 1 layer per call (2 calls each)": engine_calls(1),
            f"engine, {cfg.depth} layers per call": engine_calls(cfg.depth),
        }
        times = {name: [] for name in variants}
        for round_ in range(args.repeats + 1):
            for name, fn in variants.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(x))
                if round_:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
    base = np.median(times[f"one program of {cfg.depth} blocks"])
    print(f"{args.rows} x {cfg.num_tokens} tokens, {cfg.depth} blocks, medians of "
          f"{args.repeats}:")
    for name, ts in times.items():
        median = np.median(ts)
        print(f"  {name:42s} {1e3 * median / cfg.depth:7.1f} ms per block  "
              f"x{median / base:.3f} of one program  (min {1e3 * min(ts) / cfg.depth:.1f})")


def _chain(program, blocks, n, x, c):
    for first in range(0, len(blocks), n):
        x = program(blocks[first:first + n], x, c)
    return x


if __name__ == "__main__":
    main()
