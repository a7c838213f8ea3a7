"""PEFT adapter folders → LoraAdapter: per module lora_A, lora_B, r, lora_alpha, scaling and variant.

Only what changes the math is interpreted; every config field that would change it in a way this tool does not
implement is refused by name, so an adapter is either merged exactly or not at all.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..io.errors import AdapterError, InputError, NonFiniteError, UnsafeInputError, UnsupportedError
from ..io.hashing import sha256_file
from ..io.jsonio import read_json_object
from ..io.paths import as_path, checked_link
from ..io.tensorfiles import TensorStore

PREFIX = "base_model.model."

# Config fields that do not change the merged weights (training-time or bookkeeping only).
HARMLESS_FIELDS = {
    "alpha_pattern",
    "auto_mapping",
    "base_model_name_or_path",
    "bias",
    "exclude_modules",
    "fan_in_fan_out",
    "inference_mode",
    "init_lora_weights",
    "layers_pattern",
    "layers_to_transform",
    "loftq_config",
    "lora_alpha",
    "lora_bias",
    "lora_dropout",
    "megatron_config",
    "megatron_core",
    "modules_to_save",
    "peft_type",
    "peft_version",
    "r",
    "rank_pattern",
    "revision",
    "target_modules",
    "task_type",
    "use_dora",
    "use_rslora",
    "runtime_config",
    "eva_config",
    "qalora_group_size",
    "ensure_weight_tying",
    "modules_to_tie",
}
# Fields whose presence with a non-empty value means math this tool does not implement.
REFUSED_FIELDS = {
    "target_parameters": "LoRA on raw parameters (e.g. MoE experts) is not supported",
    "layer_replication": "layer replication changes the model's structure; merge it with PEFT into a new base first",
    "trainable_token_indices": "trainable token deltas are not supported yet",
    "use_qalora": "QALoRA pools the input before lora_A; it cannot be merged as B·A",
    "alora_invocation_tokens": "activated LoRA only applies after its invocation tokens; it cannot be merged",
    "arrow_config": "Arrow routing picks adapters per token; it cannot be merged into one weight",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "corda_config": "CorDA modifies the base weights at initialisation",
    "lora_ga_config": "LoRA-GA modifies the base weights at initialisation",
    "kasa_config": "KaSA is not supported",
    "velora_config": "VeLoRA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
}
# init_lora_weights values after which the saved A/B are not a delta on the original base.
INIT_CHANGES_BASE = ("pissa", "olora", "corda", "loftq", "lora_ga", "orthogonal")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module. `kind` is "linear" (A: r×in, B: out×r) or "embedding" (A: r×vocab, B: dim×r)."""

    path: str
    kind: str
    r: int
    lora_alpha: float
    scaling: float
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    magnitude: torch.Tensor | None = None  # DoRA's m
    lora_bias: torch.Tensor | None = None  # lora_B.bias (lora_bias=True)

    @property
    def variant(self) -> str:
        parts = [self.kind]
        if self.magnitude is not None:
            parts.append("dora")
        if self.lora_bias is not None:
            parts.append("lora_bias")
        return "+".join(parts)


@dataclass(frozen=True)
class LoraAdapter:
    path: Path
    config: dict[str, Any]
    weights_file: Path
    sha256: str
    modules: dict[str, LoraModule]
    # Base tensor name → full replacement: modules_to_save, trained biases, base_layer weights PEFT saved.
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)

    def files(self) -> list[dict[str, Any]]:
        cfg = self.path / "adapter_config.json"
        return [
            {"name": cfg.name, "sha256": sha256_file(cfg), "size": cfg.stat().st_size},
            {"name": self.weights_file.name, "sha256": self.sha256, "size": self.weights_file.stat().st_size},
        ]


