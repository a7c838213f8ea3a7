"""Check results: the one shape of a check, of compared outputs, and of every checking command's report."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..io.jsonio import Fields
from .sections import Diagnosis, Generation, StructureSummary


@dataclass(frozen=True)
class Metrics:
    """One compared output of one input case. Relative errors are max |a − b| / max |reference| over valid tokens."""

    case: str
    output: str
    max_abs: float
    max_rel: float
    min_cosine: float
    top1: float | None = None  # share of tokens whose argmax agrees (reported; near-ties may flip legitimately)
    flip_gap: float | None = None
    max_kl: float | None = None


@dataclass(frozen=True)
class Check:
    """One check of any command: its name, what it compares at which dtype, the verdict and why."""

    name: str
    compares: str
    dtype: str
    passed: bool
    summary: str
    failures: tuple[str, ...] = ()
    metrics: tuple[Metrics, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # lists given by callers become tuples: a record compares equal to its reload
        object.__setattr__(self, "failures", tuple(self.failures))
        object.__setattr__(self, "metrics", tuple(self.metrics))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failures": list(self.failures), "metrics": [asdict(m) for m in self.metrics]}

    @classmethod
    def from_fields(cls, f: Fields) -> Check:
        metrics = []
        for m in f.items("metrics", []):  # measured values may be NaN or infinite: that is what failed
            numbers = {k: m.get(k, float, finite=False) for k in ("max_abs", "max_rel", "min_cosine")}
            optional = {k: m.get(k, float, None, optional=True, finite=False) for k in ("top1", "flip_gap", "max_kl")}
            metrics.append(Metrics(m.get("case", str), m.get("output", str), **numbers, **optional))
        return cls(
            name=f.get("name", str),
            compares=f.get("compares", str, ""),
            dtype=f.get("dtype", str, ""),
            passed=f.get("passed", bool),
            summary=f.get("summary", str, ""),
            failures=f.strings("failures", []),
            metrics=tuple(metrics),
            details=f.get("details", dict, {}),
        )


class CheckedReport:
    """What every checking command returns: its checks, and `passed` when all of them passed."""

    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]


@dataclass(frozen=True)
class VerifyReport(CheckedReport):
    """`lora-export verify`: merged vs unmerged (weights, outputs, generation), with the tolerances it used."""

    base: str
    adapters: list[str]
    weights: list[float]
    merged: str
    model_class: str
    merged_dtype: str
    tolerances: dict[str, dict[str, float]]
    cases: list[dict[str, Any]]
    checks: tuple[Check, ...]
    generation: Generation | None
    diagnosis: Diagnosis | None
    placement: dict[str, dict[str, int]] | None = None  # modules per device of each device-mapped model
    structure: StructureSummary | None = None  # counted per forward: the merged model's, what unmerged LoRA adds
    sources: dict[str, Any] | None = None  # {path: Hub source} for the inputs that came from the Hub cache

    def to_dict(self) -> dict[str, Any]:
        typed = {"generation": self.generation, "diagnosis": self.diagnosis, "structure": self.structure}
        return {
            **asdict(self),
            **{k: None if v is None else v.to_dict() for k, v in typed.items()},
            "checks": [c.to_dict() for c in self.checks],
            "passed": self.passed,
        }
