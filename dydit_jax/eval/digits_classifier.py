r"""A small MLP classifier of the embedded scikit-learn digits: the feature extractor of the
digits metrics (digits-FID, sFID, IS, precision/recall, class accuracy).

  python -m dydit_jax.eval.digits_classifier --workdir DIR [--reference_out REF.npz \
      --image_size 8] [--retrain]

trains it (a few seconds on CPU; fixed seed and split, deterministic) or reuses the cached
weights in DIR/digits_classifier/ (params.npz + classifier.json with the settings and the test
accuracy), prints its test accuracy, and optionally writes a digits reference batch (the
held-out digits, uint8 NHWC `arr_0` + labels `arr_1`) at a chosen image size.

Network: an MLP 64 -> 256 -> ReLU -> 64 -> ReLU -> 10 on the 8x8 image (a small CNN gains
half a point of accuracy but trains tens of times slower on a CPU). Features: `pool` = the 64
post-ReLU activations of the penultimate layer; `spatial` = the network's input layer, i.e.
the 8x8 image in [-1, 1] flattened (64; the only layer that keeps the spatial layout, which
is what sFID's first 7 channels of `mixed_6/conv` measure); `probs` = the softmax of the
logits.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dydit_jax import cli, files
from dydit_jax.data.digits import load_digits
from dydit_jax.eval.features import (
    EvalInputError,
    FeatureExtractor,
    save_json,
    save_npz,
)
from dydit_jax.sample_lib import to_uint8

IMAGE_SIZE = 8
NUM_CLASSES = 10
# Everything that determines the weights: a cache with other settings is retrained.
SETTINGS = {
    "version": 1,
    "network": "mlp64-256-64-10",
    "seed": 0,
    "split_seed": 0,
    "test_fraction": 0.2,
    "epochs": 40,
    "batch_size": 64,
    "learning_rate": 3e-3,
    "weight_decay": 1e-4,
}
CACHE_DIR = "digits_classifier"


class DigitsNet(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.hidden1 = nnx.Linear(IMAGE_SIZE * IMAGE_SIZE, 256, rngs=rngs)
        self.hidden2 = nnx.Linear(256, 64, rngs=rngs)
        self.head = nnx.Linear(64, NUM_CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(N, 8, 8, 1) in [-1, 1] -> (spatial, pool, logits)."""
        spatial = x.reshape(x.shape[0], -1)
        pool = nnx.relu(self.hidden2(nnx.relu(self.hidden1(spatial))))
        return spatial, pool, self.head(pool)


