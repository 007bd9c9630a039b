"""Bad-input sweep: malformed configs, flags and files for every entry point.

Each bad input must give ONE clear error (a ValueError / FileNotFoundError that the CLIs turn
into an `error: ...` line, or the `error:` line itself; never a Python traceback) whose message
says what is wrong, and must leave every existing file untouched: a module fixture trains and
samples once, and each case compares a snapshot (size and sha256 of every file) of that run,
its samples and the other fixture files before and after the bad input.

Cases are tables grouped by entry point; most run in-process (the library function the CLI
calls, or the CLI's `main(argv)`), a few run the scripts in a subprocess. The fault report
(tests/conftest.py) counts "bad inputs tried" and "files lost" (changed or missing files).
"""

import hashlib
import importlib.util
import json
import os
import shutil
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from dydit_jax import convert, sample_lib, train_lib
from dydit_jax import vae as vae_lib
from dydit_jax.convert import __main__ as convert_cli
from dydit_jax.convert.vae import write_vae_dir
from dydit_jax.data import LatentSource, extract_latents, write_latent_shards
from dydit_jax.eval import evaluate
from tests.helpers import run_entry_point, tiny_config
from tests.test_convert import TINY as TINY_DIT_SIZES
from tests.test_convert import tiny as tiny_reference_model

pytestmark = pytest.mark.faults

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_permissions = pytest.mark.skipif(AS_ROOT, reason="root ignores folder permissions")
no_proc = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc (Linux)")
HAS_TORCH = importlib.util.find_spec("torch") is not None  # CI has none: .pt needs it
GREY = np.zeros((8, 8, 8, 1), np.uint8)  # 8 digits-sized images


# ----------------------------------------------------------------------------- the existing run


@pytest.fixture(scope="module")
def existing(tmp_path_factory):
    """Paths of the files that bad inputs must not touch: a trained workdir (checkpoints),
    its samples, a latent directory, a VAE, an image folder and assorted input files."""
    root = tmp_path_factory.mktemp("existing")
    paths = {name: str(root / name) for name in (
        "workdir", "out", "files", "latents", "vae", "images", "readonly")}
    train_lib.train_and_evaluate(
        tiny_config(num_steps=2, checkpoint_every_steps=2, log_every_steps=1,
                    sample_every_steps=1000),
        paths["workdir"],
    )
    sample_lib.sample_from_workdir(
        paths["workdir"], paths["out"], num_samples=8, batch_size=8, sampling_steps="2",
        progress=False,
    )
    write_files(root / "files")
    rng = np.random.default_rng(0)
    write_latent_shards(  # 4x4x4 latents: not what the 8x8x1 digits model takes
        paths["latents"],
        {"latents": rng.normal(size=(6, 4, 4, 4)).astype(np.float32),
         "label": np.arange(6) % 3},
        num_shards=2,
    )
    tiny_vae = vae_lib.VAEConfig(block_out_channels=(8, 8), layers_per_block=1,
                                 norm_num_groups=4)
    write_vae_dir(paths["vae"], tiny_vae, jax.tree.map(
        lambda s: np.zeros(s.shape, np.float32), vae_lib.param_shapes(tiny_vae)))
    for cls in ("cat", "dog"):
        os.makedirs(os.path.join(paths["images"], cls))
        Image.new("RGB", (20, 20)).save(os.path.join(paths["images"], cls, "1.png"))
    os.makedirs(paths["readonly"])
    os.chmod(paths["readonly"], 0o500)
    paths["root"] = str(root)
    paths["before"] = snapshot(str(root))
    yield paths
    os.chmod(paths["readonly"], 0o700)  # so that pytest can remove it


