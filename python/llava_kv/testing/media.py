"""Test media: deterministic images (``random_image``) and audio clips (``random_audio``, ``wav_bytes``)
to feed sessions, the same for a given seed on every machine.
"""
from __future__ import annotations

import numpy as np


def random_image(seed: int, size: tuple[int, int] = (96, 96)) -> np.ndarray:
    """A deterministic HxWx3 uint8 test image: smooth colour fields plus noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / (5 + 10 * rng.random()) + rng.random() * 6) for _ in range(3)], axis=-1)
    base += np.stack([np.cos(yy / (5 + 10 * rng.random()) + rng.random() * 6) for _ in range(3)], axis=-1)
    img = 127.5 + 50 * base + rng.normal(0, 20, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def random_audio(seed: int, seconds: float = 1.0, rate: int = 16000) -> np.ndarray:
    """A deterministic mono test clip of float32 samples in [-1, 1): a few tones plus noise, rounded to
    16-bit steps, so that it survives a 16-bit WAV round trip (:func:`wav_bytes`) bit for bit."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate)), dtype=np.float64) / rate
    x = sum(0.2 * np.sin(2 * np.pi * rng.uniform(80, 4000) * t + rng.uniform(0, 2 * np.pi)) for _ in range(3))
    x = x + rng.normal(0, 0.05, t.size)
    pcm = np.clip(np.round(x * 32768), -32768, 32767)
    return (pcm / 32768).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    """``samples`` (mono floats in [-1, 1)) as a 16-bit PCM WAV file."""
    import io
    import wave

    pcm = np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32768), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return buf.getvalue()
