"""llava-kv selfcheck: passes on the tiny families, fails when a real fault is injected, exit codes.

Every run here uses one CPU thread: these shapes gain nothing from more, and on a busy 2-core machine
spinning worker threads make each decode many times slower.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import llava_kv as lk
from llava_kv import selfcheck as selfcheck_module
from llava_kv.cli import main
from llava_kv.selfcheck import DEVICE_TOLERANCE, device_agreement, run_selfcheck
from llava_kv.testing import make_test_model, make_test_projector, random_image

from test_real_weights import gemma_path  # noqa: F401  (the fixture: the real GGUF, assembled once)

EDITS = ["append_image", "insert_image@start", "insert_image@middle", "replace_image@first", "replace_image@last",
         "remove_image(exact)", "images.clear()"]
IMAGE_CHECKS = [f"edit:{e}" for e in EDITS] + ["reference:mtmd"]


def _args(pair, *extra: str) -> list[str]:
    return ["selfcheck", "--model", str(pair.model_path), "--mmproj", str(pair.mmproj_path), "--threads", "1",
            *extra]


def _json_run(capsys, pair, *extra: str) -> tuple[int, dict, dict]:
    """(exit code, the report, its checks by name) of ``llava-kv selfcheck --json``."""
    code = main(_args(pair, "--json", *extra))
    report = json.loads(capsys.readouterr().out)
    return code, report, {c["name"]: c for c in report["checks"]}


def _check_device_entry(report: dict, check: dict) -> None:
    """Without a device the device check is reported as skipped (with why), never as passed."""
    if report["devices"]:
        assert check["status"] == "pass" and check["figure"] <= DEVICE_TOLERANCE, check
    else:
        assert check["status"] == "skip" and check["passed"] is None and check["figure"] is None, check
        assert "nothing ran on a device" in check["detail"]


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-qwen25vl", "tiny-gemma3"])
def test_selfcheck_passes_on_the_tiny_families(models_dir, capsys, preset):
    pair = make_test_model(models_dir, preset)
    code, report, checks = _json_run(capsys, pair)
    assert code == 0, report
    assert report["ok"] is True and report["counts"]["fail"] == 0
    assert list(checks) == IMAGE_CHECKS + ["device:vs_cpu"]
    for name in IMAGE_CHECKS:
        c = checks[name]
        assert c["status"] == "pass" and c["passed"] is True and c["figure"] is not None, c
        assert c["figure"] <= c["limit"], c
    for name in IMAGE_CHECKS[:-1]:
        assert checks[name]["figure"] == 0 and checks[name]["limit"] == 0  # bitwise, as tests/test_edits.py
        assert "bitwise equal to a fresh session" in checks[name]["detail"]
    # mlp keeps mtmd's chunks (bitwise); the others keep their media markers with the media (1e-3)
    assert checks["reference:mtmd"]["limit"] == (0 if preset == "tiny-llava" else 1e-3)
    _check_device_entry(report, checks["device:vs_cpu"])
    assert len(report["media"]) == 3 and report["n_ctx"] <= 512
    if preset == "tiny-gemma3":  # the question runs past the 64-token window
        assert any("64-token sliding window" in note for note in report["notes"])


def test_text_report_has_one_line_per_check(llava_pair, capsys):
    assert main(_args(llava_pair)) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    for name in IMAGE_CHECKS:
        line = next(x for x in lines if x.split()[1:2] == [name])
        assert line.startswith("PASS ") and "(limit " in line, line
    device = next(x for x in lines if "device:vs_cpu" in x)
    assert device.startswith(("SKIP ", "PASS "))
    assert lines[-1].startswith("OK: all 8 checks passed")
    assert "... edit:append_image" in captured.err  # progress goes to stderr


def test_a_user_image_is_used_with_mirrored_copies(llava_pair, capsys, tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(random_image(7, size=(80, 120))).save(path)
    code, report, checks = _json_run(capsys, llava_pair, "--image", str(path))
    assert code == 0, report
    assert report["media"] == [str(path), f"{path} (mirrored)", f"{path} (upside down)"]
    assert all(checks[name]["status"] == "pass" for name in IMAGE_CHECKS)


def test_audio_projector_checks_every_audio_edit(models_dir, capsys):
    pair = make_test_model(models_dir, "tiny-qwen2a")
    code, report, checks = _json_run(capsys, pair)
    assert code == 0, report
    names = [f"edit:{e.replace('image', 'audio')}" for e in EDITS[:-1]] + ["edit:media.clear()",
                                                                          "reference:mtmd(audio)"]
    assert list(checks) == names + ["device:vs_cpu(audio)"]
    assert all(checks[n]["status"] == "pass" and checks[n]["figure"] == 0 for n in names), checks
    _check_device_entry(report, checks["device:vs_cpu(audio)"])


# -- the checks can fail -------------------------------------------------------------------------


@pytest.mark.parametrize("method, mode, failing", [
    ("replace_image", "blend", "edit:replace_image@first"),
    ("remove_image", "shift", "edit:remove_image(exact)"),
])
def test_an_approximate_edit_fails_its_check(llava_pair, capsys, monkeypatch, method, mode, failing):
    """A session whose edits are approximate (the opt-in modes, forced here) is caught by the check of
    that edit kind, and only by it."""
    original = getattr(lk.Session, method)

    def approximate(self, ref, *args, **kwargs):
        return original(self, ref, *args[:1], mode=mode, **({"k": 0} if mode == "blend" else {}))

    monkeypatch.setattr(lk.Session, method, approximate)
    code, report, checks = _json_run(capsys, llava_pair)
    assert code == 1 and report["ok"] is False
    assert [n for n, c in checks.items() if c["status"] == "fail"] == [failing]
    bad = checks[failing]
    assert bad["passed"] is False and bad["figure"] > 0 and "differs from a fresh session" in bad["detail"]
    assert "approximate (exact=False)" in bad["detail"]
    assert all(c["status"] == "pass" for n, c in checks.items() if n != failing and n != "device:vs_cpu")

    assert main(_args(llava_pair)) == 1
    out = capsys.readouterr().out
    assert f"FAIL  {failing}" in out and out.splitlines()[-1].startswith("FAILED: 1 of 8 checks")


def test_text_tokenized_unlike_mtmd_fails_the_reference_check(llava_pair, capsys, monkeypatch):
    """A session that changes the text it is given (consistently, so a fresh session agrees with
    the edited one) holds other tokens than mtmd's evaluation of the same prompt."""
    original = lk.Session.append_text
    monkeypatch.setattr(lk.Session, "append_text", lambda self, text: original(self, text.replace("USER:", "USER;")))
    code, report, checks = _json_run(capsys, llava_pair)
    assert code == 1
    ref = checks["reference:mtmd"]
    assert ref["status"] == "fail" and "tokens differ from mtmd's" in ref["detail"], ref
    assert all(checks[f"edit:{e}"]["status"] == "pass" for e in EDITS)


