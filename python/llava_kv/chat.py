"""OpenAI-style chat messages -> the timeline a session should hold.

A conversation is rendered with the model's chat template (llama.cpp's template engine) with the
media marker standing in for each image, then split at the markers into text and images. The
session then edits its timeline to match: a new turn only appends; a changed earlier message or
image is an edit from the first difference on.
"""
from __future__ import annotations

import base64
import binascii
import os
from typing import Any, Iterable, Sequence, Union
from urllib.parse import unquote, urlparse

from .errors import ImageError
from .images import LoadedImage, load_image

__all__ = ["render_messages", "plan_edit"]

Item = Union[str, LoadedImage]


def _image_from_part(part: dict[str, Any], projector_id: str) -> LoadedImage:
    kind = part.get("type")
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str) or not url:
            raise ValueError("an image_url part needs image_url={'url': ...}")
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if ";base64" not in header:
                raise ValueError("only base64 data: URIs are supported for images")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as e:
                raise ImageError(f"invalid base64 in data: URI: {e}") from e
            return load_image(data, projector_id)
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https"):
            raise ValueError(f"remote image URLs are not fetched ({url}); download the image and pass its path")
        path = unquote(parsed.path) if parsed.scheme == "file" else url
        if not os.path.isfile(path):
            raise ImageError(f"image file not found: {path}")
        return load_image(path, projector_id)
    if kind == "image":
        image = part.get("image")
        if isinstance(image, (str, os.PathLike)) and not os.path.isfile(image):
            raise ImageError(f"image file not found: {image}")
        return load_image(image, projector_id)
    raise ValueError(f"unknown message part type {kind!r}: use 'text', 'image_url' or 'image'")


def render_messages(model: Any, messages: Sequence[dict[str, Any]], *, add_assistant: bool = True,
                    chat_template: str | None = None) -> list[Item]:
    """Render ``messages`` with the chat template and return the items (text / images) in order.

    Every image is loaded here, before anything changes, so a bad message leaves a session as it was.
    """
    marker = model._core.media_marker
    rendered: list[tuple[str, str]] = []
    images: list[LoadedImage] = []
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        content = message.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            if marker in content:
                raise ValueError(f"message {i} contains the media marker {marker!r} as text")
            text = content
        elif isinstance(content, (list, tuple)):
            pieces = []
            for part in content:
                if not isinstance(part, dict):
                    raise ValueError(f"message {i}: content parts must be dicts, not {type(part).__name__}")
                if part.get("type") == "text":
                    if marker in part.get("text", ""):
                        raise ValueError(f"message {i} contains the media marker {marker!r} as text")
                    pieces.append(str(part.get("text", "")))
                else:
                    images.append(_image_from_part(part, model.projector_id))
                    pieces.append(marker)
            text = "".join(pieces)
        else:
            raise ValueError(f"message {i}: content must be a string or a list of parts")
        rendered.append((str(message["role"]), text))
    prompt = model._core.apply_chat_template(rendered, add_assistant, chat_template or "")
    segments = prompt.split(marker)
    if len(segments) != len(images) + 1:
        raise ValueError("the chat template dropped or duplicated an image marker")
    items: list[Item] = []
    for k, seg in enumerate(segments):
        if seg:
            items.append(seg)
        if k < len(images):
            items.append(images[k])
    return items


def plan_edit(timeline: Iterable[Any], items: Sequence[Item]) -> tuple[int, list[Item]]:
    """Where the session's timeline first departs from ``items``, and what must follow from there.

    Text may be split over several chunks (a generated reply, then the template's end-of-turn
    text); it matches while the chunks' text is a prefix of the wanted text. A generated reply
    also matches when the template puts whitespace before it ("ASSISTANT: " + reply): the reply
    stays in the KV cache as the model produced it, rather than being decoded again.
    """
    chunks = list(timeline)
    i, offset = 0, 0
    k = 0
    for k, chunk in enumerate(chunks):
        if i >= len(items):
            break
        want = items[i]
        if chunk.kind == "image":
            if offset == 0 and isinstance(want, LoadedImage) and chunk.image.digest == want.digest:
                i += 1
                continue
            break
        if not isinstance(want, str):
            break
        if chunk.generated and not chunk.text:
            continue  # a reply of tokens without text (e.g. control tokens) renders as nothing
        if not chunk.text:
            break
        if want.startswith(chunk.text, offset):
            offset += len(chunk.text)
        elif chunk.generated and want[offset:].lstrip().startswith(chunk.text.lstrip()) and chunk.text.lstrip():
            rest_of_want = want[offset:]
            offset += len(rest_of_want) - len(rest_of_want.lstrip()) + len(chunk.text.lstrip())
        else:
            break
        if offset == len(want):
            i, offset = i + 1, 0
    else:
        k = len(chunks)
    rest: list[Item] = []
    if i < len(items):
        head = items[i]
        rest.append(head[offset:] if isinstance(head, str) else head)
        rest.extend(items[i + 1:])
    return k, rest
