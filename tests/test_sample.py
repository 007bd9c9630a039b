"""sample.py: determinism, the .npz format, labels, and clear errors."""

import functools
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from dydit_jax import checkpoint as ckpt_lib
from dydit_jax import config_lib, model_parts, parallel, sample_lib, train_lib
from tests.helpers import run_entry_point, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("trained"))
    train_lib.train_and_evaluate(tiny_config(num_steps=4), path)
    return path


def test_same_seed_same_images_and_npz_format(workdir, tmp_path):
    kwargs = dict(num_samples=13, sampling_steps="5", batch_size=8)
    sample_lib.sample_from_workdir(workdir, str(tmp_path / "a"), seed=3, **kwargs)
    # image i depends on (seed, i, label) only: another batch size gives the same images
    sample_lib.sample_from_workdir(
        workdir, str(tmp_path / "b"), seed=3, **(kwargs | {"batch_size": 16})
    )
    sample_lib.sample_from_workdir(workdir, str(tmp_path / "c"), seed=4, **kwargs)
    a, b, c = (np.load(tmp_path / d / "samples.npz") for d in "abc")
    assert sorted(a.files) == ["arr_0", "arr_1"]
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (13, 8, 8, 1)
    np.testing.assert_array_equal(a["arr_1"], np.arange(13) % 10)  # balanced labels
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    assert not np.array_equal(a["arr_0"], c["arr_0"])
    grid = Image.open(tmp_path / "a" / "grid.png")
    assert grid.size[0] > 8 * 10  # ten columns of (upscaled) images


def test_sample_cli_with_ddim_and_labels(workdir, tmp_path):
    out = tmp_path / "out"
    proc = run_entry_point(
        "sample.py", f"--workdir={workdir}", f"--out={out}", "--num_samples=5",
        "--sampler=ddim", "--sampling_steps=ddim10", "--labels=1,2", "--cfg_scale=1.0",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = np.load(out / "samples.npz")
    np.testing.assert_array_equal(data["arr_1"], [1, 2, 1, 2, 1])
    assert data["arr_0"].shape == (5, 8, 8, 1)
    assert (out / "grid.png").exists()


def test_sample_without_checkpoint_is_one_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ckpt_lib.CheckpointNotFoundError, match="train first"):
        sample_lib.sample_from_workdir(str(empty), str(tmp_path / "o"), num_samples=2)
    proc = run_entry_point(
        "sample.py", f"--workdir={empty}", f"--out={tmp_path / 'o'}", "--num_samples=2"
    )
    assert proc.returncode != 0
    assert "no checkpoint found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
    assert os.listdir(empty) == []


def test_bad_labels_are_refused(workdir, tmp_path):
    with pytest.raises(ValueError, match="outside 0..9"):
        sample_lib.sample_from_workdir(workdir, str(tmp_path / "o"), num_samples=2, labels="3,12")
    assert not (tmp_path / "o").exists()


