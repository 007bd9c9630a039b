"""Back glibc's malloc with transparent huge pages, for the entry points (no JAX import here).

XLA:CPU allocates each program's buffers with malloc, and glibc serves the large ones with
fresh mmaps that are unmapped again on free: every call page-faults its buffers anew, 4 KiB
at a time. The DyDiT engine (two compiled calls per layer and step) faulted 9.6 GB per batch
at DiT-B/2 (batch 8, guided), the one-program DiT sampler 3.6 GB. glibc >= 2.35 can advise
transparent huge pages for malloc's memory (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`): 40x
fewer faults, the engine ~20% and the DiT sampler ~8% faster, digits training ~20% (see
BENCHMARKS.md). glibc reads tunables only when a process starts, so an entry point calls
`reexec()` first thing, which restarts the same command once with the tunable set.

Set DYDIT_NO_HUGEPAGES=1 to opt out; a GLIBC_TUNABLES that already names the tunable is
respected as it is.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "DYDIT_NO_HUGEPAGES"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def supported() -> bool:
    """Linux, glibc >= 2.35 (the tunable's first release) and transparent huge pages not
    switched off by the kernel setting."""
    if not sys.platform.startswith("linux") or (glibc_version() or (0, 0)) < (2, 35):
        return False
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def setting(environ=None) -> str | None:
    """The tunable's value in GLIBC_TUNABLES ("1", "0", ...), None when it is not named."""
    environ = os.environ if environ is None else environ
    for entry in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = entry.partition("=")
        if name == TUNABLE:
            return value
    return None


def enabled(environ=None) -> bool:
    """Whether this environment asks glibc for huge pages (the tunable set, not to 0)."""
    return setting(environ) not in (None, "", "0")


def wanted(environ=None) -> bool:
    """Whether `reexec` would restart a process started with this environment."""
    environ = os.environ if environ is None else environ
    return not environ.get(OPT_OUT) and setting(environ) is None and supported()


def tunables_with_huge_pages(current: str) -> str:
    """GLIBC_TUNABLES with the tunable added, the user's own entries kept."""
    return ":".join([entry for entry in current.split(":") if entry] + [f"{TUNABLE}=1"])


def reexec() -> None:
    """Restart this command (same interpreter, same arguments, same pid) with the tunable
    set, unless it is set already, unsupported, or opted out. Call it before heavy imports:
    everything done before is done twice. Returns only when it does not restart."""
    if not wanted():
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = tunables_with_huge_pages(env.get("GLIBC_TUNABLES", ""))
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:  # exec refused (sandbox): run on without huge pages
        return
