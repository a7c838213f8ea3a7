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


# The default merge-and-onnx is re-run for one decoder per way it ships (the builder's graph: llama, qwen3; dynamo
# where the builder does not build the family: gpt2, gemma3) — all 13 decoders cost CI a minute more; the full
# matrix (python tools/support_matrix.py) re-runs every cell.
AUTO_AGAIN = {"llama", "qwen3", "gpt2", "gemma3"}


@pytest.mark.parametrize("family", list(sm.FAMILIES))
def test_cells_come_out_the_same_again(family: str) -> None:
    """Merge and verify for every row; the default merge-and-onnx too for a decoder of each way it ships."""
    columns = ["merge", "verify"] + (["auto"] if family in AUTO_AGAIN else [])
    again = sm.run_family(family, columns)
    recorded = DATA["rows"][family]["cells"]
    for column in columns:
        assert again[column]["status"] == recorded[column]["status"], (column, again[column], recorded[column])
