r"""Sample from a trained workdir (EMA weights of the latest checkpoint by default).

  python sample.py --workdir=workdirs/digits --out=workdirs/digits/samples --num_samples=100 \
      [--sampling_steps=250 --sampler=ddpm|ddim|dpmpp2m --cfg_scale=2.0 --seed=0 --labels=0,1,2]

Few steps: --sampler=dpmpp2m --sampling_steps=20 (DPM-Solver++(2M)). Guidance only in part of
the noise range: --cfg_interval=LO,HI (timesteps t with LO <= t/1000 < HI; the conditional
half runs alone at the other steps).

Writes OUT/samples.npz (arr_0: uint8 NHWC images, arr_1: labels; the evaluation suite's
format), OUT/grid.png and OUT/run.json. Latent models decode with --vae=DIR (written by
`python -m dydit_jax.convert vae`). Long runs are resumable: finished batches are kept in
OUT/parts/ and the same command continues where an interrupted run stopped.
DyDiT checkpoints run the inference engine (dydit_jax/dynamic; --token_capacity,
--width_multiple, --layers_per_call; --nodynamic = the masked model) and also write
OUT/dynamic.json.
"""

import sys

from absl import app, flags

from dydit_jax import cli, sample_lib
from dydit_jax import diffusion as diffusion_lib

flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
flags.DEFINE_string("out", None, "Output directory for samples.npz and grid.png.")
flags.DEFINE_integer("num_samples", 100, "Number of images.")
flags.DEFINE_string(
    "sampling_steps", None,
    "Respacing: '250', 'ddim50', 'logsnr20' (log-SNR spacing), ... (default: config).",
)
flags.DEFINE_enum("sampler", None, list(diffusion_lib.SAMPLERS), "Sampler (default: config).")
flags.DEFINE_float("cfg_scale", None, "Guidance scale; 1.0 = none (default: config).")
flags.DEFINE_integer("guided_channels", None, "-1: guide all eps channels; 3: reference quirk.")
flags.DEFINE_string(
    "cfg_interval", None,
    "Guide only at timesteps t with LO <= t/1000 < HI, as 'LO,HI' (default: config, 0,1 = all).",
)
flags.DEFINE_integer("seed", 0, "Same seed, same images.")
flags.DEFINE_string("labels", None, "'balanced' (default), 'random', or ids like 0,3,7 (cycled).")
flags.DEFINE_integer("batch_size", None, "Images per compiled batch (default: config).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_bool("ema", True, "Use the EMA weights (else the raw training weights).")
flags.DEFINE_bool(
    "dynamic", None,
    "DyDiT: run the inference engine (default: config, on); --nodynamic = the masked model.",
)
flags.DEFINE_string(
    "token_capacity", None,
    "DyDiT engine: tokens per sample and layer through the MLP: calibrate | all | 0.75 | 192.",
)
flags.DEFINE_integer("width_multiple", None, "DyDiT engine: round head/group counts up to this.")
flags.DEFINE_integer(
    "layers_per_call", None,
    "DyDiT engine: blocks per compiled call (1: fewest compiles; depth: one call per step).",
)
flags.DEFINE_string(
    "mesh_shape", None,
    "Mesh (data, fsdp, tensor) to sample on, e.g. '(1,1,2)'; -1 = the remaining devices "
    "(default: every device present, data parallel; never the training run's mesh).",
)
flags.DEFINE_string(
    "vae", None, "Latent models: decode with this VAE (python -m dydit_jax.convert vae ...)."
)
flags.mark_flags_as_required(["workdir", "out"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.start(distributed=True)
    try:
        summary = sample_lib.sample_from_workdir(
            FLAGS.workdir,
            FLAGS.out,
            num_samples=FLAGS.num_samples,
            sampling_steps=FLAGS.sampling_steps,
            sampler=FLAGS.sampler,
            cfg_scale=FLAGS.cfg_scale,
            guided_channels=FLAGS.guided_channels,
            cfg_interval=FLAGS.cfg_interval,
            seed=FLAGS.seed,
            labels=FLAGS.labels,
            batch_size=FLAGS.batch_size,
            use_ema=FLAGS.ema,
            step=FLAGS.step,
            dynamic=FLAGS.dynamic,
            token_capacity=FLAGS.token_capacity,
            width_multiple=FLAGS.width_multiple,
            layers_per_call=FLAGS.layers_per_call,
            vae=FLAGS.vae,
            mesh_shape=FLAGS.mesh_shape,
        )
    except (ValueError, FileNotFoundError) as e:
        sys.exit(cli.fail(e))
    if summary.get("already_complete"):
        print(f"{summary['out']} already holds these {summary['num_samples']} samples (step "
              f"{summary['step']}); sampling is complete, nothing was written")
        return
    if summary["dynamic"]:
        r = summary["dynamic"]
        print(
            f"DyDiT engine: FLOPs ratio {r['achieved_flops_ratio']:.3f} achieved "
            f"(width plan {r['plan_flops_ratio']:.3f}, executed with padding "
            f"{r['executed_flops_ratio']:.3f}); {r['signatures']} block shapes compiled in "
            f"{r['compile_seconds']:.1f} s; {r['tokens_overflow']} of {r['tokens_selected']} "
            "selected tokens dropped for capacity"
        )
    resumed = summary.get("resumed_with", 0)
    print(
        f"wrote {summary['num_samples']} samples to {summary['out']} (step {summary['step']}"
        + (f"; {resumed} from an interrupted run" if resumed else "") + ")"
    )


if __name__ == "__main__":
    app.run(main)