def test_an_interrupted_run_resumes_and_finished_samples_are_kept(workdir, tmp_path, monkeypatch):
    # batches are multiples of the 8 (fake) devices: 13 images = 8 + 5
    kwargs = dict(num_samples=13, sampling_steps="5", batch_size=8, seed=3, progress=False)
    sample_lib.sample_from_workdir(workdir, str(tmp_path / "whole"), **kwargs)
    out = str(tmp_path / "run")
    original_add, added = sample_lib.SampleRun.add, []

    def crash_after_one(self, indices, images, labels):
        if len(added) == 1:
            raise KeyboardInterrupt  # the kill: one batch is on disk
        added.append(indices)
        original_add(self, indices, images, labels)

    monkeypatch.setattr(sample_lib.SampleRun, "add", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        sample_lib.sample_from_workdir(workdir, out, **kwargs)
    assert not os.path.exists(os.path.join(out, "samples.npz"))
    assert len([f for f in os.listdir(os.path.join(out, "parts")) if f.endswith(".npz")]) == 1
    monkeypatch.setattr(sample_lib.SampleRun, "add", original_add)
    # a rerun with other settings must not mix its images in
    with pytest.raises(ValueError, match="unfinished run with other settings.*seed"):
        sample_lib.sample_from_workdir(workdir, out, **(kwargs | {"seed": 4}))
    # the same command (another batch size is fine) samples only the 5 missing images
    summary = sample_lib.sample_from_workdir(workdir, out, **(kwargs | {"batch_size": 16}))
    assert summary["resumed_with"] == 8
    want, got = (np.load(os.path.join(d, "samples.npz")) for d in (tmp_path / "whole", out))
    np.testing.assert_array_equal(got["arr_0"], want["arr_0"])
    np.testing.assert_array_equal(got["arr_1"], want["arr_1"])
    assert not os.path.exists(os.path.join(out, "parts"))
    # finished: the same settings do nothing, other settings are refused, nothing changes
    before = open(os.path.join(out, "samples.npz"), "rb").read()
    assert sample_lib.sample_from_workdir(workdir, out, **kwargs)["resumed_with"] == 8
    with pytest.raises(ValueError, match="already holds the samples of another run"):
        sample_lib.sample_from_workdir(workdir, out, **(kwargs | {"num_samples": 20}))
    assert open(os.path.join(out, "samples.npz"), "rb").read() == before


def test_latent_samples_are_decoded_with_the_vae(workdir, tmp_path):
    from flax import nnx

    from dydit_jax import vae as vae_lib
    from dydit_jax.convert import vae as convert_vae

    # a tiny random autoencoder whose latents have the digits model's one channel
    config = vae_lib.VAEConfig(block_out_channels=(8, 8), layers_per_block=1,
                               norm_num_groups=4, latent_channels=1)
    rng = np.random.default_rng(0)
    shapes = nnx.to_pure_dict(nnx.state(vae_lib.abstract_model(config), nnx.Param))
    params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)
    convert_vae.write_vae_dir(str(tmp_path / "vae"), config, params)
    kwargs = dict(num_samples=3, sampling_steps="2", batch_size=4, progress=False)
    summary = sample_lib.sample_from_workdir(
        workdir, str(tmp_path / "rgb"), vae=str(tmp_path / "vae"), **kwargs
    )
    assert summary["vae"] == str(tmp_path / "vae")
    rgb = np.load(tmp_path / "rgb" / "samples.npz")["arr_0"]
    assert rgb.shape == (3, 16, 16, 3) and rgb.dtype == np.uint8  # 8x8 latents, factor 2
    # = the VAE's decode of the model's own samples
    mesh = parallel.make_mesh((-1, 1, 1))
    with jax.set_mesh(mesh):
        _, run_config, parts, weights = model_parts.restore_weights(workdir, mesh)
        sampler = sample_lib.make_batch_sampler(
            parts, mesh=mesh, sampling_steps="2", cfg_scale=run_config.sample.cfg_scale,
            guided_channels=run_config.sample.guided_channels,
        )
    latents = sample_lib.generate(
        functools.partial(sampler, weights), np.arange(3) % 10, batch_size=8, seed=0,
        mesh=mesh, progress=False,
    )
    decoded = sample_lib.to_uint8(vae_lib.load(str(tmp_path / "vae")).decode_latents(latents))
    assert np.abs(decoded.astype(int) - rgb).max() <= 1
    with pytest.raises(ValueError, match="4 latent channels but the model samples 1"):
        bad = vae_lib.VAEConfig(block_out_channels=(8, 8), layers_per_block=1,
                                norm_num_groups=4)
        shapes = nnx.to_pure_dict(nnx.state(vae_lib.abstract_model(bad), nnx.Param))
        convert_vae.write_vae_dir(str(tmp_path / "vae4"), bad, jax.tree.map(
            lambda s: np.zeros(s.shape, np.float32), shapes))
        sample_lib.sample_from_workdir(
            workdir, str(tmp_path / "x"), vae=str(tmp_path / "vae4"), **kwargs
        )


