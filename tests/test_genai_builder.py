"""The second exporter: ONNX Runtime GenAI's model builder on the merged folder, checked in GenAI against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_adapter

from lora_export.cli import main
from lora_export.exporters.genai_builder import genai_logits_check
from lora_export.lora_runtime import load_model

pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnx_ir")


def add_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over the tiny model's 96 ids: the builder saves the model's tokenizer beside the graph."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(96)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2", pad_token="w3")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA whose head size (16) GroupQueryAttention accepts, with a tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("builder") / "llama"
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        LlamaForCausalLM(config).save_pretrained(folder)
    add_tokenizer(folder)
    return folder


def test_merge_and_onnx_with_the_genai_builder(base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main,
        ["merge-and-onnx", str(base), str(adapter), "-o", str(out), "--exporter", "genai", "--max-new-tokens", "6"],
    )
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["exporter"] == "onnxruntime_genai.models.builder"
    genai = next(c for c in report["checks"] if c["name"] == "genai vs pytorch")
    assert genai["passed"] and {m["case"].split(" step ")[1] for m in genai["metrics"]} >= {"0", "1", "5"}
    assert json.loads((out / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is True
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert "GroupQueryAttention" in ops  # the fused graph, not the dynamo one


def test_genai_check_fails_against_another_model(base: Path, tmp_path: Path, models_dir: Path) -> None:
    """The builder's graph of the base, checked against a merged model: the logits differ, the check fails."""
    r = CliRunner().invoke(main, ["export", str(base), "-o", str(tmp_path / "b"), "--exporter", "genai"])
    assert r.exit_code == 0, r.output
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    from lora_export.lora_runtime import load_unmerged

    check = genai_logits_check(tmp_path / "b", load_unmerged(base, [adapter]), [[5, 6, 7, 8]], 4, "float32")
    assert not check.passed and any("rel error" in f for f in check.failures)
    same = genai_logits_check(tmp_path / "b", load_model(base), [[5, 6, 7, 8]], 4, "float32")
    assert same.passed, same.failures


def test_auto_and_refusals(models_dir: Path, tmp_path: Path) -> None:
    """auto falls back to dynamo and says why; --exporter genai on what the builder cannot build is refused."""
    r = CliRunner().invoke(main, ["export", str(models_dir / "gpt2"), "-o", str(tmp_path / "g"), "--exporter", "auto"])
    assert r.exit_code == 0, r.output
    choice = json.loads((tmp_path / "g" / "report.json").read_text())["export"]["exporter_choice"]
    assert choice == "auto: the GenAI model builder does not build GPT2LMHeadModel"
    r = CliRunner().invoke(
        main, ["export", str(models_dir / "llama"), "-o", str(tmp_path / "n"), "--exporter", "genai"]
    )
    assert r.exit_code == 2 and "multiple of 16 (this model: 8)" in r.output and not (tmp_path / "n").exists()
