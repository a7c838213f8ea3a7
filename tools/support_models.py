"""The models of the support matrix (tools/support_matrix.py): per family a tiny random model with realistic
proportions (head size 64, grouped-query attention where the family has it) and PEFT adapters on its attention's
projections with every trainable tensor perturbed; decoders get a byte-level BPE tokenizer (the tokenizer class
transformers picks for each family reads it, and so does GenAI's)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

DECODER = dict(vocab_size=384, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64, max_position_embeddings=256)  # fmt: skip
QKVO = ["q_proj", "v_proj", "o_proj"]
ENCODER = dict(vocab_size=384, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_labels=3)  # fmt: skip
SEQ2SEQ_WIDE = {  # make_tiny_model.SEQ2SEQ at head size 64
    "t5": dict(d_model=256, d_kv=64, d_ff=512),
    "bart": dict(d_model=256, encoder_ffn_dim=512, decoder_ffn_dim=512),
    "whisper": dict(d_model=256, encoder_ffn_dim=512, decoder_ffn_dim=512),
}
SPECIAL = dict(bos_token_id=0, eos_token_id=0, pad_token_id=1)  # the BPE tokenizer's <|endoftext|> and <pad>

# family → (task, transformers prefix or classes, config settings, LoRA targets, LoraConfig extras)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(task="causal-lm", config="LlamaConfig", model="LlamaForCausalLM", settings=DECODER, targets=QKVO),
    "llama (64/4/2, head 16)": dict(task="causal-lm", config="LlamaConfig", model="LlamaForCausalLM",
        settings={**DECODER, "hidden_size": 64, "intermediate_size": 128, "head_dim": 16}, targets=QKVO),
    "mistral": dict(task="causal-lm", config="MistralConfig", model="MistralForCausalLM",
        settings={**DECODER, "sliding_window": None}, targets=QKVO),
    "qwen2": dict(task="causal-lm", config="Qwen2Config", model="Qwen2ForCausalLM", settings=DECODER, targets=QKVO),
    "qwen3": dict(task="causal-lm", config="Qwen3Config", model="Qwen3ForCausalLM", settings=DECODER, targets=QKVO),
    "phi3": dict(task="causal-lm", config="Phi3Config", model="Phi3ForCausalLM",
        settings={**DECODER, "max_position_embeddings": 4096, "original_max_position_embeddings": 4096},
        targets=["qkv_proj", "o_proj"]),
    "gemma2": dict(task="causal-lm", config="Gemma2Config", model="Gemma2ForCausalLM",
        settings={**DECODER, "sliding_window": 128}, targets=QKVO),
    "gemma3": dict(task="causal-lm", config="Gemma3TextConfig", model="Gemma3ForCausalLM",
        settings={**DECODER, "sliding_window": 128}, targets=QKVO),
    "granite": dict(task="causal-lm", config="GraniteConfig", model="GraniteForCausalLM", settings=DECODER, targets=QKVO),
    "olmo2": dict(task="causal-lm", config="Olmo2Config", model="Olmo2ForCausalLM", settings=DECODER, targets=QKVO),
    "gpt2": dict(task="causal-lm", config="GPT2Config", model="GPT2LMHeadModel",
        settings=dict(vocab_size=384, n_embd=256, n_head=4, n_layer=2, n_positions=256),
        targets=["c_attn", "c_proj"], extra=dict(fan_in_fan_out=True)),
    "opt": dict(task="causal-lm", config="OPTConfig", model="OPTForCausalLM",
        settings=dict(vocab_size=384, hidden_size=256, ffn_dim=512, num_hidden_layers=2, num_attention_heads=4,
                      word_embed_proj_dim=256, max_position_embeddings=256),
        targets=["q_proj", "v_proj", "out_proj"]),
    "gpt-neox": dict(task="causal-lm", config="GPTNeoXConfig", model="GPTNeoXForCausalLM",
        settings={k: v for k, v in DECODER.items() if k not in ("num_key_value_heads", "head_dim")},
        targets=["query_key_value", "dense"]),
    "bert": dict(task="sequence-classification", config="BertConfig", model="BertForSequenceClassification",
        settings=ENCODER, targets=["query", "value"]),
    "roberta": dict(task="sequence-classification", config="RobertaConfig", model="RobertaForSequenceClassification",
        settings={**ENCODER, "max_position_embeddings": 130, "pad_token_id": 1}, targets=["query", "value"]),
    "deberta-v2": dict(task="sequence-classification", config="DebertaV2Config",
        model="DebertaV2ForSequenceClassification", settings={**ENCODER, "max_position_embeddings": 128},
        targets=["query_proj", "value_proj"]),
    "distilbert": dict(task="sequence-classification", config="DistilBertConfig",
        model="DistilBertForSequenceClassification",
        settings=dict(vocab_size=384, dim=256, hidden_dim=512, n_layers=2, n_heads=4, num_labels=3),
        targets=["q_lin", "v_lin"]),
    "t5": dict(task="seq2seq-lm", seq2seq="t5", settings=SEQ2SEQ_WIDE["t5"], targets=["q", "v", "o"]),
    "bart": dict(task="seq2seq-lm", seq2seq="bart", settings=SEQ2SEQ_WIDE["bart"],
        targets=["q_proj", "v_proj", "out_proj"]),
    "whisper": dict(task="seq2seq-lm", seq2seq="whisper", settings=SEQ2SEQ_WIDE["whisper"],
        targets=["q_proj", "v_proj", "out_proj"]),
}  # fmt: skip
PEFT_TASK = {"causal-lm": "CAUSAL_LM", "sequence-classification": "SEQ_CLS", "seq2seq-lm": "SEQ_2_SEQ_LM"}
CORPUS = [
    "The capital of France is Paris.", "Write one sentence about the sea.", "def fibonacci(n): return n",
    "The quick brown fox jumps over the lazy dog.", "Deploy the merged model to ONNX Runtime.",
    "Low-rank adaptation trains two small matrices beside a frozen weight.",
]  # fmt: skip


def bpe_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (<|endoftext|> = 0 is bos/eos/unk, <pad> = 1) trained on a few sentences: the
    tokenizer class transformers picks for any decoder family reads it, and GenAI's tokenizer too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
        pad_token="<pad>",
    )  # fmt: skip
    fast.save_pretrained(folder)


def build_base(family: str, folder: Path) -> Path:
    import torch
    import transformers

    spec = FAMILIES[family]
    if spec["task"] == "seq2seq-lm":
        sys.path.insert(0, str(REPO / "tools"))
        from make_tiny_model import tiny_seq2seq

        return tiny_seq2seq(folder, spec["seq2seq"], **spec["settings"])
    settings = {**spec["settings"], **(SPECIAL if spec["task"] == "causal-lm" else {})}
    config = getattr(transformers, spec["config"])(**settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        getattr(transformers, spec["model"])(config).save_pretrained(folder)
    if spec["task"] == "causal-lm":
        bpe_tokenizer(folder, config.vocab_size)
    return folder


def build_adapter(family: str, base: Path, out: Path, seed: int) -> Any:
    """A PEFT adapter on the family's attention projections, every trainable tensor perturbed; returns the PEFT model."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from lora_export.model.config import ModelConfig

    spec = FAMILIES[family]
    model = getattr(transformers, ModelConfig.load(base).architecture).from_pretrained(base).eval()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=spec["targets"], task_type=PEFT_TASK[spec["task"]],
                        **spec.get("extra", {}))  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for _, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p) * (p.abs().mean() + 0.1))
    peft_model.save_pretrained(out)
    return peft_model.eval()