def write_files(files):
    """Input files, good and bad: text where an archive belongs, npz images of all sorts."""
    (files / "empty_folder").mkdir(parents=True)
    (files / "hollow" / "cls").mkdir(parents=True)  # a class folder without images
    (files / "plain.txt").write_text("user notes\n")
    for name in ("not_an_npz.npz", "not_a_checkpoint.pt", "not_a_checkpoint.safetensors"):
        (files / name).write_text("this is not what the name says\n" * 4)
    npz = {
        "no_arr_0": dict(images=GREY), "float_images": dict(arr_0=GREY.astype(np.float32)),
        "3d_images": dict(arr_0=GREY[..., 0]), "no_images": dict(arr_0=GREY[:0]),
        "rgb_images": dict(arr_0=np.repeat(GREY, 3, axis=-1)), "no_dit_keys": dict(a=GREY),
    }
    for name, arrays in npz.items():
        np.savez(files / f"{name}.npz", **arrays)
    whole = (files / "rgb_images.npz").read_bytes()
    (files / "truncated.npz").write_bytes(whole[: len(whole) // 2])
    _, _, state_dict, _ = tiny_reference_model("dit")
    np.savez(files / "tiny_dit.npz", **state_dict)


def snapshot(root: str) -> dict[str, tuple[int, str]]:
    """{path relative to root: (size, sha256)} of every file under root."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            found[os.path.relpath(path, root)] = (os.path.getsize(path), digest)
    return found


def check_untouched(existing, record_property) -> None:
    """Count the bad input and the existing files it changed or removed (must be none)."""
    before, after = existing["before"], snapshot(existing["root"])
    lost = sorted(p for p in before if after.get(p) != before[p])
    new = sorted(set(after) - set(before))
    record_property("fault:bad inputs tried", 1)
    record_property("fault:files lost", len(lost))
    assert not lost, f"bad input changed or removed existing files: {lost}"
    assert not new, f"bad input wrote into existing folders: {new}"


def fill(value, paths: dict):
    """`value` with "{name}" placeholders (workdir, out, files, tmp, ...) made real paths."""
    if isinstance(value, str):
        return value.format(**paths)
    if isinstance(value, list | tuple):
        return type(value)(fill(v, paths) for v in value)
    if isinstance(value, dict):
        return {k: fill(v, paths) for k, v in value.items()}
    return value


@pytest.fixture
def paths(existing, tmp_path):
    return {k: v for k, v in existing.items() if k != "before"} | {"tmp": str(tmp_path)}


def run_main(main, argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of a CLI `main(argv)`; argparse's own errors exit via SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_error_line(code, err, message) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert err.count("error:") == 1 and message in err, err


# ---------------------------------------------------------------------------- training configs


class Train(NamedTuple):
    overrides: dict
    message: str  # a regex fragment of the error
    workdir: str = "{tmp}/never"
    error: type = ValueError


def case(id_, *values, marks=()):
    """One row of a table: the values, a readable id, optional marks (skip, xfail)."""
    return pytest.param(*values, id=id_, marks=marks)


DYDIT = {"model": "DyDiT-S/2"}
TRAINING = [
    case("num_steps 0", Train({"num_steps": 0}, "num_steps must be >= 1")),
    case("num_steps -5", Train({"num_steps": -5}, "num_steps must be >= 1")),
    case("num_steps 2.5", Train({"num_steps": 2.5}, "num_steps must be a whole number")),
    case("num_steps true", Train({"num_steps": True}, "num_steps must be a whole number")),
    case("batch 12 on 8 devices", Train({"global_batch_size": 12}, "not divisible by the 8")),
    case("learning_rate 0", Train({"learning_rate": 0.0}, "learning_rate must be > 0")),
    case("learning_rate -1e-3", Train({"learning_rate": -1e-3}, "learning_rate must be > 0")),
    case("learning_rate nan", Train({"learning_rate": float("nan")}, "learning_rate must be")),
    case("learning_rate string", Train({"learning_rate": "fast"}, "learning_rate must be a num")),
    case("ema_decay 1.0", Train({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\)")),
    case("ema_decay string", Train({"ema_decay": "0.99"}, "ema_decay must be a number")),
    case("label_dropout -0.1", Train({"label_dropout": -0.1}, "label_dropout must be in")),
    case("lambda_target 0", Train(DYDIT | {"dydit.lambda_target": 0.0}, "lambda_target must")),
    case("lambda_target 1.5", Train(DYDIT | {"dydit.lambda_target": 1.5}, "lambda_target mus")),
    case("dydit hold_steps -1", Train(DYDIT | {"dydit.hold_steps": -1}, "hold_steps must be")),
    case("dydit group missing", Train(DYDIT | {"dydit": None}, "dydit must be a group")),
    case("mesh 2 entries", Train({"mesh_shape": (-1, 1)}, "mesh_shape needs 3 entries")),
    case("mesh two -1", Train({"mesh_shape": (-1, -1, 1)}, "at most one -1")),
    case("mesh product 3", Train({"mesh_shape": (3, 1, 1)}, "uses 3 devices but 8")),
    case("mesh not numbers", Train({"mesh_shape": ("x", 1, 1)}, "whole-number sizes")),
    case("mesh as a string", Train({"mesh_shape": "-1,1,1"}, "mesh_shape must be a list")),
    case("image_size 9 patch 2", Train({"image_size": 9}, "not divisible by the patch size")),
    case("image_size 0", Train({"image_size": 0}, "input_size must be positive")),
    case("hidden 64 heads 3", Train({"model_overrides.num_heads": 3}, "not divisible by num_h")),
    case("heads 0", Train({"model_overrides.num_heads": 0}, "num_heads must be a whole")),
    case("hidden 0", Train({"model_overrides.hidden_size": 0}, "hidden_size must be a whole")),
    case("patch 0", Train({"model_overrides.patch_size": 0}, "patch_size must be a whole")),
    case("depth 2.5", Train({"model_overrides.depth": 2.5}, "depth must be a whole number")),
    case("depth string", Train({"model_overrides.depth": "two"}, "depth must be a whole")),
    case("mlp_ratio string", Train({"model_overrides.mlp_ratio": "4"}, "mlp_ratio must be a")),
    case("dtype float8", Train({"model_overrides.dtype": "float8"}, "dtype must name a float")),
    case("dtype int32", Train({"model_overrides.dtype": "int32"}, "dtype must name a float")),
    case("unknown model option", Train({"model_overrides.heads": 2}, "unknown model option")),
    case("model_overrides a list", Train({"model_overrides": [2]}, "must be a group of fields")),
    case("unknown attention", Train({"model_overrides.attention": "flash"}, "attention='fla")),
    case("unknown model name", Train({"model": "DiT-Q/2"}, "unknown model name")),
    case("model name a number", Train({"model": 2}, "config.model must be a string")),
    case("unknown dataset", Train({"dataset": "cifar"}, "unknown dataset 'cifar'")),
    case("num_classes 5 < labels", Train({"num_classes": 5}, "labels up to 9 but num_classes")),
    case("num_classes 0", Train({"num_classes": 0}, "num_classes must be positive")),
    case("in_channels 3 for grey", Train({"in_channels": 3}, r"model expects \(8, 8, 3\)")),
    case("nonfinite explode", Train({"nonfinite": "explode"}, "nonfinite must be one of")),
    case("lr_schedule unknown", Train({"lr_schedule": "linear-ish"}, "lr_schedule 'linear-")),
    case("sampler euler", Train({"sample.sampler": "euler"}, "sampler 'euler' is not one of")),
    case("steps ddim0", Train({"sample.steps": "ddim0"}, "at least one step, got ddim0")),
    case("steps abc", Train({"sample.steps": "abc"}, "bad timestep respacing string 'abc'")),
    case("steps empty", Train({"sample.steps": ""}, "bad timestep respacing string ''")),
    case("dpmpp2m 1 step", Train({"sample.sampler": "dpmpp2m", "sample.steps": "1"},
                                 "dpmpp2m sampler needs at least 2 sampling steps")),
    case("cfg_interval reversed", Train({"sample.cfg_interval": (0.8, 0.2)},
                                        "guidance interval")),
    case("cfg_interval past 1", Train({"sample.cfg_interval": (0.0, 1.5)}, "0 <= LO <= HI <= 1")),
    case("cfg_scale 0.5", Train({"sample.cfg_scale": 0.5}, "cfg_scale must be >= 1")),
    case("token_capacity 1.5", Train({"sample.token_capacity": 1.5}, "token capacity '1.5'")),
    case("token_capacity lots", Train({"sample.token_capacity": "lots"}, "capacity 'lots'")),
    case("mlp_shape_budget 0", Train({"sample.mlp_shape_budget": 0}, "mlp_shape_budget must")),
    case("layers_per_call 0", Train({"sample.layers_per_call": 0}, "layers_per_call must")),
    case("capacity_margin -1", Train({"sample.capacity_margin": -1.0}, "capacity_margin must")),
    case("sample batch 0", Train({"sample.batch_size": 0}, "sample.batch_size must be >= 1")),
    case("sample.dynamic yes", Train({"sample.dynamic": "yes"}, "must be true or false")),
    case("sample group missing", Train({"sample": None}, "sample must be a group of fields")),
    case("keep_checkpoints 0", Train({"keep_checkpoints": 0}, "keep_checkpoints must be >= 1")),
    case("log_every_steps 0", Train({"log_every_steps": 0}, "log_every_steps must be >= 1")),
    case("sample_every_steps -1", Train({"sample_every_steps": -1}, "sample_every_steps must")),
    case("weight_decay -1", Train({"weight_decay": -1.0}, "weight_decay must be >= 0")),
    case("grad_clip_norm -1", Train({"grad_clip_norm": -1.0}, "grad_clip_norm must be >= 0")),
    case("warmup_steps -1", Train({"warmup_steps": -1}, "warmup_steps must be >= 0")),
    case("diffusion_steps 0", Train({"diffusion_steps": 0}, "diffusion_steps must be")),
    case("sharding axis unknown", Train({"sharding_rules": (("embed", "model"),)}, "mesh axis")),
    case("sharding rules a number", Train({"sharding_rules": 5}, "config.sharding_rules")),
    case("init_from without checkpoints", Train({"init_from": "{files}"}, "holds no checkp")),
    case("init_from a file", Train({"init_from": "{files}/plain.txt"}, "holds no checkpoints")),
    case("latents without data_dir", Train({"dataset": "latents"}, "set --config.data_dir")),
    case("latents dir missing", Train({"dataset": "latents", "data_dir": "{tmp}/nowhere"},
                                      "does not exist", error=FileNotFoundError)),
    case("latents dir without manifest", Train({"dataset": "latents", "data_dir": "{images}"},
                                               "no manifest.json", error=FileNotFoundError)),
    case("latents of another shape", Train({"dataset": "latents", "data_dir": "{latents}"},
                                           r"data is \(4, 4, 4\) per example")),
    case("workdir is a file", Train({}, "exists and is not a directory",
                                    workdir="{files}/plain.txt")),
    case("workdir in read-only folder", Train({}, "not writable", workdir="{readonly}/run"),
         marks=needs_permissions),
    case("workdir on read-only /proc", Train({}, "not writable", workdir="/proc/dydit/run"),
         marks=no_proc),
    case("workdir under a file", Train({}, "is a file, not a directory",
                                       workdir="{files}/plain.txt/run")),
    case("resume another model", Train({"model_overrides.depth": 3},
                                       "another model .*depth: 2 there, 3 here",
                                       workdir="{workdir}")),
]


def bad_config(overrides: dict) -> ml_collections.ConfigDict:
    """The tiny digits config with fields replaced as a config file could write them (no
    ConfigDict type locks: a string may stand where a number belongs)."""
    config = tiny_config(num_steps=1).to_dict()  # 1 step: a missed check trains briefly
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        target = config
        for part in parents:
            target = target[part]
        target[leaf] = value
    return ml_collections.ConfigDict(config)


@pytest.mark.parametrize("bad", TRAINING)
def test_training_refuses(bad: Train, paths, existing, record_property):
    workdir = fill(bad.workdir, paths)
    with pytest.raises(bad.error, match=bad.message):
        train_lib.train_and_evaluate(bad_config(fill(bad.overrides, paths)), workdir)
    if bad.workdir.startswith("{tmp}"):
        assert not os.path.exists(workdir), "the bad config created its workdir"
    check_untouched(existing, record_property)


# ------------------------------------------------------------------------------------- sampling


class Sample(NamedTuple):
    options: dict
    message: str
    workdir: str = "{workdir}"
    out: str = "{tmp}/samples"
    error: type = ValueError


SAMPLING = [
    case("workdir without checkpoints", Sample({}, "no checkpoint found",
                                               workdir="{files}", error=FileNotFoundError)),
    case("workdir missing", Sample({}, "no checkpoint found", workdir="{tmp}/nowhere",
                                   error=FileNotFoundError)),
    case("num_samples 0", Sample({"num_samples": 0}, "--num_samples must be >= 1")),
    case("num_samples -3", Sample({"num_samples": -3}, "--num_samples must be >= 1")),
    case("batch_size 0", Sample({"batch_size": 0}, "--batch_size must be >= 1")),
    case("labels out of range", Sample({"labels": "3,12"}, r"labels \[12\] are outside 0..9")),
    case("labels negative", Sample({"labels": "-1"}, r"labels \[-1\] are outside 0..9")),
    case("labels empty", Sample({"labels": ""}, "--labels '' is not balanced, random or class")),
    case("labels words", Sample({"labels": "cats,dogs"}, "--labels 'cats,dogs' is not")),
    case("sampler euler", Sample({"sampler": "euler"}, "unknown sampler 'euler'")),
    case("steps abc", Sample({"sampling_steps": "abc"}, "bad timestep respacing string")),
    case("steps ddim0", Sample({"sampling_steps": "ddim0"}, "at least one step")),
    case("steps 2000 of 1000", Sample({"sampling_steps": "2000"}, "cannot divide a section")),
    case("dpmpp2m 1 step", Sample({"sampler": "dpmpp2m", "sampling_steps": "1"},
                                  "dpmpp2m sampler needs at least 2 sampling steps")),
    case("dpmpp2m 0 steps", Sample({"sampler": "dpmpp2m", "sampling_steps": "0"},
                                   "needs >= 1 step")),
    case("cfg_interval reversed", Sample({"cfg_interval": "0.8,0.2"},
                                         "--cfg_interval: guidance interval '0.8,0.2'")),
    case("cfg_interval past 1", Sample({"cfg_interval": "0,1.5"}, "0 <= LO <= HI <= 1")),
    case("cfg_interval one number", Sample({"cfg_interval": "0.5"}, "not two fractions")),
    case("step 99 not saved", Sample({"step": 99}, r"--step 99: .*saved steps: \[2\]",
                                     error=FileNotFoundError)),
    case("token_capacity lots", Sample({"token_capacity": "lots"}, "token capacity 'lots'")),
    case("token_capacity 1.5", Sample({"token_capacity": "1.5"}, "token capacity '1.5'")),
    case("width_multiple 0", Sample({"width_multiple": 0}, "width_multiple must be >= 1")),
    case("vae folder missing", Sample({"vae": "{tmp}/vae"}, "--vae .*no such directory")),
    case("out is a file", Sample({}, "exists and is not a directory", out="{files}/plain.txt")),
    case("out under a file", Sample({}, "is a file, not a directory", out="{files}/plain.txt/s")),
    case("out in read-only folder", Sample({}, "not writable", out="{readonly}/samples"),
         marks=needs_permissions),
    case("out on read-only /proc", Sample({}, "not writable", out="/proc/dydit/samples"),
         marks=no_proc),
    case("finished out, other seed", Sample({"seed": 1}, "already holds the samples of another "
                                            r"run \(seed: 0 there, 1 now\)", out="{out}")),
    case("finished out, other count", Sample({"num_samples": 9}, "already holds the samples",
                                             out="{out}")),
    case("out is the workdir", Sample({}, "is a training run's workdir", out="{workdir}")),
    case("guided_channels 5 of 1", Sample({"guided_channels": 5},
                                          "--guided_channels=5: this model has 1 channel")),
    case("finished out, other steps", Sample({"sampling_steps": "3"}, "already holds the sampl",
                                             out="{out}")),
]


@pytest.mark.parametrize("bad", SAMPLING)
def test_sampling_refuses(bad: Sample, paths, existing, record_property):
    options = dict(num_samples=8, batch_size=8, sampling_steps="2", progress=False)
    out = fill(bad.out, paths)
    with pytest.raises(bad.error, match=bad.message):
        sample_lib.sample_from_workdir(
            fill(bad.workdir, paths), out, **options | fill(bad.options, paths)
        )
    if bad.out.startswith("{tmp}"):
        assert not os.path.exists(out), "the bad input created --out"
    check_untouched(existing, record_property)


# --------------------------------------------------------------------------------- latent data


def edit_manifest(**changes):
    def edit(folder):
        path = os.path.join(folder, "manifest.json")
        with open(path) as f:
            manifest = json.load(f)
        for key, value in changes.items():
            if value is None:
                del manifest[key]
            else:
                manifest[key] = value
        with open(path, "w") as f:
            json.dump(manifest, f)
    return edit


def remove(name):
    return lambda folder: os.remove(os.path.join(folder, name))


def overwrite(name, content: bytes):
    def write(folder):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)
    return write


def truncate(name, drop: int = 100):
    def cut(folder):
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            data = f.read()
        overwrite(name, data[:-drop])(folder)
    return cut


def save_labels(labels):
    return lambda folder: np.save(os.path.join(folder, "labels.npy"), labels)


SHARD0, SHARD1 = "shard-00000-of-00002.array_record", "shard-00001-of-00002.array_record"


class Latents(NamedTuple):
    damage: Any  # folder -> None: what is wrong with the copy of the good directory
    message: str
    error: type = ValueError
    on_read: bool = False  # found when an example is read, not when the directory is opened


LATENT_DIRS = [
    case("folder missing", Latents(shutil.rmtree, "does not exist", FileNotFoundError)),
    case("no manifest", Latents(remove("manifest.json"), "no manifest.json", FileNotFoundError)),
    case("manifest not json", Latents(overwrite("manifest.json", b"{not json"), "not valid JSON")),
    case("manifest other format", Latents(edit_manifest(format="v0"), "unknown format 'v0'")),
    case("manifest without kind", Latents(edit_manifest(kind=None), "lacks or mangles a field")),
    case("shard entry without file", Latents(edit_manifest(shards=[{"num_examples": 6}]),
                                             "lacks or mangles a field")),
    case("shards not a list", Latents(edit_manifest(shards=2), "lacks or mangles a field")),
    case("shard count not a number", Latents(
        edit_manifest(shards=[{"file": SHARD0, "num_examples": "three"}]), "lacks or mangles")),
    case("num_classes not a number", Latents(edit_manifest(num_classes="ten"), "lacks or mang")),
    case("dtype int8", Latents(edit_manifest(dtype="int8"), "dtype 'int8' not in")),
    case("negative shape", Latents(edit_manifest(shape=[-4, 4, 4]), "is not an array shape")),
    case("shape of another write", Latents(edit_manifest(shape=[4, 4, 2]), "truncated or corr",
                                           on_read=True)),
    case("num_examples too high", Latents(edit_manifest(num_examples=7), "hold 6 examples but")),
    case("shard missing", Latents(remove(SHARD1), f"{SHARD1} listed .* is missing",
                                  FileNotFoundError)),
    case("shard truncated", Latents(truncate(SHARD0), f"{SHARD0} is truncated or corrupt")),
    case("shard is text", Latents(overwrite(SHARD0, b"text"), f"{SHARD0} is truncated or cor")),
    case("labels missing", Latents(remove("labels.npy"), "labels.npy is missing",
                                   FileNotFoundError)),
    case("labels short", Latents(save_labels(np.arange(5)), "expected 6 integer labels")),
    case("labels float", Latents(save_labels(np.arange(6.0)), "expected 6 integer labels")),
    case("labels not npy", Latents(overwrite("labels.npy", b"text"), "is not a .npy array")),
    case("labels disagree", Latents(save_labels(np.arange(6) % 3 + 1), "labels.npy says",
                                    on_read=True)),
]


@pytest.mark.parametrize("bad", LATENT_DIRS)
def test_latent_directory_refused(bad: Latents, paths, existing, record_property):
    copy = os.path.join(paths["tmp"], "latents")
    shutil.copytree(paths["latents"], copy)
    bad.damage(copy)
    with pytest.raises(bad.error, match=bad.message):
        source = LatentSource(copy)
        assert bad.on_read, "opening should have failed"
        source.__getitems__(range(len(source)))
    check_untouched(existing, record_property)


# ------------------------------------------------------------------------------------- evaluate


DIGITS = ["--features", "digits", "--workdir", "{tmp}/classifier"]
GOOD_GREY = "{out}/samples.npz"  # the existing samples: a valid digits npz
EVALUATE = [
    case("samples without arr_0", [*DIGITS, "--samples", "{files}/no_arr_0.npz"], "no arr_0"),
    case("float samples", [*DIGITS, "--samples", "{files}/float_images.npz"], "dtype float32"),
    case("3-D samples", [*DIGITS, "--samples", "{files}/3d_images.npz"], "expected 4-D"),
    case("RGB samples for digits", [*DIGITS, "--samples", "{files}/rgb_images.npz"],
         "3 channels"),
    case("no images", [*DIGITS, "--samples", "{files}/no_images.npz"], "arr_0 is empty"),
    case("fewer images than asked", [*DIGITS, "--samples", GOOD_GREY, "--num_samples", "9"],
         "holds 8 images but --num_samples asks for 9"),
    case("num_samples 0", [*DIGITS, "--samples", GOOD_GREY, "--num_samples", "0"],
         "--num_samples must be positive"),
    case("samples missing", [*DIGITS, "--samples", "{tmp}/samples.npz"], "not found"),
    case("samples a text file", [*DIGITS, "--samples", "{files}/not_an_npz.npz"],
         "not a readable .npz"),
    case("samples truncated", [*DIGITS, "--samples", "{files}/truncated.npz"],
         "not a readable .npz"),
    case("reference float", [*DIGITS, "--samples", GOOD_GREY, "--reference",
                             "{files}/float_images.npz"], "reference {files}/float_images.npz"),
    case("batch_size 0", [*DIGITS, "--samples", GOOD_GREY, "--batch_size", "0"],
         "--batch_size must be positive"),
    case("out folder missing", [*DIGITS, "--samples", GOOD_GREY, "--out", "{tmp}/no/r.json"],
         "its folder does not exist"),
    case("inception graph missing", ["--samples", "{files}/rgb_images.npz", "--reference",
                                     "{files}/rgb_images.npz", "--inception_graph",
                                     "{tmp}/graph.pb"], "Inception graph {tmp}/graph.pb not found"),
    case("inception graph not given", ["--samples", "{files}/rgb_images.npz", "--reference",
                                       "{files}/rgb_images.npz"], "no Inception graph given"),
    case("inception graph a text file", ["--samples", "{files}/rgb_images.npz", "--reference",
                                         "{files}/rgb_images.npz", "--inception_graph",
                                         "{files}/plain.txt"], "not a TensorFlow GraphDef"),
    case("unknown features", ["--samples", GOOD_GREY, "--features", "clip"], "invalid choice"),
    case("samples flag missing", ["--features", "digits"], "--samples"),
]


@pytest.mark.parametrize("argv,message", EVALUATE)
def test_evaluate_refuses(argv, message, paths, existing, record_property, capsys):
    if "--reference" not in argv and "--samples" in argv:
        argv = [*argv, "--reference", GOOD_GREY]
    code, err = run_main(evaluate.main, fill(argv, paths), capsys)
    assert_one_error_line(code, err, fill(message, paths))
    assert not os.path.exists(os.path.join(paths["tmp"], "classifier")), "trained a classifier"
    check_untouched(existing, record_property)


# -------------------------------------------------------------------------------------- convert


CONVERT = [
    case("unknown kind", ["unet", "--src", "{files}/tiny_dit.npz", "--dst", "{tmp}/dst"],
         "invalid choice: 'unet'"),
    case("src flag missing", ["dit", "--dst", "{tmp}/dst"], "required: --src"),
    case("src missing", ["dit", "--src", "{tmp}/w.pt", "--dst", "{tmp}/dst"], "does not exist"),
    case("src text as npz", ["dit", "--src", "{files}/not_an_npz.npz", "--dst", "{tmp}/dst"],
         "is not an .npz archive of arrays"),
    case("src text as pt", ["dit", "--src", "{files}/not_a_checkpoint.pt", "--dst", "{tmp}/dst"],
         "not a readable torch checkpoint" if HAS_TORCH else "pip install torch (CPU)"),
    case("src text as safetensors", ["dit", "--src", "{files}/not_a_checkpoint.safetensors",
                                     "--dst", "{tmp}/dst"], "is not a safetensors file"),
    case("src unknown extension", ["dit", "--src", "{files}/plain.txt", "--dst", "{tmp}/dst"],
         "unknown checkpoint format '.txt'"),
    case("src without DiT keys", ["dit", "--src", "{files}/no_dit_keys.npz", "--dst",
                                  "{tmp}/dst"], "missing key 'pos_embed'"),
    case("src not a registry size", ["dit", "--src", "{files}/tiny_dit.npz", "--dst",
                                     "{tmp}/dst"], "no registry size has depth 2"),
    case("src of another arch", ["dit", "--src", "{files}/tiny_dit.npz", "--dst", "{tmp}/dst",
                                 "--arch", "DiT-S/4"], "missing keys: blocks.2"),
    case("dst holds a workdir", ["dit", "--src", "{files}/tiny_dit.npz", "--dst", "{workdir}"],
         "already holds checkpoints/"),
    case("vae dst holds a workdir", ["vae", "--src", "{files}/tiny_dit.npz", "--dst",
                                     "{workdir}"], "already exists; refusing to overwrite"),
    case("vae src text", ["vae", "--src", "{files}/not_a_checkpoint.safetensors", "--dst",
                          "{tmp}/dst"], "is not a safetensors file"),
    case("fuse for dit", ["dit", "--src", "{files}/tiny_dit.npz", "--dst", "{tmp}/dst",
                          "--fuse"], "--fuse applies to U-DiT"),
    case("dtype for dit", ["dit", "--src", "{files}/tiny_dit.npz", "--dst", "{tmp}/dst",
                           "--dtype", "bfloat16"], "--dtype applies to VAE"),
]


@pytest.mark.parametrize("argv,message", CONVERT)
def test_convert_refuses(argv, message, paths, existing, record_property, capsys):
    code, err = run_main(convert_cli.main, fill(argv, paths), capsys)
    assert_one_error_line(code, err, message)
    assert not os.path.exists(os.path.join(paths["tmp"], "dst"))
    check_untouched(existing, record_property)


@pytest.fixture(scope="module")
def tiny_dit():
    """A 2-block DiT's reference state_dict and its arch name (see tests/test_convert.py)."""
    _, _, state_dict, arch = tiny_reference_model("dit")
    return state_dict, arch


def with_extra_key(sd):
    return sd | {"blocks.0.extra.weight": np.zeros(3, np.float32)}


def without(key):
    return lambda sd: {k: v for k, v in sd.items() if k != key}


def reshaped(key, shape):
    return lambda sd: sd | {key: np.zeros(shape, np.float32)}


STATE_DICTS = [
    case("unexpected key", with_extra_key, r"unexpected keys: blocks\.0\.extra\.weight"),
    case("missing key", without("blocks.1.mlp.fc2.bias"), r"missing keys: blocks\.1\.mlp\.fc2"),
    case("wrong shape", reshaped("blocks.1.attn.proj.weight", (64, 32)),
         r"shape mismatch at blocks\.1\.attn\.proj\.weight.*\(64, 32\)"),
    case("wrong pos_embed", reshaped("pos_embed", (1, 64, 64)), "pos_embed differs"),
]


@pytest.mark.parametrize("damage,message", STATE_DICTS)
def test_converting_a_bad_state_dict_refuses(damage, message, tiny_dit, existing,
                                             record_property):
    state_dict, arch = tiny_dit
    with pytest.raises(ValueError, match=message):
        convert.state_dict_to_params("dit", damage(state_dict), arch, overrides=TINY_DIT_SIZES)
    check_untouched(existing, record_property)


# ------------------------------------------------------------------------------ extract_latents


EXTRACT_OPTIONS = ["--vae", "{vae}", "--out", "{tmp}/extracted", "--image_size", "16"]
EXTRACT = [
    case("folder missing", ["--source", "folder:{tmp}/nowhere"], "does not exist"),
    case("folder empty", ["--source", "folder:{files}/empty_folder"], "has no class subfolders"),
    case("folder without images", ["--source", "folder:{files}/hollow"], "found no images"),
    case("source without prefix", ["--source", "{images}"], "use tfds:NAME"),
    case("image_size 12", ["--source", "folder:{images}", "--image_size", "12"],
         "--image_size 12 must be a positive multiple of 8"),
    case("image_size abc", ["--source", "folder:{images}", "--image_size", "abc"],
         "invalid int value: 'abc'"),
    case("vae missing", ["--source", "folder:{images}", "--vae", "{tmp}/vae"],
         "--vae {tmp}/vae does not exist"),
    case("vae is a workdir", ["--source", "folder:{images}", "--vae", "{workdir}"],
         "is not a converted VAE directory"),
    case("more shards than images", ["--source", "folder:{images}", "--num_shards", "5"],
         "--num_shards 5 is more than the 2 examples"),
    case("batch_size 0", ["--source", "folder:{images}", "--batch_size", "0"],
         "--batch_size must be positive"),
    case("out is a file", ["--source", "folder:{images}", "--out", "{files}/plain.txt"],
         "exists and is not a directory"),
    case("out holds other latents", ["--source", "folder:{images}", "--out", "{latents}"],
         "this tool did not write"),
    case("out under a file", ["--source", "folder:{images}", "--out", "{files}/plain.txt/x"],
         "is a file, not a directory"),
]


@pytest.mark.parametrize("argv,message", EXTRACT)
def test_extract_latents_refuses(argv, message, paths, existing, record_property, capsys):
    code, err = run_main(extract_latents.main, fill([*EXTRACT_OPTIONS, *argv], paths), capsys)
    assert_one_error_line(code, err, fill(message, paths))
    assert not os.path.exists(os.path.join(paths["tmp"], "extracted"))
    check_untouched(existing, record_property)


# ------------------------------------------------------------- the scripts, as a user runs them


SCRIPTS = [
    case("train bad flag value", ["train.py", "--config=configs/digits.py:tiny",
                                  "--workdir={tmp}/never", "--config.num_steps=abc"],
         "--config.num_steps=abc"),
    case("train unknown flag", ["train.py", "--config=configs/digits.py:tiny",
                                "--workdir={tmp}/never", "--bogus_flag=1"],
         "Unknown command line flag 'bogus_flag'"),
    case("train config file missing", ["train.py", "--config=configs/nope.py",
                                       "--workdir={tmp}/never"], "configs/nope.py"),
    case("train config key typo", ["train.py", "--config=configs/digits.py:tiny",
                                   "--workdir={tmp}/never", "--config.num_step=10"],
         "error: --config.num_step: the config has no such key; did you mean "
         "config.num_steps?"),
    case("train unknown config key", ["train.py", "--config=configs/digits.py:tiny",
                                      "--workdir={tmp}/never", "--config.foo=1"],
         "error: --config.foo: the config has no such key; the closest:"),
    case("sample workdir missing", ["sample.py", "--workdir={tmp}/nowhere", "--out={tmp}/never"],
         "no checkpoint found"),
    case("sample bad labels", ["sample.py", "--workdir={workdir}", "--out={tmp}/never",
                               "--labels=cats"], "--labels 'cats' is not balanced"),
]


@pytest.mark.parametrize("argv,message", SCRIPTS)
def test_script_refuses_without_traceback(argv, message, paths, existing, record_property):
    proc = run_entry_point(*fill(argv, paths))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert not os.path.exists(os.path.join(paths["tmp"], "never"))
    check_untouched(existing, record_property)


def test_the_sweep_is_broad():
    tables = (TRAINING, SAMPLING, LATENT_DIRS, EVALUATE, CONVERT, STATE_DICTS, EXTRACT, SCRIPTS)
    assert sum(len(t) for t in tables) >= 55
    assert len(SCRIPTS) <= 7  # each costs seconds


# ---------------------------------------------------------------------------- a full disk


def test_a_full_disk_is_detected_before_training_or_sampling(paths, existing, record_property,
                                                            monkeypatch):
    """Free space is checked before a run writes anything: a disk with 16 bytes left refuses
    both a training workdir (room for keep_checkpoints + 1 checkpoints) and a sampling --out."""
    real = shutil.disk_usage
    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: real(p)._replace(free=16)
    )
    workdir, out = os.path.join(paths["tmp"], "run"), os.path.join(paths["tmp"], "samples")
    # small numbers in units that show them
    with pytest.raises(ValueError, match=r"has 16 bytes free but this run needs about "
                                         r"[0-9.]+ MiB"):
        train_lib.train_and_evaluate(bad_config({}), workdir)
    with pytest.raises(ValueError, match=r"has 16 bytes free but this run needs about "
                                         r"[0-9.]+ KiB"):
        sample_lib.sample_from_workdir(paths["workdir"], out, num_samples=8, batch_size=8,
                                       sampling_steps="2", progress=False)
    assert not os.path.exists(workdir) and not os.path.exists(out)
    check_untouched(existing, record_property)
