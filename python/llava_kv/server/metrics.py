"""The server's counters, written in the Prometheus text exposition format (version 0.0.4)."""
from __future__ import annotations

import bisect
import threading
from typing import Callable, Iterable

# Request latency buckets (seconds): from a cached one-token reply to a long prefill on a CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Counters, gauges read when scraped, and one latency histogram; safe from any thread."""

    COUNTERS = {
        "requests_total": "chat completion requests answered, by HTTP status",
        "prompt_tokens_total": "prompt tokens of answered requests (reused + decoded)",
        "tokens_reused_total": "prompt tokens served from a slot's KV cache (not decoded again)",
        "tokens_decoded_total": "prompt tokens (text and media) decoded into a KV cache",
        "tokens_generated_total": "tokens generated",
        "images_encoded_total": "images and audio clips run through the projector",
        "embed_cache_hits_total": "images and audio clips whose embeddings came from the cache",
        "prefill_seconds_total": "seconds the engine thread spent bringing slots to requests' prompts (slot choice, "
                                 "saves, restores, media encoding, prompt decoding)",
        "generation_seconds_total": "seconds the engine thread spent in batched generation steps",
        "batched_steps_total": "batched decode calls of the generation loop",
        "batched_step_sequences_total": "sequences carried by those calls (divide by batched_steps_total: the mean batch)",
        "evictions_total": "conversations moved out of a slot to make room, by where they went",
        "restores_total": "conversations put back into a slot from a saved state, by where it came from",
        "cancelled_total": "generations stopped because the client went away",
        "rejected_total": "requests refused because the queue was full (503)",
    }

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._gauges = gauges
        self._buckets = [0] * len(LATENCY_BUCKETS)
        self._latency_sum = 0.0
        self._latency_count = 0

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        assert name in self.COUNTERS, name
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + value

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            if labels:
                return self._counters.get((name, tuple(sorted(labels.items()))), 0)
            return sum(v for (n, _), v in self._counters.items() if n == name)

    def observe_latency(self, seconds: float) -> None:
        with self._lock:
            i = bisect.bisect_left(LATENCY_BUCKETS, seconds)
            if i < len(self._buckets):
                self._buckets[i] += 1
            self._latency_sum += seconds
            self._latency_count += 1

    def render(self) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> None:
            lines.append(f"# HELP llava_kv_{name} {help_text}")
            lines.append(f"# TYPE llava_kv_{name} {kind}")
            lines.extend(samples)

        with self._lock:
            counters = dict(self._counters)
            buckets = list(self._buckets)
            total, count = self._latency_sum, self._latency_count
        for name, help_text in self.COUNTERS.items():
            samples = [f"llava_kv_{name}{_labels(labels)} {_num(v)}"
                       for (n, labels), v in sorted(counters.items()) if n == name]
            family(name, "counter", help_text, samples or [f"llava_kv_{name} 0"])
        for name, (help_text, read) in self._gauges.items():
            family(name, "gauge", help_text, [f"llava_kv_{name} {_num(read())}"])
        cumulative = 0
        samples = []
        for bound, n in zip(LATENCY_BUCKETS, buckets):
            cumulative += n
            samples.append(f'llava_kv_request_duration_seconds_bucket{{le="{bound}"}} {cumulative}')
        samples.append(f'llava_kv_request_duration_seconds_bucket{{le="+Inf"}} {count}')
        samples.append(f"llava_kv_request_duration_seconds_sum {_num(total)}")
        samples.append(f"llava_kv_request_duration_seconds_count {count}")
        family("request_duration_seconds", "histogram", "time from a request's arrival to its last byte", samples)
        return "\n".join(lines) + "\n"


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse(text: str) -> dict[str, float]:
    """Samples of a Prometheus text page by their full name with labels (for tests and benchmarks)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        out[name] = float(value)
    return out
