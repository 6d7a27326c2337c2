"""Turning what users pass as an image into RGB pixels and a content digest.

Image identity is the decoded pixels plus the projector's identity, never the placeholder tokens or
the file name: the same picture saved as PNG and JPEG-less BMP shares one embedding; two different
pictures never do.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from .errors import ImageError

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray, Any]

__all__ = ["LoadedImage", "load_image", "file_fingerprint"]


@dataclass(frozen=True)
class LoadedImage:
    pixels: np.ndarray  # HxWx3 uint8, C-contiguous
    digest: str
    source: str  # the path as given, or a short description of the object


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """A content hash of a model file; whole-file for files up to 64 MiB, sampled beyond that."""
    size = os.path.getsize(path)
    h = hashlib.blake2b(digest_size=16)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= 64 << 20:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            step = size // 64
            for i in range(64):
                f.seek(i * step)
                h.update(f.read(1 << 16))
            f.seek(size - (1 << 16))
            h.update(f.read())
    return h.hexdigest()


def _from_pil(img: Any, source: str) -> np.ndarray:
    try:
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8)
    except Exception as e:  # PIL raises many types for truncated or odd files
        raise ImageError(f"cannot decode image {source}: {e}") from e


def _from_array(arr: np.ndarray, source: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise TypeError(f"image array {source} must have dtype uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    elif not (arr.ndim == 3 and arr.shape[2] == 3):
        raise ValueError(f"image array {source} must be HxWx3 (or HxW, HxWx4) uint8, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"image array {source} is empty ({arr.shape[1]}x{arr.shape[0]})")
    return np.ascontiguousarray(arr)


def describe_image(image: Any) -> str:
    """How errors and records name an image: the path as given, or a short description."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<{memoryview(image).nbytes} bytes>"
    if isinstance(image, np.ndarray):
        return f"<array {'x'.join(map(str, image.shape))}>"
    size, mode = getattr(image, "size", None), getattr(image, "mode", None)
    if isinstance(size, tuple) and mode is not None:  # a PIL image
        return getattr(image, "filename", "") or f"<PIL {mode} {size[0]}x{size[1]}>"
    return f"<{type(image).__name__}>"


def load_image(image: ImageInput, projector_id: str = "") -> LoadedImage:
    """Decode ``image`` (path, bytes, PIL image or uint8 array) to RGB pixels and digest them.

    Raises FileNotFoundError for a missing path, ImageError for data Pillow cannot decode, and
    TypeError/ValueError for objects that are not images.
    """
    from PIL import Image, UnidentifiedImageError

    source = describe_image(image)
    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FileNotFoundError(2, "No such image file", source)
        try:
            with Image.open(image) as img:
                pixels = _from_pil(img, repr(source))
        except UnidentifiedImageError as e:
            raise ImageError(f"cannot read image {source!r}: not an image format Pillow knows") from e
    elif isinstance(image, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(image))) as img:
                pixels = _from_pil(img, source)
        except UnidentifiedImageError as e:
            raise ImageError(f"cannot read image from {source}: not an image format Pillow knows") from e
    elif isinstance(image, np.ndarray):
        pixels = _from_array(image, source)
    elif isinstance(image, Image.Image):
        pixels = _from_pil(image, source)
    else:
        raise TypeError(f"an image is a path, bytes, PIL.Image or HxWx3 uint8 array, not {type(image).__name__}")

    h = hashlib.blake2b(digest_size=20)
    h.update(b"llava-kv/image/1\0")
    h.update(projector_id.encode())
    h.update(np.asarray(pixels.shape, dtype=np.int64).tobytes())
    h.update(pixels.tobytes())
    return LoadedImage(pixels, h.hexdigest(), source)