def _abstract_params() -> dict:
    model = nnx.eval_shape(lambda: DigitsNet(rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _model(params: dict) -> DigitsNet:
    """The network holding `params` (a pure dict, as saved); a fresh object per call."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DigitsNet(rngs=nnx.Rngs(0))), nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- data


def digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into `load_digits()`: a fixed stratified split."""
    from sklearn.model_selection import train_test_split  # heavy (scipy)

    _, labels = load_digits()
    train, test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    return np.sort(train), np.sort(test)


def digits_uint8(
    image_size: int = IMAGE_SIZE, split: str = "test"
) -> tuple[np.ndarray, np.ndarray]:
    """Real digits as the sampler exports them: uint8 (N, S, S, 1) images and int32 labels of
    the classifier's `train` or held-out `test` split, or `all` of them."""

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be train, test or all, got {split!r}")
    images, labels = load_digits(image_size)
    if split != "all":
        train, test = digits_split(SETTINGS["split_seed"], SETTINGS["test_fraction"])
        index = train if split == "train" else test
        images, labels = images[index], labels[index]
    return to_uint8(images), labels


def write_digits_reference(path: str, image_size: int = IMAGE_SIZE, split: str = "test") -> str:
    """Writes a digits reference batch (`arr_0` uint8 NHWC, `arr_1` labels) atomically.

    Use the samples' image size: digits upsampled by `load_digits` and shrunk back to 8x8 by
    the classifier are slightly blurred, which alone costs ~25 digits-FID against 8x8 digits.
    """
    images, labels = digits_uint8(image_size, split)
    save_npz(path, arr_0=images, arr_1=labels)
    return path


def to_model_input(images: jax.Array) -> jax.Array:
    """uint8 (N, H, W, 1) -> float32 (N, 8, 8, 1) in [-1, 1].

    Pixels map by u / 127.5 - 1 (the midpoint inverse of the sampler's uint8 encoding). Sizes
    that are multiples of 8 are area-averaged (the source digits are themselves 4x4 block
    counts of 32x32 bitmaps); other sizes are resized bilinearly with antialiasing.
    """
    x = images.astype(jnp.float32) / 127.5 - 1.0
    n, h, w, _ = x.shape
    if (h, w) == (IMAGE_SIZE, IMAGE_SIZE):
        return x
    if h % IMAGE_SIZE == 0 and w % IMAGE_SIZE == 0:
        x = x.reshape(n, IMAGE_SIZE, h // IMAGE_SIZE, IMAGE_SIZE, w // IMAGE_SIZE, 1)
        return x.mean(axis=(2, 4))
    return jax.image.resize(x, (n, IMAGE_SIZE, IMAGE_SIZE, 1), "linear", antialias=True)


@jax.jit
def _features(params: dict, images: jax.Array) -> dict[str, jax.Array]:
    spatial, pool, logits = _model(params)(to_model_input(images))
    return {"pool": pool, "spatial": spatial, "probs": jax.nn.softmax(logits)}


# ----------------------------------------------------------------------------- training


@functools.partial(jax.jit, static_argnums=0)
def _init_params(seed: int) -> dict:
    # One compiled program instead of one small compilation per initializer op.
    return nnx.to_pure_dict(nnx.state(DigitsNet(rngs=nnx.Rngs(seed)), nnx.Param))


def _loss(params: dict, images: jax.Array, labels: jax.Array) -> jax.Array:
    logits = _model(params)(images)[2]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.partial(
    jax.jit, static_argnames=("epochs", "batch_size", "learning_rate", "weight_decay")
)
def _train_loop(params, images, labels, key, *, epochs, batch_size, learning_rate, weight_decay):
    """All epochs in one compiled program: a fresh permutation per epoch, full batches only."""
    steps = len(images) // batch_size
    schedule = optax.cosine_decay_schedule(learning_rate, epochs * steps)
    optimizer = optax.adamw(schedule, weight_decay=weight_decay)

    def step(carry, index):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(_loss)(params, images[index], labels[index])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def epoch(carry, epoch_key):
        order = jax.random.permutation(epoch_key, len(images))[: steps * batch_size]
        carry, losses = jax.lax.scan(step, carry, order.reshape(steps, batch_size))
        return carry, losses.mean()

    carry = (params, optimizer.init(params))
    (params, _), losses = jax.lax.scan(epoch, carry, jax.random.split(key, epochs))
    return params, losses


def _cpu():
    # Train on the CPU whatever the default backend: the same weights on every machine.
    try:
        return jax.default_device(jax.local_devices(backend="cpu")[0])
    except RuntimeError:
        return contextlib.nullcontext()


def train(settings: dict = SETTINGS) -> tuple[dict[str, np.ndarray], dict]:
    """Trains from scratch: (params as a pure dict of numpy arrays, info with the accuracy)."""

    start = time.perf_counter()
    images, labels = load_digits()
    train_index, test_index = digits_split(settings["split_seed"], settings["test_fraction"])
    with _cpu():
        key = jax.random.key(settings["seed"])
        init = _init_params(settings["seed"])
        params, losses = _train_loop(
            init,
            jnp.asarray(images[train_index]),
            jnp.asarray(labels[train_index]),
            key,
            epochs=settings["epochs"],
            batch_size=settings["batch_size"],
            learning_rate=settings["learning_rate"],
            weight_decay=settings["weight_decay"],
        )
        params = jax.tree.map(np.asarray, params)
        test_images = digits_uint8(IMAGE_SIZE, "test")[0]
        probs = np.asarray(_features(params, jnp.asarray(test_images))["probs"])
    accuracy = float(np.mean(probs.argmax(axis=1) == labels[test_index]))
    info = {
        "settings": dict(settings),
        "test_accuracy": accuracy,
        "final_train_loss": float(losses[-1]),
        "num_train": int(len(train_index)),
        "num_test": int(len(test_index)),
        "train_seconds": time.perf_counter() - start,
    }
    return params, info


def _flatten(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    params: dict = {}
    for name, value in flat.items():
        *path, leaf = name.split("/")
        node = params
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return params


def _load_cache(folder: str) -> tuple[dict, dict] | None:
    """(params, info) when the cache exists, is intact and matches SETTINGS; else None."""
    params_path = os.path.join(folder, "params.npz")
    info_path = os.path.join(folder, "classifier.json")
    try:
        with open(info_path) as f:
            info = json.load(f)
        if info.get("settings") != SETTINGS or info.get("params_sha256") != files.sha256_file(
            params_path
        ):
            return None
        with np.load(params_path, allow_pickle=False) as data:
            flat = {name: data[name] for name in data.files}
    except (OSError, ValueError):
        return None
    expected = _flatten(_abstract_params())
    if set(flat) != set(expected) or any(
        flat[k].shape != expected[k].shape for k in expected
    ):
        return None
    return _unflatten(flat), info


def load_or_train(workdir: str, retrain: bool = False) -> tuple[dict, dict]:
    """The classifier cached in WORKDIR/digits_classifier/, trained there when missing, stale
    (other settings) or damaged. info["trained"] says whether this call trained it."""
    folder = os.path.join(workdir, CACHE_DIR)
    cached = None if retrain else _load_cache(folder)
    if cached is not None:
        params, info = cached
        return params, dict(info, trained=False)
    params, info = train()
    os.makedirs(folder, exist_ok=True)
    params_path = os.path.join(folder, "params.npz")
    save_npz(params_path, **_flatten(params))
    info["params_sha256"] = files.sha256_file(params_path)
    save_json(os.path.join(folder, "classifier.json"), info)
    return params, dict(info, trained=True)


# ----------------------------------------------------------------------------- extractor


class DigitsClassifier(FeatureExtractor):
    """Features of uint8 grey digits (N, H, W, 1) of any size (see `to_model_input`)."""

    name = "digits"
    channels = 1
    class_labels = True

    def __init__(self, workdir: str | None = None, *, params: dict | None = None):
        if params is None:
            if not workdir:
                raise EvalInputError(
                    "the digits features need --workdir DIR (where the digits classifier is "
                    "trained once and cached)"
                )
            params, self.info = load_or_train(workdir)
        else:
            self.info = {}
        self.params = jax.tree.map(np.asarray, params)
        self._identity = f"digits:{params_digest(self.params)}"

    @property
    def identity(self) -> str:
        return self._identity

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 1:
            raise EvalInputError(
                f"the digits classifier takes grey images (N, H, W, 1), got {images.shape}"
            )
        out = _features(self.params, jnp.asarray(images))
        return {key: np.asarray(value) for key, value in out.items()}


def params_digest(params: dict) -> str:
    """A short digest of the weights: the extractor's identity for the stats cache."""
    digest = hashlib.sha256()
    for name, value in sorted(_flatten(params).items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(value, np.float32).tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dydit_jax.eval.digits_classifier", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workdir", required=True, help="Cache: DIR/digits_classifier/.")
    parser.add_argument("--retrain", action="store_true", help="Train even if cached.")
    parser.add_argument("--reference_out", help="Also write the held-out digits as this npz.")
    parser.add_argument("--image_size", type=int, default=IMAGE_SIZE, help="Reference size.")
    parser.add_argument(
        "--split", default="test", choices=("test", "train", "all"), help="Reference digits."
    )
    args = parser.parse_args(argv)
    _, info = load_or_train(args.workdir, retrain=args.retrain)
    how = f"trained in {info['train_seconds']:.1f} s" if info["trained"] else "cached"
    print(
        f"digits classifier ({how}, {os.path.join(args.workdir, CACHE_DIR)}): test accuracy "
        f"{100 * info['test_accuracy']:.2f}% on {info['num_test']} held-out digits"
    )
    if args.reference_out:
        try:
            write_digits_reference(args.reference_out, args.image_size, args.split)
        except (OSError, ValueError) as e:
            return cli.fail(e)
        print(f"wrote {args.split} digits at {args.image_size}x{args.image_size} to "
              f"{args.reference_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
