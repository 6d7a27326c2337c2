"""The benchmark suite's CI smoke run: ``python -m benchmarks --preset tiny`` must produce valid JSON
with every scenario and the plots. A smoke test, not a timing gate: no figure is compared to a
target here, only counters that are exact by construction (re-adding a seen image encodes nothing).

The peer (llama-cpp-python in its own venv) takes minutes to compile, so the run uses it when its
venv is already built (``--no-peer-build``) and otherwise records the peer figures as null with the
reason, and this test says so with a warning. ``LLAVA_KV_BENCH_BUILD_PEER=1`` builds the venv.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from numbers import Number
from pathlib import Path

import pytest

import llava_kv as lk

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ["multi_turn", "replace_last_image", "replace_middle_image", "readd_image", "batch", "token_overhead",
             "load_close", "build_time"]
PLOTS = ["multi_turn.png", "edits.png", "batch.png", "token_overhead.png", "load_close.png"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "benchmarks", "--preset", "tiny", "--out", str(out)]
    if os.environ.get("LLAVA_KV_BENCH_BUILD_PEER") != "1":
        cmd.append("--no-peer-build")
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr[-6000:]}"
    return out


@pytest.mark.slow
def test_smoke_run_writes_every_scenario(smoke_run: Path) -> None:
    results = json.loads((smoke_run / "results.json").read_text())
    assert list(results["scenarios"]) == SCENARIOS
    assert results["preset"] == "tiny"
    assert results["llama_cpp_commit"] == lk.build_info()["llama_cpp_commit"]
    assert results["machine"]["cores"] and results["machine"]["cpu"] and results["machine"]["backends"]
    assert results["timestamp"]

    for name, e in results["scenarios"].items():
        assert isinstance(e["unit"], str) and e["unit"], name
        assert e["better"] in ("lower", "higher"), name
        assert isinstance(e["repetitions"], int), name
        for figure in ("ours", "peer", "limit"):
            value = e[figure]
            assert value is None or isinstance(value, Number), (name, figure, value)
            if value is None:
                assert e["reasons"].get(figure), f"{name}.{figure} is null without a reason"
        if name == "build_time":
            assert e["ours"] is None and "--build-time" in e["reasons"]["ours"]
        else:
            assert isinstance(e["ours"], Number), f"{name}: {e['reasons'].get('ours')}"
            assert e["repetitions"] >= 1

    if results["peer_version"] is None:
        warnings.warn(f"benchmark smoke run without the peer: {results['peer']['reason']}", stacklevel=1)
    else:
        assert all(results["scenarios"][k]["peer"] is not None for k in SCENARIOS if k != "build_time")


@pytest.mark.slow
def test_smoke_run_counts_that_are_exact(smoke_run: Path) -> None:
    sc = json.loads((smoke_run / "results.json").read_text())["scenarios"]
    assert sc["readd_image"]["ours"] == 0 and sc["readd_image"]["limit"] == 0
    assert sc["readd_image"]["details"]["ours_embed_cache_hits"] == 1
    assert sc["multi_turn"]["details"]["images_encoded"][1:] == [0] * (len(sc["multi_turn"]["details"]["ours_s"]) - 1)
    assert sc["replace_last_image"]["details"]["max_abs_logit_diff_vs_fresh"] < 1e-3
    assert sc["load_close"]["details"]["ours"]["native_objects_after"]["models"] == 0


@pytest.mark.slow
def test_smoke_run_writes_the_plots(smoke_run: Path) -> None:
    results = json.loads((smoke_run / "results.json").read_text())
    assert results["plots"], "no plots: matplotlib is missing (it is in the test extra: pip install '.[test]')"
    assert sorted(results["plots"]) == sorted(PLOTS)
    for name in PLOTS:
        assert (smoke_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_readme_block_is_regenerated_in_place(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import report
    finally:
        sys.path.remove(str(ROOT))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n\n## Benchmarks\n\n" + report.BEGIN + "\nold\n" + report.END + "\n\nafter\n")
    results_dir = tmp_path / "benchmarks" / "results"
    run = results_dir / "tiny-cpu"
    run.mkdir(parents=True)
    entry = {"unit": "ms", "better": "lower", "repetitions": 3, "ours": 1.0, "peer": None, "limit": 0.5,
             "limit_means": "x", "ratios": {"ours_vs_limit": 2.0, "peer_vs_ours": None},
             "reasons": {"peer": "skipped: --no-peer"}, "details": {}}
    (run / "results.json").write_text(json.dumps({
        "preset": "tiny", "device": "cpu", "timestamp": "2025-01-01T00:00:00+00:00", "llama_cpp_commit": "0c1e5709",
        "peer_version": None, "plots": ["edits.png"],
        "model": {"preset": "tiny-llava", "description": "d", "dtype": "f32"},
        "machine": {"cpu": "cpu", "cores": 2, "ram_gib": 4, "gpu": None},
        "scenarios": {"replace_last_image": entry}}))
    report.update_readme(readme, results_dir, tmp_path)
    once = readme.read_text()
    report.update_readme(readme, results_dir, tmp_path)
    assert readme.read_text() == once
    assert "old" not in once and once.startswith("# x\n\nbefore") and once.endswith("after\n")
    assert "| replace the last image (~2k tokens) | ms | 1 | 0.5 | n/a (skipped: --no-peer) | 2.00x | n/a |" in once
    assert "![edits](benchmarks/results/tiny-cpu/edits.png)" in once
