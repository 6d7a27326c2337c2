#!/usr/bin/env python3
"""Populate third_party/llama.cpp from the pinned, hash-checked llama.cpp source.

The source is the llama.cpp tree vendored in the PyPI sdist of llama-cpp-python at a pinned
version: pip fetches it by name (no registry address is written here), the sha256 is checked,
and only the folders the build needs are extracted. The sdist is cached so that rebuilds and
CI do not download 76 MB again.

Exit status is non-zero with a message saying what to do when the download fails or the hash
does not match.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
SDIST_TREE = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"  # the llama.cpp tree inside the sdist

# What the build of llama + ggml (all backends, so any can be chosen at build time) + mtmd needs,
# and of common/ the JSON Schema -> grammar converter with what it includes.
NEEDED = ("CMakeLists.txt", "LICENSE", "cmake/", "include/", "src/", "ggml/", "vendor/",
          "licenses/", "tools/mtmd/",
          "common/common.h", "common/json.h", "common/json.cpp", "common/json-schema.h", "common/json-schema.cpp",
          "common/json-schema-to-grammar.h", "common/json-schema-to-grammar.cpp", "common/trie.h",
          "common/trie.cpp", "common/unicode.h", "common/unicode.cpp")
# Inside tools/mtmd only the library sources are needed, not its sample media.
SKIPPED_SUFFIXES = (".jpeg", ".jpg", ".mp3", ".mp4", ".png", ".wav")
STAMP = ".llava-kv-source"


def default_cache_dir() -> Path:
    """llava-kv's cache folder, as the package defines it (python/llava_kv/paths.py, loaded by path:
    the package is not installed yet while it is being built)."""
    spec = importlib.util.spec_from_file_location(
        "llava_kv_paths", Path(__file__).resolve().parent.parent / "python" / "llava_kv" / "paths.py")
    assert spec is not None and spec.loader is not None
    paths = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paths)
    return paths.cache_dir()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fail(message: str) -> "NoReturn":  # type: ignore[name-defined]  # noqa: F821
    print(f"fetch_llama_cpp: error: {message}", file=sys.stderr)
    sys.exit(1)


def cached_sdist(cache_dir: Path) -> Path:
    """Return the verified sdist, downloading it into the cache when absent or corrupt."""
    target = cache_dir / SDIST_FILE
    if target.exists():
        if sha256_of(target) == SDIST_SHA256:
            return target
        print(f"fetch_llama_cpp: cached {target} has the wrong sha256; downloading it again",
              file=sys.stderr)
        target.unlink()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-binary", SDIST_NAME, f"{SDIST_NAME}=={SDIST_VERSION}", "-d", tmp]
        print("fetch_llama_cpp: " + " ".join(cmd), file=sys.stderr)
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        downloaded = Path(tmp) / SDIST_FILE
        if result.returncode != 0 or not downloaded.exists():
            fail(f"could not download {SDIST_NAME}=={SDIST_VERSION} with pip "
                 f"(exit {result.returncode}):\n{result.stdout[-2000:]}\n"
                 "Check that PyPI is reachable, or place the sdist in "
                 f"{cache_dir}, or point the build at your own llama.cpp checkout with "
                 "LLAVA_KV_LLAMA_CPP_DIR=/path/to/llama.cpp.")
        actual = sha256_of(downloaded)
        if actual != SDIST_SHA256:
            fail(f"{SDIST_FILE} has sha256 {actual}, expected {SDIST_SHA256}. The download is "
                 "corrupt or not the pinned release; delete it and retry, or set "
                 "LLAVA_KV_LLAMA_CPP_DIR to a llama.cpp checkout at commit "
                 f"{LLAMA_CPP_COMMIT}.")
        shutil.move(str(downloaded), target)
    return target


def stamp_text() -> str:
    """What a tree extracted from the pinned source records in its STAMP file: the source, and which
    of its files were taken (a tree extracted before NEEDED grew is then fetched again)."""
    needed = hashlib.sha256("\n".join(NEEDED).encode()).hexdigest()[:16]
    return f"{SDIST_FILE} sha256 {SDIST_SHA256}\ncommit {LLAMA_CPP_COMMIT}\nfiles {needed}\n"


def recorded_source(dest: Path) -> str | None:
    """The source ``dest``'s STAMP records (its lines joined by "; "), or None without a stamp."""
    try:
        text = (dest / STAMP).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or "an empty stamp"