@pytest.mark.slow
def test_a_killed_sampling_process_resumes(workdir, tmp_path):
    # kill -9 sample.py once its first batch is on disk; the same command then completes
    # with exactly N images, each once, equal to an uninterrupted run's
    out = tmp_path / "killed"
    args = ["sample.py", f"--workdir={workdir}", f"--out={out}", "--num_samples=24",
            "--batch_size=8", "--sampling_steps=250", "--seed=5"]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / "parts"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if parts.is_dir() and any(f.endswith(".npz") for f in os.listdir(parts)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "sample.py ended before it could be killed"
    assert not (out / "samples.npz").exists()
    done = len([f for f in os.listdir(parts) if f.endswith(".npz")])
    assert 1 <= done < 3
    rerun = run_entry_point(*args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{8 * done} from an interrupted run" in rerun.stdout
    got = np.load(out / "samples.npz")
    assert got["arr_0"].shape[0] == 24
    np.testing.assert_array_equal(got["arr_1"], np.arange(24) % 10)
    whole = sample_lib.sample_from_workdir(
        workdir, str(tmp_path / "whole"), num_samples=24, batch_size=24, sampling_steps="250",
        seed=5, progress=False,
    )
    want = np.load(os.path.join(whole["out"], "samples.npz"))["arr_0"]
    np.testing.assert_array_equal(got["arr_0"], want)
    assert len({img.tobytes() for img in got["arr_0"]}) == 24


def sample_with_devices(workdir, out, devices, *extra):
    """sample.py in a subprocess that sees `devices` CPU devices; the images it wrote."""
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    env["XLA_FLAGS"] = " ".join(
        [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
        + [f"--xla_force_host_platform_device_count={devices}"]
    )
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "sample.py"), f"--workdir={workdir}",
         f"--out={out}", "--num_samples=8", "--sampling_steps=4", *extra],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(os.path.join(out, "samples.npz"))["arr_0"].astype(int)


@pytest.mark.parametrize("model,train_mesh", [
    ("DiT-S/2", (2, 4, 1)), ("DiT-S/2", (1, 2, 4)),
    pytest.param("DyDiT-S/2", (1, 2, 4), marks=pytest.mark.slow),
])
def test_a_run_trained_on_8_devices_samples_on_1_and_on_8(tmp_path, model, train_mesh):
    # sampling picks its own mesh from the devices present, never the training run's
    workdir = str(tmp_path / "run")
    config = tiny_config(model=model, num_steps=3, mesh_shape=train_mesh, sample_every_steps=0)
    config.model_overrides.update(num_heads=4)
    train_lib.train_and_evaluate(config, workdir)
    extra = ["--token_capacity=all"] if model.startswith("DyDiT") else []
    one = sample_with_devices(workdir, str(tmp_path / "one"), 1, *extra)
    eight = sample_with_devices(workdir, str(tmp_path / "eight"), 8, *extra)
    assert np.abs(one - eight).max() <= 1  # within 1/255
    if model.startswith("DyDiT"):  # the engine ran on both
        assert os.path.exists(tmp_path / "one" / "dynamic.json")
        assert os.path.exists(tmp_path / "eight" / "dynamic.json")


def test_mesh_shape_flag(workdir, tmp_path):
    summary = sample_lib.sample_from_workdir(
        workdir, str(tmp_path / "t"), num_samples=4, sampling_steps="3", mesh_shape="(1,2,-1)"
    )
    assert summary["num_samples"] == 4
    with pytest.raises(ValueError, match="--mesh_shape: mesh_shape"):
        sample_lib.sample_from_workdir(workdir, str(tmp_path / "u"), num_samples=4,
                                       mesh_shape="3,1,1")
    with pytest.raises(ValueError, match="is not 3 whole numbers"):
        sample_lib.sample_from_workdir(workdir, str(tmp_path / "v"), num_samples=4,
                                       mesh_shape="a,b,c")
    assert not os.path.exists(tmp_path / "u") and not os.path.exists(tmp_path / "v")


def test_training_on_another_device_count_says_how_to_override():
    with pytest.raises(ValueError, match=r"--config.mesh_shape='\(-1,1,1\)'"):
        config_lib.validate_config(tiny_config(mesh_shape=(2, 8, 1)))


def test_random_labels_are_the_reference_protocol():
    # sample_ddp.py draws every label uniformly from 0..K-1, independently: random labels
    # are not balanced, cover the classes evenly in expectation, and follow the seed
    labels = sample_lib.make_labels("random", 50_000, 1000, seed=0)
    counts = np.bincount(labels, minlength=1000)
    assert labels.dtype == np.int32 and counts.min() >= 20 and counts.max() <= 85
    assert len(set(counts.tolist())) > 1  # not exactly 50 each, as balanced gives
    chi2 = float(((counts - 50.0) ** 2 / 50.0).sum())  # 999 degrees of freedom
    assert 850 < chi2 < 1150
    np.testing.assert_array_equal(labels, sample_lib.make_labels("random", 50_000, 1000, 0))
    assert not np.array_equal(labels, sample_lib.make_labels("random", 50_000, 1000, 1))
    np.testing.assert_array_equal(np.bincount(sample_lib.make_labels("balanced", 50_000, 1000)),
                                  np.full(1000, 50))


def test_outputs_follow_the_umask_and_a_rerun_says_it_is_complete(workdir, tmp_path, caplog):
    old = os.umask(0o022)
    try:
        out = tmp_path / "o"
        first = sample_lib.sample_from_workdir(workdir, str(out), num_samples=3,
                                               sampling_steps="2", progress=False)
    finally:
        os.umask(old)
    for name in ("samples.npz", "grid.png", "run.json"):
        assert os.stat(out / name).st_mode & 0o777 == 0o644, name  # readable by others
    assert "already_complete" not in first
    again = sample_lib.sample_from_workdir(workdir, str(out), num_samples=3,
                                           sampling_steps="2", progress=False)
    assert again["already_complete"]
    proc = run_entry_point("sample.py", f"--workdir={workdir}", f"--out={out}",
                           "--num_samples=3", "--sampling_steps=2")
    assert proc.returncode == 0 and "sampling is complete, nothing was written" in proc.stdout


def test_engine_flags_on_a_dit_run_warn_once(workdir, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        sample_lib.sample_from_workdir(workdir, str(tmp_path / "o"), num_samples=2,
                                       sampling_steps="2", progress=False,
                                       token_capacity="all", width_multiple=2)
    warnings = [r.getMessage() for r in caplog.records if "DyDiT engine option" in
                r.getMessage()]
    assert len(warnings) == 1 and "--token_capacity, --width_multiple" in warnings[0]


def test_format_bytes():
    from dydit_jax.checkpoint import format_bytes

    assert format_bytes(16) == "16 bytes"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 2**20) == "3.00 MiB"
    assert format_bytes(5 * 2**30) == "5.00 GiB"