def scaling_for(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """PEFT: s = α/r, or α/√r with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first key whose regex `(.*\\.)?(key)$` matches the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    if not folder.is_dir():
        raise InputError(f"adapter folder {folder} does not exist")
    config = read_json_object(
        path,
        f"is {folder} a PEFT adapter folder (saved with save_pretrained)?",
        AdapterError,
        ": re-save the adapter with PEFT",
    )
    check_config(config, path)
    return config


def check_config(config: dict[str, Any], path: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedError(f"{path}: peft_type is {peft_type!r}; only LORA adapters can be merged by this tool")
    for key, why in REFUSED_FIELDS.items():
        if config.get(key):
            raise UnsupportedError(f"{path}: {key}={config[key]!r}: {why}. Refusing rather than merging it wrongly")
    unknown = sorted(
        k
        for k, v in config.items()
        if k not in HARMLESS_FIELDS and k not in REFUSED_FIELDS and v not in (None, False, {}, [])
    )
    if unknown:
        raise UnsupportedError(
            f"{path}: config field(s) {', '.join(unknown)} are unknown to this tool and may change the math; "
            "refusing rather than merging wrongly (upgrade lora-export, or remove the field if it is bookkeeping)"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(INIT_CHANGES_BASE):
        raise UnsupportedError(
            f"{path}: init_lora_weights={init!r} changes the base weights at initialisation, so this adapter is not a "
            "delta on the original base. Save it with PEFT's path_initial_model_for_weight_conversion to get one that is"
        )
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        value = config.get(key)
        if not _positive(value, kind):
            raise AdapterError(f"{path}: {key} must be a positive finite number, found {value!r}")
    for key, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        value = config.get(key) or {}
        if not isinstance(value, dict) or not all(_positive(v, kind) for v in value.values()):
            raise AdapterError(f"{path}: {key} must map module patterns to positive finite numbers, found {value!r}")
        for pattern in value:
            _check_regex(path, key, pattern)
    target = config.get("target_modules")
    if isinstance(target, str):
        _check_regex(path, "target_modules", target)
    elif target is not None and not (isinstance(target, list) and all(isinstance(t, str) for t in target)):
        raise AdapterError(f"{path}: target_modules must be a regex or a list of module names, found {target!r}")
    for key in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out"):
        if not isinstance(config.get(key, False), bool):
            raise AdapterError(f"{path}: {key} must be true or false, found {config[key]!r}")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise AdapterError(f"{path}: bias must be 'none', 'all' or 'lora_only', found {config['bias']!r}")


def _positive(value: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_regex(path: Path, key: str, pattern: str) -> None:
    """PEFT matches these as regular expressions: one that does not compile is refused here, naming it."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise AdapterError(f"{path}: {key} pattern {pattern!r} is not a valid regular expression ({e})") from None


def open_adapter_weights(folder: Path, allow_pickle: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    st = folder / "adapter_model.safetensors"
    pk = folder / "adapter_model.bin"
    if st.is_file():
        checked_link(folder, st, f"{folder}'s weights")
        store = TensorStore.open_safetensors([st])
        path = st
    elif pk.is_file():
        if not allow_pickle:
            raise UnsafeInputError(
                f"{pk} is a pickle, which can run code when loaded: pass --allow-pickle to load it with "
                "torch.load(weights_only=True), or convert it to adapter_model.safetensors"
            )
        store = TensorStore.open_pickle(pk)
        path = pk
    else:
        raise InputError(
            f"{folder} has no adapter_model.safetensors (or adapter_model.bin): is it a PEFT adapter folder?"
        )
    try:
        return path, {name: store.read(name) for name in store.names()}
    finally:
        store.close()


_MODULE_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "embA",
    ".lora_embedding_B": "embB",
    ".lora_magnitude_vector": "m",
    ".lora_magnitude_vector.weight": "m",
}


def load_adapter(folder: Path | str, allow_pickle: bool = False) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder. Shapes are checked against each other here and against the base in merge."""
    folder = as_path(folder)
    config = read_config(folder)
    weights_file, tensors = open_adapter_weights(folder, allow_pickle)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterError(
                f"{weights_file}: key {key!r} does not start with {PREFIX!r}: not a PEFT adapter file (or saved with a custom prefix)"
            )
        if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise AdapterError(
                f"{weights_file}: tensor {key} has dtype {tensor.dtype}; adapter weights must be float16, bfloat16, "
                "float32 or float64 (convert the adapter, e.g. with PEFT, before merging)"
            )
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteError(
                f"{weights_file}: tensor {key} has {bad} NaN/Inf values: the adapter is broken (diverged training?)"
            )
        rest = key[len(PREFIX) :]
        for suffix, role in _MODULE_SUFFIXES.items():
            if rest.endswith(suffix):
                module = rest[: -len(suffix)]
                if re.search(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.", module + "."):
                    raise AdapterError(
                        f"{weights_file}: key {key!r} has an unexpected layout (adapter name left in the key?)"
                    )
                parts.setdefault(module, {})[role] = tensor
                break
        else:
            if ".lora_" in rest or ".token_adapter." in rest:
                raise AdapterError(f"{weights_file}: key {key!r} is not a LoRA tensor this tool understands")
            # modules_to_save, biases (bias="all"/"lora_only") and base weights PEFT saved beside embedding LoRA
            replacements[rest.replace(".base_layer.", ".")] = tensor
    modules = {path: _build_module(path, p, config, weights_file) for path, p in parts.items()}
    if not modules and not replacements:
        raise AdapterError(f"{weights_file}: no LoRA tensors found: the adapter is empty")
    check_targets(config, list(modules), folder / "adapter_config.json")
    return LoraAdapter(folder, config, weights_file, sha256_file(weights_file), modules, replacements)


def targets_module(target_modules: str | list[str], path: str) -> bool:
    """PEFT's check_target_module_exists: a string is a regex matched in full, a list matches names or name suffixes."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == t or path.endswith(f".{t}") for t in target_modules)


def check_targets(config: dict[str, Any], modules: list[str], path: Path) -> None:
    """Every module the weights adapt must be one target_modules selects: otherwise config and weights disagree."""
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear" or not modules:
        return
    if not isinstance(targets, (str, list)) or (
        isinstance(targets, list) and not all(isinstance(t, str) for t in targets)
    ):
        raise AdapterError(
            f"{path}: target_modules must be a list of module names or a regex string, found {targets!r}"
        )
    try:
        stray = [m for m in modules if not targets_module(targets, m)]
    except re.error as e:
        raise AdapterError(f"{path}: target_modules {targets!r} is not a valid regex ({e})") from None
    if stray:
        which = "match none of" if len(stray) == len(modules) else "do not match"
        raise AdapterError(
            f"{path}: target_modules {targets!r} {which} the modules the weights adapt (e.g. {stray[0]}): the config "
            "does not belong to these weights; re-save the adapter with PEFT's save_pretrained"
        )


def _build_module(path: str, p: dict[str, torch.Tensor], config: dict[str, Any], file: Path) -> LoraModule:
    if "A" in p or "B" in p:
        kind, a, b = "linear", p.get("A"), p.get("B")
    else:
        kind, a, b = "embedding", p.get("embA"), p.get("embB")
    if a is None or b is None:
        raise AdapterError(
            f"{file}: module {path} has {'lora_B' if a is None else 'lora_A'} but not its pair: the file is incomplete"
        )
    if a.dim() != 2 or b.dim() != 2:
        raise AdapterError(
            f"{file}: module {path}: lora_A and lora_B must be matrices, found shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    r = a.shape[0]
    if b.shape[1] != r:
        raise AdapterError(
            f"{file}: module {path}: lora_A has rank {r} (shape {tuple(a.shape)}) but lora_B has {b.shape[1]} (shape {tuple(b.shape)})"
        )
    out_features, in_features = b.shape[0], a.shape[1]
    if r > max(out_features, in_features):
        raise AdapterError(
            f"{file}: module {path} has rank {r}, larger than the layer itself ({out_features}×{in_features}): not a "
            "low-rank update (a corrupt file, or r set absurdly); retrain with r below the layer's size"
        )
    r_config = pattern_value(config.get("rank_pattern") or {}, path, config["r"])
    if r_config != r:
        raise AdapterError(
            f"{file}: module {path} has rank {r} in its tensors but {r_config} in adapter_config.json (r / rank_pattern)"
        )
    alpha = pattern_value(config.get("alpha_pattern") or {}, path, config["lora_alpha"])
    scaling = scaling_for(r, alpha, bool(config.get("use_rslora")))
    magnitude, bias = p.get("m"), p.get("bias")
    if magnitude is not None and not config.get("use_dora"):
        raise AdapterError(
            f"{file}: module {path} has a DoRA magnitude vector but use_dora is false in adapter_config.json"
        )
    if config.get("use_dora") and magnitude is None:
        raise AdapterError(f"{file}: use_dora is true but module {path} has no lora_magnitude_vector")
    if magnitude is not None and magnitude.shape != (out_features,):
        raise AdapterError(
            f"{file}: module {path}: DoRA magnitude has shape {tuple(magnitude.shape)}, expected ({out_features},)"
        )
    if bias is not None and bias.shape != (out_features,):
        raise AdapterError(
            f"{file}: module {path}: lora_B.bias has shape {tuple(bias.shape)}, expected ({out_features},)"
        )
    return LoraModule(path, kind, r, float(alpha), scaling, a, b, magnitude, bias)
