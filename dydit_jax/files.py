"""Files written whole or not at all, and file digests.

A reader (or a rerun after a kill) sees the old file or the new one, never a partial one: the
content goes to a temporary file in the target's folder, which is renamed over the target
only when it is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator


def umask() -> int:
    """The process's umask (reading it means setting it: set it back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".part") -> Iterator[str]:
    """Yields a temporary path beside `path`; on success it becomes `path` (with the umask's
    permissions: mkstemp makes 0600), on an exception it is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path: str, write: Callable, *, mode: str = "wb", suffix: str = ".part") -> None:
    """Calls write(file object) on a temporary file opened with `mode`, synced to disk, then
    renamed over `path`."""
    with atomic_path(path, suffix) as tmp, open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def write_json(path: str, obj, indent: int = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
