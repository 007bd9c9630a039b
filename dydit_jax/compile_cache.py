"""JAX's persistent compilation cache for the entry points (train.py, sample.py, evaluate.py,
the latent extraction and the digits experiment).

A resumed or restarted run, and sample.py after train.py, loads its compiled programs from
disk instead of compiling them again. The cache lives in `$DYDIT_COMPILATION_CACHE`, by default
`$XDG_CACHE_HOME/dydit_jax/xla` (`~/.cache/dydit_jax/xla`), at most 4 GiB (least recently
used entries go first; JAX needs the `filelock` package for that, a requirement);
`DYDIT_COMPILATION_CACHE=off` turns it off. A cache configured for JAX itself
(`JAX_COMPILATION_CACHE_DIR`, or `jax.config` before the call) is kept as it is.
Only process 0 writes entries (JAX's rule), so several hosts may share one directory. JAX
writes an entry in place: one cut short by a kill is unreadable, and JAX then warns and
compiles that program as if it were not cached; deleting the directory clears it.
"""

from __future__ import annotations

import os

import jax
from absl import logging

ENV = "DYDIT_COMPILATION_CACHE"
MAX_BYTES = 4 * 2**30
_OFF = ("", "off", "none", "0", "false")


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dydit_jax", "xla")


def enable() -> str | None:
    """Turn the persistent cache on (see the module docstring); returns its directory, or
    None when it is off or its directory cannot be created (a warning says why)."""
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return configured
    path = os.environ.get(ENV, default_dir())
    if path.strip().lower() in _OFF:
        return None
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as e:
        logging.warning("compilation cache off: cannot use %s (%s); set %s to another "
                        "directory, or to 'off'", path, e, ENV)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    # JAX's LRU eviction locks the directory with `filelock` and, without it, turns the
    # whole cache off: bound the size only where it can be bounded.
    if jax.config.jax_compilation_cache_max_size < 0 and _has_filelock():
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path


def _has_filelock() -> bool:
    try:
        import filelock  # noqa: F401 - optional: only probed for
    except ImportError:
        return False
    return True
