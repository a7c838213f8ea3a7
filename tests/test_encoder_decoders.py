"""Encoder-decoders (T5, BART, Whisper) with PEFT SEQ_2_SEQ_LM adapters: merge equals PEFT's merge_and_unload,
verify checks the decoder's logits and greedy tokens (and fails a merge of another adapter), the greedy tokens are
PEFT's own, and the exporters refuse them in one line (their ONNX is an encoder and a decoder-with-past graph,
which lora-export does not build)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from conftest import read_all

from lora_export import MergeOptions, VerifyOptions, merge, verify
from lora_export.cli import main
from lora_export.model.config import ModelConfig
from lora_export.verification.seq2seq import seq2seq_cases, seq2seq_greedy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from make_tiny_model import SEQ2SEQ, tiny_seq2seq  # noqa: E402  (tools/ is not a package)


def adapter(base: Path, out: Path, seed: int) -> Any:
    """A PEFT SEQ_2_SEQ_LM adapter on the attention's projections, every trainable tensor perturbed; the PEFT model."""
    import transformers
    from peft import LoraConfig, get_peft_model

    config = ModelConfig.load(base)
    model = getattr(transformers, config.architecture).from_pretrained(base).eval()
    targets = SEQ2SEQ[config.data["model_type"]][3]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_2_SEQ_LM")
        )
        with torch.no_grad():
            for _, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(out)
    return peft_model.eval()


@pytest.fixture(scope="module", params=sorted(SEQ2SEQ))
def seq2seq(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Any]:
    root = tmp_path_factory.mktemp(request.param)
    base = tiny_seq2seq(root / "base", request.param)
    peft_model = adapter(base, root / "a", seed=1)
    adapter(base, root / "b", seed=2)
    return base, root / "a", root / "b", peft_model


def test_merge_equals_peft_and_verify_checks_tokens(seq2seq: tuple[Path, Path, Path, Any], tmp_path: Path) -> None:
    base, a, _, peft_model = seq2seq
    result = merge(base, [a], tmp_path / "merged", MergeOptions(progress=False))
    ours = read_all(result.output)
    case = seq2seq_cases(ModelConfig.load(base), None, (), 0)[0]
    start = ModelConfig.load(base).decoder_start
    peft_tokens = seq2seq_greedy(peft_model.get_base_model(), case.inputs, 12, start)  # PEFT LoRA at run time
    theirs = peft_model.merge_and_unload().state_dict()
    assert result.manifest.merged_tensors > 0
    for name, tensor in ours.items():
        assert torch.allclose(tensor, theirs[name], rtol=0, atol=1e-6), name
    report = verify(base, [a], result.output, VerifyOptions(max_new_tokens=12))
    assert report.passed, [c.summary for c in report.checks]
    assert {c.name for c in report.checks} == {"weights (float32)", "merge (float32)", "generation (float32)"}
    assert report.generation is not None and list(report.generation.float32.reference) == peft_tokens
    assert all("decoder_shape" in c for c in report.cases)


def test_verify_fails_another_adapters_merge(seq2seq: tuple[Path, Path, Path, Any], tmp_path: Path) -> None:
    base, a, b, _ = seq2seq
    merged = merge(base, [b], tmp_path / "merged-b", MergeOptions(progress=False)).output
    report = verify(base, [a], merged, VerifyOptions(max_new_tokens=12))
    failed = {c.name for c in report.checks if not c.passed}
    assert {"weights (float32)", "merge (float32)"} <= failed
    assert report.diagnosis is not None and report.diagnosis.first_divergence is not None


@pytest.mark.parametrize("command", ["merge-and-onnx", "export", "bench", "package"])
def test_exporters_refuse_in_one_line(seq2seq: tuple[Path, Path, Path, Any], tmp_path: Path, command: str) -> None:
    base, a, _, _ = seq2seq
    out = tmp_path / "out"
    args = {
        "merge-and-onnx": [str(base), str(a), "-o", str(out)],
        "export": [str(base), "-o", str(out)],
        "bench": [str(base), str(a), "--shapes", "1x8", "--budget", "0.1"],
        "package": [str(base), "--variants", str(tmp_path / "variants.json"), "-o", str(out), "--mode", "shared"],
    }[command]
    (tmp_path / "variants.json").write_text(json.dumps({"variants": {"a": {"adapters": [str(a)]}}}))
    r = CliRunner().invoke(main, [command, *args])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "encoder-decoder" in errors[0], r.output
    assert not out.exists()
