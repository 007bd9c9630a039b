"""Fault injection on training: kill -9 at random moments (some of them while a checkpoint is
being written), SIGTERM, and a non-finite loss.

Short by default (10 kills, what CI runs); `pytest tests/faults --faults-long` kills 30 times.
Each kill is followed by a restart of the same command, which must resume from the newest
committed checkpoint; the run that finally completes must end with exactly the parameters,
EMA and optimizer state of an uninterrupted run.
"""

import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dydit_jax import data as data_lib
from dydit_jax import train_lib
from dydit_jax.checkpoint import checkpoint_dir
from tests.helpers import REPO, tiny_config

pytestmark = pytest.mark.faults

NUM_STEPS, EVERY = 120, 4
FLAGS = [
    "--config=configs/digits.py:tiny", f"--config.num_steps={NUM_STEPS}",
    f"--config.checkpoint_every_steps={EVERY}", f"--config.log_every_steps={EVERY}",
    "--config.keep_checkpoints=2", "--config.sample_every_steps=100000",
]


def start(workdir, *extra):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3",
               JAX_DEFAULT_MATMUL_PRECISION="highest")
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}", *FLAGS, *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def committed_steps(workdir) -> list[int]:
    d = checkpoint_dir(str(workdir))
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def writing(workdir) -> bool:
    """A checkpoint is being written (Orbax's temporary directory exists)."""
    d = checkpoint_dir(str(workdir))
    return os.path.isdir(d) and any("tmp" in n for n in os.listdir(d))


def kill_at(proc, workdir, moment: str, delay: float, deadline: float) -> bool:
    """SIGKILL the run at `moment`: "write" = as soon as a checkpoint write is seen,
    "training" = `delay` s after it first logged a step, "any" = `delay` s after start.
    Returns False if the run ended first."""
    began = time.time()
    trained_at = None
    while time.time() < deadline and proc.poll() is None:
        if moment == "write" and writing(workdir):
            break
        if moment == "any" and time.time() - began > delay:
            break
        if moment == "training":
            if trained_at is None and committed_steps(workdir) or writing(workdir):
                trained_at = trained_at or time.time()
            if trained_at is not None and time.time() - trained_at > delay:
                break
        time.sleep(0.005)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return True


