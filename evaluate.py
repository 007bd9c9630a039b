r"""Evaluate a sample batch: FID, sFID, Inception Score, precision, recall (+ class accuracy
with --features digits). See dydit_jax/eval/evaluate.py for the details.

  python evaluate.py --samples S.npz --reference VIRTUAL_imagenet256_labeled.npz \
      --inception_graph classify_image_graph_def.pb [--num_samples 50000] [--out results.json]
  python evaluate.py --samples S.npz --reference digits_ref.npz --features digits --workdir DIR
"""

import sys

from dydit_jax.eval.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