def test_device_check_compares_with_a_cpu_copy(models_dir, llava_pair, monkeypatch):
    """The device path, run on a CPU build by calling the CPU a device: a CPU copy agrees bit for bit;
    a 'device' that computes with other weights (a pair of another seed as the CPU copy) fails."""
    monkeypatch.setattr(selfcheck_module, "_devices_used", lambda model: ["Fake0"])
    report = run_selfcheck(str(llava_pair.model_path), str(llava_pair.mmproj_path), n_threads=1)
    device = report.checks[-1]
    assert device.name == "device:vs_cpu" and device.passed is True and device.figure == 0, device
    assert "Fake0 vs CPU, 3 positions compared" in device.detail

    other = make_test_model(models_dir, "tiny-llava", seed=1)
    load = lk.Model.load

    def load_other_on_cpu(model_path, mmproj_path=None, **kw):
        if kw.get("n_gpu_layers") == 0 and kw.get("mmproj_use_gpu") is False:
            model_path, mmproj_path = other.model_path, other.mmproj_path
        return load(model_path, mmproj_path, **kw)

    monkeypatch.setattr(lk.Model, "load", load_other_on_cpu)
    report = run_selfcheck(str(llava_pair.model_path), str(llava_pair.mmproj_path), n_threads=1)
    device = report.checks[-1]
    assert device.passed is False and device.figure > DEVICE_TOLERANCE and not report.ok


