"""The converted VAE folder, as `python -m dydit_jax.convert vae` writes it and `vae.load`
and the latent extraction read it: DIR/params.npz (float32 arrays keyed by their parameter
path, "encoder/down_blocks/0/...") and DIR/config.json ({"format", "config", "param_count",
"source"})."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from dydit_jax.vae.model import VAEConfig, param_shapes

PARAMS_FILE, CONFIG_FILE = "params.npz", "config.json"
FORMAT = "dydit-jax-vae/1"
MAKE_ONE = "python -m dydit_jax.convert vae --src CHECKPOINT --dst DIR"


def _key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _unkey(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in key.split("/"))


def check_params(config: VAEConfig, params: Mapping) -> dict[tuple, np.ndarray]:
    """Flat params, checked against the config's parameter tree (names and shapes)."""
    shapes = flatten_dict(param_shapes(config))
    flat = flatten_dict(params)
    missing = sorted(_key(p) for p in set(shapes) - set(flat))
    extra = sorted(_key(p) for p in set(flat) - set(shapes))
    if missing or extra:
        raise ValueError(
            f"VAE params do not match {config}: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for path, struct in shapes.items():
        if tuple(np.shape(flat[path])) != tuple(struct.shape):
            raise ValueError(
                f"VAE param {_key(path)} has shape {tuple(np.shape(flat[path]))}; the config "
                f"expects {tuple(struct.shape)}"
            )
    return flat


def write_vae_dir(dst: str, config: VAEConfig, params: Mapping, *, source: str | None = None
                  ) -> dict:
    """Write DST/params.npz (float32, keys "encoder/down_blocks/0/...") and DST/config.json.

    DST must not exist (an empty directory is allowed); the files are written to a temporary
    sibling directory first and moved into place in one rename, so DST never holds a partial
    result. Returns the JSON written."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ValueError(f"{dst} already exists; refusing to overwrite it: pick a new --dst")
    flat = check_params(config, params)
    meta = {
        "format": FORMAT,
        "config": config.to_dict(),
        "param_count": int(sum(np.size(v) for v in flat.values())),
        "source": source,
    }
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        np.savez(os.path.join(tmp, PARAMS_FILE),
                 **{_key(p): np.asarray(v, np.float32) for p, v in flat.items()})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        os.replace(tmp, dst)  # atomic; fails if DST appeared meanwhile with content
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def read_vae_dir(src: str) -> tuple[VAEConfig, dict]:
    """(config, params as a pure dict of float32 numpy arrays) of a `write_vae_dir` output."""
    config_path, params_path = os.path.join(src, CONFIG_FILE), os.path.join(src, PARAMS_FILE)
    for path in (config_path, params_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} does not exist: {src} is not a converted VAE directory (make one "
                "with python -m dydit_jax.convert vae --src FILE --dst DIR)"
            )
    with open(config_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{config_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    config = VAEConfig.from_dict(meta["config"])
    with np.load(params_path, allow_pickle=False) as f:
        flat = {_unkey(k): f[k] for k in f.files}
    check_params(config, unflatten_dict(flat))
    return config, unflatten_dict(flat)


def folder_files(directory: str, what: str = "--vae") -> tuple[str, str]:
    """(config path, params path) of a converted VAE folder; a ValueError that says how to
    make one when the folder or a file is missing."""
    if not os.path.isdir(directory):
        raise ValueError(f"{what} {directory} does not exist; make it with {MAKE_ONE}")
    paths = os.path.join(directory, CONFIG_FILE), os.path.join(directory, PARAMS_FILE)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(
            f"{what} {directory} is not a converted VAE directory ({missing[0]} is missing); "
            f"make it with {MAKE_ONE}"
        )
    return paths


def read_config(config_path: str) -> VAEConfig:
    """The VAEConfig of a folder's config.json; ValueError when it is not one of ours."""
    try:
        with open(config_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        return VAEConfig.from_dict(meta["config"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{config_path} is not a VAE config of ours: {e}") from e
