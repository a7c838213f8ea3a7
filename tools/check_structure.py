"""Report modules over 400 lines and functions over 60 lines in the package, tests, tools and examples (exit 1 if any).

python tools/check_structure.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE, MAX_FUNCTION = 400, 60
ROOT = Path(__file__).resolve().parents[1]


def problems(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        source = path.read_text()
        lines = len(source.splitlines())
        if lines > MAX_MODULE:
            found.append(f"{path.relative_to(ROOT)}: {lines} lines (> {MAX_MODULE})")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION:
                    found.append(
                        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines (> {MAX_FUNCTION})"
                    )
    return found


if __name__ == "__main__":
    files = sorted(p for folder in ("lora_export", "tests", "tools", "examples") for p in (ROOT / folder).rglob("*.py"))
    found = problems(files)
    print("\n".join(found) or f"{len(files)} files: no module over {MAX_MODULE} lines, no function over {MAX_FUNCTION}")
    sys.exit(1 if found else 0)
