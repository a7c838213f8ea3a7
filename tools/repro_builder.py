"""Minimal reproductions for the ONNX Runtime GenAI model builder: a random tiny model of one configuration, no
adapter, built with `onnxruntime_genai.models.builder` (fp32, CPU) and run in ONNX Runtime GenAI and in plain ONNX
Runtime against PyTorch, so a failure can be placed in the builder, in the graph, or in GenAI. Nothing of lora-export
is used: this is the script to attach to an upstream report.

    python tools/repro_builder.py                 # every case below
    python tools/repro_builder.py gemma2-window-over-context llama-gqa-64-4-2

Per case it prints the builder's outcome, then for GenAI (max_length = prompt + 1) and plain ONNX Runtime (empty
past) the worst |logits − PyTorch| relative to PyTorch's largest logit at the last prompt position, or the error.
Findings of 2026-12-06 (onnxruntime 1.32, onnxruntime-genai 0.18, transformers 5.25) are in docs/export.md
("When the builder's graph fails").
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

BASE = dict(vocab_size=96, num_hidden_layers=2, pad_token_id=3, bos_token_id=1, eos_token_id=2)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    # grouped-query attention at the shapes an earlier report named (hidden/heads/kv heads): right here
    "llama-gqa-64-4-2": ("Llama", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)),
    "llama-gqa-256-4-2": ("Llama", dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)),
    "qwen2-gqa-256-4-2": ("Qwen2", dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)),
    # Phi-3 whose context is shorter than original_max_position_embeddings (4096 by default): the builder fails
    "phi3-context-below-original": ("Phi3", dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)),
    "phi3-context-4096": ("Phi3", dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)),
    # a sliding window longer than the context: GenAI's GroupQueryAttention needs a KV buffer of at least the window
    "gemma2-window-over-context": ("Gemma2", dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=128, sliding_window=4096)),
    # a window within the context, but a generator whose max_length is below it: the same refusal
    "gemma2-window-64": ("Gemma2", dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, sliding_window=64)),
}  # fmt: skip
PROMPT = [5, 17, 33, 8, 61, 40, 12, 77]


def make(folder: Path, family: str, settings: dict[str, Any]) -> torch.nn.Module:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = getattr(transformers, f"{family}Config")(**BASE, **settings)
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2")
    fast.save_pretrained(folder)
    return model


def build(src: Path, out: Path) -> str:
    with tempfile.TemporaryDirectory() as cache:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out), "-p", "fp32",
               "-e", "cpu", "-c", cache]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return "builder failed: " + ((done.stderr or done.stdout).strip().splitlines() or ["?"])[-1][:160]
    return "built"


def in_genai(folder: Path) -> np.ndarray:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(PROMPT) + 1)
    generator = og.Generator(model, params)
    generator.append_tokens(PROMPT)
    return np.asarray(generator.get_logits()).reshape(-1)


def in_onnxruntime(folder: Path, config: Any) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    feeds = {"input_ids": np.array([PROMPT], np.int64), "attention_mask": np.ones((1, len(PROMPT)), np.int64)}
    for i in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, config.num_key_value_heads, 0, head), np.float32)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0][0, -1]


def check(name: str) -> str:
    family, settings = CASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "hf", Path(tmp) / "onnx"
        model = make(src, family, settings)
        with torch.no_grad():
            ref = model(torch.tensor([PROMPT])).logits[0, -1].numpy()
        built = build(src, out)
        parts = [built]
        if built == "built":
            for runtime, run in (
                ("genai", lambda: in_genai(out)),
                ("onnxruntime", lambda: in_onnxruntime(out, model.config)),
            ):
                try:
                    parts.append(f"{runtime} {float(np.abs(run() - ref).max()) / float(np.abs(ref).max()):.2e}")
                except Exception as e:  # what the runtime says is the finding
                    parts.append(f"{runtime} error: {str(e).splitlines()[0][-160:]}")
        return f"{name}: " + "; ".join(parts)


if __name__ == "__main__":
    import onnxruntime
    import onnxruntime_genai
    import transformers

    print(f"onnxruntime {onnxruntime.__version__}, onnxruntime-genai {onnxruntime_genai.__version__}, "
          f"transformers {transformers.__version__}, torch {torch.__version__}")  # fmt: skip
    for case in sys.argv[1:] or CASES:
        print(check(case), flush=True)