def check_member(name: str) -> str:
    """``name`` (a path inside the extracted tree) if it stays inside it, else fail. The "data"
    extraction filter checks this too, where Python has it; on older Pythons this is the check."""
    parts = name.split("/")
    if name.startswith(("/", "\\")) or ".." in parts or any(":" in p or "\\" in p for p in parts):
        fail(f"the sdist holds an unsafe path {name!r} (absolute, or leaving the tree): not extracting it. "
             "The file is not the pinned release; delete it from the cache and retry.")
    return name


def sanitize(member: tarfile.TarInfo) -> None:
    """What tarfile's "data" filter does to a file or folder, for Pythons without it (before
    3.9.17, 3.10.12, 3.11.4): no setuid/setgid/sticky or group/other write bits, owner read/write
    on files, and the extracting user as owner (an extraction run as root would chown otherwise)."""
    member.mode = 0o755 if member.isdir() else (member.mode & 0o755) | 0o600
    member.uid, member.gid = (os.getuid(), os.getgid()) if hasattr(os, "getuid") else (0, 0)
    member.uname = member.gname = ""


def extract(sdist: Path, dest: Path) -> None:
    prefix = SDIST_TREE
    staging = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=dest.parent))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(prefix):
                    continue
                rel = m.name[len(prefix):]
                if not rel or not any(rel == n or rel.startswith(n) for n in NEEDED):
                    continue
                if rel.startswith("tools/mtmd/") and rel.endswith(SKIPPED_SUFFIXES):
                    continue
                if not (m.isfile() or m.isdir()):  # links and devices: nothing the build needs
                    continue
                m.name = check_member(rel)
                members.append(m)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(staging, members=members, filter="data")
            else:
                for m in members:
                    sanitize(m)
                tar.extractall(staging, members=members)
        (staging / STAMP).write_text(stamp_text())
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parent.parent
    parser.add_argument("--dest", type=Path, default=root / "third_party" / "llama.cpp")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--force", action="store_true",
                        help="extract again even if --dest already holds the pinned source, or a tree of its own")
    parser.add_argument("--sdist", type=Path, default=None,
                        help=f"use this {SDIST_FILE} instead of the cache or a download (still hash-checked)")
    args = parser.parse_args()

    dest: Path = args.dest.resolve()
    if not args.force and dest.is_dir() and any(dest.iterdir()):
        recorded = recorded_source(dest)
        if recorded is None:
            print(f"fetch_llama_cpp: {dest} has no {STAMP} stamp, so it is not a tree this script extracted: "
                  "left as it is (--force replaces it with the pinned source)", file=sys.stderr)
            return 0
        pinned = "; ".join(stamp_text().splitlines())
        if recorded == pinned and (dest / "CMakeLists.txt").exists():
            print(f"fetch_llama_cpp: {dest} already holds the pinned source", file=sys.stderr)
            return 0
        print(f"fetch_llama_cpp: {dest} holds {recorded}, but the pin is {pinned}: fetching the pinned "
              "source again", file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if args.sdist is not None:
        actual = sha256_of(args.sdist) if args.sdist.is_file() else "missing"
        if actual != SDIST_SHA256:
            fail(f"{args.sdist} has sha256 {actual}, expected {SDIST_SHA256}: not the pinned "
                 f"{SDIST_NAME} {SDIST_VERSION} sdist. Use the right file, or drop --sdist to download it.")
        sdist = args.sdist
    else:
        sdist = cached_sdist(args.cache_dir)
    extract(sdist, dest)
    print(f"fetch_llama_cpp: llama.cpp {LLAMA_CPP_COMMIT[:12]} extracted to {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
