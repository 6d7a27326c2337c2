import json
import subprocess
import sys


def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "llava_kv", *args], capture_output=True, text=True, timeout=300, **kw)


def test_make_test_model_cli(tmp_path):
    result = _run("make-test-model", "--preset", "tiny-gemma3", "--out", str(tmp_path), "--seed", "2")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["preset"] == "tiny-gemma3" and out["image_tokens"] == 9 and "random weights" in out["note"]
    assert (tmp_path / "tiny-gemma3-s2.gguf").is_file() and (tmp_path / "tiny-gemma3-s2-mmproj.gguf").is_file()


def test_demo_runs_end_to_end_and_says_weights_are_random(tmp_path):
    result = _run("demo", env={"LLAVA_KV_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "RANDOM" in result.stdout
    assert "replace_image" in result.stdout and "embed cache hits 1" in result.stdout
    assert "model.closed=True" in result.stdout


def test_info_reports_build_and_model(llava_pair):
    result = _run("info", "--model", str(llava_pair.model_path), "--mmproj", str(llava_pair.mmproj_path))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["build"]["llama_cpp_commit"].startswith("0c1e5709")
    assert info["model"]["has_vision"] is True and info["model"]["memory"]["weights"]["CPU"] > 0


def test_help_texts():
    for args in (["--help"], ["demo", "--help"], ["info", "--help"], ["make-test-model", "--help"]):
        result = _run(*args)
        assert result.returncode == 0 and "usage:" in result.stdout
