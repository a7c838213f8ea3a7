"""Tiny real models (hidden size 32, 2 layers), built once per session; adapters made with PEFT, weights perturbed so
that every LoRA tensor (B included) is non-zero and DoRA magnitudes differ from the weight norms."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# In CI the property tests draw the same examples every run (a failure there is reproducible); locally they explore.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


REPO = Path(__file__).resolve().parents[1]


def tiny_llama(tied: bool, bias: bool = False) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        attention_bias=bias,
        mlp_bias=bias,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4))


def tiny_bert() -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg)


def tiny_decoder(family: str) -> Any:
    """Tiny random decoders of other families, for the exporters."""
    import transformers as T

    common = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    configs = {
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**common, num_key_value_heads=2)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**common, num_key_value_heads=2)),
        "phi": lambda: T.PhiForCausalLM(T.PhiConfig(**common)),
        "opt": lambda: T.OPTForCausalLM(
            T.OPTConfig(
                vocab_size=96,
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=128,
                word_embed_proj_dim=32,
            )
        ),
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
        for _name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p) * (p.abs().mean() + 0.1))
    peft_model.save_pretrained(out)
    return out


# Every PEFT LoRA variant the tool merges: (case, tiny model, LoraConfig arguments). Built once per session.
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("llama-plain", "llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama-all-linear", "llama", dict(target_modules="all-linear")),
    (
        "llama-rslora-patterns",
        "llama",
        dict(
            target_modules="all-linear",
            use_rslora=True,
            r=8,
            rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
            alpha_pattern={"v_proj": 3, "up_proj": 32},
        ),
    ),
    ("llama-dora", "llama", dict(target_modules=["q_proj", "k_proj", "down_proj"], use_dora=True)),
    ("llama-embedding", "llama", dict(target_modules=["embed_tokens", "q_proj"])),
    ("llama-embedding-dora", "llama", dict(target_modules=["embed_tokens"], use_dora=True)),
    ("llama-modules-to-save", "llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head", "norm"])),
    ("llama-layers-to-transform", "llama", dict(target_modules=["q_proj", "o_proj"], layers_to_transform=[1])),
    ("llama-lora-bias", "llama-bias", dict(target_modules=["q_proj", "up_proj"], lora_bias=True)),
    ("llama-bias-all", "llama-bias", dict(target_modules=["q_proj"], bias="all")),
    ("llama-bias-lora-only", "llama-bias", dict(target_modules=["v_proj"], bias="lora_only")),
    ("gpt2-fused-c_attn", "gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True)),
    (
        "gpt2-all-conv1d-config-says-false",
        "gpt2",
        dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=False),
    ),
    ("gpt2-dora", "gpt2", dict(target_modules=["c_attn", "attn.c_proj"], use_dora=True, fan_in_fan_out=True)),
    ("bert-classifier", "bert", dict(target_modules=["query", "value", "dense"], modules_to_save=["classifier"])),
    ("bert-embedding", "bert", dict(target_modules=["word_embeddings", "key"])),
]
VARIANT_CASES = [v[0] for v in VARIANTS]


class Variants:
    """The adapter of each variant case, made once per session, and its merge (float32), made once when first asked."""

    def __init__(self, models_dir: Path, root: Path) -> None:
        self.models_dir, self.root = models_dir, root
        self.spec = {case: (model, kwargs) for case, model, kwargs in VARIANTS}

    def base(self, case: str) -> Path:
        return self.models_dir / self.spec[case][0]

    def adapter(self, case: str) -> Path:
        out = self.root / case / "adapter"
        if not out.exists():
            make_adapter(self.base(case), out, **self.spec[case][1])
        return out

    def merged(self, case: str) -> Path:
        from lora_export import MergeOptions, merge

        out = self.root / case / "merged"
        if not out.exists():
            merge(self.base(case), [self.adapter(case)], out, MergeOptions(progress=False))
        return out


@pytest.fixture(scope="session")
def variants(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Variants:
    return Variants(models_dir, tmp_path_factory.mktemp("variants"))


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mant_bits = {torch.bfloat16: 8, torch.float16: 11}[dtype]
    _, exp = torch.frexp(x.float())
    spacing = torch.ldexp(torch.ones_like(x, dtype=torch.float32), exp - mant_bits)
    return torch.maximum(spacing, torch.tensor(2.0**-24 if dtype == torch.float16 else 2.0**-133))


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
    return {
        "input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }


def logits_of(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: the CLI refuses with one line naming the file and the fix, and writes nothing


@pytest.fixture(scope="module")
def good(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("good")
    return models_dir / "llama", make_adapter(
        models_dir / "llama", root / "adapter", target_modules=["q_proj", "v_proj"]
    )


def merged_llama(models_dir: Path, root: Path) -> tuple[Path, Path, Path]:
    """The tiny LLaMA, a q/v adapter for it in root/adapter and their merge in root/merged."""
    base = models_dir / "llama"
    adapter = make_adapter(base, root / "adapter", target_modules=["q_proj", "v_proj"])
    code, out = run_merge(base, adapter, root / "merged")
    assert code == 0, out
    return base, adapter, root / "merged"


def copy_adapter(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def run_cli(args: list[str]) -> tuple[int, str]:
    from click.testing import CliRunner

    from lora_export.cli import main

    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def run_merge(base: Path, adapter: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run_cli(["merge", str(base), str(adapter), "-o", str(out), "-q", *extra])


def assert_one_error(code: int, output: str, out: Path, fragments: tuple[str, ...]) -> None:
    """Exit 2, exactly one `Error:` line holding every fragment (the file, the problem, the fix), no traceback,
    and nothing at the output location: no folder, no partial folder, no lock file."""
    assert code == 2, output
    error_lines = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(error_lines) == 1, output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in error_lines[0], output
    assert not out.exists(), "a refused run must write nothing"
    assert not [p.name for p in out.parent.glob(f".{out.name}.*")], "temporary folder or lock left behind"


def assert_refused(base: Path, adapter: Path, out: Path, *fragments: str, extra: tuple[str, ...] = ()) -> None:
    assert_one_error(*run_merge(base, adapter, out, *extra), out, fragments)


def write_raw_safetensors(path: Path, header: dict | bytes, data: bytes) -> None:
    import json
    import struct

    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
