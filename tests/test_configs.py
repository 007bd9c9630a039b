"""Config files load into valid runs; the memory plan counts and shards the train state."""

import importlib.util
import math
import os
import subprocess
import sys

import jax
import pytest
from absl import flags
from jax.sharding import PartitionSpec
from ml_collections import config_flags

from dydit_jax import config_lib, memory, model_parts, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XL2_PARAMS = 674_834_720  # docs/dit.md: DiT-XL/2 without the fixed position table


def load(name: str, variant: str | None = None):
    """get_config(VARIANT) of configs/NAME, as --config=configs/NAME[:VARIANT] calls it."""
    path = os.path.join(ROOT, "configs", name)
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*([variant] if variant is not None else []))


def test_dit_config_through_the_config_flag():
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values)
    path = os.path.join(ROOT, "configs", "dit.py")
    values([sys.argv[0], f"--config={path}:L/4,512"])
    assert values.config.model == "DiT-L/4" and values.config.image_size == 64


DIT_VARIANTS = [n.removeprefix("DiT-") for n in models.model_names("DiT")]


@pytest.mark.parametrize("variant", DIT_VARIANTS)
@pytest.mark.parametrize("res, latent", [(None, 32), (256, 32), (512, 64)])
def test_dit_config_variants_are_valid(variant, res, latent):
    config = load("dit.py", variant if res is None else f"{variant},{res}")
    model_config = config_lib.validate_config(config)
    assert config.model == f"DiT-{variant}"
    assert config.image_size == latent == model_config.input_size
    assert (model_config.in_channels, model_config.num_classes) == (4, 1000)
    assert model_config.patch_size == int(variant.split("/")[1])
    assert (config.learning_rate, config.weight_decay) == (1e-4, 0.0)
    assert (config.global_batch_size, config.ema_decay) == (256, 0.9999)
    assert (config.label_dropout, config.num_steps) == (0.1, 400_000)
    assert config.dataset == "latents" and config.data_dir == ""
    assert (config.sample.steps, config.sample.cfg_scale) == ("250", 1.5)
    assert config.sample.guided_channels == 3
    assert model_config.dtype == "bfloat16" and model_config.scan_blocks


@pytest.mark.parametrize("bad", ["XL/3", "M/2", "XL/2,384", "XL/2,512,9", "XL", "xl/2,abc"])
def test_dit_config_unknown_variant(bad):
    with pytest.raises(ValueError, match="XL/2"):
        load("dit.py", bad)


@pytest.mark.parametrize("variant", [None, "default", "tiny"])
def test_digits_config_still_loads(variant):
    config = load("digits.py", variant)
    model_config = config_lib.validate_config(config)
    assert config.dataset == "digits" and model_config.in_channels == 1


# --------------------------------------------------------------------------- memory plan


@pytest.fixture(scope="module")
def xl2():
    return load("dit.py", "XL/2")


def test_memory_plan_replicated(xl2):
    plan = memory.memory_plan(xl2, (8, 1, 1), 8)
    assert plan["param_count"] == XL2_PARAMS
    assert plan["params_bytes"] == XL2_PARAMS * 4 == plan["ema_bytes"] == plan["grads_bytes"]
    # AdamW: two float32 moments per parameter plus a few scalar counters
    extra = plan["optimizer_bytes"] - 2 * plan["params_bytes"]
    assert 0 <= extra <= 64
    assert plan["batch_per_device"] == 32
    assert 0 < plan["activation_bytes"]
    assert plan["total_bytes"] == (
        3 * plan["params_bytes"] + plan["optimizer_bytes"] + plan["activation_bytes"]
    )


def expected_fsdp_bytes(config, fsdp: int) -> int:
    """Independent count: a leaf is split over fsdp iff its 'embed' dim divides by fsdp."""
    _, shapes, logical = model_parts.abstract_model(config_lib.validate_config(config))
    total = 0
    for spec, x in zip(
        jax.tree.leaves(logical, is_leaf=lambda s: isinstance(s, PartitionSpec)),
        jax.tree.leaves(shapes),
        strict=True,
    ):
        nbytes = math.prod(x.shape) * 4
        dims = [d for d, name in zip(x.shape, spec, strict=False) if name == "embed"]
        total += nbytes // fsdp if dims and dims[0] % fsdp == 0 else nbytes
    return total


def test_memory_plan_fsdp_shards_params(xl2):
    plan = memory.memory_plan(xl2, (1, 8, 1), 8)
    assert plan["params_bytes"] == expected_fsdp_bytes(xl2, 8)
    assert plan["params_bytes"] == pytest.approx(XL2_PARAMS * 4 / 8, rel=0.02)
    assert 0 <= plan["optimizer_bytes"] - 2 * plan["params_bytes"] <= 64
    assert plan["batch_per_device"] == 32
    # same per-device batch, so the same activations as pure data parallelism
    assert plan["activation_bytes"] == memory.memory_plan(xl2, (8, 1, 1), 8)["activation_bytes"]


