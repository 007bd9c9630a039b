"""The training loop: config -> mesh -> model -> jitted step -> steps with EMA, logs,
checkpoints and sample grids; resumable, preemption-safe.

The train state is a pytree of pure dicts (params, EMA, optimizer state) plus the step; the
model structure (graphdef) and fixed buffers live outside it, so the jitted step is a pure
function: nnx.merge inside, no module mutation. The batch of a step is `batches[step]`:
resuming at step s replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from dydit_jax import checkpoint as ckpt_lib
from dydit_jax import config_lib, model_parts, parallel, sample_lib, update_step
from dydit_jax import data as data_lib
from dydit_jax.metric_writer import MetricWriter
from dydit_jax.models import DyDiTConfig

MAX_STEPS_IN_FLIGHT = 2


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> update_step.TrainState:
    """Train (resuming from the latest checkpoint in `workdir`), logging and sampling as set."""
    # --- validate everything before writing anything
    model_config = config_lib.validate_config(config)
    source = data_lib.load_source(config)
    if int(source.labels.max()) >= model_config.num_classes:
        raise ValueError(
            f"the data has labels up to {int(source.labels.max())} but num_classes is "
            f"{model_config.num_classes}; set --config.num_classes={int(source.labels.max()) + 1}"
        )
    data_shape = update_step.model_input_shape(source.example_shape)
    expected = (model_config.input_size, model_config.input_size, model_config.in_channels)
    if data_shape != expected:
        raise ValueError(f"the data is {data_shape} per example but the model expects {expected}")
    fresh_start = not os.path.isdir(ckpt_lib.checkpoint_dir(workdir))
    if fresh_start and config.get("init_from"):
        if not os.path.isdir(ckpt_lib.checkpoint_dir(config.init_from)):
            raise ValueError(
                f"config.init_from={config.init_from!r} holds no checkpoints/; point it at the "
                "workdir of a finished run"
            )
    mesh = parallel.make_mesh(config.mesh_shape)
    update_step.check_training_mesh(model_config, mesh)
    ways = parallel.batch_size_per_step(mesh)
    if config.global_batch_size % ways:
        raise ValueError(
            f"global_batch_size {config.global_batch_size} is not divisible by the {ways} "
            "data-parallel devices; change global_batch_size or mesh_shape"
        )
    batches = data_lib.make_batches(
        source, global_batch_size=config.global_batch_size, seed=config.seed
    )
    ckpt_lib.check_writable(
        workdir, model_parts.checkpoint_bytes(model_config, config), what="--workdir"
    )
    if not fresh_start and not os.access(ckpt_lib.checkpoint_dir(workdir), os.R_OK | os.X_OK):
        raise ValueError(f"the checkpoints in {workdir} are not readable; fix the permissions")

    # --- mesh, init, restore
    with jax.set_mesh(mesh):
        return _train_loop(config, workdir, model_config, mesh, batches)


def _train_loop(config, workdir, model_config, mesh, batches) -> update_step.TrainState:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # local or gs:// workdirs
    ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
    resume = _newest_readable_meta(ckpt, model_config, workdir) is not None
    parts = model_parts.build_model(
        model_config, mesh, seed=config.seed, rules=config.sharding_rules,
        init_params=not resume,  # a resumed run never allocates a fresh state
    )
    tx = update_step.make_optimizer(config)
    logging.info(
        "model %s: %s trainable parameters", config.model,
        f"{sum(x.size for x in jax.tree.leaves(parts.param_shapes)):,}",
    )
    model_parts.log_replicated(model_config, mesh, config.sharding_rules)
    if resume:
        targets = update_step.restore_targets(parts, tx, mesh)
        step, items = _restore_newest(ckpt, targets, model_config, workdir)
        state = update_step.stored_state(parts, tx, mesh, step, items)
        logging.info("resumed from step %d in %s", step, ckpt.directory)
    else:
        if config.get("init_from"):
            parts.params = model_parts.initial_weights(parts, config.init_from, mesh)
        state = update_step.init_state(parts, tx, mesh)
    start = int(state.step)
    if start >= config.num_steps:
        logging.info("training is complete: step %d of num_steps %d is saved in %s; nothing "
                     "to do (raise --config.num_steps to train on)", start, config.num_steps,
                     ckpt.directory)
        ckpt.close()
        return state
    grids = model_config.in_channels in (1, 3)  # latent grids need the VAE decoder (issue 7)

    writer = MetricWriter(workdir, just_logging=jax.process_index() > 0)
    train_step = update_step.make_train_step(parts, tx, config, mesh)
    grid_sampler = _make_grid_sampler(parts, config, mesh)

    checkpoint_items = update_step.make_checkpoint_items(parts, tx, mesh)
    natural_params = update_step.make_natural_params(parts, mesh)
    dynamic = isinstance(model_config, DyDiTConfig)

    def save_checkpoint(step, state, force=False):
        ckpt.save(step, checkpoint_items(state),
                  model_parts.run_meta(config, model_config, step), force=force)

    preemption, stopped_at = PreemptionWatcher(), None
    profiler = StepProfiler(config.get("profile_steps", ()), workdir)
    watch = NonFiniteWatch(
        config.get("nonfinite", "stop"), ckpt, float(config.get("grad_skip_norm", 0.0))
    )
    pending: list[dict] = []
    t_last, step_last = time.perf_counter(), start
    t_start, last_loss, done = t_last, None, start
    try:
        for step in range(start, config.num_steps):
            if preemption.requested(step):
                logging.warning("%s: saving a checkpoint at step %d and stopping",
                                preemption.name, step)
                stopped_at = step
                watch.check(jax.device_get(pending), step - len(pending))
                if ckpt.latest_step() != step:
                    save_checkpoint(step, state, force=True)
                break
            batch = parallel.global_batch(batches[step], mesh)
            profiler.before(step)
            state, metrics = train_step(state, batch)
            profiler.after(step, state)
            pending.append(metrics)
            if len(pending) > MAX_STEPS_IN_FLIGHT:
                # Bound dispatch-ahead: the host may run at most a few steps ahead.
                jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT - 1])
            done = step + 1
            log = done % config.log_every_steps == 0 or done == config.num_steps
            save = done % config.checkpoint_every_steps == 0 or done == config.num_steps
            if log or save:
                # the only host sync: once per log or checkpoint interval; every step is
                # checked for a non-finite loss before a checkpoint can include it
                fetched = jax.device_get(pending)
                watch.check(fetched, done - len(fetched))
                summary = watch.summary(fetched)
                elapsed = time.perf_counter() - t_last
                summary["steps_per_sec"] = (done - step_last) / elapsed
                summary["images_per_sec"] = summary["steps_per_sec"] * config.global_batch_size
                writer.write_scalars(done, summary)
                last_loss = summary.get("loss")
                pending, t_last, step_last = [], time.perf_counter(), done
            if save:
                save_checkpoint(done, state)
            every = config.sample_every_steps
            if every and (done % every == 0 or done == config.num_steps):
                ema = natural_params(state.ema_params) if grids or dynamic else None
                if grids:
                    _write_grid(grid_sampler, ema, config, mesh, writer, workdir, done)
                if dynamic:
                    x0 = update_step.model_inputs(batch, jax.random.key(0))
                    ratio = update_step.eval_flops_ratio(parts, ema, x0, batch["label"])
                    writer.write_scalars(done, {"eval_flops_ratio": ratio})
                t_last = time.perf_counter()  # do not count sampling in steps/s
    finally:
        profiler.close()
        preemption.close()
        ckpt.close()  # waits for the async saves; their errors surface here
        writer.flush()
        writer.close()
    if stopped_at is not None and preemption.signum == signal.SIGINT:
        raise TrainingInterrupted(stopped_at, ckpt.directory)
    if stopped_at is None:
        loss = "n/a" if last_loss is None else f"{float(last_loss):.4g}"
        logging.info(
            "done: %d steps (%d to %d) in %s, final loss %s; checkpoint %s", done - start,
            start, done, _duration(time.perf_counter() - t_start), loss,
            os.path.join(ckpt.directory, str(done)),
        )
    return state


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class StepProfiler:
    """A jax.profiler trace of the train steps first..last-1 (`config.profile_steps`) in
    WORKDIR/profile, the layout TensorBoard's profile plugin reads (Perfetto opens the
    .trace.json.gz beside it). Steps are dispatched ahead, so the trace waits for the last
    profiled step before it stops."""

    def __init__(self, steps, workdir: str):
        self.first, self.last = (tuple(int(s) for s in steps) or (-1, -1))
        self.directory = os.path.join(workdir, "profile")
        self.active = False

    def before(self, step: int) -> None:
        if not self.active and self.first <= step < self.last:
            jax.profiler.start_trace(self.directory)
            self.active = True
            self.started = step

    def after(self, step: int, state) -> None:
        if self.active and step + 1 >= self.last:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            logging.info("profile of steps %d..%d written to %s (tensorboard --logdir %s)",
                         self.started, self.last - 1, self.directory, self.directory)


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss or gradient under `config.nonfinite = "stop"`."""


