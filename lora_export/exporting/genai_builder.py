"""The second ONNX exporter: ONNX Runtime GenAI's model builder, run on the merged folder.

It writes the graph GenAI runs fastest (fused GroupQueryAttention, a preallocated KV buffer), genai_config.json and
the tokenizer files, in seconds. Its graph has another contract than the dynamo export (no position_ids, past and
present sharing one buffer), so it is checked where it will run: in ONNX Runtime GenAI, against PyTorch, logits after
each prompt and after every generated token, and the greedy tokens. The builder runs in its own process: it holds
its own copy of the weights, and a crash there is an error here, not a dead run.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io.errors import ExportError
from ..io.jsonio import read_json_object
from ..model.config import ModelConfig
from ..model.loading import load_model
from ..records import Check
from ..records.sections import ExportSection
from ..verification.compare import DTYPES, Case, compare, metrics_check
from .onnx_check import computing_in_float32
from .runtime_files import (
    genai_model,
    model_special_ids,
    new_generator,
    next_tokens,
    portable_tokenizer_config,
    prompt_tokens,
    random_prompt,
)

# Architectures the builder of onnxruntime-genai 0.18 turns into a plain decoder (builder.py's dispatch).
SUPPORTED = {
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "PhiForCausalLM",
    "Phi3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM",
    "NemotronForCausalLM", "SmolLM3ForCausalLM", "InternLM2ForCausalLM", "Ernie4_5ForCausalLM",
}  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
BUILDER = "onnxruntime_genai.models.builder"  # the report's name for this exporter


def unsupported_reason(folder: Path) -> str | None:
    """Why the builder cannot export this folder here, or None when it can."""
    missing = [m for m in ("onnxruntime_genai", "onnx_ir") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install 'lora-export[genai]')"
    config = ModelConfig.load(folder)
    if config.architecture not in SUPPORTED:
        return f"the GenAI model builder does not build {config.architecture or '?'}"
    head_size = config.head_size
    if head_size % 16:  # seen: "head_size shall be a multiple of 16" from ONNX Runtime at the first run
        return f"its GroupQueryAttention needs a head size that is a multiple of 16 (this model: {head_size})"
    known = known_failure(config)
    if known:
        return known
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return "the GenAI model builder needs the model's tokenizer (tokenizer.json) in the folder"
    return None


def known_failure(config: ModelConfig) -> str | None:
    """Configurations whose builder graph is known to fail here (tools/repro_builder.py reproduces each, builder alone,
    no adapter), so that auto does not spend a build on them."""
    text, context = config.text, config.context or 0
    original = text.get("original_max_position_embeddings")
    scaling = text.get("rope_scaling") or {}
    if config.architecture == "Phi3ForCausalLM" and isinstance(original, int) and context < original:
        if not (isinstance(scaling, dict) and scaling.get("type", scaling.get("rope_type")) == "longrope"):
            return (
                f"the builder fails on Phi-3 whose context ({context}) is below original_max_position_embeddings "
                f"({original}) without LongRoPE factors (KeyError: 'multi_cache')"
            )
    window = text.get("sliding_window")
    if isinstance(window, int) and context and window > context:
        return (
            f"its sliding window ({window}) is longer than its context ({context}): ONNX Runtime's GroupQueryAttention "
            "needs a KV buffer at least as long as the window"
        )
    return None


def build_with_genai(merged_dir: Path, out: Path, dtype: str, log: Any) -> ExportSection:
    """Run the builder (fp32 or fp16, CPU) from the merged folder into `out`; returns the report's export section."""
    with genai_build(merged_dir, out, dtype, log) as finish:
        return finish()


@contextlib.contextmanager
def genai_build(
    merged_dir: Path, out: Path, dtype: str, log: Any, quant: Any = None
) -> Iterator[Callable[[], ExportSection]]:
    """Start the builder in a child process; the block may work meanwhile and calls the yielded function to wait for
    it (the export section, or an ExportError). Leaving the block early (an error, Ctrl-C) kills the child. `quant`
    (quantized.QuantOptions, int8/int4): weight-only MatMulNBits from the float32 weights, with its options."""
    precision = {"float32": "fp32", "float16": "fp16"}.get(dtype)
    if precision is None:
        raise ExportError(f"the GenAI model builder exports float32 or float16 here, not {dtype}")
    extra: list[str] = []
    if quant is not None and quant.quantized:
        precision, extra = quant.precision, quant.builder_options()
    # float16 for CUDA: the builder's CPU float16 graph does not run in ONNX Runtime's CPU provider (seen: "Shape
    # mismatch attempting to re-use buffer" in an inserted Cast), while its CUDA one does, for the check here
    target = "cuda" if precision == "fp16" else "cpu"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora-export-genai-") as cache, tempfile.TemporaryFile("w+") as output:
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(merged_dir), "-o", str(out),
                   "-p", precision, "-e", target, "-c", cache, *extra]  # fmt: skip
        log(f"building the GenAI graph ({precision}, {target}) with onnxruntime_genai.models.builder …")
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True)

        def finish() -> ExportSection:
            code = child.wait()
            if code != 0 or not (out / "model.onnx").is_file():
                output.seek(0)
                last = [line for line in output.read().splitlines() if line.strip()][-1:] or ["no output"]
                raise ExportError(f"the GenAI model builder failed on {merged_dir} (exit {code}): {last[0]}")
            return export_section(out, dtype, precision, target, time.perf_counter() - started)

        try:
            yield finish
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()


