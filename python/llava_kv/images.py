"""Turning what users pass as an image into RGB pixels and a content digest.

Image identity is the decoded pixels plus the projector's identity, never the placeholder tokens or
the file name: the same picture saved as PNG and JPEG-less BMP shares one embedding; two different
pictures never do.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from .arguments import check_int
from .errors import ImageError, ImageTooLargeError

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray, Any]

__all__ = ["LoadedImage", "load_image", "describe_image", "file_fingerprint", "set_max_image_pixels",
           "get_max_image_pixels", "DEFAULT_MAX_IMAGE_PIXELS", "check_image_pixels", "image_header_size"]

# Images larger than this (width x height) are refused before they are decoded: a small file can
# declare a huge canvas (a "decompression bomb"), and a projector resizes every image to a few
# hundred pixels a side anyway. 8192 x 8192; raise it with set_max_image_pixels(). Pillow's own
# guard (PIL.Image.MAX_IMAGE_PIXELS, about 89 Mpx, an error at twice that) also applies, and its
# errors become ImageError too.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
_max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS


def set_max_image_pixels(n: int | None) -> None:
    """Refuse images of more than ``n`` pixels (None: back to DEFAULT_MAX_IMAGE_PIXELS), process-wide."""
    global _max_image_pixels
    _max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS if n is None else check_int("max_image_pixels", n, 1, 2**62)


def get_max_image_pixels() -> int:
    return _max_image_pixels


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


def check_image_pixels(width: int, height: int, source: str, limit: int) -> None:
    """ImageTooLargeError unless a ``width`` x ``height`` image is within ``limit`` pixels."""
    if width * height > limit:
        raise ImageTooLargeError(f"image {source} is {width}x{height} = {width * height} pixels, more than the "
                                 f"limit of {limit} (llava_kv.images.set_max_image_pixels() raises it)",
                                 width * height, limit)


def image_header_size(data: bytes, source: str) -> tuple[int, int]:
    """The width and height an encoded image's header gives (nothing is decoded); ImageError, whose
    message starts with ``source`` ("the image"), when Pillow cannot read it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            return int(width), int(height)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{source} cannot be decoded ({e})") from e


def _from_pil(img: Any, source: str, limit: int) -> np.ndarray:
    check_image_pixels(img.size[0], img.size[1], source, limit)  # before decoding: only the header is read
    img.load()
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _decode(open_image: Any, source: str, limit: int) -> np.ndarray:
    """Pixels of the image ``open_image()`` opens; every failure of Pillow's becomes ImageError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open_image() as img:
            return _from_pil(img, source, limit)
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError(f"cannot read image {source}: not an image format Pillow knows") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image {source} is too large to decode safely: {e}") from e
    except Exception as e:  # truncated or corrupt data: Pillow raises OSError, ValueError, SyntaxError, ...
        raise ImageError(f"cannot decode image {source}: {type(e).__name__}: {e}") from e


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


def load_image(image: ImageInput, projector_id: str = "", *, max_pixels: int | None = None) -> LoadedImage:
    """Decode ``image`` (path, bytes, PIL image or uint8 array) to RGB pixels and digest them.

    Raises FileNotFoundError for a missing path, ImageError naming the input for data Pillow cannot
    decode or an image of more than ``max_pixels`` pixels (default: :func:`get_max_image_pixels`),
    and TypeError/ValueError for objects that are not images.
    """
    from PIL import Image

    limit = _max_image_pixels if max_pixels is None else check_int("max_pixels", max_pixels, 1, 2**62)
    source = describe_image(image)
    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FileNotFoundError(2, "No such image file", source)
        pixels = _decode(lambda: Image.open(image), repr(source), limit)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        pixels = _decode(lambda: Image.open(io.BytesIO(data)), source, limit)
    elif isinstance(image, np.ndarray):
        pixels = _from_array(image, source)
        check_image_pixels(pixels.shape[1], pixels.shape[0], source, limit)
    elif isinstance(image, Image.Image):
        pixels = _decode(lambda: contextlib.nullcontext(image), source, limit)  # the caller's to close
    else:
        raise TypeError(f"an image is a path, bytes, PIL.Image or HxWx3 uint8 array, not {type(image).__name__}")

    h = hashlib.blake2b(digest_size=20)
    h.update(b"llava-kv/image/1\0")
    h.update(projector_id.encode())
    h.update(np.asarray(pixels.shape, dtype=np.int64).tobytes())
    h.update(pixels.tobytes())
    return LoadedImage(pixels, h.hexdigest(), source)
