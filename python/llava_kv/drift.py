"""How far an approximate session (a ``mode="blend"`` or ``"shift"`` edit) is from the exact one.

:func:`logit_drift` compares the next-token logits of two sessions; :func:`greedy_agreement` the
greedy continuations they generate (on forks, so neither session changes). The blend tests and the
``blend`` benchmark scenario report both beside the cost each edit saved.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .session import Session

__all__ = ["logit_drift", "greedy_agreement", "log_softmax"]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities (float64) of the next-token distribution ``logits`` define."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max()
    out: np.ndarray = x - np.log(np.exp(x).sum())
    return out


def logit_drift(reference: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    """``max_abs``: the largest |logit difference|; ``top1_agree``: the same most likely token;
    ``kl``: KL(reference || other) of the next-token distributions, in nats."""
    ref = np.asarray(reference, dtype=np.float64)
    oth = np.asarray(other, dtype=np.float64)
    if ref.shape != oth.shape or ref.ndim != 1:
        raise ValueError(f"logit_drift needs two vectors of one vocabulary, got {ref.shape} and {oth.shape}")
    log_p, log_q = log_softmax(ref), log_softmax(oth)
    kl = float(np.sum(np.exp(log_p) * (log_p - log_q)))
    return {"max_abs": float(np.abs(ref - oth).max()), "top1_agree": bool(ref.argmax() == oth.argmax()),
            "kl": max(kl, 0.0)}


def _greedy_tokens(session: "Session", n: int) -> list[int]:
    with session.fork() as f:
        f.generate(n, temperature=0.0)
        chunk = f.timeline[-1]
        return list(chunk.tokens) if chunk.generated else []


def greedy_agreement(reference: "Session", other: "Session", n: int = 32) -> dict[str, Any]:
    """The next ``n`` greedy tokens of both sessions (each on a fork): ``leading`` how many agree
    before the first difference, ``same_positions`` at how many positions they agree, and the
    tokens themselves (fewer than ``n`` where a side generated an end-of-generation token)."""
    a = _greedy_tokens(reference, n)
    b = _greedy_tokens(other, n)
    leading = 0
    for x, y in zip(a, b):
        if x != y:
            break
        leading += 1
    return {"n": n, "leading": leading, "same_positions": sum(x == y for x, y in zip(a, b)),
            "reference_tokens": a, "other_tokens": b}
