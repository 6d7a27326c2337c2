import subprocess
import sys
from pathlib import Path

import llava_kv as lk

ROOT = Path(__file__).resolve().parent.parent
PINNED_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"


def test_build_info_reports_commit_backends_devices():
    info = lk.build_info()
    assert info["llama_cpp_commit"] == PINNED_COMMIT
    assert "CPU" in info["backends"]
    cpu = [d for d in info["devices"] if d["type"] == "cpu"]
    assert cpu and cpu[0]["memory_total"] > 0
    assert info["version"] == lk.__version__


def test_fetch_script_refuses_a_wrong_hash(tmp_path):
    bogus = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    bogus.write_bytes(b"not the pinned sdist")
    dest = tmp_path / "llama.cpp"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_llama_cpp.py"), "--sdist", str(bogus),
                             "--dest", str(dest)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "sha256" in result.stderr and "expected 832db069" in result.stderr
    assert not dest.exists()


def test_package_exports_the_contract():
    for name in ["Model", "Session", "ImageRef", "LlavaKVError", "ModelLoadError", "ImageError",
                 "ContextFullError", "ClosedError", "build_info"]:
        assert name in lk.__all__ and hasattr(lk, name)
    assert issubclass(lk.ClosedError, ValueError) and issubclass(lk.ClosedError, lk.LlavaKVError)
    assert issubclass(lk.LlavaKVError, RuntimeError)
