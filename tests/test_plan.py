"""The pod planner: tiny models compiled for TPU topologies without a TPU (libtpu's
deviceless compiler, installed by the `tpu` extra that CI installs)."""

import json
import os
import subprocess
import sys

import jax
import pytest

from configs import digits, dydit, udit
from dydit_jax import config_lib, model_parts, parallel, plan, tpu
from tests.helpers import REPO

pytestmark = pytest.mark.skipif(not tpu.libtpu_installed(), reason="needs the tpu extra")


def quiet(*_):
    pass


def tiny(name: str, per_chip: int, chips: int, mesh=(1, -1, 1), **model):
    """A tiny config of one family, `per_chip` images per chip on `chips` chips."""
    config = {"dit": lambda: digits.get_config("tiny"),
              "dydit": lambda: dydit.get_config("digits,0.5"),
              "udit": lambda: udit.get_config("digits")}[name]()
    if name == "dydit":
        config.model_overrides.update(depth=2, hidden_size=64, num_heads=2)
    if name == "udit":  # the XLA depthwise form compiles fastest; no tensor axis here
        config.model_overrides.update(depthwise="xla", hidden_size=16, depth_latent=1)
        # the plain baseline (same U-Net of downsampled-attention blocks, plain MLP): its
        # compile for a TPU takes 0.6x the time of the full model's
        config.model_overrides.update(vanilla=True)
    config.model_overrides.update(**model)
    config.global_batch_size = per_chip * chips
    config.mesh_shape = mesh
    return config


