"""Test setup: 8 fake CPU devices (the mesh code path of a multi-device host) and float32
matmuls at full precision, both fixed before JAX initialises its backend."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# 8 fake devices share 2 cores: one device thread can lag the others at an all-reduce by more
# than XLA:CPU's default 40 s, which aborts the process. Real devices never need this.
if "collective_call_terminate_timeout" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_collective_call_terminate_timeout_seconds=900"
# Also the collectives' own timeout: CI machines are slower and share the cores with the
# other pytest worker.
if "xla_cpu_collective_timeout_seconds" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_collective_timeout_seconds=1800"
# Tests are dominated by compilation of tiny models: skip LLVM's expensive optimisations
# (a quarter of the suite's time; the float semantics are unchanged).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# One compilation cache for the pytest workers and the subprocesses the tests start (train.py,
# sample.py, multi-process workers compile the same small programs again and again).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(__file__)), ".pytest_cache", "jax-compilation"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# ------------------------------------------------------------------ fault-injection suite
# tests/faults/ report counts (kills survived, bad inputs tried, files lost) through
# `record_property("fault:NAME", count)`; user properties reach the controller under xdist,
# which sums them here and prints them at the end of the run.
FAULT_COUNTS: dict[str, int] = {}


def pytest_addoption(parser):
    parser.addoption(
        "--faults-long", action="store_true",
        help="the long fault-injection run (more kills, larger sweeps) instead of CI's short one",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "faults: fault injection and bad-input tests")
    # Under xdist, hand out one test at a time (default: chunks of a quarter of each worker's
    # share), so that the slow tests, collected first below, run in parallel at the start
    # instead of queueing behind each other on one worker at the end.
    if hasattr(config.option, "maxschedchunk") and config.option.maxschedchunk is None:
        config.option.maxschedchunk = 1


# The slowest tests (seconds in a fresh clone's run: cold compilation cache, 2 workers on 2
# cores), started first. xdist keeps two tests queued per worker: the first worker gets the
# first two, the second the next two, so those are paired to take about as long.
SLOW_FIRST = (
    "test_plan.py::test_per_chip_memory_stays_flat_from_4_to_16_chips[udit",  # ~190
    "test_mesh_contract.py::test_loss_and_every_gradient_leaf_match_one_device[U-DiT 8",  # ~240
    "test_mesh_contract.py::test_loss_and_every_gradient_leaf_match_one_device[U-DiT 16",  # ~240
    "test_experiments.py::test_tiny_digits_paper",  # ~170
    "test_multiprocess.py::test_two_processes_match_one",  # ~90
    "test_udit.py::test_training_on_digits",  # ~180
    "test_training_faults.py::test_kill_9",  # ~160
    "test_dydit.py::test_finetuning_moves",  # ~70
    "test_training_faults.py::test_sigterm",  # ~35
    "test_sample.py::test_a_killed_sampling_process",  # ~40
    "test_sampling_loop.py::test_the_compiled_loop_equals_the_step_by_step_loop[U-DiT",  # ~50
    "test_train.py::test_train_steps_lower_the_loss",  # ~40
    "test_multiprocess.py::test_sigterm",  # ~26
    "test_dynamic.py::test_sample_py_runs_the_engine",  # ~57 with set-up
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        for i, name in enumerate(SLOW_FIRST):
            if name in item.nodeid:
                return i
        return len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the rest keep pytest's order


def pytest_runtest_logreport(report):
    if report.when == "call":
        for name, value in report.user_properties:
            if name.startswith("fault:"):
                FAULT_COUNTS[name[6:]] = FAULT_COUNTS.get(name[6:], 0) + int(value)


def pytest_terminal_summary(terminalreporter):
    if FAULT_COUNTS:
        counts = ", ".join(f"{name}: {n}" for name, n in sorted(FAULT_COUNTS.items()))
        terminalreporter.write_line(f"fault report: {counts}")
