r"""The PyTorch baseline for `bench/throughput.py`: a DiT forward and training step in the
reference release's layout and operations, timed on the same machine next to ours in one
process.

The reference DiT is PyTorch modules (timm's Attention and Mlp: one qkv Linear, PyTorch's
`scaled_dot_product_attention`, proj; Linear -> tanh-GELU -> Linear) in eager mode. This
script writes that forward in a few lines of torch from the spec (docs/dit.md; our code,
not the release's), with random weights, and times it against our jitted forward on the
same inputs: float32, and bfloat16 (torch: `autocast`; ours: `dtype=bfloat16` compute).
Needs the optional torch extra (`pip install torch`, CPU wheel); the core library never
imports torch.

The training step (`--what=train`) is the reference training loop's body: q_sample at random
timesteps, forward, loss, backward, `torch.optim.AdamW(lr=1e-4, weight_decay=0)` step and the
release's EMA update (a Python loop of `mul_`/`add_` over the parameters), against ours:
`update_step.make_train_step` with the shipped DiT config (`configs/dit.py`: scan over the
blocks), which also computes the learned-sigma VB term and drops 10% of the labels. The torch
loss is the epsilon MSE alone: the VB term is elementwise work on the 8 output channels,
a negligible fraction of a step.

  python bench/torch_reference.py --model=DiT-B/2 --batch=8          # CPU, ~2 min
  python bench/torch_reference.py --model=DiT-B/2 --batch=8 --dtypes=float32
  python bench/torch_reference.py --model=DiT-B/2 --batch=8 --what=train --dtypes=float32

Both run with all the machine's cores (torch.set_num_threads(os.cpu_count())); each timed
batch is a median over `--iters` after `--warmup`, the two implementations alternating.
The last line reads `speedup_forward_float32=<x> ...` (ours over torch, images/s), one entry
per (what, dtype).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import machine  # noqa: E402
from bench.throughput import (  # noqa: E402
    LATENT_CHANNELS,
    LATENT_SIZE,
    NUM_CLASSES,
    random_inputs,
    run_config,
)
from dydit_jax import config_lib, flops, model_parts, parallel, update_step  # noqa: E402
from dydit_jax.models import create_model, model_config  # noqa: E402


def torch_dit(cfg, torch):
    """A reference-layout DiT forward (NCHW input, torch Linear weights) as a torch module."""
    nn, F = torch.nn, torch.nn.functional
    d, heads, p = cfg.hidden_size, cfg.num_heads, cfg.patch_size

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, cfg.mlp_hidden), nn.Linear(cfg.mlp_hidden, d)
            self.ada = nn.Linear(d, 6 * d)

        def forward(self, x, c):
            b, n, _ = x.shape
            s1, sc1, g1, s2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=1)
            h = F.layer_norm(x, (d,), eps=1e-6) * (1 + sc1[:, None]) + s1[:, None]
            q, k, v = self.qkv(h).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
            x = x + g1[:, None] * self.proj(a)
            h = F.layer_norm(x, (d,), eps=1e-6) * (1 + sc2[:, None]) + s2[:, None]
            return x + g2[:, None] * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))

    class DiT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(cfg.in_channels, d, p, stride=p)
            self.pos = nn.Parameter(torch.randn(1, cfg.num_tokens, d) * 0.02)
            self.t1, self.t2 = nn.Linear(256, d), nn.Linear(d, d)
            self.table = nn.Embedding(cfg.num_classes + 1, d)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.depth))
            self.final_ada = nn.Linear(d, 2 * d)
            self.final = nn.Linear(d, p * p * cfg.out_channels)

        def forward(self, x, t, y):
            x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
            freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
            args = t[:, None].float() * freqs[None]
            t_emb = self.t2(F.silu(self.t1(torch.cat([args.cos(), args.sin()], -1))))
            c = t_emb + self.table(y)
            for block in self.blocks:
                x = block(x, c)
            shift, scale = self.final_ada(F.silu(c)).chunk(2, dim=1)
            x = F.layer_norm(x, (d,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
            return self.final(x)  # (unpatchify is a reshape: left out on both sides)

    return DiT().eval()


def median_seconds(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(args, dtype: str, torch) -> float:
    """Time torch's and our forward of `args.model` in `dtype`; returns ours/torch images/s."""
    cfg = model_config(args.model, input_size=32, in_channels=4, num_classes=1000, dtype=dtype)
    ours = create_model(args.model, input_size=32, in_channels=4, num_classes=1000,
                        dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(ours)
    forward = jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 32, 32, 4)).astype(np.float32)
    t = rng.integers(0, 1000, args.batch)
    y = rng.integers(0, 1000, args.batch)
    jx, jt, jy = jnp.asarray(x), jnp.asarray(t, jnp.int32), jnp.asarray(y, jnp.int32)
    reference = torch_dit(cfg, torch)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    tt, ty = torch.from_numpy(t), torch.from_numpy(y)

    def run_torch():
        with torch.inference_mode(), torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"
        ):
            reference(tx, tt, ty)

    run_jax = lambda: jax.block_until_ready(forward(state, jx, jt, jy))
    run_jax()  # compile
    return race(args, f"forward, batch {args.batch}, {dtype}", run_torch, run_jax,
                gflop=2 * flops.dit_macs(cfg) * args.batch / 1e9)


