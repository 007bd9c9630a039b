"""python -m dydit_jax.convert {dit,dydit,udit} --src FILE --dst DIR [--arch NAME]
    [--input-size N] [--fuse]
python -m dydit_jax.convert vae --src FILE --dst DIR [--dtype bfloat16]

Converts a reference PyTorch checkpoint (.pt/.pth needs torch; .safetensors; .npz) into a
workdir that sample.py reads and train.py starts from (`--config.init_from=DIR`).
"""

from __future__ import annotations

import argparse
import os
import sys

from dydit_jax import cli, convert
from dydit_jax.convert import vae


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dydit_jax.convert", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument(
        "kind", choices=sorted([*convert.KINDS, "vae"]),
        help="model family of --src (vae: the KL-f8 autoencoder; --dst becomes a new "
        "directory with params.npz and config.json, see convert/vae.py)",
    )
    parser.add_argument("--src", required=True, help="reference checkpoint file")
    parser.add_argument(
        "--dst", required=True, help="workdir to create (must hold no checkpoints/)"
    )
    parser.add_argument(
        "--arch", default=None,
        help="registry name, e.g. DiT-XL/2 (default: inferred from the shapes)",
    )
    parser.add_argument(
        "--input-size", type=int, default=None,
        help="latent size; U-DiT files do not store it (default 32 = 256px; 64 for 512px)",
    )
    parser.add_argument(
        "--fuse", action="store_true",
        help="udit: write the fused (re-parameterised) inference form instead of the "
        "training form",
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default=None,
        help="vae: compute dtype recorded in DIR (parameters stay float32; default float32)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.kind == "vae":

        return vae.main(args)
    try:
        if os.path.exists(os.path.join(os.path.abspath(args.dst), "checkpoints")):
            raise ValueError(f"{args.dst} already holds checkpoints/; pick a new --dst")
        if args.fuse and args.kind != "udit":
            raise ValueError("--fuse applies to U-DiT checkpoints (kind udit) only")
        if args.dtype is not None:
            raise ValueError("--dtype applies to VAE checkpoints (kind vae) only")
        state_dict = convert.load_state_dict(args.src)
        options = dict(
            input_size=args.input_size, overrides={"fused": True} if args.fuse else None
        )
        name, _ = convert.infer_config(args.kind, state_dict, args.arch, **options)
        config, params = convert.state_dict_to_params(
            args.kind, state_dict, args.arch, **options
        )
        convert.write_workdir(
            args.dst, config, params, model_name=name, image_size=config.input_size,
            num_classes=config.num_classes,
        )
    except (ValueError, OSError, ImportError, KeyError) as e:
        return cli.fail(e)
    count = sum(v.size for v in convert.common.flatten(params).values())
    layout = getattr(config, "router_layout", None)
    print(
        f"wrote {args.dst}: {name} ({count / 1e6:.1f}M parameters, input {config.input_size}, "
        f"{config.in_channels} channels, {config.num_classes} classes"
        + (f", router layout {layout}" if layout else "")
        + ") as step 0 params and ema_params"
    )
    print(
        f"sample: python sample.py --workdir={args.dst} --out=OUT; "
        f"fine-tune: python train.py ... --config.init_from={args.dst}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
