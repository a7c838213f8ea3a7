"""benchmarks/scaling.md and its JSON (tools/bench_scale.py: long sweeps, run by hand; the committed output checked
here): the page shows the tables its JSON renders to, and the figures the page states hold in the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import bench_scale  # noqa: E402

GIB = 2**30


def test_the_page_shows_what_the_json_holds() -> None:
    page = (REPO / "benchmarks" / "scaling.md").read_text()
    assert "\n".join(bench_scale.tables()) in page
    assert (REPO / "benchmarks" / "scaling.png").is_file()


def test_the_committed_figures() -> None:
    rows = json.loads((REPO / "benchmarks" / "scaling-variants.json").read_text())["rows"]
    one = rows["merge-and-onnx (1 adapter)"][0]
    tenth = (rows["package --mode both, 10 variants"][0] - rows["package --mode both, 3 variants"][0]) / 7
    assert tenth <= 0.5 * one  # the figure for the 10th variant (the 3-variant one is short: the page says so)
    sizes = json.loads((REPO / "benchmarks" / "scaling-sizes.json").read_text())["sizes"]
    assert set(sizes) == {"135m", "360m", "1b", "1.7b"}
    for name, size in sizes.items():
        fp32, r = 4 * size["parameters"], size["rows"]
        assert r["merge"][1] < 0.5 * GIB, name  # streamed: flat in the model's size
        assert r["verify"][1] < 1.3 * fp32 + GIB, name  # one float32 model at a time
        assert r["merge-and-onnx"][1] <= 1.3 * fp32 + r["GenAI builder alone"][1], name
    capped = sizes["1.7b"]["rows"]["verify, --max-memory cpu=2611MiB"]
    assert capped[1] < 4 * sizes["1.7b"]["parameters"]  # verified in less memory than its float32 copy
