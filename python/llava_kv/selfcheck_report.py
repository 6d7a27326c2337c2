"""What ``llava-kv selfcheck`` found: one result per check, the report of a run, and its text form."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CheckResult", "SelfcheckReport"]


@dataclass(frozen=True)
class CheckResult:
    """One check: ``passed`` is None when it did not run (``detail`` says why)."""

    name: str
    passed: bool | None
    figure: float | None  # what was measured (None: not measured, or not a finite number)
    limit: float | None  # passes when figure <= limit (and whatever ``detail`` names agrees)
    measure: str  # what ``figure`` is, e.g. "max |logit - fresh|"
    detail: str
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return "skip" if self.passed is None else "pass" if self.passed else "fail"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "passed": self.passed, "figure": self.figure,
                "limit": self.limit, "measure": self.measure, "detail": self.detail,
                "seconds": round(self.seconds, 3)}


@dataclass
class SelfcheckReport:
    """What :func:`run_selfcheck` measured; ``ok`` when at least one check ran and none failed."""

    model_path: str
    mmproj_path: str | None
    n_gpu_layers: int
    main_gpu: str | None
    n_ctx: int = 0
    n_batch: int = 0
    devices: list[str] = field(default_factory=list)  # devices other than the CPU that held weights
    media: list[str] = field(default_factory=list)  # what the conversation showed
    notes: list[str] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if c.passed is False]

    @property
    def ok(self) -> bool:
        return not self.failed and any(c.passed for c in self.checks)

    def counts(self) -> dict[str, int]:
        out = {"pass": 0, "fail": 0, "skip": 0}
        for c in self.checks:
            out[c.status] += 1
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "counts": self.counts(), "model": self.model_path, "mmproj": self.mmproj_path,
                "n_gpu_layers": self.n_gpu_layers, "main_gpu": self.main_gpu, "devices": self.devices,
                "n_ctx": self.n_ctx, "n_batch": self.n_batch, "media": self.media, "notes": self.notes,
                "seconds": round(self.seconds, 3), "checks": [c.as_dict() for c in self.checks]}

    def format_text(self) -> str:
        """One line per check (status, name, figure against limit, what was seen), then a verdict."""
        lines = [f"llava-kv selfcheck: {Path(self.model_path).name}"
                 + (f" + {Path(self.mmproj_path).name}" if self.mmproj_path else "")
                 + f" on {', '.join(self.devices) or 'CPU'} (n_ctx {self.n_ctx}, n_batch {self.n_batch})"]
        lines += [f"  media: {', '.join(self.media)}"] if self.media else []
        lines += [f"  note: {note}" for note in self.notes]
        width = max((len(c.name) for c in self.checks), default=0)
        for c in self.checks:
            figure = "" if c.passed is None else f"{c.measure} = {_number(c.figure)} (limit {_number(c.limit)}); "
            lines.append(f"{c.status.upper():4}  {c.name:{width}}  {figure}{c.detail}")
        n = self.counts()
        ran = n["pass"] + n["fail"]
        verdict = (f"FAILED: {n['fail']} of {ran} checks" if n["fail"] else
                   f"OK: all {ran} checks passed" if ran else "NOTHING CHECKED: no check could run")
        lines.append(f"{verdict} ({n['skip']} skipped), {self.seconds:.1f} s")
        return "\n".join(lines)


def _number(x: float | None) -> str:
    return "-" if x is None else "0" if x == 0 else f"{x:.3g}"
