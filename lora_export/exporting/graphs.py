"""Export-ready wrappers around a transformers model: plain tensors in, plain tensors out, names runtimes expect.

Decoders with past: inputs `input_ids`, `attention_mask` (batch × past+seq), `position_ids`, and
`past_key_values.N.key/value` (batch × kv_heads × past × head_dim; past may be 0 for the first step); outputs
`logits` and `present.N.key/value`. A cache object cannot cross an export boundary, so the wrapper builds one inside
`forward` from the flat tensors and flattens the updated one again. Encoders: `input_ids`, `attention_mask`
(`token_type_ids` where the model has them) → `last_hidden_state` (and `pooler_output`), or `logits` for
classification heads.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.errors import UnsupportedError
from ..model.config import ModelConfig
from ..model.loading import model_kind, text_config


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5.x calls the cache argument `cache`; 4.x `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(config: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers versions whose DynamicCache takes no config
        return DynamicCache()


def _flatten_cache(cache: Any) -> list[torch.Tensor]:
    flat: list[torch.Tensor] = []
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            flat += [layer.keys, layer.values]
    else:  # older DynamicCache
        for k, v in zip(cache.key_cache, cache.value_cache):
            flat += [k, v]
    return flat


@dataclass(frozen=True)
class CacheShape:
    layers: int
    kv_heads: int
    head_dim: int


def cache_shape(config: Any) -> CacheShape:
    text = text_config(config)
    layers = getattr(text, "num_hidden_layers", None) or text.n_layer
    heads = getattr(text, "num_attention_heads", None) or text.n_head
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    hidden = getattr(text, "hidden_size", None) or text.n_embd
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return CacheShape(int(layers), int(kv_heads), int(head_dim))


class DecoderWithPast(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.shape = cache_shape(model.config)
        self.keyword = _cache_keyword(model)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        cache = _new_cache(self.model.config)
        for i in range(self.shape.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.keyword: cache},
        )
        present = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
        return (out.logits, *_flatten_cache(present))


class DecoderNoPast(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).logits


class Encoder(nn.Module):
    def __init__(self, model: nn.Module, outputs: list[str], token_types: bool):
        super().__init__()
        self.model, self.outputs, self.token_types = model, outputs, token_types

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *rest: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        extra = {"token_type_ids": rest[0]} if self.token_types else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return tuple(getattr(out, n) for n in self.outputs)


@dataclass
class Graph:
    """A wrapper (in eval mode) with its input/output names, example inputs and dynamic axes."""

    module: nn.Module
    kind: str
    with_past: bool
    input_names: list[str]
    output_names: list[str]
    example: tuple[torch.Tensor, ...]
    dynamic_shapes: dict[str, Any]
    cache: CacheShape | None = None

    def __post_init__(self) -> None:
        self.module.eval()


def position_ids_for(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """Positions of the last `seq` tokens: count of real tokens before each one (left padding aware)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0)[:, -seq:]


def build_graph(model: nn.Module, with_past: bool = True) -> Graph:
    """Wrap a loaded transformers model for export. Example inputs are batch 2 so no axis is specialised to 1; they
    come from a local generator (the caller's global RNG is left as it was)."""
    from torch.export import Dim

    kind = model_kind(model)
    model.eval()
    text = text_config(model.config)
    # learned absolute positions (BERT, GPT-2, OPT) bound the sequence; the exporter needs that bound to be told
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    batch, seq = Dim("batch"), Dim("sequence", max=int(limit)) if limit else Dim("sequence")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(text.vocab_size), (2, 5), generator=g)
    if kind != "causal-lm":
        return _encoder_graph(model, kind, ids, batch, seq)
    if not with_past:
        mask = torch.ones(2, 5, dtype=torch.long)
        dyn = {
            "input_ids": {0: batch, 1: seq},
            "attention_mask": {0: batch, 1: seq},
            "position_ids": {0: batch, 1: seq},
        }
        inputs = ["input_ids", "attention_mask", "position_ids"]
        return Graph(DecoderNoPast(model), kind, False, inputs, ["logits"], (ids, mask, position_ids_for(mask, 5)), dyn)
    shape = cache_shape(model.config)
    past_len, total = Dim("past_sequence"), Dim("total_sequence")
    dtype = next(model.parameters()).dtype
    past = tuple(
        torch.randn(2, shape.kv_heads, 3, shape.head_dim, dtype=torch.float32, generator=g).to(dtype)
        for _ in range(2 * shape.layers)
    )
    mask = torch.ones(2, 8, dtype=torch.long)
    names = [f"past_key_values.{i}.{kv}" for i in range(shape.layers) for kv in ("key", "value")]
    dyn = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past_len} for _ in past),
    }
    inputs = ["input_ids", "attention_mask", "position_ids", *names]
    outputs = ["logits", *[n.replace("past_key_values", "present") for n in names]]
    example = (ids, mask, position_ids_for(mask, 5), *past)
    return Graph(DecoderWithPast(model), kind, True, inputs, outputs, example, dyn, shape)


def _encoder_graph(model: nn.Module, kind: str, ids: torch.Tensor, batch: Any, seq: Any) -> Graph:
    token_types = (
        "token_type_ids" in inspect.signature(model.forward).parameters
        and getattr(model.config, "type_vocab_size", 0) > 0
    )
    with torch.no_grad():
        probe = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    outputs = (
        ["logits"]
        if kind == "sequence-classification"
        else [n for n in ("last_hidden_state", "pooler_output") if getattr(probe, n, None) is not None]
    )
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_types else [])
    example = (ids, torch.ones_like(ids)) + ((torch.zeros_like(ids),) if token_types else ())
    dyn: dict[str, Any] = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    if token_types:  # torch.export wants keys for the arguments there are: no `rest` when nothing fills it
        dyn["rest"] = ({0: batch, 1: seq},)
    return Graph(Encoder(model, outputs, token_types), kind, False, inputs, outputs, example, dyn)


def refuse_encoder_decoder(folder: Path, what: str) -> None:
    """Encoder-decoders (T5, BART, Whisper) merge and verify, but lora-export's exporters build decoders and encoders:
    an encoder-decoder needs an encoder graph and a decoder-with-past graph that reads the encoder's output."""
    config = ModelConfig.load(folder)
    if config.encoder_decoder:
        task = "automatic-speech-recognition" if config.speech_input else "text2text-generation"
        raise UnsupportedError(
            f"{folder} is an encoder-decoder ({config.architecture or config.data.get('model_type')}): {what} builds "
            "decoders and encoders, not yet an encoder graph with a decoder-with-past graph. `lora-export merge` and "
            "`lora-export verify` handle it; export the verified merged folder with Optimum "
            f"(optimum-cli export onnx --model MERGED_DIR --task {task}-with-past OUT)"
        )