def test_a_cpu_run_stays_quiet_with_libtpu_installed():
    code = ("import dydit_jax, jax, logging; logging.basicConfig(level=logging.INFO); "
            "print(jax.devices())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0 and "CpuDevice" in proc.stdout
    assert "tpu" not in proc.stderr.lower(), proc.stderr


def test_topology_names_as_users_write_them():
    cases = {"v4-32": ("v4", (2, 2, 4)), "v5e-256": ("v5e", (16, 16)),
             "v5litepod-256": ("v5e", (16, 16)), "v5p-128": ("v5p", (4, 4, 4)),
             "v6e-64": ("v6e", (8, 8)), "v5p:4x4x4": ("v5p", (4, 4, 4)),
             "v5e:2x2": ("v5e", (2, 2)), "v5p-8": ("v5p", (2, 2, 1))}
    for name, (gen, grid) in cases.items():
        topo = tpu.parse_topology(name)
        assert (topo.chip.name, topo.grid) == (gen, grid), name
    assert tpu.parse_topology("v5p-128").chips == 64  # the cloud counts TensorCores
    for bad in ("v9-8", "tpu-32", "v5p-7", "v5e-24", "v5p:4x4x4x4"):
        with pytest.raises(ValueError, match="topology"):
            tpu.parse_topology(bad)
    devices = tpu.devices(tpu.parse_topology("v5e:4x4"))
    assert len(devices) == 16 and len({d.process_index for d in devices}) == 4


@pytest.mark.parametrize("name,model", [
    ("dit", {"scan_blocks": True, "remat": "none"}),
    ("dit", {"scan_blocks": False, "remat": "full"}),
    pytest.param("dydit", {"scan_blocks": True, "remat": "dots"}, marks=pytest.mark.slow),
    pytest.param("udit", {}, marks=pytest.mark.slow),
])
def test_per_chip_memory_stays_flat_from_4_to_16_chips(name, model):
    """Same images per chip on 4 chips (one host) and 16 (four hosts): every program
    compiles and the per-chip temporaries stay within 1.15x."""
    small = plan.plan(tiny(name, 4, 4, **model), "v5e:2x2", what=("train",), log=quiet)
    large = plan.plan(tiny(name, 4, 16, **model), "v5e:4x4", what=("train",),
                      log=quiet)
    assert large["hosts"] == 4 and large["chips"] == 16
    a, b = small["programs"][0], large["programs"][0]
    assert a["fits"] and b["fits"]
    assert b["temp_bytes_per_chip"] <= 1.15 * a["temp_bytes_per_chip"], (a, b)
    assert b["bytes_per_chip"] <= 1.15 * a["bytes_per_chip"]


def test_a_width_that_no_fsdp_size_divides_is_still_split():
    # width 100 on 16 chips: fsdp divides no dimension of the attention and adaLN kernels,
    # so training keeps them padded (parallel.StoredForm) rather than whole on every chip
    config = tiny("dit", 4, 16, hidden_size=100)
    report = plan.plan(config, "v5e:4x4", what=("train",), log=quiet)
    _, shapes, _ = model_parts.abstract_model(config_lib.validate_config(config, training=False))
    state = 4 * 4 * sum(x.size for x in jax.tree.leaves(shapes))  # params, EMA, 2 moments
    train = report["programs"][0]
    assert train["fits"]
    assert train["argument_bytes_per_chip"] < state / 4, (train, state)
    assert not [p for p in report["replicated_params"] if p.endswith("['kernel']")
                and ("qkv" in p or "adaLN" in p)]


def test_fsdp_gathers_parameters_and_data_parallel_does_not():
    fsdp = plan.plan(tiny("dit", 4, 16), "v5e:4x4", what=("train",), log=quiet)
    data = plan.plan(tiny("dit", 4, 16, mesh=(-1, 1, 1)), "v5e:4x4", what=("train",),
                     log=quiet)
    fsdp_c, data_c = fsdp["programs"][0]["collectives"], data["programs"][0]["collectives"]
    # FSDP: the sharded weights are gathered, the gradients reduced (all-reduce or
    # reduce-scatter, as the compiler chooses); data parallel only reduces.
    assert fsdp_c["all-gather"]["count"] > 0
    assert set(fsdp_c) & {"all-reduce", "reduce-scatter"}
    assert data_c.get("all-gather", {"bytes": 0})["bytes"] < fsdp_c["all-gather"]["bytes"]
    assert data_c["all-reduce"]["count"] > 0
    # per chip, data parallelism holds the whole state; FSDP a sixteenth of it
    assert fsdp["programs"][0]["argument_bytes_per_chip"] < (
        data["programs"][0]["argument_bytes_per_chip"] / 4)


def test_a_step_built_for_a_mesh_compiles_the_same_with_or_without_an_ambient_mesh():
    config = tiny("dit", 4, 16)
    model_config = config_lib.validate_config(config, training=False)
    mesh = parallel.make_mesh(config.mesh_shape, devices=tpu.devices(
        tpu.parse_topology("v5e:4x4")))
    step, state, batch = plan.train_step_and_args(config, model_config, mesh)
    bare = step.lower(state, batch)
    with jax.set_mesh(mesh):
        ambient = step.lower(state, batch)
    a, b = plan.compile_lowered(bare), plan.compile_lowered(ambient)
    assert a.memory_analysis().temp_size_in_bytes == b.memory_analysis().temp_size_in_bytes
    assert plan.collectives(a.as_text()) == plan.collectives(b.as_text())


def test_a_program_that_cannot_fit_is_reported_not_raised():
    config = tiny("dit", 2**17, 4, hidden_size=256, num_heads=4)
    report = plan.plan(config, "v5e:2x2", what=("train",), log=quiet)
    program = report["programs"][0]
    assert program["fits"] is False
    assert program["bytes_per_chip"] > report["hbm_bytes_per_chip"]


@pytest.mark.slow
def test_the_command_line_writes_the_report(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dydit_jax.plan", "--config=configs/dydit.py:digits,0.5",
         "--topology=v5e-4", "--what=train,sample,engine", f"--json={out}",
         "--config.global_batch_size=16", "--config.mesh_shape=(1,-1,1)",
         "--config.model_overrides.depth=2", "--config.model_overrides.hidden_size=64",
         "--config.model_overrides.num_heads=2", "--config.sample.batch_size=8"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("topology", "chips", "hosts", "chip", "hbm_bytes_per_chip", "programs"):
        assert key in report
    assert report["chips"] == 4 and report["hbm_bytes_per_chip"] == 16 * 2**30
    names = [p["name"] for p in report["programs"]]
    assert names[:2] == ["train_step", "sample_step"]
    engine = [n for n in names if n.startswith("engine:")]
    assert any(n.startswith("engine:attention:heads=") for n in engine)
    assert any(n.startswith("engine:token_mlp:") for n in engine)
    for p in report["programs"]:
        assert p["fits"] and p["bytes_per_chip"] > 0 and p["compile_seconds"] >= 0
        assert p["flops_per_image"] > 0 and p["ceiling_images_per_second_per_chip"] > 0
        assert p["temp_bytes_per_chip"] <= p["bytes_per_chip"]
        assert isinstance(p["collectives"], dict)
    assert "ceiling" in proc.stdout and "train_step: fits" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "dydit_jax.plan", "--config=configs/digits.py:tiny",
         "--topology=v7-8"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith("error: unknown TPU topology")


@pytest.mark.slow
def test_search_lists_the_settings_that_fit_best_ceiling_first():
    config = tiny("dit", 4, 4)
    results = plan.search(config, "v5e:2x2", batches=(4,), remats=("none", "full"),
                          scans=(True,), log=quiet)
    assert {tuple(r["mesh"]) for r in results} >= {(1, 4, 1), (4, 1, 1)}
    fitting = [r for r in results if r["fits"]]
    assert fitting and fitting == results[: len(fitting)]
    ceilings = [r["ceiling_images_per_second_per_chip"] for r in fitting]
    assert ceilings == sorted(ceilings, reverse=True)
    assert fitting[0]["remat"] == "none"  # recomputing the forward lowers the ceiling
    assert "settings fit" in plan.format_search(results)
