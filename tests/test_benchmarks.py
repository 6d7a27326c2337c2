"""The benchmark suite's CI smoke run: ``python -m benchmarks --preset tiny`` must produce valid JSON
with every scenario and the plots. A smoke test, not a timing gate: no figure is compared to a
target here, only counters that are exact by construction (re-adding a seen image encodes nothing)
and the settings every side records.

The peers take minutes to compile (llama-cpp-python's venv about 10 minutes on 2 cores, llama-server
about 9.5 minutes: 570 s measured), so the run uses them when they are already built
(``--no-peer-build``) and otherwise records their figures as null with the reason, and this test says
so with a warning. ``LLAVA_KV_BENCH_BUILD_PEER=1`` builds both (once per machine: they are cached).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import warnings
from numbers import Number
from pathlib import Path

import pytest

import llava_kv as lk

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ["control", "multi_turn", "replace_first_image", "replace_middle_image", "replace_last_image",
             "readd_image", "new_conversation", "batch", "token_overhead", "load_close", "build_time",
             "serve_multi_turn", "serve_replace_first_image", "serve_new_conversation", "serve_concurrency",
             "serve_http_overhead", "serve_restore", "blend"]
# the scenarios run against llama-server (the others say why not, in reasons["server"])
SERVER_SCENARIOS = ["control", "multi_turn", "replace_first_image", "replace_last_image", "new_conversation", "batch",
                    "token_overhead", "serve_multi_turn", "serve_replace_first_image", "serve_new_conversation",
                    "serve_concurrency", "blend"]
# no llama-cpp-python figure (reasons["peer"] says why: not applicable, or not measured)
NO_PEER = {"build_time", "serve_http_overhead", "serve_restore", "blend"}
# llama-cpp-python's own server (its [server] extra, installed into the peer venv when the peers may be built)
SERVE_PEER = {"serve_multi_turn", "serve_replace_first_image", "serve_new_conversation", "serve_concurrency"}
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
        for figure in ("ours", "peer", "server", "limit"):
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
        assert all(results["scenarios"][k]["peer"] is not None for k in SCENARIOS if k not in NO_PEER | SERVE_PEER)
        serve_reason = results["scenarios"]["serve_multi_turn"]["reasons"].get("peer")
        if serve_reason and os.environ.get("LLAVA_KV_BENCH_BUILD_PEER") != "1":
            assert "server unavailable" in serve_reason, serve_reason
            warnings.warn(f"benchmark smoke run without llama-cpp-python's server: {serve_reason}", stacklevel=1)
        else:
            assert all(results["scenarios"][k]["peer"] is not None for k in SERVE_PEER), serve_reason
    if results["server_version"] is None:
        reason = results["server"]["reason"]
        assert reason, "llama-server left out without a reason"
        warnings.warn(f"benchmark smoke run without llama-server: {reason}", stacklevel=1)
        assert all(reason in results["scenarios"][k]["reasons"]["server"] for k in SERVER_SCENARIOS)
    else:
        assert results["server"]["sdist_sha256"] and results["server"]["build_seconds"] > 0
        assert all(results["scenarios"][k]["server"] is not None for k in SERVER_SCENARIOS)


@pytest.mark.slow
def test_smoke_run_records_the_same_settings_on_every_side(smoke_run: Path) -> None:
    results = json.loads((smoke_run / "results.json").read_text())
    assert results["settings"]["flash_attn"] == "on" and results["settings"]["omp_wait_policy"] == "passive"
    for name in ("control", "multi_turn", "replace_first_image", "batch", "token_overhead"):
        used = results["scenarios"][name]["settings"]
        assert used["ours"]["flash_attn"] == "on", name
        for side in ("peer", "server"):
            if used.get(side):
                for key in ("flash_attn", "n_threads", "n_batch", "n_ubatch", "kv_type", "omp_wait_policy"):
                    assert used[side][key] == used["ours"][key], (name, side, key)
    control = results["scenarios"]["control"]
    assert control["limit"] is None and control["reasons"]["limit"]
    for side in ("peer", "server"):
        if control[side] is not None:
            assert control["details"]["verdict"][side]["says"]


@pytest.mark.slow
def test_smoke_run_counts_that_are_exact(smoke_run: Path) -> None:
    sc = json.loads((smoke_run / "results.json").read_text())["scenarios"]
    assert sc["readd_image"]["ours"] == 0 and sc["readd_image"]["limit"] == 0
    assert sc["readd_image"]["details"]["ours_embed_cache_hits"] == 1
    assert sc["multi_turn"]["details"]["images_encoded"][1:] == [0] * (len(sc["multi_turn"]["details"]["ours_s"]) - 1)
    assert sc["replace_last_image"]["details"]["max_abs_logit_diff_vs_fresh"] < 1e-3
    assert sc["load_close"]["details"]["ours"]["native_objects_after"]["models"] == 0
    assert sc["load_close"]["ratios"]["peer_vs_ours"] is None  # no ratio of two noise-level drifts
    assert sc["new_conversation"]["ours"] == 0 and sc["new_conversation"]["limit"] == 0
    assert sc["replace_first_image"]["details"]["max_abs_logit_diff_vs_fresh_by_edit"]["first"] < 1e-3
    assert sc["replace_first_image"]["details"]["images_encoded"]["ours"] == 1
    if sc["multi_turn"]["server"] is not None:  # llama-server encodes the image once, then reuses its cache
        assert sc["multi_turn"]["details"]["server_images_encoded"][1:] == [0] * (
            len(sc["multi_turn"]["details"]["ours_s"]) - 1)
        assert sc["new_conversation"]["server"] == 1  # its prompt cache is keyed by the token prefix
    if sc["serve_new_conversation"]["peer"] is not None:  # llama-cpp-python's server: every image, every request
        assert sc["serve_new_conversation"]["peer"] == 1
        assert sc["serve_replace_first_image"]["details"]["encodes"]["peer"] == 3
        assert sc["serve_multi_turn"]["details"]["peer"]["encodes_per_turn"] == [1] * len(
            sc["serve_multi_turn"]["details"]["peer"]["encodes_per_turn"])
    assert sc["serve_new_conversation"]["ours"] == 0
    assert sc["serve_replace_first_image"]["details"]["encodes"]["ours"] == 1
    td = sc["token_overhead"]["details"]
    assert len(td["all_ms_per_token"]["cpp_loop"]) == len(td["all_ms_per_token"]["native_step"]) >= 5


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
        from benchmarks.harness import report
    finally:
        sys.path.remove(str(ROOT))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n\n## Benchmarks\n\n" + report.BEGIN + "\nold\n" + report.END + "\n\nafter\n")
    results_dir = tmp_path / "benchmarks" / "results"
    run = results_dir / "tiny-cpu"
    run.mkdir(parents=True)
    entry = {"unit": "ms", "better": "lower", "repetitions": 3, "ours": 1.0, "peer": None, "server": 0.5,
             "limit": 0.5, "limit_means": "x",
             "ratios": {"ours_vs_limit": 2.0, "peer_vs_ours": None, "server_vs_ours": 0.5},
             "reasons": {"peer": "skipped: --no-peer"}, "notes": {"server": "it is newer"}, "details": {}}
    (run / "results.json").write_text(json.dumps({
        "preset": "tiny", "device": "cpu", "timestamp": "2025-01-01T00:00:00+00:00", "llama_cpp_commit": "0c1e5709",
        "peer_version": None, "server_version": "llama-server (b1)", "plots": ["edits.png"],
        "model": {"preset": "tiny-llava", "description": "d", "dtype": "f32"},
        "machine": {"cpu": "cpu", "cores": 2, "ram_gib": 4, "gpu": None},
        "scenarios": {"replace_last_image": entry}}))
    report.update_readme(readme, results_dir, tmp_path)
    once = readme.read_text()
    report.update_readme(readme, results_dir, tmp_path)
    assert readme.read_text() == once
    assert "old" not in once and once.startswith("# x\n\nbefore") and once.endswith("after\n")
    assert ("| replace the last image, never seen | ms | 1 | 0.5 | n/a (skipped: --no-peer) | 0.5 | 2.00x | n/a | "
            "0.50x | **llama-server wins** (0.50x): it is newer |") in once
    assert "![edits](benchmarks/results/tiny-cpu/edits.png)" in once


@pytest.mark.slow
def test_smoke_run_blend_reports_cost_and_drift(smoke_run: Path) -> None:
    b = json.loads((smoke_run / "results.json").read_text())["scenarios"]["blend"]
    d = b["details"]
    assert set(d["blend"]) == {"0", "8", "32", "64"} and d["exact_tokens_decoded"] > 0
    for k, v in d["blend"].items():
        report, drift = v["report"], v["drift"]
        assert report["k"] == int(k) and report["tokens_decoded"] <= report["exact_tokens"] == d["exact_tokens_decoded"]
        assert 0 <= drift["top1_agreement"] <= 1 and drift["kl_median"] >= 0 and drift["max_abs_logit_diff"] >= 0
        assert 0 <= drift["greedy_leading_median"] <= drift["greedy_tokens"] == 32
    assert b["ours"] == d["blend"]["32"]["ms"] or abs(b["ours"] - d["blend"]["32"]["ms"]) < 1e-3
    assert b["limit"] == round(d["exact_ms"], 3) and "reason" in d["real_gemma"]  # the tiny preset: not run


@pytest.mark.slow
def test_smoke_run_alternates_the_sides(smoke_run: Path) -> None:
    """Every side that ran the edits and the serving rows ran each repetition, in alternating rounds."""
    sc = json.loads((smoke_run / "results.json").read_text())["scenarios"]
    for key in ("replace_first_image", "replace_last_image"):
        e = sc[key]
        assert len(e["details"]["ours_all_ms"]) == e["repetitions"]
        if e["server"] is not None:
            assert len(e["details"]["server_all_ms"]) == e["repetitions"]
    conc = sc["serve_concurrency"]
    for side in ("ours", "peer", "server"):
        if conc[side] is None:
            continue
        d = conc["details"][side]
        assert d["rounds"] == len(d["all_requests_per_s"]) == conc["repetitions"] >= 1
        assert d["requests"] == 32  # 16 conversations x 2 turns, in each round
        assert conc[side] == pytest.approx(statistics.median(d["all_requests_per_s"]), rel=1e-3)
    # Ours also says where its engine thread's time went in each round: one thread, so never more
    # than the round lasted (the metrics are read just before and just after it).
    ours = conc["details"]["ours"]
    for prefill, generation, wall in zip(ours["all_engine_prefill_s"], ours["all_engine_generation_s"],
                                         ours["all_wall_s"]):
        assert prefill > 0 and generation > 0 and prefill + generation < wall + 0.1


def test_a_failing_peer_leaves_the_rounds_and_ours_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.scenarios import serve
    finally:
        sys.path.remove(str(ROOT))
    monkeypatch.setattr(serve, "settle", lambda: None)
    order: list[str] = []

    def turn(side: str, srv: str) -> None:
        order.append(srv)
        if side == "peer":
            raise OSError("connection refused")

    running = {"ours": "o", "peer": "p", "server": "s"}
    sides: dict[str, dict[str, str]] = {k: {} for k in running}
    serve._alternate(running, sides, "pool", turn)
    serve._alternate(running, sides, "pool", turn)
    assert order == ["o", "p", "s", "o", "s"]
    assert list(running) == ["ours", "server"]
    assert sides == {"ours": {}, "peer": {"pool_error": "OSError: connection refused"}, "server": {}}

    def ours_fails(side: str, srv: str) -> None:
        raise RuntimeError("our server died")

    with pytest.raises(RuntimeError, match="our server died"):
        serve._alternate(running, sides, "pool", ours_fails)


def test_llama_server_is_built_from_our_pin_or_b11434() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.harness import llama_server
        from benchmarks.harness.llama_cpp_python import _fetcher
    finally:
        sys.path.remove(str(ROOT))
    fetch = _fetcher()
    pinned = llama_server.source("pinned")
    # the very sdist and hash llava-kv's own build fetches, and the tree inside it
    assert (pinned.sdist_file, pinned.sha256) == (fetch.SDIST_FILE, fetch.SDIST_SHA256)
    assert pinned.tree == fetch.SDIST_TREE == f"llama_cpp_python-{fetch.SDIST_VERSION}/vendor/llama.cpp/"
    assert fetch.LLAMA_CPP_COMMIT[:7] in pinned.label and fetch.LLAMA_CPP_COMMIT[:7] in pinned.description
    assert llama_server.source("b11434") is llama_server.B11434
    # two builds never share a folder (the suite's peer stays where LLAVA_KV_SERVER_DIR puts it)
    assert llama_server.default_dir(pinned) != llama_server.default_dir(llama_server.B11434)
    with pytest.raises(ValueError, match="unknown llama-server source 'b9999'"):
        llama_server.source("b9999")
