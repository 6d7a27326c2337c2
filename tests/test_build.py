import importlib.util
import io
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import llava_kv as lk

ROOT = Path(__file__).resolve().parent.parent
PINNED_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"


def test_build_info_reports_commit_backends_devices():
    info = lk.build_info()
    assert info["llama_cpp_commit"] == PINNED_COMMIT
    assert "CPU" in info["backends"]
    cpu = [d for d in info["devices"] if d.type == "cpu"]
    assert cpu and cpu[0].total > 0
    assert [d.as_dict() for d in info["devices"]] == [d.as_dict() | {"free": d2.free, "allocated": d2.allocated}
                                                     for d, d2 in zip(info["devices"], lk.devices())]
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


def _fetch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_llama_cpp.py"), *args],
                          capture_output=True, text=True)


def _fetch_module():
    spec = importlib.util.spec_from_file_location("fetch_llama_cpp", ROOT / "scripts" / "fetch_llama_cpp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fetch_script_fetches_again_when_the_pin_moved(tmp_path):
    fetch = _fetch_module()
    bogus = tmp_path / fetch.SDIST_FILE
    bogus.write_bytes(b"not the pinned sdist")
    dest = tmp_path / "llama.cpp"
    dest.mkdir()
    (dest / "CMakeLists.txt").write_text("# an extracted tree\n")
    # A stamp with the pinned sha256 and commit: nothing to do (the sdist is not even looked at).
    (dest / fetch.STAMP).write_text(fetch.stamp_text())
    current = _fetch("--sdist", str(bogus), "--dest", str(dest))
    assert current.returncode == 0 and "already holds the pinned source" in current.stderr, current.stderr
    # A stamp of another release or commit (the pin was bumped since): fetch again, which here
    # reaches the hash check of the (bogus) sdist and fails, leaving the old tree as it was.
    # A tree extracted before the build needed more of the source (the stamp's "files" line, which
    # names what was taken, differs or is missing) is fetched again the same way.
    older = "".join(line for line in fetch.stamp_text().splitlines(keepends=True) if not line.startswith("files "))
    for stale in (fetch.stamp_text().replace(fetch.LLAMA_CPP_COMMIT, "1" * 40),
                  fetch.stamp_text().replace(fetch.SDIST_SHA256, "0" * 64), older):
        (dest / fetch.STAMP).write_text(stale)
        result = _fetch("--sdist", str(bogus), "--dest", str(dest))
        assert result.returncode == 1, result.stderr
        assert "but the pin is" in result.stderr and "fetching the pinned source again" in result.stderr
        assert f"expected {fetch.SDIST_SHA256}" in result.stderr
        assert (dest / fetch.STAMP).read_text() == stale and (dest / "CMakeLists.txt").exists()


def test_fetch_script_leaves_a_tree_it_did_not_extract(tmp_path):
    dest = tmp_path / "llama.cpp"
    dest.mkdir()
    (dest / "CMakeLists.txt").write_text("# the user's own checkout\n")
    result = _fetch("--sdist", str(tmp_path / "missing.tar.gz"), "--dest", str(dest))
    assert result.returncode == 0 and "left as it is" in result.stderr, result.stderr
    assert [p.name for p in dest.iterdir()] == ["CMakeLists.txt"]


def _sdist(path: Path, fetch, members: dict[str, tuple[bytes, int]]) -> Path:
    """A tar.gz laid out like the pinned sdist, holding ``members`` (name -> (content, mode))."""
    prefix = f"llama_cpp_python-{fetch.SDIST_VERSION}/vendor/llama.cpp/"
    with tarfile.open(path, "w:gz") as tar:
        for name, (content, mode) in members.items():
            info = tarfile.TarInfo(prefix + name)
            info.size, info.mode, info.uid, info.gid, info.uname, info.gname = len(content), mode, 4321, 4321, "x", "x"
            tar.addfile(info, io.BytesIO(content))
    return path


@pytest.mark.parametrize("data_filter", [True, False], ids=["data-filter", "before-3.9.17"])
def test_extraction_is_safe_with_and_without_the_data_filter(tmp_path, monkeypatch, data_filter):
    fetch = _fetch_module()
    if not data_filter:  # what Pythons before 3.9.17 / 3.10.12 / 3.11.4 have
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python has no tarfile data filter")
    good = _sdist(tmp_path / "good.tar.gz", fetch, {
        "CMakeLists.txt": (b"project(llama)\n", 0o4777),  # setuid, world-writable: both dropped
        "src/llama.cpp": (b"// source\n", 0o644),
        "tools/mtmd/test-1.jpeg": (b"sample media", 0o644),  # not needed: left out
        "docs/readme.md": (b"not needed", 0o644),
        "common/json-schema-to-grammar.cpp": (b"// the converter\n", 0o644),  # needed: taken
        "common/arg.cpp": (b"// the tool stack\n", 0o644),  # the rest of common/: left out
    })
    dest = tmp_path / "llama.cpp"
    fetch.extract(good, dest)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == \
        [fetch.STAMP, "CMakeLists.txt", "common/json-schema-to-grammar.cpp", "src/llama.cpp"]
    assert (dest / "src" / "llama.cpp").read_bytes() == b"// source\n"
    assert stat.S_IMODE((dest / "CMakeLists.txt").stat().st_mode) & 0o7022 == 0
    assert (dest / fetch.STAMP).read_text() == fetch.stamp_text()

    # A member whose path leaves the tree is refused: nothing is written outside, dest is kept.
    evil = _sdist(tmp_path / "evil.tar.gz", fetch, {"CMakeLists.txt": (b"x", 0o644),
                                                    "src/../../../escaped.txt": (b"x", 0o644)})
    with pytest.raises(SystemExit):
        fetch.extract(evil, dest)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert (dest / "src" / "llama.cpp").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".llama.cpp-")] == []
