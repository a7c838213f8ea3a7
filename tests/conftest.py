"""Tiny real models (hidden size 32, 2 layers), built once per session; adapters made with PEFT, weights perturbed so
that every LoRA tensor (B included) is non-zero and DoRA magnitudes differ from the weight norms."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]


def tiny_llama(tied: bool, bias: bool = False) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias)
    return LlamaForCausalLM(cfg)


def tiny_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4))


def tiny_bert() -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg)


def tiny_decoder(family: str) -> Any:
    """Tiny random decoders of other families, for the exporters."""
    import transformers as T

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
    configs = {
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**common, num_key_value_heads=2)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**common, num_key_value_heads=2)),
        "phi": lambda: T.PhiForCausalLM(T.PhiConfig(**common)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                                    max_position_embeddings=128, word_embed_proj_dim=32)),
    }
    return configs[family]()


BUILDERS = {
    "llama": lambda: tiny_llama(tied=False),
    "llama-tied": lambda: tiny_llama(tied=True),
    "llama-bias": lambda: tiny_llama(tied=False, bias=True),
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "qwen2": lambda: tiny_decoder("qwen2"),
    "mistral": lambda: tiny_decoder("mistral"),
    "phi": lambda: tiny_decoder("phi"),
    "opt": lambda: tiny_decoder("opt"),
}


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for i, (name, build) in enumerate(BUILDERS.items()):
        torch.manual_seed(100 + i)
        model = build()
        model.save_pretrained(root / name)
    # a bf16 copy of the untied LLaMA (different numbers from a cast, to exercise the cast report)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(root / "llama", dtype=torch.bfloat16)
    m.save_pretrained(root / "llama-bf16")
    return root


def load_model(folder: Path, dtype: torch.dtype = torch.float32) -> Any:
    import json

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    cls = AutoModelForSequenceClassification if "SequenceClassification" in arch else AutoModelForCausalLM
    return cls.from_pretrained(folder, dtype=dtype)


def make_adapter(base: Path, out: Path, seed: int = 0, **lora_kwargs: Any) -> Path:
    """A PEFT adapter for `base` with every trainable tensor perturbed (non-zero B, non-trivial DoRA magnitudes)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_model(base)
    peft_model = get_peft_model(model, LoraConfig(**{"r": 4, "lora_alpha": 8, **lora_kwargs}))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p) * (p.abs().mean() + 0.1))
    peft_model.save_pretrained(out)
    return out


def peft_unmerged(base: Path, adapters: list[Path], dtype: torch.dtype = torch.float32) -> Any:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base, dtype), adapters[0], adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        model.load_adapter(a, adapter_name=f"a{i}")
    if len(adapters) > 1:
        model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    return model.eval()


def sample_inputs(folder: Path, batch: int = 2, seq: int = 9) -> dict[str, torch.Tensor]:
    import json

    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(7)
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g), "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def logits_of(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out
