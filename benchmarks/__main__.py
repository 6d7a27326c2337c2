import os
import sys

# OpenMP reads OMP_WAIT_POLICY once, when llama.cpp's library loads: set it before anything imports
# llava_kv. Every process the suite starts (peers, llama-server, fresh processes) inherits it, so all
# sides run in the same environment (benchmarks/harness/settings.py says why passive is the default here).
_policy = "passive"
for _i, _arg in enumerate(sys.argv):
    if _arg.startswith("--omp-wait-policy="):
        _policy = _arg.split("=", 1)[1]
    elif _arg == "--omp-wait-policy" and _i + 1 < len(sys.argv):
        _policy = sys.argv[_i + 1]
if _policy == "unset":
    os.environ.pop("OMP_WAIT_POLICY", None)
else:
    os.environ["OMP_WAIT_POLICY"] = _policy

from benchmarks.harness.suite import main  # noqa: E402

raise SystemExit(main())
