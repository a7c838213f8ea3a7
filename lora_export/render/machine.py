"""For machines: JSON that strict parsers read, and JUnit XML with one test case per check."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rendering needs no torch: `--help` and `package --check` import this module
    from ..records import (
        Check,
    )


def to_json(data: Any) -> str:
    """Strict JSON (lora_export.io.jsonio.json_text, without its final newline)."""
    from ..io.jsonio import json_text

    return json_text(data)[:-1]


def write_junit(path: Path, suite: str, checks: Sequence[Check]) -> None:
    """JUnit XML, one test case per check, so CI systems list each check and show a failed one's reasons."""
    failed = sum(1 for c in checks if not c.passed)
    root = ET.Element("testsuites", name=suite, tests=str(len(checks)), failures=str(failed))
    node = ET.SubElement(
        root, "testsuite", name=suite, tests=str(len(checks)), failures=str(failed), errors="0", skipped="0"
    )
    for c in checks:
        case = ET.SubElement(node, "testcase", classname=suite, name=c.name)
        if not c.passed:
            ET.SubElement(case, "failure", message=c.summary, type="CheckFailed").text = (
                "\n".join(c.failures) or c.summary
            )
        ET.SubElement(case, "system-out").text = c.summary
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
