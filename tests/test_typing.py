"""The stub of the compiled module matches it, and the package type-checks."""
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# Bound classes: pybind11 gives them its own metaclass, and those without a constructor its own __init__.
CONSTRUCTED = ["StopStrings", "MediaItem", "ChunkKind", "FlashAttn", "KvType", "SamplingParams", "StepSignal"]
NOT_CONSTRUCTED = ["Model", "Session", "BatchRunner", "ChunkInfo", "BatchResult", "Device", "LedgerEntry",
                   "SessionStats", "BatchStats", "EmbeddingCacheStats", "BlendReport", "StateHeader", "MemoryEntry",
                   "MemoryReport", "BuildInfo", "GenerationStep", "Branch", "TokenLogprob", "ReferenceEval",
                   "NativeObjects"]


def test_core_stub_matches_the_compiled_module(tmp_path):
    allow = tmp_path / "allow.txt"
    # pybind11's own class machinery (its metaclass, the no-constructor __init__) is not ours to stub
    allow.write_text(f"llava_kv._core.({'|'.join(CONSTRUCTED + NOT_CONSTRUCTED)})\n"
                     f"llava_kv._core.({'|'.join(NOT_CONSTRUCTED)}).__init__\n")
    # no --ignore-missing-stub: a binding added without its stub fails here
    result = subprocess.run([sys.executable, "-m", "mypy.stubtest", "llava_kv._core", "--allowlist", str(allow)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_type_checks_strictly():
    # pyproject.toml's [tool.mypy] (strict, no ignored imports) is the configuration
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                             "-p", "llava_kv"], capture_output=True, text=True, cwd=ROOT / "python")
    assert result.returncode == 0, result.stdout + result.stderr


def _lacks_doc(obj) -> bool:
    """pybind11 writes a callable's signature as the first line of its __doc__: the text after it is ours."""
    doc = getattr(obj, "__doc__", None) or ""
    if isinstance(obj, property) or isinstance(obj, type):
        return not doc.strip()
    parts = doc.split("\n\n", 1)
    return len(parts) < 2 or not parts[1].strip()


def _enum_value_docs(enum: type) -> dict[str, str]:
    """The docstring pybind11 lists for each value of a bound enum ("  NAME : text" lines of its __doc__)."""
    docs = {name: "" for name in enum.__members__}  # type: ignore[attr-defined]
    for line in (enum.__doc__ or "").splitlines():
        name, _, text = line.strip().partition(" : ")
        if name in docs:
            docs[name] = text.strip()
    return docs


def test_every_binding_has_a_docstring():
    from llava_kv import _core
    from llava_kv._core import _testing

    missing = []
    for module in (_core, _testing):
        for name, obj in vars(module).items():
            if name.startswith("_") or not callable(obj):
                continue
            if _lacks_doc(obj):
                missing.append(f"{module.__name__}.{name}")
            if isinstance(obj, type) and hasattr(obj, "__members__"):  # an enum: pybind11 writes its methods
                missing += [f"{module.__name__}.{name}.{v}" for v, doc in _enum_value_docs(obj).items() if not doc]
            elif isinstance(obj, type):
                for attr, member in vars(obj).items():
                    if isinstance(member, staticmethod):
                        member = member.__func__
                    # a class without a constructor has pybind11's own __init__ (a slot wrapper), not ours
                    public = not attr.startswith("_") or (attr == "__init__" and
                                                          not isinstance(member, types.WrapperDescriptorType))
                    if public and (callable(member) or isinstance(member, property)) and _lacks_doc(member):
                        missing.append(f"{module.__name__}.{name}.{attr}")
    assert not missing, "bindings without a docstring: " + ", ".join(missing)
