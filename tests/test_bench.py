"""bench: variants really differ where they should, statistics are right, outputs are written. No wall-clock asserts."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_adapter

from lora_export.bench import BenchOptions, bench
from lora_export.bench.baselines import BottleneckAdapter, insert_adapters, plan_adapters
from lora_export.bench.timing import bootstrap_ratio, percentile, verdicts
from lora_export.cli import main
from lora_export.cli.main import parse_shapes
from lora_export.model.loading import load_model

QUICK = BenchOptions(shapes=((1, 8), (2, 16)), budget_s=0.05, min_rounds=5, max_rounds=20, warmup=1, progress=False)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "opt", "phi"])
def test_adapter_baselines_run_in_the_forward_pass(models_dir: Path, family: str) -> None:
    model = load_model(models_dir / family)
    ids = {
        "input_ids": torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0)),
        "attention_mask": torch.ones(1, 8, dtype=torch.long),
    }
    with torch.no_grad():
        before = model(**ids)[0]
    for kind, per_block in (("H", 2), ("L", 1)):
        m = load_model(models_dir / family)
        plan = plan_adapters(m, kind, 20_000)
        assert insert_adapters(m, plan) == per_block * 2  # two blocks in the tiny models
        calls = []
        for mod in m.modules():
            if isinstance(mod, BottleneckAdapter):
                mod.register_forward_hook(lambda *_, c=calls: c.append(1))
        with torch.no_grad():
            after = m(**ids)[0]
        assert len(calls) == per_block * 2 and not torch.allclose(before, after)
        added = sum(
            p.numel()
            for mod in m.modules()
            if isinstance(mod, BottleneckAdapter)
            for n, p in mod.named_parameters()
            if not n.startswith("inner.")
        )
        assert added == plan.params
        assert abs(plan.params - 20_000) <= 2 * plan.dim * plan.blocks * per_block + 2 * plan.dim  # nearest bottleneck


def test_statistics() -> None:
    assert percentile([1, 2, 3, 4, 5], 0.5) == 3 and percentile([1, 2, 3, 4, 5], 0.1) == pytest.approx(1.4)
    base = [10.0 + 0.1 * (i % 3) for i in range(30)]
    same = list(base)
    slower = [t * 1.3 for t in base]
    lo, hi = bootstrap_ratio(same, base, 0)
    assert lo <= 1.0 <= hi and hi - lo < 0.02
    lo, hi = bootstrap_ratio(slower, base, 0)
    assert 1.29 < lo <= hi < 1.31
    assert parse_shapes("1x128, 16X256") == ((1, 128), (16, 256))
    with pytest.raises(ValueError):
        parse_shapes("1x")


def test_verdicts_name_a_slower_merged_model() -> None:
    from lora_export.bench.timing import Row, summarize

    rows = [Row("base", "torch", 0, ""), Row("merged", "torch", 0, ""), Row("adapter-H", "torch", 10, "")]
    base = [10.0 + 0.01 * i for i in range(20)]
    summarize(
        rows,
        "1/8",
        {("base", "torch"): base, ("merged", "torch"): list(base), ("adapter-H", "torch"): [t * 1.2 for t in base]},
        0,
    )
    lines = verdicts(rows, ["1/8"])
    assert "merged indistinguishable from base" in lines[0] and "+20.0%" in lines[1]
    summarize(
        rows,
        "1/8",
        {("base", "torch"): base, ("merged", "torch"): [t * 1.05 for t in base], ("adapter-H", "torch"): base},
        0,
    )
    assert "NOT shown indistinguishable" in verdicts(rows, ["1/8"])[0]


def test_bench_quick_all_variants(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "llama"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    result = bench(base, [adapter], QUICK)
    assert [r.variant for r in result.rows] == [
        "base",
        "base-copy",
        "merged",
        "lora-unmerged",
        "adapter-H",
        "adapter-L",
    ]
    lora = result.rows[3].params
    assert lora == 2 * (4 * (32 + 32) + 4 * (32 + 16))  # two layers of q (32→32) and v (32→16), r = 4
    for row in result.rows:
        assert set(row.cells) == {"1/8", "2/16"}
        for cell in row.cells.values():
            assert len(cell.runs_ms) >= 5 and cell.p10_ms <= cell.median_ms <= cell.p90_ms
            assert cell.median_ms == pytest.approx(statistics.median(cell.runs_ms))
            assert cell.ci_low <= cell.ratio <= cell.ci_high
    assert any("merged" in v for v in result.verdicts)
    assert result.environment["threads"] >= 1 and result.environment["torch"]


def test_bench_cli_writes_json_markdown_plot(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "gpt2"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["c_attn"])
    r = CliRunner().invoke(
        main,
        [
            "bench",
            str(base),
            str(adapter),
            "--quick",
            "--backend",
            "all",
            "--budget",
            "0.05",
            "--threads",
            "1",
            "--json",
            str(tmp_path / "b.json"),
            "--markdown",
            str(tmp_path / "b.md"),
            "--plot",
            str(tmp_path / "b.png"),
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "b.json").read_text())
    assert {(row["variant"], row["backend"]) for row in data["rows"]} == {
        (v, b)
        for v in ("base", "base-copy", "merged", "lora-unmerged", "adapter-H", "adapter-L")
        for b in ("torch", "onnxruntime")
    }
    assert data["environment"]["threads"] == 1 and "onnxruntime" in data["environment"]
    graphs = {row["variant"]: row for row in data["rows"] if row["backend"] == "onnxruntime"}
    assert graphs["merged"]["structure"]["identical_to_base"] and graphs["base-copy"]["structure"]["identical_to_base"]
    for variant in ("lora-unmerged", "adapter-H", "adapter-L"):  # each adds nodes to the base graph, and weights
        added = graphs[variant]["structure"]["graph_adds"]
        assert not graphs[variant]["structure"]["identical_to_base"] and added["op_calls"] > 0, (variant, added)
        assert added["param_bytes"] == 4 * graphs[variant]["params"], (variant, added)
    nodes = graphs["base"]["structure"]["graph_nodes"]
    torch_rows = {row["variant"]: row for row in data["rows"] if row["backend"] == "torch"}
    for shape, cell in graphs["merged"]["cells"].items():  # counted from the graph: the base's, and PyTorch's
        assert cell["op_calls"] == nodes and cell["flops"] == graphs["base"]["cells"][shape]["flops"] > 0
        assert cell["flops"] == torch_rows["merged"]["cells"][shape]["flops"]
    for cell, base_cell in zip(torch_rows["merged"]["cells"].values(), torch_rows["base"]["cells"].values()):
        assert cell["flops"] == base_cell["flops"] > 0 and cell["ops"] == base_cell["ops"]
        assert sum(cell["ops"].values()) == cell["op_calls"]
    md = (tmp_path / "b.md").read_text()
    flops = [f"{c['flops'] / 1e9:.3f} / {nodes}" for c in graphs["merged"]["cells"].values()]
    assert f"| merged | onnxruntime | yes | {' | '.join(flops)} |" in md, md
    assert "| variant | backend | added params | 1/16 | 2/32 |" in md and "Verdicts" in md
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(main, ["bench", str(base)])
    assert bad.exit_code == 2


def test_paper_table1_keeps_every_shapes_structure(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--paper-table1 measures each shape in its own run (adapters sized per shape) and joins them: every shape's
    cells, and every shape's counted additions, survive the join (here on the tiny GPT-2 instead of GPT-2 medium)."""
    import shutil

    from lora_export.bench import bench_model as run

    def tiny(folder: Path, rank: int = 4, seed: int = 0) -> tuple[Path, Path]:
        base = shutil.copytree(models_dir / "gpt2", folder / "gpt2")
        return base, make_adapter(base, folder / "lora", target_modules=["c_attn"])

    monkeypatch.setattr(run, "build_paper_model", tiny)
    options = BenchOptions(shapes=((1, 8), (2, 8)), budget_s=0.02, min_rounds=3, max_rounds=4, warmup=1, progress=False)
    result = run.paper_table1(options)
    assert result.shapes == ["1/8", "2/8"]
    rows = {r.variant: r for r in result.rows}
    assert rows["merged"].structure == {"identical_to_base": True}
    for variant in ("lora-unmerged", "adapter-H", "adapter-L"):
        adds = rows[variant].structure["adds_per_forward"]
        assert set(adds) == {"1/8", "2/8"} and adds["2/8"]["flops"] == 2 * adds["1/8"]["flops"] > 0, (variant, adds)
        assert all(c.flops and c.ops for c in rows[variant].cells.values())