def final_state(workdir) -> dict:
    step = committed_steps(workdir)[-1]
    path = os.path.join(checkpoint_dir(str(workdir)), str(step))
    reader = ocp.StandardCheckpointer()
    items = {name: reader.restore(os.path.join(path, name))
             for name in ("params", "ema_params", "opt_state")}
    return step, jax.tree.map(np.asarray, items)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(
    tmp_path, request, record_property
):
    kills = 30 if request.config.getoption("--faults-long") else 10
    rng = random.Random(0)
    reference = tmp_path / "uninterrupted"
    proc = start(reference)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]

    workdir = tmp_path / "killed"
    survived, during_writes = 0, 0
    deadline = time.time() + 900
    moments = ["write", "training", "any"]
    while survived < kills:
        before = committed_steps(workdir)
        proc = start(workdir)
        moment = moments[survived % 3]
        if not kill_at(proc, workdir, moment, rng.uniform(0.0, 1.5 if moment != "any" else 12),
                       deadline):
            out = proc.communicate()[0]
            assert proc.returncode == 0, out[-3000:]
            break  # the run completed before this kill: nothing left to interrupt
        log = proc.stdout.read()
        if before:  # the killed run had resumed from the newest committed checkpoint
            resumed = re.search(r"resumed from step (\d+)", log)
            assert resumed is None or int(resumed[1]) == before[-1], log[-2000:]
        survived += 1
        during_writes += moment == "write"
        # every committed step is complete (Orbax commits by rename): its meta is readable
        for step in committed_steps(workdir):
            assert os.path.exists(
                os.path.join(checkpoint_dir(str(workdir)), str(step), "commit_success.txt")
            ) or os.path.isdir(os.path.join(checkpoint_dir(str(workdir)), str(step), "meta"))
    assert survived == kills, f"only {survived} kills landed before the run completed"
    proc = start(workdir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    record_property("fault:kills survived", survived)
    record_property("fault:kills during checkpoint writes", during_writes)

    got_step, got = final_state(workdir)
    want_step, want = final_state(reference)
    assert got_step == want_step == NUM_STEPS
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_and_ctrl_c_save_and_stop_then_the_run_completes(tmp_path, record_property,
                                                                  signum):
    workdir = tmp_path / "preempted"
    short = "--config.num_steps=40"
    proc = start(workdir, short)
    deadline = time.time() + 300
    while time.time() < deadline and not committed_steps(workdir):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    assert "Traceback" not in out, out[-3000:]
    match = re.search(rf"{name}: saving a checkpoint at step (\d+)", out)
    assert match, out[-3000:]
    stopped = int(match[1])
    if signum == signal.SIGTERM:  # a preemption: a normal exit
        assert proc.returncode == 0, out[-3000:]
    else:  # an interruption: the shell's code for Ctrl-C, and where it saved
        assert proc.returncode == 130, out[-3000:]
        assert f"interrupted (Ctrl-C): saved a checkpoint at step {stopped}" in out
    assert 0 < stopped < 40 and committed_steps(workdir)[-1] == stopped
    proc = start(workdir, short)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and f"resumed from step {stopped}" in out, out[-3000:]
    assert committed_steps(workdir)[-1] == 40
    record_property("fault:sigterms survived", 1)
    if signum == signal.SIGTERM:
        # a rerun of the finished run says so and writes nothing
        before = sorted(os.listdir(workdir))
        proc = start(workdir, short)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0 and "training is complete: step 40" in out, out[-3000:]
        assert sorted(os.listdir(workdir)) == before  # no new events file


def damage(workdir, step: int, item: str = "ema_params") -> None:
    """Cut every data file of one item of a saved step to 10 bytes (a disk that filled up)."""
    folder = os.path.join(checkpoint_dir(str(workdir)), str(step), item)
    for root, _, names in os.walk(folder):
        if os.path.basename(root) == "d":
            for name in names:
                os.truncate(os.path.join(root, name), 10)


def test_a_damaged_latest_checkpoint_is_set_aside_and_training_resumes_before_it(tmp_path):
    from dydit_jax import sample_lib
    from dydit_jax.checkpoint import CheckpointDamagedError

    config = lambda steps: tiny_config(num_steps=steps, checkpoint_every_steps=4,
                                       log_every_steps=4, sample_every_steps=0)
    reference = train_lib.train_and_evaluate(config(12), str(tmp_path / "reference"))
    workdir = tmp_path / "run"
    train_lib.train_and_evaluate(config(8), str(workdir))
    damage(workdir, 8)
    # sampling names the damaged step and the ones that read back
    with pytest.raises(CheckpointDamagedError,
                       match=r"step 8 .* cannot be restored: .*--step=N, N one of \[4\]"):
        sample_lib.sample_from_workdir(str(workdir), str(tmp_path / "s"), num_samples=2,
                                       sampling_steps="2", progress=False)
    # training goes on from step 4, keeping the damaged step aside (renamed, not deleted)
    state = train_lib.train_and_evaluate(config(12), str(workdir))
    assert os.listdir(tmp_path / "run" / "checkpoints_damaged") == ["8"]
    assert committed_steps(workdir)[-1] == 12
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
                 jax.device_get(reference.params))  # as if never damaged
    # a meta item deleted, or garbage in it: named, with the steps that read back
    import shutil

    shutil.rmtree(os.path.join(checkpoint_dir(str(workdir)), "12", "meta"))
    with pytest.raises(CheckpointDamagedError, match=r"step 12: its meta item .*12/meta is "
                       r"missing or unreadable .*N one of \[4, 8\]"):
        sample_lib.sample_from_workdir(str(workdir), str(tmp_path / "s"), num_samples=2)


class PoisonedBatches:
    """The run's batches with NaN images at the given steps (a corrupt record)."""

    def __init__(self, batches, steps):
        self.batches, self.steps = batches, set(steps)

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, step):
        batch = self.batches[step]
        if step in self.steps:
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return batch


@pytest.fixture
def poisoned(monkeypatch):
    def poison(steps):
        make = data_lib.make_batches
        monkeypatch.setattr(
            data_lib, "make_batches", lambda *a, **k: PoisonedBatches(make(*a, **k), steps)
        )
    return poison


def _config(**overrides):
    return tiny_config(num_steps=12, checkpoint_every_steps=4, log_every_steps=4,
                       sample_every_steps=100000, **overrides)


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, poisoned, record_property
):
    poisoned([9])
    workdir = str(tmp_path / "nan")
    with pytest.raises(train_lib.NonFiniteLossError, match="non-finite loss at step 9") as e:
        train_lib.train_and_evaluate(_config(), workdir)
    assert "last good checkpoint is step 8" in str(e.value)
    assert committed_steps(workdir) == [4, 8]  # nothing written after the bad step
    _, state = final_state(workdir)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
    record_property("fault:nan runs stopped cleanly", 1)


def test_a_nan_loss_is_skipped_and_counted_when_configured(tmp_path, poisoned):
    workdir = str(tmp_path / "skip")
    clean = train_lib.train_and_evaluate(_config(), str(tmp_path / "clean"))
    poisoned([5, 6])
    state = train_lib.train_and_evaluate(_config(nonfinite="skip"), workdir)
    assert int(state.step) == 12 and committed_steps(workdir)[-1] == 12
    params = jax.tree.leaves(jax.device_get(state.params))
    assert all(np.isfinite(x).all() for x in params)
    # the two batches changed nothing: the run differs from the clean one (it missed them)
    assert any(not np.array_equal(a, b) for a, b in
               zip(params, jax.tree.leaves(jax.device_get(clean.params)), strict=True))
    events = "".join(open(os.path.join(workdir, f), "rb").read().decode("latin-1")
                     for f in os.listdir(workdir) if f.startswith("events"))
    assert "skipped_batches" in events