def test_device_agreement_rule():
    cpu = np.array([3.0, 1.0, 0.95, -2.0], np.float32)
    assert device_agreement([cpu], [cpu]) == (True, 0.0, "1 positions compared; the same most likely token at each")
    assert device_agreement([cpu], [cpu + 0.05])[0] is True
    assert device_agreement([cpu], [cpu + np.array([0, 0.2, 0, 0], np.float32)])[0] is False  # > 0.1
    # top two 0.05 apart: a rounding difference may swap them
    tie = np.array([1.0, 0.95, 0.0], np.float32)
    ok, figure, detail = device_agreement([tie], [np.array([0.97, 0.98, 0.0], np.float32)])
    assert ok and figure == pytest.approx(0.03, abs=1e-6) and "1 near tie(s)" in detail
    # a clear winner that changes fails, whatever the tolerance
    ok, _, detail = device_agreement([cpu], [np.array([1.0, 3.0, 0.95, -2.0], np.float32)], tolerance=10)
    assert not ok and "most likely token 1 on the device, 0 on the CPU" in detail
    nan = cpu.copy()
    nan[2] = np.nan
    assert device_agreement([cpu], [nan])[:2] == (False, None)


# -- what cannot run is skipped, what is wrong is an error -----------------------------------------


def test_without_a_projector_the_checks_are_skipped_not_passed(llava_pair):
    report = run_selfcheck(str(llava_pair.model_path), None, n_threads=1)
    assert [c.name for c in report.checks] == IMAGE_CHECKS + ["device:vs_cpu"]
    assert all(c.passed is None and c.status == "skip" and c.detail for c in report.checks)
    assert all(c.detail == "no projector given" for c in report.checks[:-1])
    assert report.ok is False  # nothing was checked
    assert report.format_text().splitlines()[-1].startswith("NOTHING CHECKED")


def test_usage_and_model_errors_exit_codes(llava_pair, models_dir, capsys, tmp_path):
    missing = tmp_path / "missing.gguf"
    assert main(["selfcheck", "--model", str(missing), "--mmproj", str(llava_pair.mmproj_path)]) == 2
    assert f"model file not found: {missing}" in capsys.readouterr().err
    assert main(_args(llava_pair, "--image", str(tmp_path / "nope.png"))) == 2
    assert "image file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["selfcheck", "--model", str(llava_pair.model_path)])  # --mmproj is required
    assert e.value.code == 2
    capsys.readouterr()

    assert main(_args(llava_pair, "--n-ctx", "64")) == 1
    assert "n_ctx is 64" in capsys.readouterr().err

    image = tmp_path / "x.png"
    Image.fromarray(random_image(0)).save(image)
    audio = make_test_model(models_dir, "tiny-qwen2a")
    assert main(_args(audio, "--image", str(image))) == 1
    assert "has no vision encoder" in capsys.readouterr().err


def _has_gpu() -> bool:
    return any(d.type in ("gpu", "igpu") for d in lk.devices())


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a GPU build and a visible GPU: this build sees "
                    + ", ".join(d.name for d in lk.devices()))
@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-gemma3"])
def test_selfcheck_on_a_device(models_dir, capsys, preset):
    pair = make_test_model(models_dir, preset)
    code, report, checks = _json_run(capsys, pair, "--n-gpu-layers", "-1")
    assert report["devices"], report
    assert code == 0, report
    assert checks["device:vs_cpu"]["status"] == "pass"
    print({n: c["figure"] for n, c in checks.items()})


@pytest.mark.real
@pytest.mark.slow  # about 1.5 min on 2 idle cores: 16 runs of a 600-token conversation (past the window)
def test_selfcheck_on_real_quantized_weights(gemma_path, capsys):
    """Gemma 3 270M Q4_K_M (the test extra) with a generated projector of its width: edits stay bitwise
    exact past its 512-token window; against mtmd, whose batches differ at each media marker, the
    quantized kernels round differently, and the limit follows the re-batching noise measured on it."""
    code = main(["selfcheck", "--model", str(gemma_path), "--mmproj", str(make_test_projector(640)), "--threads", "2",
                 "--json"])
    report = json.loads(capsys.readouterr().out)
    checks = {c["name"]: c for c in report["checks"]}
    assert code == 0, report
    assert all(checks[name]["figure"] == 0 for name in IMAGE_CHECKS[:-1])
    ref = checks["reference:mtmd"]
    print(f"reference: {ref['figure']:.3g} within {ref['limit']:.3g}: {ref['detail']}")
    assert "when the same tokens are batched otherwise" in ref["detail"] and ref["limit"] > 1e-3
    assert any("512-token sliding window" in note for note in report["notes"])
