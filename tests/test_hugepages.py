"""Entry points restart once with glibc's huge-page tunable (dydit_jax/hugepages.py)."""

import os
import subprocess
import sys

from dydit_jax import hugepages
from tests.helpers import REPO

PROBE = (
    "from dydit_jax import hugepages; hugepages.reexec(); import os; "
    "print(os.getpid(), os.environ.get('GLIBC_TUNABLES', ''))"
)


def run_probe(**env):
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT)}
    proc = subprocess.Popen([sys.executable, "-c", PROBE], cwd=REPO, env=base | env,
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    pid, _, tunables = out.strip().partition(" ")
    assert int(pid) == proc.pid  # restarted in place: signals and pipes still reach it
    return tunables


def test_the_command_restarts_with_the_tunable_keeping_the_users_own():
    got = run_probe(GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    if hugepages.supported():
        assert got == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
    else:  # other C libraries, old glibc, THP off: nothing changes
        assert got == "glibc.malloc.arena_max=4"


def test_opt_out_and_an_explicit_setting_are_respected():
    assert run_probe(DYDIT_NO_HUGEPAGES="1", GLIBC_TUNABLES="") == ""
    assert run_probe(GLIBC_TUNABLES="glibc.malloc.hugetlb=0") == "glibc.malloc.hugetlb=0"
    assert not hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"})
    assert hugepages.tunables_with_huge_pages("") == "glibc.malloc.hugetlb=1"
    assert hugepages.enabled({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"})
    assert not hugepages.enabled({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not hugepages.enabled({})
