"""Run fuzz targets for a bounded time, each in its own process; exit 1 on any finding.

    python -m tests.fuzz.run                         # every target, 60 s each
    python -m tests.fuzz.run --target gguf_mmproj --seconds 3600

New inputs that reach new code go to tests/fuzz/work/<target>/ (not the checked-in seeds); the
input behind any crash, abort, hang or unexpected exception is kept as
tests/fuzz/crashes/<target>-crash-<sha1> (both folders are git-ignored). Replay one with
``python -m tests.fuzz.targets <target> tests/fuzz/crashes/<file>``.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .targets import CORPUS, TARGETS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@dataclass
class Result:
    target: str
    seconds: float
    execs: int
    returncode: int
    findings: list[Path]
    log_tail: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.findings


def run_target(target: str, seconds: int, *, crashes: Path = HERE / "crashes", work: Path = HERE / "work",
               per_input_timeout: int = 60, rss_limit_mb: int = 4096) -> Result:
    crashes.mkdir(parents=True, exist_ok=True)
    (work / target).mkdir(parents=True, exist_ok=True)
    before = set(crashes.glob(f"{target}-*"))
    cmd = [sys.executable, "-m", "tests.fuzz.targets", target, f"-max_total_time={seconds}",
           f"-timeout={per_input_timeout}", f"-rss_limit_mb={rss_limit_mb}", "-print_final_stats=1",
           f"-artifact_prefix={crashes}/{target}-", str(work / target), str(CORPUS / target)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, errors="replace",
                              timeout=seconds + 120 + per_input_timeout)
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, log = -1, f"{e.stdout or ''}{e.stderr or ''}\nthe fuzzer did not stop in time"
    elapsed = time.monotonic() - t0
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log) or re.findall(r"Done (\d+) runs", log)
    findings = sorted(set(crashes.glob(f"{target}-*")) - before)
    return Result(target, elapsed, int(runs[-1]) if runs else 0, rc, findings, log[-4000:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", action="append", choices=TARGETS, help="repeatable; default: all")
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per target (default 60)")
    args = parser.parse_args(argv)
    failed = False
    for target in args.target or TARGETS:
        r = run_target(target, args.seconds)
        status = "ok" if r.ok else f"FAILED (exit {r.returncode})"
        print(f"{target}: {r.execs} inputs in {r.seconds:.0f} s: {status}", flush=True)
        for path in r.findings:
            print(f"  finding: {path}")
        if not r.ok:
            failed = True
            print(r.log_tail, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
