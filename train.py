r"""Train a model from an ml-collections config.

  python train.py --config=configs/digits.py --workdir=workdirs/digits [--config.KEY=VALUE ...]

Resumes from the latest checkpoint in --workdir. See README.md for the outputs.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from dydit_jax import cli, train_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:VARIANT]).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and sample grids.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.start(distributed=True)
    try:
        train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except train_lib.TrainingInterrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)  # the shell's code for a Ctrl-C
    except (ValueError, FileNotFoundError, train_lib.NonFiniteLossError) as e:
        sys.exit(cli.fail(e))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