def test_memory_plan_activations_respond_to_knobs(xl2):
    base = memory.memory_plan(xl2, (8, 1, 1), 8)["activation_bytes"]
    for remat in ("dots", "full"):
        config = load("dit.py", "XL/2")
        config.model_overrides.remat = remat
        assert memory.memory_plan(config, (8, 1, 1), 8)["activation_bytes"] < base
    tp = memory.memory_plan(xl2, (2, 1, 4), 8)
    assert tp["tensor_divides_heads"] and tp["batch_per_device"] == 128
    odd = memory.memory_plan(xl2, (1, 1, 3), 3)
    assert not odd["tensor_divides_heads"]


@pytest.mark.parametrize(
    "mesh, devices", [((2, 2, 1), 8), ((-1, 3, 1), 8), ((1, 8), 8), ((0, 8, 1), 8)]
)
def test_memory_plan_bad_mesh(xl2, mesh, devices):
    with pytest.raises(ValueError, match="mesh_shape"):
        memory.memory_plan(xl2, mesh, devices)


def test_memory_plan_batch_not_divisible(xl2):
    with pytest.raises(ValueError, match="global_batch_size"):
        memory.memory_plan(xl2, (3, 1, 1), 3)


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "dydit_jax.memory", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def test_memory_cli_prints_a_table():
    out = run_cli("--config=configs/dit.py:S/2", "--mesh=2,4,1", "--devices=8", "--formula")
    assert out.returncode == 0, out.stderr
    assert "DiT-S/2" in out.stdout and "data=2 fsdp=4 tensor=1" in out.stdout
    assert "total (estimate)" in out.stdout and "estimate" in out.stdout
    assert "answered by: the fitted formula" in out.stdout
    bad = run_cli("--config=configs/dit.py:S/2", "--mesh=2,2,1", "--devices=8")
    assert bad.returncode != 0 and "mesh_shape" in bad.stderr


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the tpu extra")
def test_memory_cli_answers_with_the_compiler_where_libtpu_is_installed():
    out = run_cli("--config=configs/digits.py:tiny", "--mesh=1,4,1")
    assert out.returncode == 0, out.stderr
    assert "compiled by XLA for TPU (v5p:2x2x1" in out.stdout
    assert "answered by: the compiler" in out.stdout
    total = [line for line in out.stdout.splitlines() if line.strip().startswith("total ")]
    assert total and float(total[-1].split()[-2]) > 0


@pytest.mark.parametrize("config_file,overrides", [
    ("dit.py:S/2", ["depth=6", "mlp_ratio=2.0"]),
    ("digits.py", ["depth=6", "attention=xla", "remat=full", "scan_blocks=true",
                   "mlp_ratio=2.0", "patch_size=4"]),
    ("udit.py:digits", ["depthwise=xla", "remat=dots"]),
    ("dydit.py:digits", ["router_layout=all", "tau=2.0"]),
])
def test_every_model_field_is_overridable_on_every_config(config_file, overrides):
    # config_flags locks the config: a key the file did not write used to be an AttributeError
    name, _, variant = config_file.partition(":")
    config = load(name, variant or None)
    config.lock()
    for override in overrides:
        key, value = override.split("=")
        kind = type(config.model_overrides[key]) if config.model_overrides[key] is not None \
            else config.model_overrides.get_type(key)
        parsed = {"true": True, "false": False}.get(value) if kind is bool else kind(value)
        setattr(config.model_overrides, key, parsed)
    config.init_from = ""
    model_config = config_lib.validate_config(config, training=False)
    for override in overrides:
        name, value = override.split("=")
        got = getattr(model_config, name)
        want = {"true": True, "false": False}.get(value, value)
        assert str(got) == str(type(got)(want)), (name, got)


def test_unset_model_overrides_change_nothing():
    config = load("dit.py", "XL/2")
    assert config_lib.active_overrides(config) == {
        "dtype": "bfloat16", "attention": "xla", "remat": "none", "scan_blocks": True}
    assert config_lib.model_config_from(config).depth == 28


def test_a_config_key_typo_gets_the_closest_names():
    from dydit_jax import cli

    config = load("digits.py", "tiny")
    error = AttributeError("'num_step'\nDid you mean \"num_steps\" instead of \"num_step\"?")
    message = cli.config_override_message(error, ["--config.num_step=3"], config)
    assert message.startswith("--config.num_step: the config has no such key; did you mean "
                              "config.num_steps?")
    message = cli.config_override_message(
        AttributeError("'drop_out'"), ["--config.dydit.drop_out=3"], config)
    assert "the closest:" in message and "hold_steps" in message.split("closest:")[1]
