"""What a production runtime needs beside the ONNX graph, so that the folder runs there as written.

- ONNX Runtime GenAI reads `genai_config.json`: written from the model's config and the graph's own input and output
  names. The dynamo graph concatenates past and new keys, so `past_present_share_buffer` is false (a shared buffer
  is only for graphs whose attention writes into one preallocated cache, as GroupQueryAttention does), and its
  model type is GenAI's generic `decoder`: the graph holds all of the architecture's computation.
- transformers 5 writes `tokenizer_class: TokenizersBackend`, which transformers 4.x (and so Optimum) cannot load; the
  copy beside the graph names `PreTrainedTokenizerFast`, which both read from the same tokenizer.json.
- Optimum's ORTModelForCausalLM needs config.json and generation_config.json beside model.onnx (copied by the
  pipeline).

When onnxruntime-genai is installed, the folder is loaded with `og.Model` and its greedy tokens are compared with
PyTorch's: a check like any other. When it is not, the report says the check was not run.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io.jsonio import read_json_object, write_json
from ..model.config import ModelConfig
from ..records import Check
from ..records.tolerances import tolerance
from ..verification.compare import compare_tokens, load_tokenizer
from .graphs import CacheShape

GENAI_CONFIG = "genai_config.json"


# Files a runtime needs beside the graph to tokenize and generate.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def copy_side_files(merged_dir: Path, out: Path) -> None:
    """The config and tokenizer files of the merged folder that `out` lacks, copied beside the graph."""
    for name in SIDE_FILES:
        if (merged_dir / name).is_file() and not (out / name).exists():
            shutil.copy2(merged_dir / name, out / name)


def genai_config(
    config: ModelConfig, shape: CacheShape, input_names: list[str], output_names: list[str]
) -> dict[str, Any]:
    """genai_config.json for a graph with our decoder contract (input_ids, attention_mask[, position_ids], past…)."""
    text = config.text
    heads, hidden, context = config.heads, config.hidden_size, config.context or 2048
    eos = text.get("eos_token_id", config.data.get("eos_token_id"))
    eos = eos[0] if isinstance(eos, list) and eos else eos
    pad = text.get("pad_token_id", config.data.get("pad_token_id"))
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in input_names:
        inputs["position_ids"] = "position_ids"
    inputs |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    outputs = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    missing = [n for n in ("input_ids", "attention_mask", "past_key_values.0.key") if n not in input_names]
    missing += [n for n in ("logits", "present.0.key") if n not in output_names]
    if missing:
        raise ValueError(f"the graph lacks {missing}: not the decoder-with-past contract")
    vocab = int(text.get("vocab_size"))
    for what, token in (("eos_token_id", _token(eos, 0)), ("bos_token_id", _token(text.get("bos_token_id"), 0))):
        if not 0 <= token < vocab:
            raise ValueError(f"{what} {token} is outside the vocabulary (size {vocab}), which GenAI refuses")
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": "model.onnx",
        "head_size": shape.head_dim,
        "hidden_size": hidden,
        "inputs": inputs,
        "outputs": outputs,
        "num_attention_heads": heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
    }
    model = {
        "type": "decoder",
        "context_length": context,
        "vocab_size": vocab,
        "bos_token_id": _token(text.get("bos_token_id", config.data.get("bos_token_id")), 0),
        "eos_token_id": _token(eos, 0),
        "pad_token_id": _token(pad, _token(eos, 0)),
        "decoder": decoder,
    }
    search = {"do_sample": False, "num_beams": 1, "max_length": context, "past_present_share_buffer": False}
    return {"model": model, "search": search}


def _token(value: Any, default: int) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else default


def portable_tokenizer_config(src: Path, dst: Path) -> bool:
    """Copy tokenizer_config.json so that transformers 4.x and 5.x both load it; True when it had to be changed."""
    data = read_json_object(src, "the tokenizer config was listed but is gone")
    changed = False
    if data.get("tokenizer_class") == "TokenizersBackend":  # transformers 5 only
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
        changed = True
    if "model_input_names" not in data:
        data["model_input_names"] = ["input_ids", "attention_mask"]
        changed = True
    write_json(dst, data)
    return changed


def write_runtime_files(
    out: Path, source: Path, shape: CacheShape | None, input_names: list[str], output_names: list[str]
) -> list[str]:
    """genai_config.json (decoders with past) and a portable tokenizer_config.json into `out`; returns notes."""
    notes = []
    if (source / "tokenizer_config.json").is_file() and portable_tokenizer_config(
        source / "tokenizer_config.json", out / "tokenizer_config.json"
    ):
        notes.append("tokenizer_config.json names PreTrainedTokenizerFast (transformers 4.x and 5.x both read it)")
    if shape is not None:
        config = ModelConfig.load(source)
        try:
            write_json(out / GENAI_CONFIG, genai_config(config, shape, input_names, output_names))
        except ValueError as e:
            notes.append(f"{GENAI_CONFIG} not written: {e}")
        else:
            notes.append(
                f"{GENAI_CONFIG}: type decoder, past_present_share_buffer false (the graph concatenates its cache)"
            )
    return notes


GENAI_MISSING = "the folder was not run in ONNX Runtime GenAI: onnxruntime-genai is not installed (lora-export[genai])"


def genai_installed() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def genai_special_ids(config_path: Path) -> set[int]:
    """pad, bos and eos ids of a genai_config.json (eos may be a list)."""
    model = read_json_object(config_path, "genai_config.json was not written")["model"]
    ids: set[int] = set()
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = model.get(key)
        ids |= set(value) if isinstance(value, list) else {value} if isinstance(value, int) else set()
    return ids


def model_special_ids(folder: Path) -> set[int]:
    """pad, bos and eos ids of a model folder's config.json and generation_config.json (what GenAI's config takes)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        if (folder / name).is_file():
            config = read_json_object(folder / name, "the model folder changed while it was read")
            for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
                value = config.get(key)
                ids |= {v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)}
    return ids


