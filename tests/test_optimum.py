"""Optimum loads what lora-export writes and generates PyTorch's tokens: ORTModelForCausalLM + AutoTokenizer on the
folder as written. optimum-onnx needs transformers < 4.58, so these run in tools/test_transformers4.sh's
environment; elsewhere they are skipped. LORA_EXPORT_GENAI_OUTPUT names a merge-and-onnx output made by the GenAI
model builder (the script makes one with the main environment, which has onnxruntime-genai)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("optimum.onnxruntime")
REPO = Path(__file__).resolve().parents[1]


def optimum_tokens(folder: Path, prompt: str, n: int) -> list[int]:
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True, use_io_binding=False)
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1] :].tolist()


def pytorch_tokens(folder: Path, prompt: str, n: int) -> list[int]:
    """The merged model in PyTorch (folder/merged), with the tokenizer beside the ONNX graph."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = AutoModelForCausalLM.from_pretrained(folder / "merged").generate(
            **ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return out[0, ids["input_ids"].shape[1] :].tolist()


PROMPT = "w5 w9 w17 w33 w40 w41"


def test_optimum_runs_the_dynamo_output(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_model.py"), str(tmp_path)], check=True)
    out = tmp_path / "onnx"
    from click.testing import CliRunner

    from lora_export.cli import main

    args = ["merge-and-onnx", str(tmp_path / "base"), str(tmp_path / "adapter"), "-o", str(out), "--exporter", "dynamo"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    expected = pytorch_tokens(out, PROMPT, 8)
    assert optimum_tokens(out, PROMPT, 8) == expected


@pytest.mark.skipif(not os.environ.get("LORA_EXPORT_GENAI_OUTPUT"), reason="no GenAI builder output given")
def test_optimum_runs_the_genai_builder_output() -> None:
    out = Path(os.environ["LORA_EXPORT_GENAI_OUTPUT"])
    assert (out / "genai_config.json").is_file()  # it is the builder's folder
    assert optimum_tokens(out, PROMPT, 8) == pytorch_tokens(out, PROMPT, 8)


def test_optimum_runs_the_encoder_output(models_dir: Path, tmp_path: Path) -> None:
    """A BERT classifier exported by lora-export loads in Optimum's ORTModelForSequenceClassification and gives
    PyTorch's logits."""
    from click.testing import CliRunner
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification

    from lora_export.cli import main

    out = tmp_path / "bert"
    r = CliRunner().invoke(main, ["export", str(models_dir / "bert"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    ids = torch.randint(1, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    got = ORTModelForSequenceClassification.from_pretrained(out)(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        ref = AutoModelForSequenceClassification.from_pretrained(models_dir / "bert")(
            input_ids=ids, attention_mask=mask
        )
    assert torch.allclose(torch.as_tensor(got), ref.logits, atol=1e-4), (got, ref.logits)
