"""The demo: its answer check, and the reuse of a verified output when nothing that determines it changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import make_adapter

from lora_export.demo import demo


@pytest.mark.parametrize(
    "answer,problem",
    [
        ("THE CAPITAL OF ITALY IS ROME.", None),
        ("THE CAPITAL OF ILOWES-WELL-WELL-WELL", "loop: 'WELL' three times in a row"),
        ("A B C A B C A B C", "loop: 'A B C' three times in a row"),
        ("IT IS A CAT. IT IS A DOG. AND IT IS A COW.", "loop: 'IT IS A' said 3 times"),
        ("The capital of Italy is Rome.", "lower case"),
        ("", "empty answer"),
    ],
)
def test_answer_problems(answer: str, problem: str | None) -> None:
    found = demo.answer_problems(answer)
    assert (not found) if problem is None else any(problem in p for p in found), found


def test_demo_reuses_a_verified_output_until_an_input_changes(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a tiny model in place of SmolLM2 (the answers are stubbed: the tiny model has no tokenizer): the first run
    runs merge-and-onnx, the second reuses it and says so, a changed adapter file runs it again."""
    base = tmp_path / "base"
    shutil.copytree(models_dir / "llama", base)
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    monkeypatch.setattr(demo, "smollm2_dir", lambda workdir: base)
    monkeypatch.setattr(demo, "demo_adapter_dir", lambda: adapter)
    monkeypatch.setattr(demo, "greedy_answer", lambda folder, prompt, n: f"ANSWER FROM {folder.name}")
    monkeypatch.setattr("lora_export.exporting.onnx_check.onnx_generate", lambda folder, prompt, n: "ONNX ANSWER")

    def run() -> list[str]:
        lines: list[str] = []
        demo.run_demo(tmp_path / "work", "Q?", 4, echo=lines.append)
        return lines

    first = run()
    assert any(line.startswith("lora-export merge-and-onnx") for line in first)
    assert "merge-and-onnx: PASS" in "\n".join(first) and "merged model, ONNX Runtime     > ONNX ANSWER" in first
    again = run()
    assert any(line.startswith("reusing") for line in again), again
    assert not any(line.startswith("lora-export merge-and-onnx") for line in again)
    with (adapter / "adapter_config.json").open("a") as f:
        f.write("\n")  # same meaning, other bytes: the key is the files' hashes
    third = run()
    assert any(line.startswith("lora-export merge-and-onnx") for line in third)
