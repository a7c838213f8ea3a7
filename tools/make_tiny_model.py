"""Write a tiny random LLaMA (hidden size 64, head size 16, 2 layers) with a word-level tokenizer, and a PEFT-format
LoRA adapter for it, without PEFT. Head size 16 and the tokenizer make it a model the GenAI model builder builds.

For smoke tests where only the tool's own dependencies exist: an installed wheel (tools/check_wheel.sh), the
transformers 4.57 environment (tools/test_transformers4.sh).

    python tools/make_tiny_model.py OUT_DIR [--hub-cache CACHE]
        # writes OUT_DIR/base and OUT_DIR/adapter; with --hub-cache also both as repositories tiny-org/base and
        # tiny-org/adapter (which names tiny-org/base as its base) in a Hugging Face cache laid out as
        # huggingface_hub lays it out (refs/main, snapshots/COMMIT/ with relative links into blobs/)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def save_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over ids w0…wN (bos w1, eos w2, pad w3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2", pad_token="w3")
    fast.save_pretrained(folder)


TINY = dict(vocab_size=96, num_hidden_layers=2, pad_token_id=3, bos_token_id=1, eos_token_id=2)


def tiny_decoder(folder: Path, family: str = "Llama", seed: int = 0, **settings: Any) -> Path:
    """A random decoder of a transformers family ({family}Config, {family}ForCausalLM), 96 ids and 2 layers unless
    `settings` say otherwise, saved with the word-level tokenizer: a folder the GenAI model builder builds."""
    import transformers

    config = getattr(transformers, f"{family}Config")(**{**TINY, **settings})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        getattr(transformers, f"{family}ForCausalLM")(config).save_pretrained(folder)
    save_tokenizer(folder, config.vocab_size)
    return folder


# Encoder-decoders: (config class, model class, settings, the attention's LoRA targets); 2 + 2 layers, 4 heads of 16
SEQ2SEQ: dict[str, tuple[str, str, dict[str, Any], list[str]]] = {
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(vocab_size=96, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1), ["q", "v", "o"]),
    "bart": ("BartConfig", "BartForConditionalGeneration", dict(vocab_size=96, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64), ["q_proj", "v_proj", "out_proj"]),
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration", dict(vocab_size=96, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=32, max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1), ["q_proj", "v_proj", "out_proj"]),
}  # fmt: skip


def tiny_seq2seq(folder: Path, family: str, seed: int = 0, **overrides: Any) -> Path:
    """A random encoder-decoder of SEQ2SEQ, `overrides` on its settings (no tokenizer: checks use seeded ids, or
    features for Whisper)."""
    import transformers

    config_class, model_class, settings, _ = SEQ2SEQ[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = getattr(transformers, config_class)(**{**settings, **overrides})
        getattr(transformers, model_class)(config).save_pretrained(folder)
    return folder


def main(out: Path) -> None:
    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    tiny_decoder(out / "base", max_position_embeddings=128, pad_token_id=None, **shape)  # as it always was
    layers = TINY["num_hidden_layers"]
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(layers):
        for proj, width in (("q_proj", 64), ("v_proj", 32)):  # v_proj: 2 kv heads × head dim 16
            prefix = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, 64, generator=g) * 0.1
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


def cache_repo(cache: Path, repo: str, folder: Path, refs: tuple[str, ...] = ("main",), tag: str = "") -> str:
    """`folder` as one commit of `repo` in a Hugging Face cache: each file a blob named by its sha256, linked from
    the snapshot by a relative symlink, and `refs` (branch or tag names) pointing at the commit. Returns the commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo}:{tag}:{sorted(p.name for p in folder.iterdir())}:{folder}".encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, root / "blobs" / digest)
        link = snapshot / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(root / "blobs" / digest, link.parent), link)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return commit


def hub_cache(out: Path, cache: Path) -> None:
    """OUT/base and OUT/adapter as tiny-org/base and tiny-org/adapter (naming tiny-org/base) in `cache`."""
    cache_repo(cache, "tiny-org/base", out / "base")
    named = out / "adapter-named"
    shutil.copytree(out / "adapter", named)
    config = json.loads((named / "adapter_config.json").read_text())
    (named / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "tiny-org/base"}))
    cache_repo(cache, "tiny-org/adapter", named)
    shutil.rmtree(named)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    if sys.argv[2:3] == ["--hub-cache"]:
        hub_cache(Path(sys.argv[1]), Path(sys.argv[3]))