class NonFiniteWatch:
    """Host side of the train step's non-finite guard: stop with a clear error naming the
    step (policy "stop"), or count the skipped batches (policy "skip")."""

    def __init__(self, policy: str, ckpt: ckpt_lib.Checkpointer, skip_norm: float = 0.0):
        self.policy, self.ckpt, self.skipped = policy, ckpt, 0
        self.skip_norm, self.large_skipped = skip_norm, 0

    def check(self, fetched: list[dict], first_step: int) -> None:
        for i, m in enumerate(fetched):
            if m.get("skipped_large_grad"):
                self.large_skipped += 1
                logging.warning(
                    "step %d: update skipped, gradient norm %.4g >= grad_skip_norm %g (%d "
                    "skipped so far)", first_step + i, float(m["grad_norm"]), self.skip_norm,
                    self.large_skipped,
                )
        bad = [first_step + i for i, m in enumerate(fetched) if m["nonfinite"]]
        if not bad:
            return
        if self.policy == "skip":
            self.skipped += len(bad)
            logging.warning("non-finite loss or gradient: skipped the batches of steps %s "
                            "(%d skipped so far)", bad, self.skipped)
            return
        m = fetched[bad[0] - first_step]
        last = self.ckpt.latest_step()
        kept = (f"the last good checkpoint is step {last} in {self.ckpt.directory}"
                if last is not None else "no checkpoint had been written yet")
        raise NonFiniteLossError(
            f"non-finite loss at step {bad[0]} (loss {float(m['loss'])}, gradient norm "
            f"{float(m['grad_norm'])}); training stopped and nothing after the last finite "
            f"step was saved: {kept}. Check the data and the learning rate; resume with the "
            "same command, or set --config.nonfinite=skip to skip such batches"
        )

    def summary(self, fetched: list[dict]) -> dict:
        """Mean metrics over the finite steps, and the skipped batches so far."""
        good = [m for m in fetched if not m["nonfinite"]] or fetched
        flags = ("nonfinite", "skipped_large_grad")
        out = {k: float(np.mean([m[k] for m in good])) for k in good[0] if k not in flags}
        out["skipped_batches"] = float(self.skipped)
        out["skipped_large_grad"] = float(self.large_skipped)
        return out


