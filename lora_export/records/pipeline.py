"""report.json of merge-and-onnx and export."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..io.jsonio import Fields
from .checks import Check, CheckedReport
from .merge import FileRecord
from .sections import ExportSection, MergeSection, VerifySection
from .stored import StoredRecord

REPORT_FIX = "run lora-export merge-and-onnx or export again"


@dataclass(frozen=True)
class PipelineReport(CheckedReport, StoredRecord):
    """report.json: the inputs, what each stage did (merge and verify for merge-and-onnx; export for both), every
    check, and the files written."""

    command: str
    inputs: Mapping[str, Any]
    merge: MergeSection | None
    verify: VerifySection | None
    export: ExportSection | None
    checks: tuple[Check, ...]
    seconds: float
    versions: Mapping[str, str]
    output_files: tuple[FileRecord, ...] = ()

    NAME = "report.json"
    FIX = REPORT_FIX

    def to_dict(self) -> dict[str, Any]:
        stages = {"merge": self.merge, "verify": self.verify, "export": self.export}
        return {
            "tool": "lora-export",
            "command": self.command,
            "passed": self.passed,
            "inputs": dict(self.inputs),
            **{k: v.to_dict() for k, v in stages.items() if v is not None},
            "checks": [c.to_dict() for c in self.checks],
            "seconds": self.seconds,
            "versions": dict(self.versions),
            "output_files": [asdict(f) for f in self.output_files],
        }

    @classmethod
    def from_dict(cls, data: Any, path: Path) -> PipelineReport:
        f = Fields(data, path, fix=REPORT_FIX, label="damaged report")

        def stage(key: str, record: Any) -> Any:
            section = f.sub(key, None)
            return None if section is None else record.from_fields(section)

        report = cls(
            command=f.get("command", str),
            inputs=f.get("inputs", dict, {}),
            merge=stage("merge", MergeSection),
            verify=stage("verify", VerifySection),
            export=stage("export", ExportSection),
            checks=tuple(Check.from_fields(c) for c in f.items("checks")),
            seconds=f.get("seconds", float, 0.0),
            versions=f.get("versions", dict, {}),
            output_files=tuple(FileRecord.from_fields(x) for x in f.items("output_files", [])),
        )
        if f.get("passed", bool) != report.passed:
            f.fail("passed", "disagrees with its checks")
        return report
