"""report.json of merge-and-onnx and export."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..io.jsonio import Fields, read_json, write_json
from .checks import Check, CheckedReport
from .merge import FileRecord

REPORT_FIX = "run lora-export merge-and-onnx or export again"


@dataclass(frozen=True)
class PipelineReport(CheckedReport):
    command: str
    inputs: Mapping[str, Any]
    sections: Mapping[str, Mapping[str, Any]]  # merge, verify, export: what each stage did
    checks: tuple[Check, ...]
    seconds: float
    versions: Mapping[str, str]
    output_files: tuple[FileRecord, ...] = ()

    NAME = "report.json"
    SECTIONS = ("merge", "verify", "export")

    @property
    def export(self) -> Mapping[str, Any]:
        return self.sections.get("export", {})

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": "lora-export",
            "command": self.command,
            "passed": self.passed,
            "inputs": dict(self.inputs),
            **{k: dict(v) for k, v in self.sections.items()},
            "checks": [c.to_dict() for c in self.checks],
            "seconds": self.seconds,
            "versions": dict(self.versions),
            "output_files": [asdict(f) for f in self.output_files],
        }

    def write(self, folder: Path) -> None:
        write_json(folder / self.NAME, self.to_dict())

    @classmethod
    def load(cls, folder: Path) -> PipelineReport:
        path = folder / cls.NAME
        return cls.from_dict(read_json(path, REPORT_FIX), path)

    @classmethod
    def from_dict(cls, data: Any, path: Path) -> PipelineReport:
        f = Fields(data, path, fix=REPORT_FIX, label="damaged report")
        report = cls(
            command=f.get("command", str),
            inputs=f.get("inputs", dict, {}),
            sections={k: f.get(k, dict) for k in cls.SECTIONS if k in f.data},
            checks=tuple(Check.from_fields(c) for c in f.items("checks")),
            seconds=f.get("seconds", float, 0.0),
            versions=f.get("versions", dict, {}),
            output_files=tuple(FileRecord.from_fields(x) for x in f.items("output_files", [])),
        )
        if f.get("passed", bool) != report.passed:
            f.fail("passed", "disagrees with its checks")
        return report