def export_section(out: Path, dtype: str, precision: str, target: str, seconds: float) -> ExportSection:
    """The report's export section for a builder graph in `out` (its tokenizer_config.json made portable)."""
    config = read_json_object(out / "genai_config.json", "the GenAI model builder wrote no genai_config.json")
    tokenizer_config = out / "tokenizer_config.json"  # the builder saves transformers 5's, which 4.x cannot read
    portable = tokenizer_config.is_file() and portable_tokenizer_config(tokenizer_config, tokenizer_config)
    return ExportSection(
        format="onnx",
        dtype=dtype,
        exporter=BUILDER,
        seconds=seconds,
        precision=precision,
        target=target,
        checked_on="ONNX Runtime GenAI, CPU provider"
        + (" (providers in genai_config.json cleared)" if target != "cpu" else ""),
        files=tuple(sorted(p.name for p in out.glob("model.onnx*"))),
        past_present_share_buffer=config.get("search", {}).get("past_present_share_buffer"),
        with_past=True,
        runtime_files=("tokenizer_config.json names PreTrainedTokenizerFast (transformers 4.x and 5.x read it)",)
        * portable,
    )


References = list[tuple[list[int], list[torch.Tensor]]]  # per prompt: PyTorch's greedy tokens, logits per step


def check_prompt(vocab: int, special: set[int], seed: int = 0) -> list[int]:
    """The random prompt of the GenAI checks (8 ids): a merged variant's and a package's shared layout use the same,
    so that one PyTorch pass per variant serves both."""
    return random_prompt(vocab, special, 8, seed)


def genai_references(merged_dir: Path, dtype: str, seed: int, n: int) -> tuple[list[list[int]], References]:
    """The GenAI check's prompts (a chat prompt, random ids) and PyTorch's references of n tokens; the model is freed
    after."""
    model = load_model(merged_dir, DTYPES[dtype])
    prompt, _eos, _tokenizer = prompt_tokens(merged_dir)
    vocab = int(model.config.get_text_config().vocab_size)
    prompts = [p for p in (prompt, check_prompt(vocab, model_special_ids(merged_dir), seed)) if p]
    references = pytorch_references(model, prompts, n)
    del model
    gc.collect()
    return prompts, references


def pytorch_references(model: torch.nn.Module, prompts: list[list[int]], n: int) -> References:
    """PyTorch's greedy tokens after each prompt and its logits at every step (float16 models: the float32
    computation of their weights), computed before GenAI loads its own copy of the weights."""
    references = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad(), computing_in_float32(model):
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)  # fmt: skip
        steps = [step.reshape(1, -1).double().cpu() for step in ref.logits]
        references.append((ref.sequences[0, len(prompt) :].tolist(), steps))
    return references


def save_references(path: Path, prompt: list[int], references: dict[str, tuple[list[int], Any]]) -> None:
    """reference.npz: a prompt, and per name the greedy tokens after it and the logits after the prompt."""
    arrays = {"genai:prompt": np.asarray(prompt, np.int64)}
    for name, (tokens, logits) in references.items():
        arrays[f"tokens:{name}"] = np.asarray(tokens, np.int64)
        arrays[f"logits:{name}"] = np.asarray(logits, np.float64)
    np.savez(path, **arrays)


def genai_logits_check(folder: Path, prompts: list[list[int]], references: References, dtype: str) -> Check:
    """The folder run by ONNX Runtime GenAI vs PyTorch's references: logits after each prompt and after every
    generated token (the runtime tolerance), and the greedy tokens, identical."""
    import onnxruntime_genai as og

    metrics, failures = [], []
    try:
        runtime = genai_model(og, folder)
        for i, (prompt, (tokens, steps)) in enumerate(zip(prompts, references, strict=True)):
            generator = new_generator(og, runtime, prompt, len(tokens), folder)
            generator.append_tokens(prompt)
            got = []
            for step, step_logits in enumerate(steps):
                if step:
                    generator.generate_next_token()
                    got.append(int(generator.get_next_tokens()[0]))
                logits = torch.from_numpy(generator.get_logits().reshape(1, -1).astype("float64"))
                case = Case(f"prompt {i} ({len(prompt)} tokens) step {step}", {})
                metrics.append(compare(case, "logits", step_logits, logits))
            got += next_tokens(generator, 1)  # the last token: its logits were compared above
            if got != tokens:
                failures.append(f"prompt {i}: GenAI's greedy tokens {got} differ from PyTorch's {tokens}")
    except Exception as e:  # GenAI reports a folder it cannot run as a RuntimeError: the check fails
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return Check("genai vs pytorch", "ONNX Runtime GenAI vs PyTorch", dtype, False, "could not run", (first,))
    check = metrics_check(
        "genai vs pytorch", f"ONNX Runtime GenAI vs PyTorch eager, {dtype}", "runtime", dtype, metrics
    )
    if failures:
        return Check(
            check.name, check.compares, dtype, False, check.summary, (*check.failures, *failures), check.metrics
        )
    return check