def race(args, label: str, run_torch, run_jax, *, gflop: float) -> float:
    """Alternate the two (twice, keeping the best median of each), print the line for
    `label`; returns ours/torch images/s."""
    jax_s = torch_s = math.inf
    for _ in range(2):
        torch_s = min(torch_s, median_seconds(run_torch, args.warmup, args.iters))
        jax_s = min(jax_s, median_seconds(run_jax, args.warmup, args.iters))
    print(f"[{args.model} {label}] torch {torch_s:.3f} s ({gflop / torch_s:.0f} GFLOP/s) | "
          f"ours {jax_s:.3f} s ({gflop / jax_s:.0f} GFLOP/s) | ours/torch images/s "
          f"{torch_s / jax_s:.2f}x")
    return torch_s / jax_s


def torch_train_step(cfg, dtype: str, batch: int, torch):
    """One step of the reference training loop on a fixed batch of latents (module docstring)."""
    model = torch_dit(cfg, torch).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=generator)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=generator)
    p, side = cfg.patch_size, cfg.input_size // cfg.patch_size
    ema_params, params = dict(ema.named_parameters()), dict(model.named_parameters())

    def step():
        t = torch.randint(0, 1000, (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t][:, None, None, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            out = model(x_t, t, y)
        # the noise in the model output's token layout (patchify: a reshape on both sides)
        target = noise.reshape(batch, cfg.in_channels, side, p, side, p)
        target = target.permute(0, 2, 4, 3, 5, 1).reshape(batch, side * side, -1)
        loss = ((out.float()[..., : target.shape[-1]] - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for name, param in params.items():
                ema_params[name].mul_(0.9999).add_(param.data, alpha=1 - 0.9999)

    return step


def compare_train(args, dtype: str, torch) -> float:
    """Time torch's and our training step of `args.model` in `dtype`; returns ours/torch
    images/s."""
    cfg = model_config(args.model, input_size=LATENT_SIZE, in_channels=LATENT_CHANNELS,
                       num_classes=NUM_CLASSES, dtype=dtype)
    # configs/dit.py's default: scan over the blocks
    config = run_config(args.model, {"dtype": dtype, "scan_blocks": True},
                        argparse.Namespace(image_size=LATENT_SIZE, batch=args.batch))
    mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        parts = model_parts.build_model(config_lib.validate_config(config), mesh, seed=0)
        tx = update_step.make_optimizer(config)
        state = [update_step.init_state(parts, tx, mesh)]
        parts.params = None  # the state owns (and the step donates) the parameters
        jax_step = update_step.make_train_step(parts, tx, config, mesh)
        host = random_inputs(args.batch, LATENT_SIZE, NUM_CLASSES, seed=0)
        batch = parallel.global_batch({"latents": host["x"], "label": host["y"]}, mesh)

        def run_jax():
            state[0] = jax.block_until_ready(jax_step(state[0], batch))[0]

        run_jax()  # compile
        return race(args, f"train step, batch {args.batch}, {dtype}",
                    torch_train_step(cfg, dtype, args.batch, torch), run_jax,
                    gflop=6 * flops.dit_macs(cfg) * args.batch / 1e9)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="DiT-B/2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--what", default="forward", help="comma list: forward, train")
    args = p.parse_args(argv)
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    if not what or set(what) - {"forward", "train"}:
        p.error(f"--what takes a comma list of forward, train; got {args.what!r}")
    try:
        import torch
    except ImportError:
        p.error("needs torch (the optional extra): pip install torch (CPU wheel)")
    torch.set_num_threads(os.cpu_count())
    print(f"machine: {machine()} | torch {torch.__version__}, {torch.get_num_threads()} threads")
    functions = {"forward": compare, "train": compare_train}
    speedups = {f"{w}_{dtype}": functions[w](args, dtype, torch)
                for w in what for dtype in args.dtypes.split(",")}
    print(" ".join(f"speedup_{k}={v:.2f}" for k, v in speedups.items()))


if __name__ == "__main__":
    main()
