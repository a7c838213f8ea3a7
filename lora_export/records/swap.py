"""What swap reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .checks import Check, CheckedReport


@dataclass(frozen=True)
class SwapReport(CheckedReport):
    removed: str
    removed_weight: float
    added: str
    output: str
    dtype: str
    base: str | None  # the original base, when it is still where the merge manifest says
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        """Every check passed. Without the original base there is nothing to compare with: no check ran, and the
        report's text says the result was not compared (as it did before swap went through `conclude`)."""
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "checks": [c.to_dict() for c in self.checks], "passed": self.passed}
