import importlib.util
import os
import sys
from pathlib import Path

from benchmarks.harness.settings import PEER_CPU_VARIANT  # standard library only: llava_kv is not loaded yet


def _early_option(name: str, default: str) -> str:
    """``--name VALUE`` or ``--name=VALUE`` from the command line, read before llama.cpp loads."""
    value = default
    for i, arg in enumerate(sys.argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(sys.argv):
            value = sys.argv[i + 1]
    return value


def _set_env(key: str, value: str, unset: str) -> None:
    if value == unset:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


# OpenMP reads OMP_WAIT_POLICY once, when llama.cpp's library loads: set it before anything imports
# llava_kv. Every process the suite starts (peers, llama-server, fresh processes) inherits it, so all
# sides run in the same environment (benchmarks/harness/settings.py says why passive is the default here).
_set_env("OMP_WAIT_POLICY", _early_option("omp-wait-policy", "passive"), unset="unset")
# Like meets like: the peers (llama-cpp-python, llama-server) are built with GGML_NATIVE=OFF, i.e. ggml's
# "haswell" CPU kernels (AVX2, FMA, F16C, BMI2). llava-kv loads the best CPU variant it has unless told
# otherwise, so it is told the peers' (recorded as cpu_variant in each scenario's settings);
# benchmarks/scenarios/cpu_variants.py measures what the default, best variant gains. --cpu-variant best
# lets llava-kv choose; so does a build for its host alone (LLAVA_KV_CPU_VARIANTS=host), which has no variants.
_variant = _early_option("cpu-variant", PEER_CPU_VARIANT)
_spec = importlib.util.find_spec("llava_kv")
if not any(any(Path(d).glob("*ggml-cpu-*")) for d in (_spec.submodule_search_locations or []) if _spec):
    _variant = "best"
_set_env("LLAVA_KV_CPU_VARIANT", _variant, unset="best")

from benchmarks.harness.suite import main  # noqa: E402

raise SystemExit(main())
