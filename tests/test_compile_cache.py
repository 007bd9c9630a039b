"""The entry points' persistent compilation cache (dydit_jax/compile_cache.py)."""

import os
import subprocess
import sys

from tests.helpers import REPO

# Enables the cache as an entry point does, then compiles one program (every compile is
# written: the minimum compile time is 0 here) and prints the directory in use.
PROGRAM = """
import sys
if "{block}":  # as if the package were not installed: the import raises ImportError
    sys.modules["{block}"] = None
import jax
from dydit_jax import compile_cache
print("cache:", compile_cache.enable())
print("max:", jax.config.jax_compilation_cache_max_size)
print(jax.jit(lambda x: x * 2 + 1)(1.0))
"""


def run(tmp_path, block="", **env_vars):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(PYTHONPATH=REPO, HOME=str(tmp_path / "home"), JAX_PLATFORMS="cpu",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env_vars)
    env.pop("XDG_CACHE_HOME", None)
    program = PROGRAM.replace("{block}", block)
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    return lines, out.stderr


def entries(path) -> list[str]:
    return [n for n in os.listdir(path) if n.endswith("-cache")] if os.path.isdir(path) else []


def test_default_directory_is_written_and_bounded(tmp_path):
    lines, _ = run(tmp_path)
    default = str(tmp_path / "home" / ".cache" / "dydit_jax" / "xla")
    assert lines["cache"] == default
    assert int(lines["max"]) == 4 * 2**30
    assert entries(default), os.listdir(default)


def test_without_filelock_the_cache_still_works_unbounded(tmp_path):
    # JAX's size bound needs filelock and would turn the whole cache off without it
    lines, _ = run(tmp_path, block="filelock", DYDIT_COMPILATION_CACHE=str(tmp_path / "c"))
    assert lines["cache"] == str(tmp_path / "c") and int(lines["max"]) == -1
    assert entries(tmp_path / "c")


def test_the_variable_moves_it_or_turns_it_off_and_jax_own_setting_wins(tmp_path):
    moved = tmp_path / "elsewhere"
    lines, _ = run(tmp_path, DYDIT_COMPILATION_CACHE=str(moved))
    assert lines["cache"] == str(moved) and entries(moved)

    lines, _ = run(tmp_path, DYDIT_COMPILATION_CACHE="off")
    assert lines["cache"] == "None"
    assert not (tmp_path / "home" / ".cache").exists()

    jax_own = tmp_path / "jax_own"
    lines, _ = run(tmp_path, DYDIT_COMPILATION_CACHE=str(moved / "unused"),
                   JAX_COMPILATION_CACHE_DIR=str(jax_own))
    assert lines["cache"] == str(jax_own) and entries(jax_own)
    assert not (moved / "unused").exists()


def test_an_unusable_directory_warns_and_runs_without_a_cache(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    lines, err = run(tmp_path, DYDIT_COMPILATION_CACHE=str(blocker / "xla"))
    assert lines["cache"] == "None"
    assert "compilation cache off" in err and "DYDIT_COMPILATION_CACHE" in err
    assert blocker.read_text() == "not a directory"
