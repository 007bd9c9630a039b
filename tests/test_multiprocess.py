"""Two local processes (jax.distributed on localhost, 2 CPU devices each) train on latent
shards and match a single-process run; each process reads only its own rows."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

from dydit_jax import checkpoint as ckpt_lib
from dydit_jax import data as data_lib
from dydit_jax import sample_lib, train_lib
from tests.helpers import REPO, tiny_config


def latent_config(data_dir, **overrides):
    overrides = {
        "dataset": "latents", "data_dir": str(data_dir), "image_size": 4, "in_channels": 4,
        "num_steps": 3, "global_batch_size": 16, "checkpoint_every_steps": 3,
        "sample_every_steps": 1000, "log_every_steps": 1, **overrides,
    }
    return tiny_config(**overrides)


def write_shards(path, n=64):
    rng = np.random.default_rng(0)
    moments = rng.standard_normal((n, 2, 4, 4, 8)).astype(np.float16)
    moments[..., 4:] = -4.0  # small posterior std
    data_lib.write_latent_shards(
        str(path), {"moments": moments, "label": rng.integers(0, 10, n)}, num_shards=4
    )


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    write_shards(tmp_path / "shards")
    config = latent_config(tmp_path / "shards")
    port = portpicker.pick_unused_port()
    procs = []
    for pid in range(2):
        env = dict(
            os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
            XLA_FLAGS=os.environ["XLA_FLAGS"].replace(
                "xla_force_host_platform_device_count=8", "xla_force_host_platform_device_count=2"
            ),
        )
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(REPO, "tests", "multiprocess_worker.py"),
             json.dumps(config.to_dict()), str(tmp_path / "multi")],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]

    # single process, 8 devices, same global batches
    single = train_lib.train_and_evaluate(config, str(tmp_path / "single"))
    multi = np.load(tmp_path / "multi" / "params.npz")
    flat = {
        "/".join(str(k.key) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(single.params))
    }
    assert sorted(flat) == sorted(multi.files)
    for name, value in flat.items():
        np.testing.assert_allclose(multi[name], value, rtol=1e-4, atol=1e-6, err_msg=name)

    seen = [json.load(open(tmp_path / "multi" / f"indices_{pid}.json")) for pid in range(2)]
    assert len(seen[0]) == len(seen[1]) == 3 * 8  # 3 steps x 8 rows each
    assert not set(seen[0]) & set(seen[1])  # each process read only its own rows
    batches = data_lib.make_batches(
        data_lib.load_source(config), global_batch_size=16, seed=config.seed,
        process_index=0, process_count=1,
    )
    expected = np.concatenate([batches[s]["label"] for s in range(3)])
    labels = data_lib.load_source(config).labels
    got = np.concatenate([labels[np.reshape(seen[p], (3, 8))] for p in range(2)], axis=1)
    np.testing.assert_array_equal(got.reshape(-1), expected)
    saved = ckpt_lib.Checkpointer(str(tmp_path / "multi" / "workdir"), create=False)
    assert saved.latest_step() == 3

    # sampling with both processes (each feeds its own rows) = sampling with one
    sample_lib.sample_from_workdir(
        str(tmp_path / "single"), str(tmp_path / "single_samples"), num_samples=12,
        sampling_steps="2", batch_size=8, progress=False,
    )
    want = np.load(tmp_path / "single_samples" / "samples.npz")
    got = np.load(tmp_path / "multi" / "samples" / "samples.npz")
    np.testing.assert_array_equal(got["arr_1"], want["arr_1"])
    assert got["arr_0"].shape == want["arr_0"].shape == (12, 4, 4, 4)
    assert np.abs(got["arr_0"].astype(int) - want["arr_0"]).max() <= 1


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
    workdir = tmp_path / "wd"
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train.py"), "--config=configs/digits.py:tiny",
         f"--workdir={workdir}", "--config.num_steps=1000000",
         "--config.checkpoint_every_steps=1000000", "--config.log_every_steps=5"],
        cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
    )
    deadline, seen = time.time() + 300, []
    for line in proc.stderr:  # wait until training is under way
        seen.append(line)
        if "] step 10: loss " in line:
            break
        assert time.time() < deadline, "".join(seen[-20:])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saving a checkpoint at step" in err
    step = ckpt_lib.Checkpointer(str(workdir), create=False).latest_step()
    assert step is not None and 10 <= step < 1000000
    # the next start resumes there
    state = train_lib.train_and_evaluate(tiny_config(num_steps=step + 2), str(workdir))
    assert int(state.step) == step + 2
