"""The LoRA paper's GLUE setup end to end: RoBERTa and DeBERTa-v2 sequence classifiers with LoRA on the attention's
query and value (PEFT's task_type SEQ_CLS, which also trains the classifier head: modules_to_save), through merge
(= PEFT's merge_and_unload), verify, ONNX in ONNX Runtime and bench; and RoBERTa's position table, which starts after
the padding index, bounding every shape the checks and bench use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from conftest import read_all

from lora_export import MergeOptions, merge
from lora_export.cli import main
from lora_export.model.config import ModelConfig

SIZES = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_labels=3
)
FAMILIES = {
    "roberta": ("Roberta", ["query", "value"], dict(max_position_embeddings=20, pad_token_id=1)),
    "deberta-v2": ("DebertaV2", ["query_proj", "value_proj"], dict(max_position_embeddings=64, pad_token_id=0)),
}


def classifier(root: Path, family: str) -> tuple[Path, Path, Any]:
    """A random classifier and a PEFT SEQ_CLS adapter for it (non-zero B, a trained head); the PEFT model kept."""
    import transformers
    from peft import LoraConfig, get_peft_model

    prefix, targets, settings = FAMILIES[family]
    config = getattr(transformers, f"{prefix}Config")(**SIZES, **settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, f"{prefix}ForSequenceClassification")(config).eval()
        model.save_pretrained(root / "base")
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_CLS"))
        with torch.no_grad():
            for _, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter", peft_model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def paper(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path, Any]:
    root = tmp_path_factory.mktemp(request.param)
    return (request.param, *classifier(root, request.param))


def test_merge_equals_peft_merge_and_unload(paper: tuple[str, Path, Path, Any], tmp_path: Path) -> None:
    _, base, adapter, peft_model = paper
    result = merge(base, [adapter], tmp_path / "merged", MergeOptions(progress=False))
    ours = read_all(result.output)
    theirs = {k: v for k, v in peft_model.merge_and_unload().state_dict().items()}
    for name, tensor in ours.items():
        assert torch.allclose(tensor, theirs[name], rtol=0, atol=1e-6), name
    assert any(
        "classifier" in n for n in result.manifest.tensors if "replaced_by_adapter" in result.manifest.tensors[n]
    )


def test_verify_onnx_and_bench(paper: tuple[str, Path, Path, Any], tmp_path: Path) -> None:
    family, base, adapter, _ = paper
    out = tmp_path / "onnx"
    r = CliRunner().invoke(
        main, ["merge-and-onnx", str(base), str(adapter), "-o", str(out), "--json", str(tmp_path / "r.json")]
    )
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert {c["name"] for c in report["checks"]} >= {"weights (float32)", "merge (float32)", "onnx vs pytorch"}
    assert report["verify"]["model_class"].endswith("ForSequenceClassification")
    r = CliRunner().invoke(
        main, ["bench", str(base), str(adapter), "--backend", "all", "--shapes", "1x8", "--budget", "0.2"]
    )
    assert r.exit_code == 0, r.output
    assert "merged" in r.output and "adapter-H" in r.output


def test_roberta_context_is_the_position_table_less_the_padding_offset(tmp_path: Path) -> None:
    """20 positions, padding index 1: 18 tokens fit (positions 2…19); the checks stay within them and bench refuses
    a longer shape in one line (19 tokens indexed past the table: an internal error before)."""
    base, _, _ = classifier(tmp_path, "roberta")
    assert ModelConfig.load(base).context == 18
    r = CliRunner().invoke(main, ["bench", str(base), str(tmp_path / "adapter"), "--shapes", "1x19"])
    assert r.exit_code == 2 and "longer than the model's context of 18 tokens" in r.output, r.output
