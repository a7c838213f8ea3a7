"""docs/support.md is current: it is what docs/support.json renders to, every family and column of
tools/support_matrix.py has its cell, each row was run with the settings the tool has now, the figures the matrix
promises hold (merge and verify pass for every row; no family where the default command fails while an exporter
passes), and the merge, verify and default-export cells come out the same when run again here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import support_matrix as sm  # noqa: E402  (tools/ is not a package)

DATA = json.loads(sm.JSON.read_text())


def test_page_is_what_the_cells_render_to() -> None:
    assert sm.MARKDOWN.read_text() == sm.render(DATA), "run: python tools/support_matrix.py --render"


def test_every_family_and_column_run_with_the_tools_settings() -> None:
    assert list(DATA["rows"]) == list(sm.FAMILIES), "families changed: run python tools/support_matrix.py FAMILY…"
    assert DATA["columns"] == sm.COLUMNS
    for family, row in DATA["rows"].items():
        assert row["settings"] == sm.settings_of(family), f"{family}'s model changed since its row was run"
        assert set(row["cells"]) == set(sm.COLUMNS), family
        for column, cell in row["cells"].items():
            assert cell["status"] in sm.MARK and cell["why"], (family, column)


def test_the_figures() -> None:
    for family, row in DATA["rows"].items():
        cells = row["cells"]
        assert cells["merge"]["status"] == "ok" and cells["verify"]["status"] == "ok", family
        if "ok" in (cells["onnx"]["status"], cells["genai"]["status"]):  # an exporter passes: so does the default
            assert cells["auto"]["status"] == "ok", family


@pytest.mark.parametrize("family", list(sm.FAMILIES))
def test_cells_come_out_the_same_again(family: str) -> None:
    """Merge and verify for every row; the default merge-and-onnx too where it exports (decoders and classifiers)."""
    columns = ["merge", "verify"] + (["auto"] if sm.FAMILIES[family]["task"] == "causal-lm" else [])
    again = sm.run_family(family, columns)
    recorded = DATA["rows"][family]["cells"]
    for column in columns:
        assert again[column]["status"] == recorded[column]["status"], (column, again[column], recorded[column])
