"""`--exporter auto` is a verified choice: the GenAI builder's graph where it builds and passes its check, else the
dynamo graph with the same checks, the builder's failure recorded; known failing configurations are skipped up front;
sliding-window graphs get a KV buffer GenAI accepts; a tokenizer that encodes nothing is refused, not a crash."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import REPO, make_adapter

from lora_export.cli import main
from lora_export.exporting import genai_builder
from lora_export.io.errors import ExportError
from lora_export.model.config import ModelConfig
from lora_export.records import Check

sys.path.insert(0, str(REPO / "tools"))
from make_tiny_model import tiny_decoder  # noqa: E402  (tools/ is not a package)

pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnx_ir")

SMALL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def tiny(folder: Path, family: str, **settings: Any) -> Path:
    return tiny_decoder(folder, family, **{**SMALL, **settings})


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("choice")
    base = tiny(root / "llama", "Llama", max_position_embeddings=128)
    return base, make_adapter(base, root / "adapter", target_modules=["q_proj", "v_proj", "o_proj"])


def report_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text())


def test_auto_ships_dynamo_when_the_builder_fails(
    llama: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails(*args: Any) -> Any:
        raise ExportError("the GenAI model builder failed on X (exit 1): KeyError: 'simulated'")

    monkeypatch.setattr("lora_export.exporting.pipeline.genai_build", fails)
    r = CliRunner().invoke(main, ["merge-and-onnx", *map(str, llama), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    export = report_of(tmp_path / "out")["export"]
    assert export["exporter"] == "torch.onnx.export(dynamo=True)" and "KeyError: 'simulated'" in export["rejected"][0]
    assert export["exporter_choice"].startswith("auto: the GenAI model builder's graph failed here")
    assert "rejected onnxruntime_genai.models.builder" in r.output
    r = CliRunner().invoke(
        main, ["merge-and-onnx", *map(str, llama), "-o", str(tmp_path / "asked"), "--exporter", "genai"]
    )
    assert r.exit_code == 2 and "KeyError: 'simulated'" in r.output and not (tmp_path / "asked").exists()


def test_auto_ships_dynamo_when_the_builder_graph_fails_its_check(
    llama: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The builder's files are removed before the dynamo export: what ships is one exporter's output, whole."""

    def wrong(folder: Path, prompts: Any, references: Any, dtype: str) -> Check:
        return Check("genai vs pytorch", "GenAI vs PyTorch", dtype, False, "worst rel 2 (≤ 0.001)", ("top-1 0%",))

    monkeypatch.setattr("lora_export.exporting.pipeline.genai_logits_check", wrong)
    r = CliRunner().invoke(main, ["merge-and-onnx", *map(str, llama), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    report = report_of(tmp_path / "out")
    assert report["export"]["rejected"] == [
        "onnxruntime_genai.models.builder: genai vs pytorch: worst rel 2 (≤ 0.001) (top-1 0%)"
    ]
    assert {c["name"] for c in report["checks"]} >= {"onnx vs pytorch", "genai generation"}  # the dynamo graph's own
    assert not (tmp_path / "out" / "model.onnx.data").exists()  # the builder's weights went with its graph
    assert 'past_present_share_buffer": false' in (tmp_path / "out" / "genai_config.json").read_text()
    r = CliRunner().invoke(
        main, ["merge-and-onnx", *map(str, llama), "-o", str(tmp_path / "asked"), "--exporter", "genai"]
    )
    assert r.exit_code == 1 and "FAIL  genai vs pytorch" in r.output  # asked for: its failure is the result


@pytest.mark.parametrize(
    ("family", "settings", "reason"),
    [
        ("Phi3", dict(max_position_embeddings=128), "below original_max_position_embeddings (4096)"),
        ("Gemma2", dict(max_position_embeddings=128, sliding_window=4096, head_dim=64), "sliding window (4096)"),
    ],
    ids=["phi3-short-context", "window-over-context"],
)
def test_known_builder_failures_are_skipped_up_front(
    tmp_path: Path, family: str, settings: dict[str, Any], reason: str
) -> None:
    """Each reproduced builder-alone by tools/repro_builder.py; auto then never starts the builder for them."""
    folder = tiny(tmp_path / family, family, **settings)
    found = genai_builder.unsupported_reason(folder)
    assert found is not None and reason in found, found
    assert genai_builder.known_failure(ModelConfig.load(folder)) == found


def test_phi3_with_its_full_context_is_not_skipped() -> None:
    """With context 4096 = original_max_position_embeddings the builder builds it (tools/repro_builder.py)."""
    config = ModelConfig(Path("config.json"), {"architectures": ["Phi3ForCausalLM"], "max_position_embeddings": 4096,
                                               "original_max_position_embeddings": 4096})  # fmt: skip
    assert genai_builder.known_failure(config) is None


def test_a_sliding_window_graph_is_checked_with_a_buffer_of_its_window(tmp_path: Path) -> None:
    """Gemma-2 with a 64-token window in a 4096 context: GenAI refuses a KV buffer shorter than the window (the
    kernel's "capacity must be at least local_window_size"), so the check sizes it; the window does not slide within
    the check's few tokens."""
    folder = tiny(tmp_path / "gemma2", "Gemma2", max_position_embeddings=4096, sliding_window=64, head_dim=64)
    r = CliRunner().invoke(main, ["export", str(folder), "-o", str(tmp_path / "out"), "--exporter", "genai"])
    assert r.exit_code == 0, r.output
    assert "PASS  genai vs pytorch" in r.output


def test_a_tokenizer_that_encodes_nothing_is_refused(tmp_path: Path) -> None:
    """transformers 5 reads a Qwen2 folder's tokenizer.json with its own tokenizer class; a vocabulary it does not
    read encodes every prompt to no tokens: one line naming the tokenizer, exit 2 (was an internal error)."""
    base = tiny(tmp_path / "qwen2", "Qwen2", max_position_embeddings=128)
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    r = CliRunner().invoke(main, ["verify", str(base), str(adapter), str(base)])
    assert r.exit_code == 2, r.output
    assert "encodes prompt 1 ('The capital of France is') to no tokens" in r.output and "Qwen2Tokenizer" in r.output
