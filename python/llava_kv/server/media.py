"""What a client may make the server read: images and audio inline (base64), local files only inside
``--allow-local-files DIR``, never a remote URL; every size checked before anything is decoded.

:func:`vet_messages` returns the messages with each media part replaced by the bytes or the resolved
path the renderer may load, or raises :class:`RequestError` (the HTTP status and OpenAI error object
the client gets).
"""
from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import unquote, urlparse

from ..audio import AUDIO_FORMATS, audio_format
from ..errors import ImageError, ImageTooLargeError
from ..images import DEFAULT_MAX_IMAGE_PIXELS, check_image_pixels, image_header_size


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx/5xx), an OpenAI-style ``type`` and ``code``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class MediaPolicy:
    allow_local_files: Optional[str] = None  # a real directory path, or None: no local files at all
    max_image_bytes: int = 20 * 1024 * 1024  # encoded size of one image or audio clip
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if self.allow_local_files is not None:
            object.__setattr__(self, "allow_local_files", os.path.realpath(self.allow_local_files))


def _too_large(what: str, size: int, limit: int, unit: str) -> RequestError:
    return RequestError(413, f"{what} is {size} {unit}, more than this server's limit of {limit} {unit}",
                        code="payload_too_large")


def _check_pixels(data: bytes, where: str, policy: MediaPolicy) -> None:
    try:
        width, height = image_header_size(data, "the image")
        check_image_pixels(width, height, "", policy.max_image_pixels)
    except ImageTooLargeError as e:
        raise _too_large(f"{where}: the image ({width}x{height})", e.pixels, e.limit, "pixels") from e
    except ImageError as e:
        raise RequestError(400, f"{where}: {e}", code="invalid_image") from e


def _b64(payload: str, where: str, policy: MediaPolicy, code: str = "invalid_image") -> bytes:
    # base64 is 4 characters per 3 bytes: refuse before decoding what could never fit.
    if len(payload) * 3 // 4 > policy.max_image_bytes + 3:
        raise _too_large(where, len(payload) * 3 // 4, policy.max_image_bytes, "bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"{where}: invalid base64 ({e})", code=code) from e
    if len(data) > policy.max_image_bytes:
        raise _too_large(where, len(data), policy.max_image_bytes, "bytes")
    return data


def b64_image(payload: str, where: str, policy: MediaPolicy) -> bytes:
    """An image sent as base64 (bare, or a data: URI), its size and pixels checked against ``policy``."""
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or ";base64" not in header:
            raise RequestError(400, f"{where}: only base64 data: URIs are accepted for images", code="invalid_image")
    data = _b64(payload, where, policy)
    _check_pixels(data, where, policy)
    return data


def _local_file(url: str, where: str, policy: MediaPolicy) -> str:
    if policy.allow_local_files is None:
        raise RequestError(400, f"{where}: this server does not read local files ({url!r}); send the image as a "
                                "base64 data: URI (or start the server with --allow-local-files DIR)",
                           code="local_files_not_allowed")
    parsed = urlparse(url)
    if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
        raise RequestError(400, f"{where}: file:// URLs must not name a host ({parsed.netloc!r})",
                           code="local_files_not_allowed")
    raw = unquote(parsed.path) if parsed.scheme == "file" else url
    if "\x00" in raw:
        raise RequestError(400, f"{where}: the path holds a NUL byte", code="local_files_not_allowed")
    root = policy.allow_local_files
    if any(part == ".." for part in raw.replace("\\", "/").split("/")):
        raise RequestError(403, f"{where}: '..' is not allowed in image paths", code="path_outside_allowed_dir")
    candidate = raw if os.path.isabs(raw) else os.path.join(root, raw)
    real = os.path.realpath(candidate)  # symlinks resolved: a link out of the folder is outside it
    if os.path.commonpath([real, root]) != root:
        raise RequestError(403, f"{where}: {raw!r} is outside the folder this server may read "
                                f"(--allow-local-files)", code="path_outside_allowed_dir")
    if not os.path.isfile(real):
        raise RequestError(400, f"{where}: image file not found: {raw!r}", code="invalid_image")
    size = os.path.getsize(real)
    if size > policy.max_image_bytes:
        raise _too_large(where, size, policy.max_image_bytes, "bytes")
    return real


def _vet_part(part: Any, where: str, policy: MediaPolicy) -> Any:
    if not isinstance(part, dict):
        raise RequestError(400, f"{where}: content parts must be objects", param="messages")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError(400, f"{where}: a text part needs 'text' (a string)", param="messages")
        return part
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
            raise RequestError(400, f"{where}: an input_audio part needs input_audio={{'data': <base64>, "
                                    "'format': 'wav'}}", param="messages")
        fmt = spec.get("format", "wav")
        if fmt not in AUDIO_FORMATS:
            raise RequestError(400, f"{where}: input_audio format {fmt!r} is not supported "
                                    f"({', '.join(AUDIO_FORMATS)})",
                               param="messages", code="invalid_audio")
        data = _b64(spec["data"], where, policy, code="invalid_audio")  # chat.py decodes the samples
        if audio_format(data) != fmt:
            raise RequestError(400, f"{where}: the input_audio data is not a {fmt} file", code="invalid_audio")
        return part
    if kind != "image_url":
        raise RequestError(400, f"{where}: unknown content part type {kind!r} (text, image_url, input_audio)",
                           param="messages")
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise RequestError(400, f"{where}: an image_url part needs image_url={{'url': ...}}", param="messages")
    if url.startswith("data:"):
        return {"type": "image", "image": b64_image(url, where, policy)}
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https", "ftp"):
        raise RequestError(400, f"{where}: remote image URLs are not fetched by this server ({scheme}://...); send "
                                "the image as a base64 data: URI", code="remote_url_not_allowed")
    if scheme not in ("", "file") and len(scheme) > 1:
        raise RequestError(400, f"{where}: image URL scheme {scheme!r} is not supported; send a base64 data: URI",
                           code="invalid_image")
    path = _local_file(url, where, policy)
    with open(path, "rb") as f:
        data = f.read(policy.max_image_bytes + 1)
    if len(data) > policy.max_image_bytes:
        raise _too_large(where, len(data), policy.max_image_bytes, "bytes")
    _check_pixels(data, where, policy)
    return {"type": "image", "image": data}


def vet_messages(messages: Any, policy: MediaPolicy) -> list[dict[str, Any]]:
    """The messages with every media part checked against ``policy`` and made inline bytes."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(400, f"messages[{i}] must be an object with a 'role' string", param="messages")
        if message["role"] not in ("system", "user", "assistant", "developer", "tool"):
            raise RequestError(400, f"messages[{i}]: unknown role {message['role']!r}", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            content = [_vet_part(p, f"messages[{i}].content[{k}]", policy) for k, p in enumerate(content)]
        elif content is not None and not isinstance(content, str):
            raise RequestError(400, f"messages[{i}].content must be a string or an array of parts", param="messages")
        out.append({"role": "system" if message["role"] == "developer" else message["role"],
                    "content": content if content is not None else ""})
    return out
