"""The stub of the compiled module matches it, and the package type-checks."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_core_stub_matches_the_compiled_module(tmp_path):
    allow = tmp_path / "allow.txt"
    # pybind11's own class machinery (its metaclass, the no-constructor __init__) is not ours to stub
    allow.write_text("llava_kv._core.(Model|Session|BatchRunner|ChunkInfo|BatchResult|StopStrings|Device|LedgerEntry)\n"
                     "llava_kv._core.(Model|Session|BatchRunner|ChunkInfo|BatchResult|Device|LedgerEntry).__init__\n")
    result = subprocess.run([sys.executable, "-m", "mypy.stubtest", "llava_kv._core", "--allowlist", str(allow),
                             "--ignore-missing-stub"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_type_checks():
    result = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent",
                             "-p", "llava_kv"], capture_output=True, text=True, cwd=ROOT / "python")
    assert result.returncode == 0, result.stdout + result.stderr
