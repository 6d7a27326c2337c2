"""CI's bounded fuzzing run: each target in its own process for LLAVA_KV_FUZZ_SECONDS (default 20 s).

A crash, abort, hang or unexpected exception fails the test and leaves its input under
tests/fuzz/crashes/. Longer runs: ``python -m tests.fuzz.run --seconds 3600`` (README, Errors).
"""
from __future__ import annotations

import os

import pytest

from .run import run_target
from .targets import CORPUS, TARGETS

pytest.importorskip("atheris")

SECONDS = int(os.environ.get("LLAVA_KV_FUZZ_SECONDS", "20"))


@pytest.mark.fuzz
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_runs_clean(target: str) -> None:
    assert any((CORPUS / target).iterdir()), f"no seed corpus for {target}"
    result = run_target(target, SECONDS)
    assert result.execs > 0, result.log_tail
    assert result.ok, f"{target}: findings {[str(p) for p in result.findings]}\n{result.log_tail}"