def random_prompt(vocab: int, excluded: set[int], n: int, seed: int) -> list[int]:
    """Random token ids for a GenAI check, without pad, bos and eos: GenAI masks pad ids inside a prompt (seen: a
    prompt of pad ids gave logits of 1e32), which PyTorch does not."""
    allowed = torch.tensor(sorted(set(range(vocab)) - excluded))
    return allowed[torch.randint(0, len(allowed), (n,), generator=torch.Generator().manual_seed(seed))].tolist()


def prompt_tokens(folder: Path) -> tuple[list[int] | None, int | None, Any]:
    """A short chat prompt (or plain text) for the generation check, the EOS id, and the tokenizer."""
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        return None, None, None
    text = "What is the capital of France?"
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(text)["input_ids"]
    return list(ids), tokenizer.eos_token_id, tokenizer


def genai_prompt(config_path: Path, vocab: int, n: int, seed: int) -> list[int]:
    return random_prompt(vocab, genai_special_ids(config_path), n, seed)


def genai_model(og: Any, folder: Path, device: str = "cpu") -> Any:
    """og.Model of the folder on `device`: the providers its genai_config.json names (CUDA for the builder's float16
    graph) are cleared, so a graph built for a GPU is checked on a CPU as far as the CPU provider runs it; on
    cuda/cuda:N the CUDA provider is appended (bench on a GPU). The folder itself is left as written."""
    from ..io.processes import RUNTIME_THREADS

    config = og.Config(str(folder))
    config.clear_providers()
    if device.startswith("cuda"):
        config.append_provider("cuda")
    if RUNTIME_THREADS:  # a worker process: its share of the cores, not all of them
        config.overlay(
            json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": RUNTIME_THREADS}}}})
        )
    return og.Model(config)


def new_generator(og: Any, model: Any, prompt: list[int], new_tokens: int, folder: Path | None = None) -> Any:
    """A greedy og.Generator for `prompt` that may add `new_tokens`; the prompt is not yet appended. A graph with
    sliding-window attention gets a KV buffer of at least the window (GenAI refuses a smaller one: "KV cache capacity
    must be at least local_window_size"), where its context allows it."""
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=max(len(prompt) + new_tokens, window_length(folder)))
    return og.Generator(model, params)


def window_length(folder: Path | None) -> int:
    """The sliding window of a GenAI folder's graph when its context can hold it, else 0."""
    if folder is None or not (folder / GENAI_CONFIG).is_file():
        return 0
    model = read_json_object(folder / GENAI_CONFIG, "genai_config.json was not written").get("model", {})
    window = (model.get("decoder", {}).get("sliding_window") or {}).get("window_size") or 0
    context = model.get("context_length") or 0
    return int(window) if isinstance(window, int) and isinstance(context, int) and window <= context else 0


def next_tokens(generator: Any, n: int) -> list[int]:
    """Up to n greedy tokens (fewer when GenAI stops at eos)."""
    tokens: list[int] = []
    while not generator.is_done() and len(tokens) < n:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def genai_generate(folder: Path, prompt: str, max_new_tokens: int) -> str:
    """Answer a chat prompt with the folder run by ONNX Runtime GenAI (the tokenizer from transformers)."""
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    generator = new_generator(og, genai_model(og, folder), ids, max_new_tokens, folder)
    generator.append_tokens(ids)
    return tokenizer.decode(next_tokens(generator, max_new_tokens), skip_special_tokens=True).strip()


