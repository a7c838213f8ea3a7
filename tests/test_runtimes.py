"""Folders that production runtimes load as written: ONNX Runtime GenAI (genai_config.json from the model's config
and the graph's names) and transformers 4.x/5.x tokenizers (a portable tokenizer_config.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_export.exporting.onnx import OnnxOptions
from lora_export.exporting.pipeline import ExportOptions, export
from lora_export.exporting.runtime_files import GENAI_CONFIG, genai_check, portable_tokenizer_config
from lora_export.model.loading import load_model

og = pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def exported(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("genai") / "llama-onnx"
    result = export(models_dir / "llama", out, ExportOptions(onnx=OnnxOptions(max_new_tokens=8)))
    assert result.passed, result.report.failed
    return out


def test_export_writes_a_folder_genai_runs(exported: Path, models_dir: Path) -> None:
    """og.Model loads the folder as written; its greedy tokens are PyTorch's (checked again here, independently)."""
    config = json.loads((exported / GENAI_CONFIG).read_text())
    assert config["search"]["past_present_share_buffer"] is False  # the dynamo graph concatenates its cache
    assert config["model"]["decoder"]["inputs"]["position_ids"] == "position_ids"
    assert config["model"]["decoder"]["num_key_value_heads"] == 2 and config["model"]["vocab_size"] == 96
    report = json.loads((exported / "report.json").read_text())
    genai = next(c for c in report["checks"] if c["name"] == "genai generation")
    assert genai["passed"] and len(genai["details"]["tokens"]) == 8

    model = og.Model(str(exported))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=4 + 12)
    generator = og.Generator(model, params)
    generator.append_tokens([5, 6, 7, 8])
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = load_model(models_dir / "llama").generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False
        )
    assert tokens == ref[0, 4:].tolist()


def test_genai_check_fails_on_a_folder_genai_cannot_run(exported: Path, tmp_path: Path) -> None:
    """A config naming an input the graph does not have: GenAI cannot run the folder, and the check fails."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    config = json.loads((broken / GENAI_CONFIG).read_text())
    config["model"]["decoder"]["inputs"]["input_ids"] = "tokens"  # a name the graph does not have
    (broken / GENAI_CONFIG).write_text(json.dumps(config))
    check = genai_check(broken, [5, 6, 7, 8], [1, 2, 3], "float32")
    assert not check.passed and "could not run" in check.failures[0]


def test_tokenizer_config_that_transformers_4_and_5_read(tmp_path: Path) -> None:
    """transformers 5's TokenizersBackend becomes PreTrainedTokenizerFast; the tokenizer loads with the same ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "TokenizersBackend", "unk_token": "<unk>"})
    )
    assert portable_tokenizer_config(src / "tokenizer_config.json", dst / "tokenizer_config.json")
    (dst / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    data = json.loads((dst / "tokenizer_config.json").read_text())
    assert data["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert data["model_input_names"] == ["input_ids", "attention_mask"]
    loaded = AutoTokenizer.from_pretrained(dst)
    assert isinstance(loaded, PreTrainedTokenizerFast) and loaded("hello world")["input_ids"] == [1, 2]
    assert "token_type_ids" not in loaded("hello world")
