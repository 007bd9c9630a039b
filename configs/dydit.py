r"""DyDiT: fine-tune a trained DiT into a DyDiT at a target FLOPs ratio lambda (Zhao et al.).

Digits (CPU, minutes), after the digits DiT demo (configs/digits.py) has trained:

  python train.py --config=configs/dydit.py:digits --workdir=workdirs/dydit_digits \
      --config.init_from=workdirs/digits
  python sample.py --workdir=workdirs/dydit_digits --out=workdirs/dydit_digits/samples \
      --num_samples=100

ImageNet 256 latents, from a DiT workdir (ours, or a converted reference checkpoint):

  python train.py --config=configs/dydit.py:XL/2,0.5 --workdir=workdirs/dydit_xl2_05 \
      --config.data_dir=/data/imagenet256_latents --config.init_from=workdirs/dit_xl2

Variants: `digits[,LAMBDA]` (lambda 0.5 by default) and `SIZE/2,LAMBDA` for the paper's grid:
S and B with lambda in {0.9, 0.8, 0.7, 0.5, 0.4, 0.3}, XL with {0.7, 0.6, 0.5, 0.3}.
The recipe of the release's scripts (docs/dydit_recipe.md gives the file and line of each
number): iterations S 50k, B 100k, XL 200k, or 150k at lambda 0.7; XL trains the complete
model alongside for the first 30k steps (stage 1), at lambda 0.7 for all 150k steps with a
5000-step lambda ramp; lr 1e-4 (XL at 0.7: 2.5e-5); no gradient is ever scaled, an update
is skipped when the gradient norm reaches grad_skip_norm (XL 0.5: 200, XL 0.7: 50, else the
trainer's default 15); batch 256, EMA 0.9999, float32. Launch commands for several GPUs,
hosts and TPU pods are those of configs/dit.py.
"""

import ml_collections

from configs.digits import get_config as digits_config
from configs.dit import get_config as dit_config

LAMBDAS = {"S": (0.9, 0.8, 0.7, 0.5, 0.4, 0.3), "B": (0.9, 0.8, 0.7, 0.5, 0.4, 0.3),
           "XL": (0.7, 0.6, 0.5, 0.3)}
ITERATIONS = {"S": 50_000, "B": 100_000, "XL": 200_000}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    name, *rest = (arg or "digits").split(",")
    try:
        lam = float(rest[0]) if rest else 0.5
    except ValueError as err:
        raise ValueError(f"bad lambda in DyDiT variant {arg!r}") from err
    if name == "digits":
        return _digits(lam)
    size = name.split("/")[0]
    if size not in LAMBDAS or name != f"{size}/2" or lam not in LAMBDAS[size]:
        grid = "; ".join(f"{s}/2 with {', '.join(map(str, v))}" for s, v in LAMBDAS.items())
        raise ValueError(f"unknown DyDiT variant {arg!r}; use digits[,LAMBDA] or {grid}")
    config = dit_config(name)
    config.model = f"DyDiT-{name}"
    # the paper's float32; scan over blocks as configs/dit.py (a DiT trained in either layout
    # initialises it: init_from restacks the blocks)
    config.model_overrides.update(dtype="float32", scan_blocks=True)
    config.dydit.lambda_target = lam
    config.num_steps = ITERATIONS[size]
    config.grad_clip_norm = 0.0  # the release never scales a gradient
    config.grad_skip_norm = 15.0  # the trainer's default clip_max_norm
    if size == "XL":
        # train0.5.sh: stage 1 (train.py, complete model) to step 30k, then stage 2
        # (train_without_completemodel.py) to 200k; threshold 200 in both
        config.dydit.complete_model_steps = 30_000
        config.grad_skip_norm = 200.0
        # float32 with two forwards per step in stage 1 (dynamic and complete model): keep
        # only the matmul outputs and recompute the rest in the backward pass, so a 1024
        # batch fits 16 GiB chips (BENCHMARKS.md, Pod plans). Same numbers; `remat=none` is
        # faster where memory allows.
        config.model_overrides.remat = "dots"
        if lam == 0.7:  # train0.7.sh: stage 1 only, all 150k steps
            config.num_steps = 150_000
            config.dydit.complete_model_steps = config.num_steps
            config.dydit.warmup_steps = 5000
            config.learning_rate = 2.5e-5
            config.grad_skip_norm = 50.0
    return config


def _digits(lam: float) -> ml_collections.ConfigDict:
    if not 0 < lam <= 1:
        raise ValueError(f"lambda must be in (0, 1], got {lam}")
    config = digits_config()
    config.model = "DyDiT-S/2"  # the digits DiT backbone (same model_overrides) plus routers
    config.init_from = "workdirs/digits"
    config.dydit.lambda_target = lam
    config.dydit.hold_steps = 50
    config.dydit.warmup_steps = 250
    config.num_steps = 1500  # long enough for the hard eval masks to reach lambda too
    config.checkpoint_every_steps = 750
    config.sample_every_steps = 750
    return config
