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
    config.addinivalue_line("markers", "slow: takes more than ~25 s in a fresh clone; started "
                            "first where no measured durations exist")
    # Under xdist, hand out one test at a time (default: chunks of a quarter of each worker's
    # share), so that the slow tests, collected first below, run in parallel at the start
    # instead of queueing behind each other on one worker at the end.
    if hasattr(config.option, "maxschedchunk") and config.option.maxschedchunk is None:
        config.option.maxschedchunk = 1


# Order: the slow tests start first, so that they run side by side at the start instead of
# queueing behind each other on one worker at the end. The order comes from measurement: each
# run records every test's duration in pytest's cache (.pytest_cache) and the next run starts
# the longest first; a fresh clone, with no record yet, starts the tests marked
# `@pytest.mark.slow`. The summary names unmarked tests that took longer than SLOW_SECONDS.
SLOW_SECONDS = 25.0
DURATIONS_KEY = "dydit/durations"
DURATIONS: dict[str, float] = {}
MARKED_SLOW: set[str] = set()


def pytest_collection_modifyitems(config, items):
    cache = getattr(config, "cache", None)
    measured = cache.get(DURATIONS_KEY, {}) if cache else {}

    def rank(item):
        marked = 2 * SLOW_SECONDS if item.get_closest_marker("slow") else 0.0
        return -measured.get(item.nodeid, marked)

    items.sort(key=rank)  # stable: ties keep pytest's order


def pytest_runtest_logreport(report):
    DURATIONS[report.nodeid] = DURATIONS.get(report.nodeid, 0.0) + report.duration
    if "slow" in report.keywords:
        MARKED_SLOW.add(report.nodeid)
    if report.when == "call":
        for name, value in report.user_properties:
            if name.startswith("fault:"):
                FAULT_COUNTS[name[6:]] = FAULT_COUNTS.get(name[6:], 0) + int(value)


def pytest_sessionfinish(session):
    cache = getattr(session.config, "cache", None)
    if cache and DURATIONS and not hasattr(session.config, "workerinput"):  # the controller
        merged = cache.get(DURATIONS_KEY, {}) | DURATIONS
        cache.set(DURATIONS_KEY, {k: round(v, 2) for k, v in merged.items()})


def pytest_terminal_summary(terminalreporter):
    unmarked = sorted((d, n) for n, d in DURATIONS.items()
                      if d > SLOW_SECONDS and n not in MARKED_SLOW)
    if unmarked:
        listed = ", ".join(f"{n} ({d:.0f} s)" for d, n in unmarked[::-1][:8])
        terminalreporter.write_line(
            f"slower than {SLOW_SECONDS:.0f} s and not marked @pytest.mark.slow (a fresh clone "
            f"starts the marked ones first): {listed}"
        )
    if FAULT_COUNTS:
        counts = ", ".join(f"{name}: {n}" for name, n in sorted(FAULT_COUNTS.items()))
        terminalreporter.write_line(f"fault report: {counts}")