def genai_check(folder: Path, prompt: list[int], reference: list[int], dtype: str) -> Check:
    """Greedy tokens of the folder run by ONNX Runtime GenAI (og.Model, og.Generator) vs PyTorch's."""
    import onnxruntime_genai as og

    name, compares = "genai generation", f"{len(reference)} greedy tokens, ONNX Runtime GenAI vs PyTorch"

    try:
        generator = new_generator(og, genai_model(og, folder), prompt, len(reference), folder)
        generator.append_tokens(prompt)
        tokens = next_tokens(generator, len(reference))
    except Exception as e:  # GenAI reports a folder it cannot run as a RuntimeError: that is the check failing
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        return Check(
            name,
            compares,
            dtype,
            False,
            "could not run",
            (f"ONNX Runtime GenAI could not run {folder.name}: {first_line}",),
        )
    result = compare_tokens(reference, tokens)
    first = result["first_difference"]
    summary = "identical" if result["identical"] else f"first difference at token {first}"
    failures = () if result["identical"] else (f"GenAI's greedy tokens differ from PyTorch's from token {first}",)
    return Check(
        name,
        compares,
        dtype,
        result["identical"],
        summary,
        failures,
        details={"tokens": tokens, "reference": reference},
    )


def genai_adapters_check(
    folder: Path,
    adapters: dict[str, Path],
    prompt: list[int],
    references: dict[str, tuple[list[int], np.ndarray]],
    dtype: str = "float32",
) -> Check:
    """The shared graph in ONNX Runtime GenAI: without an adapter it computes the base; with each variant's
    .onnx_adapter active (og.Adapters, Generator.set_active_adapter), that variant. Compared per variant: the logits
    after the prompt (within the runtime tolerance, relative to their largest value) and the greedy tokens."""
    import onnxruntime_genai as og

    tol = tolerance("runtime", dtype).max_rel
    n = max(len(tokens) for tokens, _ in references.values())
    name, compares = "genai adapters", f"logits and {n} greedy tokens per variant, GenAI multi-LoRA vs PyTorch"
    failures, worst, got = [], 0.0, {}
    try:
        model = genai_model(og, folder)
        loaded = og.Adapters(model)
        for variant, path in adapters.items():
            loaded.load(str(path), variant)
        for variant, (reference, ref_logits) in references.items():
            generator = new_generator(og, model, prompt, len(reference), folder)
            if variant in adapters:
                generator.set_active_adapter(loaded, variant)
            generator.append_tokens(prompt)
            logits = np.asarray(generator.get_logits(), dtype=np.float64).reshape(-1)
            rel = float(np.abs(logits - ref_logits).max() / max(float(np.abs(ref_logits).max()), 1e-30))
            worst = max(worst, rel) if rel == rel else float("inf")
            if not rel <= tol:
                failures.append(f"{variant}: logits after the prompt differ from PyTorch's by {rel:.3g} > {tol:g}")
            tokens = next_tokens(generator, len(reference))
            got[variant] = tokens
            if generator.is_done() and len(tokens) < len(reference):  # GenAI stopped at eos; PyTorch's loop did not
                reference = reference[: len(tokens)]
            if tokens != reference:
                failures.append(f"{variant}: GenAI's greedy tokens {tokens} differ from PyTorch's {reference}")
    except Exception as e:  # GenAI reports a folder or adapter it cannot use as a RuntimeError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return Check(name, compares, dtype, False, "could not run", (f"ONNX Runtime GenAI: {first}",))
    effect = _adapter_effect(references)
    summary = (
        f"{len(references)} variants: " * (len(references) > 1)
        + f"worst logits rel {worst:.2g} (≤ {tol:g}), tokens "
        + ("identical" if not any("tokens" in f for f in failures) else "differ")
    )
    if effect:
        summary += f"; adapters move the logits by ≥ {min(effect.values()):.2g}"
    details = {"tokens": got, "adapter_effect": effect}
    return Check(name, compares, dtype, not failures, summary, tuple(failures), details=details)


def _adapter_effect(references: dict[str, tuple[list[int], np.ndarray]]) -> dict[str, float]:
    """What the check can tell apart: how far each adapter moves the logits from the base's (in PyTorch)."""
    base = references.get("__base__", (None, None))[1]
    return {
        v: float(np.abs(r - base).max() / max(float(np.abs(base).max()), 1e-30))
        for v, (_, r) in references.items()
        if base is not None and v != "__base__"
    }