class TrainingInterrupted(RuntimeError):
    """Ctrl-C (SIGINT) stopped training after a checkpoint of the current step was saved."""

    def __init__(self, step: int, directory: str):
        super().__init__(
            f"interrupted (Ctrl-C): saved a checkpoint at step {step} in {directory}; run the "
            "same command to resume"
        )
        self.step = step


class PreemptionWatcher:
    """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag that the loop checks between
    steps (all hosts agree); a second Ctrl-C interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.flag, self.signum = False, None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.flag:
            raise KeyboardInterrupt  # the second Ctrl-C: stop without waiting for the save
        self.flag, self.signum = True, self.signum or signum

    @property
    def name(self) -> str:
        return "Ctrl-C" if self.signum == signal.SIGINT else "SIGTERM"

    def requested(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.flag
        # Every host must stop at the same step to save one consistent checkpoint.
        flags = multihost_utils.process_allgather(np.asarray(self.flag, np.int32))
        return bool(np.max(flags))

    def close(self) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
        self.previous = {}


def _set_aside(ckpt: ckpt_lib.Checkpointer, error: ckpt_lib.CheckpointDamagedError) -> None:
    where = ckpt.set_aside(error.step)
    logging.warning("skipping damaged checkpoint step %d (%s); moved it to %s (kept, not "
                    "deleted) and resuming from an older one", error.step, error, where)


def _newest_readable_meta(ckpt: ckpt_lib.Checkpointer, model_config, workdir) -> int | None:
    """The newest saved step whose meta reads back (damaged newer ones are set aside), after
    checking that it is of this model; None when the workdir holds no checkpoint."""
    saved = ckpt.all_steps()
    for step in reversed(saved):
        try:
            meta = ckpt.meta(step)
        except ckpt_lib.CheckpointDamagedError as e:
            _set_aside(ckpt, e)
            continue
        model_parts.check_resume_compatible(meta, model_config, workdir)
        return step
    if saved:
        raise ValueError(
            f"none of the checkpoints {saved} in {ckpt.directory} reads back (they were moved "
            f"to {ckpt_lib.DAMAGED_DIR}/); use a new --workdir"
        )
    return None


def _restore_newest(ckpt, targets, model_config, workdir) -> tuple[int, dict]:
    """Restore the newest step that restores whole, setting damaged ones aside."""
    while True:
        step = _newest_readable_meta(ckpt, model_config, workdir)
        if step is None:
            raise ValueError(f"no checkpoint in {ckpt.directory} restores; use a new --workdir")
        try:
            step, items, _ = ckpt.restore(targets, step)
            return step, items
        except ckpt_lib.CheckpointDamagedError as e:
            _set_aside(ckpt, e)


def _make_grid_sampler(parts: model_parts.ModelParts, config, mesh):
    return sample_lib.make_batch_sampler(
        parts, mesh=mesh, sampling_steps=config.sample.steps, sampler=config.sample.sampler,
        cfg_scale=config.sample.cfg_scale, guided_channels=config.sample.guided_channels,
        cfg_interval=config_lib.cfg_interval(config.sample),
        compiler_options=config.get("compiler_options"),
    )


def _write_grid(sampler, ema_params, config, mesh, writer, workdir, step) -> None:
    n = config.sample.num_images
    labels = sample_lib.make_labels("balanced", n, config.num_classes)
    images = sample_lib.to_uint8(
        sample_lib.generate(
            functools.partial(sampler, ema_params), labels, batch_size=config.sample.batch_size,
            seed=config.seed, mesh=mesh, progress=False,
        )
    )
    grid = sample_lib.make_grid(images, ncol=min(n, config.num_classes))
    if jax.process_index() == 0:
        path = os.path.join(workdir, "samples", f"grid_{step:07d}.png")
        upscale = sample_lib.grid_upscale(config.image_size)
        sample_lib.save_png(grid, path, upscale=upscale)
        sample_lib.save_png(grid, os.path.join(workdir, "grid.png"), upscale=upscale)
        logging.info("step %d: wrote %s", step, path)
    writer.write_images(step, {"ema_samples": grid[None]})
