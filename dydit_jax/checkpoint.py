"""The one place that talks to Orbax.

A checkpoint is a step directory under `WORKDIR/checkpoints/` with separate items, so that a
sampler can read the EMA weights without the optimizer state:

  params      trainable parameters (pure nested dict)
  ema_params  EMA of the parameters
  opt_state   optimizer state
  meta        JSON: step, model name and config, dataset shape, the full run config

Saves are asynchronous; Orbax writes into a temporary directory and renames it on commit, so
an interrupted save never leaves a step that restore would accept.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import shutil
import tempfile
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

ARRAY_ITEMS = ("params", "ema_params", "opt_state")


class CheckpointNotFoundError(FileNotFoundError):
    pass


class CheckpointDamagedError(ValueError):
    """A saved step that cannot be read back (a truncated or deleted file, garbage meta)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _first_line(error: BaseException, limit: int = 240) -> str:
    """The first line of the innermost cause (TensorStore's says which file broke)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    line = (text[0] if text else type(error).__name__).strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet_asyncio():
    """A damaged step fails many parallel reads; the first error is reported, and asyncio's
    "exception was never retrieved" log of each of the others (hundreds of lines) is not."""
    logger = logging.getLogger("asyncio")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


DAMAGED_DIR = "checkpoints_damaged"  # beside checkpoints/: steps set aside, never deleted


# Orbax splits a replicated array between its replicas to write it in parallel; each piece is
# an eager slice, compiled per shape in every new process (424 compiles, 22 s, in a tiny digits
# experiment on 8 CPU devices). Only arrays whose per-replica piece is at least this big are
# split: DiT-XL's large kernels still are, small models' arrays are written whole.
MIN_REPLICA_SLICE_BYTES = 1 << 20


@functools.cache  # once per process
def _register_array_handler() -> None:
    handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES
    )
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    """Keep-N, asynchronous checkpoints of the train state in `WORKDIR/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int = 3, create: bool = True):
        _register_array_handler()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=create, enable_async_checkpointing=True
        )
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(*ARRAY_ITEMS, "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, items: dict[str, Any], meta: dict, *, force: bool = False) -> bool:
        args = {name: ocp.args.StandardSave(items[name]) for name in items}
        args["meta"] = ocp.args.JsonSave(meta)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(
        self, targets: dict[str, Any], step: int | None = None
    ) -> tuple[int, dict[str, Any], dict]:
        """Restore the items named in `targets` (abstract pytrees carrying shardings)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointNotFoundError(f"no checkpoint in {self.directory}")
        args = {name: ocp.args.StandardRestore(t) for name, t in targets.items()}
        args["meta"] = ocp.args.JsonRestore()
        try:
            with _quiet_asyncio():
                restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many kinds
            with _quiet_asyncio():  # the other failed reads' futures, collected silently
                gc.collect()
            raise CheckpointDamagedError(
                f"checkpoint step {step} in {self.directory} cannot be restored: "
                f"{_first_line(e)}", step,
            ) from None
        return step, {name: restored[name] for name in targets}, restored["meta"]

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def meta(self, step: int) -> dict:
        """The JSON meta item of a step, without touching its arrays."""
        where = os.path.join(self.directory, str(step), "meta")
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
            meta = restored["meta"]
            if not isinstance(meta, dict) or "config" not in meta:
                raise ValueError("no run config in it")
        except Exception as e:  # noqa: BLE001 - a missing item, invalid JSON, ...
            raise CheckpointDamagedError(
                f"checkpoint step {step}: its meta item {where} is missing or unreadable "
                f"({_first_line(e)})", step,
            ) from None
        return meta

    def set_aside(self, step: int) -> str:
        """Move a damaged step out of checkpoints/ (into checkpoints_damaged/, never deleted)
        so that training goes on from an older one; returns where it went."""
        source = os.path.join(self.directory, str(step))
        target_dir = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
        target, n = os.path.join(target_dir, str(step)), 1
        while os.path.exists(target):
            n += 1
            target = os.path.join(target_dir, f"{step}.{n}")
        if jax.process_index() == 0:
            os.makedirs(target_dir, exist_ok=True)
            os.rename(source, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set-aside-{step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        """Block until pending async saves are committed; errors from them surface here."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_writable(directory: str, need_bytes: int = 0, *, what: str = "the output") -> None:
    """Before a long run: `directory` (or the parent it would be created in) must accept
    files and have `need_bytes` free; a clear ValueError otherwise. Remote paths (gs://...)
    are left to the store."""
    if "://" in directory:
        return
    path = os.path.abspath(directory)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} {directory} exists and is not a directory; choose another path")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(
            f"{what} {directory} lies below {existing}, which is a file, not a directory; "
            "choose another path"
        )
    try:  # a real write: permissions alone miss read-only mounts
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(
            f"{what} {directory} is not writable ({e.strerror} in {existing}); choose a "
            "writable directory or fix its permissions"
        ) from None
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise ValueError(
            f"{what} {directory} has {format_bytes(free)} free but this run needs about "
            f"{format_bytes(need_bytes)}; free space or choose another directory"
        )


def format_bytes(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1: 3.20 GiB, 512.0 KiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} bytes"


def read_meta(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of the latest (or given) checkpoint, with a clear error when absent."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise CheckpointNotFoundError(
            f"no checkpoint found: {directory} does not exist; train first with "
            f"`python train.py --config=... --workdir={workdir}`"
        )
    ckpt = Checkpointer(workdir, create=False)
    try:
        saved = sorted(ckpt.manager.all_steps())
        if step is None and not saved:
            raise CheckpointNotFoundError(
                f"no finished checkpoint in {directory}; train first (or wait for the "
                "first save)"
            )
        if step is not None and step not in saved:
            raise CheckpointNotFoundError(
                f"--step {step}: {directory} holds no such checkpoint (saved steps: {saved}); "
                "pick one of those or leave out --step for the latest"
            )
        step = saved[-1] if step is None else step
        try:
            return step, ckpt.meta(step)
        except CheckpointDamagedError as e:
            good = readable_steps([s for s in saved if s != step], ckpt.meta)
            raise CheckpointDamagedError(f"{e}. {other_steps_hint(good)}", step) from None
    finally:
        ckpt.close()


def readable_steps(steps: list[int], read) -> list[int]:
    """The steps for which `read(step)` raises no CheckpointDamagedError."""
    good = []
    for step in steps:
        try:
            read(step)
        except CheckpointDamagedError:
            continue
        good.append(step)
    return good


def other_steps_hint(good: list[int]) -> str:
    """The advice after a damaged step: the saved steps that do read back."""
    if not good:
        return "No other saved step of this workdir reads back either"
    return f"Use another saved step with --step=N, N one of {sorted(good)} (these read back)"


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs with explicit target shardings (needed to restore onto any mesh).

    `shardings`: a pytree of shardings matching `tree`, or None to take each leaf's own
    `.sharding`.
    """
    if shardings is None:
        shardings = jax.tree.map(lambda x: x.sharding, tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
