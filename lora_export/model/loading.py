"""Loading transformers models from folders by what their config says: the class, the kind of model, where its
weights go (one device, or accelerate's device map with offload), and the helpers that run such models."""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.errors import InputError, UnsupportedError
from .config import ModelConfig, usable_context


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps this module's own weights off the device (CPU or disk offload of a device map)."""
    hook = getattr(module, "_hf_hook", None)
    return any(getattr(h, "offload", False) for h in getattr(hook, "hooks", [hook]) if h is not None)


def materialized(module: nn.Module) -> Any:
    """A context in which an offloaded module's weights are real tensors on its execution device; a no-op otherwise."""
    if not is_offloaded(module):
        return contextlib.nullcontext()
    from accelerate.utils import align_module_device

    return align_module_device(module)


def execution_device(module: nn.Module) -> torch.device:
    """Where a module computes: its accelerate hook's execution device under a device map, else its weight's device."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where to put a model's inputs. Under a device map, accelerate's hooks move them to each block: keep the CPU."""
    if getattr(model, "hf_device_map", None):
        return torch.device("cpu")
    return next(model.parameters()).device


def model_class(folder: Path) -> Any:
    """The transformers class for a model folder: its architecture when transformers has it, else an Auto class."""
    import transformers

    config = ModelConfig.load(Path(folder))
    arch = config.architecture
    cls = getattr(transformers, arch, None)
    if cls is not None:
        return cls
    if "CausalLM" in arch or "LMHead" in arch:
        return transformers.AutoModelForCausalLM
    if config.encoder_decoder:
        return transformers.AutoModelForSeq2SeqLM
    if "SequenceClassification" in arch:
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModel


def model_kind(model: nn.Module) -> str:
    """causal-lm, seq2seq-lm, sequence-classification or encoder, from the model's class name."""
    return kind_of_class(type(model).__name__, bool(getattr(model.config, "is_encoder_decoder", False)))


def kind_of_class(name: str, encoder_decoder: bool = False) -> str:
    """causal-lm, seq2seq-lm (T5, BART, Whisper: an encoder and a decoder that attends to it), sequence-classification
    or encoder, from a model class name (config.json's architectures) and whether the config is an encoder-decoder
    (multimodal decoders such as LLaVA are also ...ForConditionalGeneration)."""
    if encoder_decoder:
        return "seq2seq-lm"
    if "CausalLM" in name or "LMHead" in name:
        return "causal-lm"
    if "SequenceClassification" in name:
        return "sequence-classification"
    return "encoder"


@dataclass(frozen=True)
class Placement:
    """Where models go: one device, or a device map through accelerate (`auto`, `balanced`, `sequential`) with
    optional per-device limits ({0: "20GiB", "cpu": "60GiB"}) and a folder for weights offloaded to disk."""

    device: str = "cpu"
    device_map: str | None = None
    max_memory: dict[int | str, int | str] | None = None
    offload_folder: Path | None = None


def load_model(folder: Path | str, dtype: torch.dtype = torch.float32, device: str | Placement = "cpu") -> nn.Module:
    from transformers.utils import logging

    place = device if isinstance(device, Placement) else Placement(device)
    cls = model_class(Path(folder))
    kwargs: dict[str, Any] = {}
    if place.device_map:
        if importlib.util.find_spec("accelerate") is None:
            raise UnsupportedError("--device-map needs the accelerate package: pip install 'lora-export[accelerate]'")
        kwargs = {
            "device_map": place.device_map,
            "max_memory": place.max_memory,
            "offload_folder": str(place.offload_folder) if place.offload_folder else None,
        }
    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # "Loading weights" bars for every model would bury the report
    try:
        model = cls.from_pretrained(folder, dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(f"transformers cannot load {folder}: {str(e).splitlines()[0]}") from None
    finally:
        if bars:
            logging.enable_progress_bar()
    return model.eval() if place.device_map else model.to(place.device).eval()


def placement_summary(model: nn.Module) -> dict[str, int] | None:
    """Modules per device of a device-mapped model ({"cuda:0": 12, "cpu": 3, "disk": 9}); None without a map."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return None
    counts: dict[str, int] = {}
    for where in device_map.values():
        key = f"cuda:{where}" if isinstance(where, int) else str(where)
        counts[key] = counts.get(key, 0) + 1
    return counts


def text_config(config: Any) -> Any:
    """The language model's part of a loaded transformers config (a multimodal model's text config), like
    ModelConfig.text for config.json."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_of(config: Any) -> int | None:
    """How many tokens one sequence may hold for a loaded transformers config (ModelConfig.context for config.json)."""
    text = text_config(config)
    positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    model_type = getattr(text, "model_type", None) or getattr(config, "model_type", None)
    return usable_context(model_type, positions, getattr(text, "pad_token_id", None))
