"""The CPU backend variant is chosen at run time: the best this CPU runs, or the one
LLAVA_KV_CPU_VARIANT names. Each case runs in a fresh process (the variant is chosen once, when
llava_kv loads; this suite's own process runs the peers' variant, see conftest.py)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import llava_kv as lk

from conftest import REFERENCE_CPU_VARIANT

BUILD = lk.build_info()
pytestmark = pytest.mark.skipif(
    BUILD["cpu_variants_built"] != "all",
    reason="this build has one CPU backend, built for its host (LLAVA_KV_CPU_VARIANTS=host): there is no variant "
           "to choose")

# What each x86-64 variant of ggml's CPU backend needs, as /proc/cpuinfo names the instruction sets
# (ggml/src/CMakeLists.txt lists the variants with their GGML_* features).
X86_VARIANT_FLAGS = {
    "x64": set(),
    "sse42": {"sse4_2"},
    "sandybridge": {"sse4_2", "avx"},
    "ivybridge": {"sse4_2", "avx", "f16c"},
    "piledriver": {"sse4_2", "avx", "f16c", "fma"},
    "haswell": {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"},
    "skylakex": {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f"},
    "cannonlake": {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f", "avx512vbmi"},
    "cascadelake": {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f", "avx512_vnni"},
    "icelake": {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f", "avx512vbmi", "avx512_vnni"},
    "cooperlake": {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f", "avx512_vnni", "avx512_bf16"},
    "zen4": {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f", "avx512vbmi", "avx512_vnni",
             "avx512_bf16"},
    "alderlake": {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx_vnni"},
    "sapphirerapids": {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f", "avx512vbmi", "avx512_vnni",
                       "avx512_bf16", "amx_tile", "amx_int8"},
}


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    raise AssertionError("no flags line in /proc/cpuinfo")


def run(script: str, variant: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh interpreter, on ``variant`` (None: the one llava-kv chooses)."""
    env = {k: v for k, v in os.environ.items() if k != "LLAVA_KV_CPU_VARIANT"}
    if variant is not None:
        env["LLAVA_KV_CPU_VARIANT"] = variant
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          env=env, timeout=300)


REPORT = """
    import json, llava_kv as lk
    b = lk.build_info()
    print(json.dumps({"variant": b["cpu_variant"], "variants": b["cpu_variants"]}))
"""


def test_this_suite_runs_the_peers_variant():
    assert REFERENCE_CPU_VARIANT in BUILD["cpu_variants"]
    assert BUILD["cpu_variant"] == os.environ.get("LLAVA_KV_CPU_VARIANT") == REFERENCE_CPU_VARIANT


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not Path("/proc/cpuinfo").exists(),
                    reason="the variant table here is x86-64's, read against /proc/cpuinfo")
def test_the_best_variant_this_cpu_runs_is_chosen():
    result = run(REPORT, None)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert set(got["variants"]) == set(X86_VARIANT_FLAGS)
    flags = cpu_flags()
    runnable = {v for v, need in X86_VARIANT_FLAGS.items() if need <= flags}
    chosen = got["variant"]
    assert chosen in runnable, (chosen, X86_VARIANT_FLAGS[chosen] - flags)
    # nothing this CPU runs does strictly more
    assert not [v for v in runnable if X86_VARIANT_FLAGS[v] > X86_VARIANT_FLAGS[chosen]], (chosen, runnable)


def test_a_named_variant_is_loaded_and_a_wrong_name_refused():
    result = run(REPORT, "x64")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["variant"] == "x64"
    result = run(REPORT, "pentium")
    assert result.returncode != 0
    assert "LLAVA_KV_CPU_VARIANT=pentium: this build has no such CPU variant; it has: alderlake" in result.stderr


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or "amx_tile" in cpu_flags(),
                    reason="needs an x86-64 CPU without AMX (to name a variant it cannot run)")
def test_a_variant_this_cpu_cannot_run_is_refused():
    result = run(REPORT, "sapphirerapids")
    assert result.returncode != 0
    assert "LLAVA_KV_CPU_VARIANT=sapphirerapids: this CPU cannot run that variant" in result.stderr


EDIT = """
    import json, sys
    import numpy as np
    import llava_kv as lk
    from llava_kv.testing import make_test_model, random_image

    pair = make_test_model(sys.argv[1], "tiny-llava")
    with lk.Model.load(pair.model_path, pair.mmproj_path) as model:
        with model.session() as s:
            s.append_text("USER: ")
            ref = s.append_image(random_image(1))
            s.append_text("Describe the picture, then the next one.")
            s.append_image(random_image(2))
            s.append_text(" ASSISTANT:")
            s.replace_image(ref, random_image(3))
            edited = s.logits()
        with model.session() as fresh:
            for part in ["USER: ", random_image(3), "Describe the picture, then the next one.", random_image(2),
                         " ASSISTANT:"]:
                (fresh.append_text if isinstance(part, str) else fresh.append_image)(part)
            ok = bool(np.array_equal(edited, fresh.logits()))
    np.save(sys.argv[2], edited)
    print(json.dumps({"variant": lk.build_info()["cpu_variant"], "edit_equals_fresh": ok}))
"""


def test_each_variant_is_exact_and_variants_agree_within_tolerance(tmp_path):
    """Within a variant, an edit equals a fresh run bit for bit; across variants the kernels differ
    (AVX-512 vs AVX2 sums in another order), so logits agree only within a tolerance."""
    logits = {}
    for variant in (None, REFERENCE_CPU_VARIANT):
        out = tmp_path / f"{variant or 'best'}.npy"
        result = run(EDIT, variant, str(tmp_path), str(out))
        assert result.returncode == 0, result.stderr
        got = json.loads(result.stdout)
        assert got["edit_equals_fresh"], got
        logits[got["variant"]] = np.load(out)
    if len(logits) == 1:  # this CPU's best variant is the reference one: nothing to compare
        return
    best, reference = logits.values()
    drift = float(np.max(np.abs(best - reference)))
    print(f"max |logit difference| across variants {set(logits)}: {drift:.3g}")
    assert 0 < drift <= 1e-2, drift  # 1.2e-3 measured (zen4 vs haswell, tiny-llava)
