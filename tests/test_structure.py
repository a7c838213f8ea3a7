""" "No added latency", counted: a merged model runs exactly the base's computation (operators, FLOPs, parameter bytes;
for ONNX, the same graph up to initializer values), and unmerged LoRA adds exactly its matmuls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_adapter, run_merge

from lora_export.model.loading import load_model
from lora_export.verification.lora_runtime import load_unmerged
from lora_export.verification.structure import onnx_structure, torch_structure

TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "llama-tied": ["q_proj", "o_proj", "lm_head"],
    "llama-bias": ["q_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc"],
    "bert": ["query", "value"],
    "qwen2": ["q_proj", "k_proj", "up_proj"],
    "mistral": ["q_proj", "v_proj", "gate_proj"],
    "phi": ["q_proj", "dense"],
    "opt": ["q_proj", "fc1"],
}


def inputs_for(folder: Path, batch: int = 2, seq: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 90, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_merged_is_the_base_computation_and_lora_adds_its_matmuls(
    models_dir: Path, tmp_path: Path, family: str
) -> None:
    base = models_dir / family
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=TARGETS[family])
    code, output = run_merge(base, adapter, tmp_path / "merged")
    assert code == 0, output
    inputs = inputs_for(base)
    tokens = inputs["input_ids"].numel()
    base_s = torch_structure(load_model(base), inputs)
    merged_s = torch_structure(load_model(tmp_path / "merged"), inputs)
    if family != "llama-tied":  # an adapted lm_head of a tied model is stored untied: more bytes, same computation
        assert merged_s.same_as(base_s), merged_s.added_over(base_s)
    assert (merged_s.flops, merged_s.ops) == (base_s.flops, base_s.ops)
    unmerged = load_unmerged(base, [adapter])
    lora_params = sum(t.numel() for m in unmerged.modules() for t in _lora_factors(m))
    added = torch_structure(unmerged, inputs).added_over(base_s)
    assert added["flops"] == 2 * tokens * lora_params, added  # x·Aᵀ then ·Bᵀ: 2·tokens·r·(in + out)
    assert added["ops"].get("mm", 0) + added["ops"].get("addmm", 0) + added["ops"].get("bmm", 0) > 0, added


def _lora_factors(module: torch.nn.Module) -> list[torch.Tensor]:
    """A LoraLayer's A and B of every branch (buffers lora_A_i, lora_B_i)."""
    return [b for n, b in module.named_buffers(recurse=False) if n.startswith(("lora_A_", "lora_B_"))]


def test_onnx_signature_is_the_graph_up_to_initializer_values(models_dir: Path, tmp_path: Path) -> None:
    """The dynamo export of the merged model and of the base: the same nodes, attributes and initializer names,
    shapes and dtypes (one signature); a graph with another node is another signature."""
    import onnx
    from click.testing import CliRunner

    from lora_export.cli import main

    base = models_dir / "llama"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    assert run_merge(base, adapter, tmp_path / "merged")[0] == 0
    for name, folder in (("b", base), ("m", tmp_path / "merged")):
        r = CliRunner().invoke(main, ["export", str(folder), "-o", str(tmp_path / name), "--exporter", "dynamo"])
        assert r.exit_code == 0, r.output
    b, m = onnx_structure(tmp_path / "b" / "model.onnx"), onnx_structure(tmp_path / "m" / "model.onnx")
    assert m.same_as(b) and b.signature and sum(b.ops.values()) > 10
    graph = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False)
    graph.graph.node.append(onnx.helper.make_node("Identity", ["logits"], ["extra"]))
    onnx.save(graph, str(tmp_path / "m" / "other.onnx"))
    assert onnx_structure(tmp_path / "m" / "other.onnx").signature != b.signature


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_the_dynamo_graph_of_a_merged_model_is_the_base_graph(models_dir: Path, tmp_path: Path, family: str) -> None:
    """Every family, dynamo exporter (as bench exports it): the merged graph is the base graph up to initializer
    values; a tied model whose lm_head the adapter changed stores lm_head untied — one more initializer, same ops."""
    from lora_export.exporting.onnx import OnnxOptions, export_onnx

    base = models_dir / family
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=TARGETS[family])
    assert run_merge(base, adapter, tmp_path / "merged")[0] == 0
    for name, folder in (("b", base), ("m", tmp_path / "merged")):
        (tmp_path / name).mkdir()
        export_onnx(load_model(folder), tmp_path / name / "model.onnx", OnnxOptions(with_past=False))
    b, m = onnx_structure(tmp_path / "b" / "model.onnx"), onnx_structure(tmp_path / "m" / "model.onnx")
    if family == "llama-tied":
        assert m.ops == b.ops and m.param_bytes > b.param_bytes, m.added_over(b)
    else:
        assert m.same_as(b), m.added_over(b)


@pytest.mark.parametrize("kind", ["H", "L"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapter_baselines_add_flops_from_their_parameter_counts(models_dir: Path, family: str, kind: str) -> None:
    """bench's adapter-H / adapter-L: the FLOPs they add per forward are exactly their matmuls, 2·tokens·(weights of
    their down and up projections), consistent with AdapterPlan.params; and they add operator calls per adapter."""
    from lora_export.bench.baselines import insert_adapters, plan_adapters

    base = load_model(models_dir / family)
    inputs = inputs_for(models_dir / family)
    tokens = inputs["input_ids"].numel()
    before = torch_structure(base, inputs)
    plan = plan_adapters(base, kind, 2_000)
    inserted = insert_adapters(base, plan)
    added = torch_structure(base, inputs).added_over(before)
    matmul_weights = inserted * 2 * plan.dim * plan.bottleneck
    assert added["flops"] == 2 * tokens * matmul_weights, (added, plan)
    biases_and_norms = plan.params - matmul_weights  # bias vectors (and LayerNorm for L): no matmul FLOPs
    assert biases_and_norms == inserted * (plan.bottleneck + plan.dim + (2 * plan.dim if kind == "L" else 0))
    assert added["param_bytes"] == 4 * plan.params and added["op_calls"] > 0
