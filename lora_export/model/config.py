"""config.json of a transformers model folder: the one reader (ModelConfig.load), which checks the fields the tool
reads, and the language model's part of it (`text`: a multimodal config's nested text_config, else the whole)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io.jsonio import Fields, read_json_object

CONFIG_OBJECTS = ("text_config", "quantization_config", "rope_scaling", "rope_parameters", "vision_config")
CONFIG_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "n_embd", "n_head", "n_layer",
                "n_positions", "num_mel_bins", "max_source_positions", "max_target_positions")  # fmt: skip
CONFIG_FIX = "fix config.json or save the model again with save_pretrained"


# Families whose position ids start after the padding index (RoBERTa's create_position_ids_from_input_ids): a sequence
# holds max_position_embeddings − pad_token_id − 1 tokens; one more indexes past the position table.
POSITIONS_AFTER_PADDING = {
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "roberta-prelayernorm", "longformer",
}  # fmt: skip


def usable_context(model_type: Any, positions: Any, pad_token_id: Any) -> int | None:
    """How many tokens one sequence may hold, from the position table's size (None when the config has none)."""
    if not isinstance(positions, int) or positions <= 0:
        return None
    if model_type in POSITIONS_AFTER_PADDING and isinstance(pad_token_id, int):
        return positions - pad_token_id - 1
    return positions


def text_part(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's fields: a multimodal config's nested text_config, else the config itself."""
    text = config.get("text_config")
    return text if isinstance(text, Mapping) else config


@dataclass(frozen=True)
class ModelConfig:
    """A checked config.json. `data` is the file as read (the merge writes it back with its edits); the properties
    read the language model's part, under the names of every family (GPT-2's n_embd, n_head, n_positions too)."""

    path: Path
    data: Mapping[str, Any]

    @classmethod
    def load(cls, folder: Path) -> ModelConfig:
        """config.json of a model folder, its fields checked where the tool reads them: nested configs are objects,
        sizes positive integers, token ids integers, architectures strings. One error naming the file and the field."""
        path = Path(folder) / "config.json"
        config = read_json_object(path, f"is {folder} a transformers model folder (saved with save_pretrained)?")
        fields = Fields(config, path, fix=CONFIG_FIX)
        _check_config(fields)
        text = fields.get("text_config", dict, None, optional=True)
        if text is not None:
            _check_config(fields.child(text, "text_config"))
        return cls(path, config)

    @property
    def text(self) -> Mapping[str, Any]:
        return text_part(self.data)

    @property
    def architecture(self) -> str:
        """The first of `architectures` ("" when absent), e.g. LlamaForCausalLM."""
        return (self.data.get("architectures") or [""])[0]

    @property
    def vocab_size(self) -> int:
        return int(self.text["vocab_size"])

    @property
    def context(self) -> int | None:
        """The longest sequence the positions allow, when the config says."""
        text = self.text
        positions = text.get("max_position_embeddings") or text.get("n_positions")
        return usable_context(text.get("model_type", self.data.get("model_type")), positions, text.get("pad_token_id"))

    @property
    def encoder_decoder(self) -> bool:
        """T5, BART, Whisper: an encoder and a decoder that attends to it (config.json's is_encoder_decoder)."""
        return self.data.get("is_encoder_decoder") is True

    @property
    def decoder_context(self) -> int | None:
        """How many tokens an encoder-decoder's decoder may hold (Whisper's max_target_positions), when it says."""
        positions = self.data.get("max_target_positions")
        return positions if isinstance(positions, int) and positions > 0 else self.context

    @property
    def speech_input(self) -> tuple[int, int] | None:
        """A speech encoder's input (mel bins, frames): Whisper's log-mel features, two frames per encoder position."""
        bins, positions = self.data.get("num_mel_bins"), self.data.get("max_source_positions")
        if isinstance(bins, int) and isinstance(positions, int) and bins > 0 and positions > 0:
            return bins, 2 * positions
        return None

    @property
    def decoder_start(self) -> int:
        """The token an encoder-decoder's decoder starts from (decoder_start_token_id, else pad, else 0)."""
        for key in ("decoder_start_token_id", "pad_token_id", "bos_token_id"):
            value = self.data.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return 0

    @property
    def heads(self) -> int:
        return int(self.text.get("num_attention_heads") or self.text.get("n_head") or 1)

    @property
    def kv_heads(self) -> int:
        return int(self.text.get("num_key_value_heads") or self.heads)

    @property
    def hidden_size(self) -> int:
        return int(self.text.get("hidden_size") or self.text.get("n_embd") or 0)

    @property
    def head_size(self) -> int:
        return int(self.text.get("head_dim") or self.hidden_size // self.heads)


def _check_config(f: Fields) -> None:
    for key in CONFIG_OBJECTS:
        f.get(key, dict, None, optional=True)
    for key in CONFIG_SIZES:
        if f.get(key, int, None, optional=True) is not None and f.data[key] < 1:
            f.fail(key, f"must be a positive integer, found {f.data[key]}")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        value = f.get(key, (int, list), None, optional=True)
        if isinstance(value, list) and not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            f.fail(key, "must be an integer or a list of integers")
    f.get("tie_word_embeddings", bool, None, optional=True)
    if f.data.get("architectures") is not None:
        f.strings("architectures")
