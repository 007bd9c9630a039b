"""Images for latent extraction: the ADM centre crop and an image-folder source.

The crop is the one DiT trains with (the ADM / guided-diffusion data pipeline, docs/dit.md):

1. the image is converted to RGB first (grey, palette, RGBA, CMYK ...; alpha is dropped, EXIF
   orientation is not applied, as in the reference loader);
2. while the short side is >= 2 * image_size, both sides are halved (floor) with a BOX filter;
3. a BICUBIC resize scales the short side to image_size (the other side to
   ``round(side * image_size / short)``, Python's round);
4. the centre image_size x image_size square is cut out, the offsets rounded down
   (``(side - image_size) // 2``).

`to_unit_range` maps uint8 to float32 in [-1, 1] (``x / 127.5 - 1``).

An image folder holds one subfolder per class: the classes are the sorted subfolder names
(hidden ones, starting with ".", are skipped), labelled 0..K-1. Each class folder is searched
recursively (symbolic links followed) for files with the extensions in `IMAGE_EXTENSIONS`
(any case); files directly in the root are ignored. Examples are ordered by class, then by
path inside the class folder (sorted), so the order and the labels are the same on every
machine and every process.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from collections.abc import Iterator

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in mode RGB (grey, palette, RGBA, CMYK, 16-bit ... converted by Pillow)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def center_crop(image: Image.Image, image_size: int) -> np.ndarray:
    """The ADM centre crop of a Pillow image: uint8 (image_size, image_size, 3) RGB."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    image = to_rgb(image)
    while min(image.size) >= 2 * image_size:
        image = image.resize(
            (image.width // 2, image.height // 2), resample=Image.Resampling.BOX
        )
    scale = image_size / min(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    image = image.resize(size, resample=Image.Resampling.BICUBIC)  # a copy if size is equal
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [-1, 1]."""
    return np.asarray(images, np.float32) / 127.5 - 1.0


def open_image(raw) -> Image.Image:
    """A loaded Pillow image from a path, encoded bytes (JPEG, PNG ...), a uint8 array
    (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), or a Pillow image."""
    if isinstance(raw, Image.Image):
        return raw
    if isinstance(raw, (str, os.PathLike)):
        with Image.open(raw) as image:
            image.load()
            return image
    if isinstance(raw, (bytes, bytearray, memoryview, np.bytes_)):
        with Image.open(io.BytesIO(bytes(raw))) as image:
            image.load()
            return image
    if isinstance(raw, np.ndarray):
        if raw.dtype == object and raw.shape == ():  # a bytes scalar from tf.data
            return open_image(raw.item())
        arr = raw[..., 0] if raw.ndim == 3 and raw.shape[-1] == 1 else raw
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (
            arr.ndim == 3 and arr.shape[-1] not in (3, 4)
        ):
            raise ValueError(
                f"expected a uint8 image array (H, W[, 1|3|4]), got {raw.dtype} {raw.shape}"
            )
        return Image.fromarray(np.ascontiguousarray(arr))
    raise ValueError(f"cannot read an image from a {type(raw).__name__}")


def load_crop(raw, image_size: int, name: str = "") -> np.ndarray:
    """`center_crop(open_image(raw))`; ValueError naming the image when it cannot be read."""
    try:
        return center_crop(open_image(raw), image_size)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        what = name or (os.fspath(raw) if isinstance(raw, (str, os.PathLike)) else "an image")
        raise ValueError(f"cannot read {what}: {e}") from e


# ------------------------------------------------------------------------------ image folder


class ImageFolder:
    """The images of a folder with one subfolder per class (see the module docstring).

    `files[i]` is example i's path relative to `root`, `labels[i]` its class index and
    `classes` the class names."""

    def __init__(self, root: str | os.PathLike):
        root = os.path.abspath(os.fspath(root))
        if not os.path.exists(root):
            raise ValueError(f"image folder {root} does not exist")
        if not os.path.isdir(root):
            raise ValueError(f"{root} is not a folder; --source folder:PATH takes a folder "
                             "with one subfolder per class")
        classes = sorted(
            d for d in os.listdir(root)
            if not d.startswith(".") and os.path.isdir(os.path.join(root, d))
        )
        if not classes:
            raise ValueError(
                f"image folder {root} has no class subfolders: put the images of each class "
                f"in their own subfolder ({root}/CLASS/...); classes are the sorted subfolder "
                "names"
            )
        files, labels, empty = [], [], []
        for label, name in enumerate(classes):
            found = sorted(_find_images(os.path.join(root, name)))
            if not found:
                empty.append(name)
            files += [os.path.join(name, f) for f in found]
            labels += [label] * len(found)
        if not files:
            raise ValueError(
                f"found no images ({', '.join(IMAGE_EXTENSIONS)}) in the {len(classes)} class "
                f"subfolders of {root}"
            )
        if empty:
            shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
            print(f"warning: {len(empty)} class folders of {root} hold no images ({shown}); "
                  "their labels stay unused", file=sys.stderr)
        self.root = root
        self.classes = classes
        self.files = files
        self.labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.files[index])

    def fingerprint(self) -> str:
        """sha256 of the class names and the (label, relative path) list: the same folder
        content gives the same value wherever it lives."""
        h = hashlib.sha256()
        for name in self.classes:
            h.update(b"c\0" + name.encode() + b"\0")
        for label, f in zip(self.labels.tolist(), self.files, strict=True):
            h.update(f"{label}\0".encode() + f.encode() + b"\0")
        return h.hexdigest()


def _find_images(folder: str) -> Iterator[str]:
    """Image files under `folder` (recursively), as paths relative to it."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, folder)
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                yield f if rel == "." else os.path.join(rel, f)
