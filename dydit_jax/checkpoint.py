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

import functools
import os
import shutil
import tempfile
from typing import Any

import jax
import orbax.checkpoint as ocp

ARRAY_ITEMS = ("params", "ema_params", "opt_state")


class CheckpointNotFoundError(FileNotFoundError):
    pass


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
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return step, {name: restored[name] for name in targets}, restored["meta"]

    def meta(self, step: int) -> dict:
        """The JSON meta item of a step, without touching its arrays."""
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

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
            f"{what} {directory} has {free / 2**30:.2f} GiB free but this run needs about "
            f"{need_bytes / 2**30:.2f} GiB; free space or choose another directory"
        )


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
        return step, ckpt.meta(step)
    finally:
        ckpt.close()


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
