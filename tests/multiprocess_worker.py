"""One process of the multi-process training test (started by tests/test_multiprocess.py).

Env: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, XLA_FLAGS (local devices).
Args: CONFIG_JSON OUT_DIR. Writes OUT_DIR/indices_<pid>.json (examples this process read),
on process 0 OUT_DIR/params.npz (final parameters), and then samples 12 images from the
workdir with both processes into OUT_DIR/samples.
"""

import json
import os
import sys

from dydit_jax import parallel

parallel.initialize_distributed()

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from dydit_jax import data as data_lib  # noqa: E402
from dydit_jax import sample_lib, train_lib  # noqa: E402
from tests.helpers import CountingSource  # noqa: E402


def main(config_json: str, out_dir: str) -> None:
    config = ml_collections.ConfigDict(json.loads(config_json))
    config.mesh_shape = tuple(config.mesh_shape)
    config.sharding_rules = tuple(tuple(r) for r in config.sharding_rules)
    counting = {}
    load = data_lib.load_source

    def load_and_count(cfg):
        counting["source"] = CountingSource(load(cfg))
        return counting["source"]

    data_lib.load_source = load_and_count
    state = train_lib.train_and_evaluate(config, os.path.join(out_dir, "workdir"))
    pid = jax.process_index()
    with open(os.path.join(out_dir, f"indices_{pid}.json"), "w") as f:
        json.dump(counting["source"].seen, f)
    flat = {
        "/".join(str(k.key) for k in path): np.asarray(leaf.addressable_data(0))
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
    }
    if pid == 0:
        np.savez(os.path.join(out_dir, "params.npz"), **flat)
    sample_lib.sample_from_workdir(
        os.path.join(out_dir, "workdir"), os.path.join(out_dir, "samples"), num_samples=12,
        sampling_steps="2", batch_size=8, progress=False,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
