r"""DyDiT: fine-tune a trained DiT into a DyDiT at a target FLOPs ratio lambda.

Digits (CPU, minutes), after the digits DiT demo (configs/digits.py) has trained:

  python train.py --config=configs/dydit.py:digits --workdir=workdirs/dydit_digits \
      --config.init_from=workdirs/digits
  python sample.py --workdir=workdirs/dydit_digits --out=workdirs/dydit_digits/samples \
      --num_samples=100

Variants: `digits` (lambda 0.5; `digits,0.7` for another lambda). The paper's ImageNet
variants (per-size lambda grids and iteration counts) are not here yet.
"""

import ml_collections

from configs.digits import get_config as digits_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name, *rest = (arg or "digits").split(",")
    if name != "digits":
        raise ValueError(f"unknown DyDiT variant {arg!r}; available: digits[,LAMBDA]")
    config = digits_config()
    config.model = "DyDiT-S/2"  # the digits DiT backbone (same model_overrides) plus routers
    config.init_from = "workdirs/digits"
    config.dydit.lambda_target = float(rest[0]) if rest else 0.5
    config.dydit.hold_steps = 50
    config.dydit.warmup_steps = 250
    config.num_steps = 600
    config.learning_rate = 1e-3
    config.warmup_steps = 0
    config.checkpoint_every_steps = 300
    config.sample_every_steps = 300
    return config
