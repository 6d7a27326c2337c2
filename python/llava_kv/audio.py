"""Turning what users pass as audio into mono float32 samples at the projector's rate and a digest.

Audio goes through the same registry as images: a clip is one media chunk of the timeline, its
embedding cached by content. Identity is the decoded samples plus the projector's identity, never
the file name or the placeholder tokens.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from .errors import AudioError

if TYPE_CHECKING:
    from .model import Model

AudioInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray]

__all__ = ["AudioInput", "LoadedAudio", "load_audio", "looks_like_audio", "MAX_AUDIO_FILE_BYTES", "AUDIO_FORMATS"]

# A file larger than this is refused before it is read (an hour of 16-bit 48 kHz stereo is ~660 MB).
MAX_AUDIO_FILE_BYTES = 1 << 30
# The audio files mtmd decodes (what OpenAI's input_audio "format" may name), and their suffixes.
AUDIO_FORMATS = ("wav", "mp3", "flac")
_AUDIO_SUFFIXES = tuple(f".{fmt}" for fmt in AUDIO_FORMATS)


@dataclass(frozen=True)
class LoadedAudio:
    samples: np.ndarray  # 1-D float32, C-contiguous, at the model's sample rate
    digest: str
    source: str  # the path as given, or a short description of the object


def audio_format(data: bytes) -> str | None:
    """"wav", "flac" or "mp3" for bytes that start like one of those files (the check mtmd's helper
    makes; an MP3 without an ID3 tag starts with a frame sync), else None."""
    head = bytes(data[:12])
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    return None


def looks_like_audio(x: Any) -> bool:
    """Whether ``x`` is meant as audio: a 1-D float array, a .wav/.mp3/.flac path, or bytes that
    start like one of those files (the check mtmd's helper makes)."""
    if isinstance(x, np.ndarray):
        return x.ndim == 1 and np.issubdtype(x.dtype, np.floating)
    if isinstance(x, (str, os.PathLike)):
        return Path(x).suffix.lower() in _AUDIO_SUFFIXES
    if isinstance(x, (bytes, bytearray, memoryview)):
        return audio_format(bytes(x[:12])) is not None
    return False


def load_audio(audio: AudioInput, model: "Model") -> LoadedAudio:
    """Decode ``audio`` (a wav/mp3/flac path or bytes, or a mono float array already at
    ``model.audio_sample_rate``) and digest it. Raises AudioError for what cannot be read as audio,
    FileNotFoundError for a missing path, TypeError for another kind of object."""
    if not model.has_audio:
        raise AudioError(f"the model {Path(model.path).name!r} takes no audio: its projector has no audio encoder")
    if isinstance(audio, (str, os.PathLike)):
        path = Path(audio)
        source = os.fspath(audio)
        if not path.is_file():
            raise FileNotFoundError(2, "No such audio file", source)
        if path.stat().st_size > MAX_AUDIO_FILE_BYTES:
            raise AudioError(f"audio file {source!r} is larger than {MAX_AUDIO_FILE_BYTES} bytes")
        samples = _decode(model, path.read_bytes(), source)
    elif isinstance(audio, (bytes, bytearray, memoryview)):
        source = f"<audio bytes: {len(audio)}>"
        samples = _decode(model, bytes(audio), source)
    elif isinstance(audio, np.ndarray):
        source = f"<audio array {audio.shape[0] if audio.ndim else 0} samples>"
        if audio.ndim != 1 or not np.issubdtype(audio.dtype, np.floating):
            raise AudioError(f"audio samples must be a 1-D float array (mono, {model.audio_sample_rate} Hz), "
                             f"got {audio.dtype} with shape {audio.shape}")
        samples = np.ascontiguousarray(audio, dtype=np.float32)
    else:
        raise TypeError(f"audio is a path, bytes or a 1-D float32 array, not {type(audio).__name__}")
    if samples.size == 0:
        raise AudioError(f"the audio {source!r} holds no samples")
    if not np.isfinite(samples).all():
        raise AudioError(f"the audio {source!r} holds NaN or infinite samples")
    h = hashlib.blake2b(digest_size=20)
    h.update(b"llava-kv/audio/1\0")
    h.update(model.projector_id.encode())
    h.update(np.int64(samples.size).tobytes())
    h.update(samples.tobytes())
    return LoadedAudio(samples, h.hexdigest(), source)


def _decode(model: "Model", data: bytes, source: str) -> np.ndarray:
    try:
        return model.decode_audio(data)
    except AudioError as e:
        raise AudioError(f"could not read {source!r} as audio: {e}") from None
