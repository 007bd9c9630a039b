"""What the checkpoint converters share: reading reference files (torch, safetensors), the
weights inside a trainer file, nested-dict flattening, key checks, and the change from the
reference's (out, in) / OIHW layouts to our (in, out) / HWIO kernels."""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

from dydit_jax.models import model_class


def unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """The model weights of a file: "ema" of a reference trainer file ({"model", "ema",
    "opt", "args"}), else "model", else the dict itself; a DDP "module." prefix is dropped."""
    for name in ("ema", "model"):
        if isinstance(state_dict.get(name), Mapping):
            state_dict = state_dict[name]
            break
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file  # optional: .safetensors files only
    except ImportError:
        return _read_safetensors_numpy(path)
    return load_file(path)


_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _read_safetensors_numpy(path: str) -> dict[str, np.ndarray]:
    """Minimal reader of the safetensors format (u64 header size, JSON header, raw bytes),
    used when the safetensors package is not installed."""
    not_safetensors = (
        f"{path} is not a safetensors file (an 8-byte header size, then a JSON header); "
        "check the file or save it again with safetensors"
    )
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(not_safetensors)
        (size,) = struct.unpack("<Q", head)
        if size > os.path.getsize(path) - 8:
            raise ValueError(not_safetensors)
        try:
            header = json.loads(f.read(size))
        except ValueError:  # JSON or UTF-8 decoding
            raise ValueError(not_safetensors) from None
        data = f.read()
    if not isinstance(header, dict):
        raise ValueError(not_safetensors)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info["dtype"]
        start, end = info["data_offsets"]
        raw = data[start:end]
        if dtype == "BF16":  # bfloat16 = the high half of a float32
            bits = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif dtype in _ST_DTYPES:
            array = np.frombuffer(raw, np.dtype(_ST_DTYPES[dtype]).newbyteorder("<"))
        else:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        out[name] = array.reshape(info["shape"])
    return out


def read_torch(path: str) -> Mapping[str, Any]:
    try:
        import torch  # optional and heavy: .pt/.pth files only
    except ImportError as e:
        raise ImportError(
            f"cannot read {path}: pip install torch (CPU) to read .pt files, or convert it "
            "to .safetensors"
        ) from e
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # trainer files keep argparse.Namespace args: allow just that

            if "Namespace" not in str(e):
                raise
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's unpickler fails with any error type on a foreign file
        raise ValueError(
            f"{path} is not a readable torch checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no details'}); check the file, or "
            "convert it to .safetensors"
        ) from e


def to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (bfloat16 has no numpy dtype)
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reference weights from `.safetensors`, `.pt`/`.pth` (torch, weights_only) or `.npz`,
    as float32 numpy arrays by reference name (trainer files: their "ema" weights)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        raw: Mapping[str, Any] = _read_safetensors(path)
    elif ext in (".pt", ".pth", ".bin"):
        raw = read_torch(path)
    elif ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                raw = {k: f[k] for k in f.files}
        except (OSError, ValueError, TypeError, zipfile.BadZipFile, EOFError):
            # (a non-archive makes np.load suggest unpickling it: not what to do here)
            raise ValueError(
                f"{path} is not an .npz archive of arrays; save one with "
                "np.savez(path, **state_dict)"
            ) from None
    else:
        raise ValueError(
            f"{path}: unknown checkpoint format {ext!r}; use .safetensors, .pt/.pth or .npz"
        )
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path} holds a {type(raw).__name__}, not a state_dict")
    return numpy_state(path, unwrap(raw))


def numpy_state(path: str, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The state_dict's tensors as numpy arrays; a ValueError naming entries that are not."""
    bad = [k for k, v in state.items() if not hasattr(v, "shape")]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad[:5]}")
    return {k: to_numpy(v) for k, v in state.items()}


def shape_of(shapes: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    value = shapes.get(key)
    if value is None:
        return None
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def need(shapes: Mapping[str, Any], key: str, ndim: int) -> tuple[int, ...]:
    shape = shape_of(shapes, key)
    if shape is None:
        raise ValueError(f"missing key {key!r}: cannot infer the architecture without it")
    if len(shape) != ndim:
        raise ValueError(f"{key} has shape {shape}; expected {ndim} dimensions")
    return shape


def param_shapes(config) -> dict:
    """Our parameter tree's shapes for a model config (a pure dict of ShapeDtypeStructs)."""

    def build():
        model = model_class(config)(config, rngs=nnx.Rngs(0))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    return jax.eval_shape(build)


# nested dicts <-> {path tuple: leaf}
flatten = traverse_util.flatten_dict
unflatten = traverse_util.unflatten_dict


def reference_shape(path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the reference stores our parameter with."""
    if path[-1] == "kernel" and len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel":
        return shape[::-1]
    return shape


def from_reference(path: tuple, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if path[-1] == "kernel" and value.ndim == 4:
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if path[-1] == "kernel":
        return np.ascontiguousarray(value.T)
    return value


def key_mismatch(expected, found, show=lambda key: key) -> list[str]:
    """["missing keys: ...", "unexpected keys: ..."] (only those that apply; naturally
    sorted, shortened) for a state_dict whose keys `found` should be `expected`; `show`
    renders an unexpected key (e.g. with the file's own name)."""
    missing = sorted(set(expected) - set(found), key=_natural)
    unexpected = sorted(set(found) - set(expected), key=_natural)
    parts = []
    if missing:
        parts.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listing([show(k) for k in unexpected])}")
    return parts


def _listing(keys: list[str], limit: int = 8) -> str:
    more = f" ... ({len(keys)} in all)" if len(keys) > limit else f" ({len(keys)})"
    return ", ".join(keys[:limit]) + more


def _natural(key: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]
