"""Issue 24: ONNX rows count FLOPs from the graph at the cell's shapes, so that "merged = base" and "LoRA unmerged adds
2·tokens·|Θ|" are exact equalities on every backend: PyTorch's counter and the graph's agree on each variant, for the
dynamo exporter's graphs (bench) and the GenAI builder's (float and MatMulNBits)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_model, make_adapter, run_cli

from lora_export.bench.bench_genai import genai_input_shapes, graph_inputs
from lora_export.verification.onnx_flops import onnx_flops
from lora_export.verification.structure import torch_structure

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bench_all_backends_count_flops_in_every_cell(models_dir: Path, tmp_path: Path, family: str) -> None:
    base = models_dir / family
    target = ["q_proj", "v_proj"] if family == "llama" else ["c_attn"]
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=target)
    report = tmp_path / "bench.json"
    code, out = run_cli(["bench", str(base), str(adapter), "--backend", "all", "--shapes", "1x8,2x5", "--budget",
                         "0.05", "--json", str(report)])  # fmt: skip
    assert code == 0, out
    data = json.loads(report.read_text())
    rows = {(r["variant"], r["backend"]): r for r in data["rows"]}
    assert {b for _, b in rows} == {"torch", "onnxruntime"}
    lora = rows[("lora-unmerged", "torch")]["params"]
    for shape, tokens in (("1/8", 8), ("2/5", 10)):
        flops = {key: row["cells"][shape]["flops"] for key, row in rows.items()}
        assert all(isinstance(f, int) and f > 0 for f in flops.values()), flops
        for variant in ("base", "base-copy", "merged", "lora-unmerged", "adapter-H", "adapter-L"):
            assert flops[(variant, "onnxruntime")] == flops[(variant, "torch")], (variant, shape, flops)
        for backend in ("torch", "onnxruntime"):
            assert flops[("merged", backend)] == flops[("base", backend)]
            assert flops[("lora-unmerged", backend)] - flops[("base", backend)] == 2 * tokens * lora


@pytest.fixture(scope="module")
def builder_graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tools/make_tiny_model.py's LLaMA built by the GenAI builder in float32 and in int4 (MatMulNBits)."""
    pytest.importorskip("onnxruntime_genai")
    root = tmp_path_factory.mktemp("builder")
    subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_model.py"), str(root)], check=True)
    for precision in ("fp32", "int4"):
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(root / "base"), "-o",
                        str(root / precision), "-p", precision, "-e", "cpu", "-c", str(root / "cache")],
                       check=True, capture_output=True)  # fmt: skip
    return root


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_builder_graph_flops_equal_pytorch(builder_graphs: Path, precision: str) -> None:
    """The builder's fused graph (GroupQueryAttention, MatMulNBits at int4) counts what PyTorch counts for the model,
    at a prompt and at a decode step with a past."""
    model = load_model(builder_graphs / "base")
    graph = builder_graphs / precision / "model.onnx"
    inputs = graph_inputs(graph)
    for batch, seq in ((1, 12), (2, 7)):
        ids = torch.randint(0, 90, (batch, seq))
        expected = torch_structure(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}).flops
        assert onnx_flops(graph, genai_input_shapes(inputs, batch, seq, 0)) == expected
    # one new token after 12: attention reads 13 keys; PyTorch counts the same with a cache of 12
    step = onnx_flops(graph, genai_input_shapes(inputs, 1, 1, 12))
    prompt = onnx_flops(graph, genai_input_shapes(inputs, 1, 12, 0))
    assert step is not None and prompt is not None and 0 < step < prompt


def test_unknown_matrix_op_counts_nothing(tmp_path: Path) -> None:
    """A graph with a matrix op the counter does not know gets None, never a low number."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("Einsum", ["x", "x"], ["y"], equation="ij,ij->ij")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 20)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert onnx_flops(tmp_path / "m.onnx", {"x": (1, 4)}) is None
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])  # a dynamic first dimension, as exported
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.ones(16, dtype=np.float32))
    graph = helper.make_graph([matmul], "g", [x], [y], initializer=[w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(tmp_path / "mm.onnx"))
    assert onnx_flops(tmp_path / "mm.onnx", {"x": (3, 4)}) == 2 * 3 * 4 * 4


@pytest.mark.parametrize("exporter", ["genai", "dynamo"])
def test_package_bench_counts_what_an_active_adapter_adds(builder_graphs: Path, tmp_path: Path, exporter: str) -> None:
    """The shared graph with an adapter active adds exactly 2·tokens·|Θ| (its A/B are inputs, counted at the
    adapter's shapes); with none active, and each merged variant, it computes the base's FLOPs."""
    root = builder_graphs
    (tmp_path / "variants.yaml").write_text(f"variants:\n  caps:\n    adapters: [{root / 'adapter'}]\n")
    pkg = tmp_path / "pkg"
    code, out = run_cli(["package", str(root / "base"), "--variants", str(tmp_path / "variants.yaml"), "-o", str(pkg),
                         "--exporter", exporter])  # fmt: skip
    assert code == 0, out
    report = tmp_path / "bench.json"
    code, out = run_cli(["bench", "--package", str(pkg), "--backend", "onnxruntime", "--shapes", "1x8,2x5", "--budget",
                         "0.05", "--json", str(report)])  # fmt: skip
    assert code == 0, out
    rows = {r["variant"]: r for r in json.loads(report.read_text())["rows"]}
    params = rows["caps shared+adapter"]["params"]
    assert params > 0
    for shape, tokens in (("1/8", 8), ("2/5", 10)):
        flops = {name: row["cells"][shape]["flops"] for name, row in rows.items()}
        assert flops["base"] == flops["base-copy"] == flops["caps merged"] > 0, flops
        assert flops["caps shared+adapter"] - flops["base"] == 2 * tokens * params, flops
    if exporter == "genai":  # in GenAI: the prefill, and a generated token's average over the steps
        code, out = run_cli(["bench", "--package", str(pkg), "--backend", "genai", "--shapes", "1x8", "--budget", "0.05",
                             "--json", str(report)])  # fmt: skip
        assert code == 0, out
        rows = {r["variant"]: r for r in json.loads(report.read_text())["rows"]}
        for cell, tokens in (("prefill 1/8", 8), ("decode ms/token 1/8+16", 1)):
            flops = {name: row["cells"][cell]["flops"] for name, row in rows.items()}
            assert flops["base"] == flops["caps merged"] > 0, flops
            assert flops["caps shared+adapter"] - flops["base"] == 2 * tokens * params, flops
