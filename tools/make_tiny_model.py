"""Write a tiny random LLaMA (hidden size 32, 2 layers) and a PEFT-format LoRA adapter for it, without PEFT.

For smoke tests of an installed lora-export (tools/check_wheel.sh), where only the tool's own dependencies exist.

    python tools/make_tiny_model.py OUT_DIR      # writes OUT_DIR/base and OUT_DIR/adapter
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM


def main(out: Path) -> None:
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out / "base")
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(config.num_hidden_layers):
        for proj, width in (("q_proj", 32), ("v_proj", 16)):  # v_proj: 2 kv heads × head dim 8
            prefix = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, 32, generator=g) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(width, 4, generator=g) * 0.1  # non-zero: a visible merge
    (out / "adapter").mkdir(parents=True)
    save_file(tensors, str(out / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
    config_json = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(out / "base"),
    }
    (out / "adapter" / "adapter_config.json").write_text(json.dumps(config_json, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
