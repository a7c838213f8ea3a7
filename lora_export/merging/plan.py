"""Planning a merge: which base tensor gets which delta (or replacement), in which layout and output dtype, with
every mismatch between adapter and base refused before anything is written."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..io.errors import LoraExportError, ShapeMismatchError, UnsupportedError
from ..model.adapters import LoraAdapter, LoraModule
from ..model.base import BaseModel

OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Contribution:
    adapter: int
    module: LoraModule
    weight: float
    transposed: bool


@dataclass
class TensorPlan:
    name: str  # output name
    source: str  # stored base tensor it starts from (differs for untied copies of tied weights)
    out_dtype: torch.dtype
    shape: tuple[int, ...]
    deltas: list[Contribution] = field(default_factory=list)
    bias_deltas: list[Contribution] = field(default_factory=list)
    replacement: tuple[int, torch.Tensor] | None = None  # (adapter index, tensor) that replaces W0

    @property
    def touched(self) -> bool:
        return bool(self.deltas or self.bias_deltas or self.replacement)


def resolve_dtype(option: str, stored: torch.dtype) -> torch.dtype:
    if option == "auto" or not stored.is_floating_point:
        return stored
    if option not in OUTPUT_DTYPES:
        raise LoraExportError(f"--dtype {option!r}: choose auto, {', '.join(OUTPUT_DTYPES)}")
    return OUTPUT_DTYPES[option]


def plan_merge(
    base: BaseModel, adapters: Sequence[LoraAdapter], weights: Sequence[float], dtype: str
) -> tuple[list[TensorPlan], dict[str, str], list[str]]:
    """Return (plans in output order, untied {output: source}, notes). Raises on anything that does not fit."""
    store, notes = base.store, []
    aliases = base.tied_aliases() if needs_tie_check(base, adapters) else {}
    plans = {
        info.name: TensorPlan(info.name, info.name, resolve_dtype(dtype, info.dtype), info.shape)
        for info in store.ordered()
    }
    for dst, src in aliases.items():
        info = store.infos[src]
        plans[dst] = TensorPlan(dst, src, resolve_dtype(dtype, info.dtype), info.shape)

    for i, (adapter, w) in enumerate(zip(adapters, weights)):
        for path, module in adapter.modules.items():
            plan = _target(plans, f"{path}.weight", adapter, path)
            transposed = module_layout(base, module, plan.shape, adapter)
            plan.deltas.append(Contribution(i, module, w, transposed))
            if module.lora_bias is not None:
                bias = _target(
                    plans, f"{path}.bias", adapter, path, "lora_bias is true, but the base layer has no bias"
                )
                bias.bias_deltas.append(Contribution(i, module, w, transposed))
        for name, tensor in adapter.replacements.items():
            plan = _target(plans, name, adapter, name.rsplit(".", 1)[0])
            if tuple(tensor.shape) != plan.shape:
                raise ShapeMismatchError(
                    f"{adapter.weights_file}: {name} has shape {'×'.join(map(str, tensor.shape))} but the base has "
                    f"{'×'.join(map(str, plan.shape))}: a resized vocabulary or another base model? Resizing is not supported"
                )
            if plan.replacement is not None:
                if not torch.equal(plan.replacement[1], tensor):
                    raise UnsupportedError(
                        f"{name} is replaced by both {adapters[plan.replacement[0]].path} and {adapter.path} "
                        "(modules_to_save or trained bias) with different values: merge these adapters separately"
                    )
                continue
            if w != 1.0 and not torch.equal(tensor, store.read(plan.source).to(tensor.dtype)):
                raise UnsupportedError(
                    f"{adapter.path} replaces {name} (modules_to_save or trained bias) and has weight {w}: a weighted "
                    "full replacement is not defined; use weight 1.0 for this adapter"
                )
            plan.replacement = (i, tensor)

    untied = {dst: src for dst, src in aliases.items() if plans[dst].touched or plans[src].touched}
    for dst in set(aliases) - set(untied):
        del plans[dst]
    for dst, src in untied.items():
        notes.append(
            f"{dst} was tied to {src}; the merge changes one of them, so the output stores both and sets tie_word_embeddings=false"
        )
    return list(plans.values()), untied, notes


def _target(plans: dict[str, TensorPlan], name: str, adapter: LoraAdapter, module: str, why: str = "") -> TensorPlan:
    if name not in plans:
        raise ShapeMismatchError(
            f"{adapter.weights_file}: adapter targets {module}, but the base has no tensor {name}"
            f"{': ' + why if why else ''}: is this adapter for another base model?"
        )
    return plans[name]


def needs_tie_check(base: BaseModel, adapters: Sequence[LoraAdapter]) -> bool:
    """Building the model on the meta device costs seconds: only when a tied embedding may be touched."""
    if not base.tie_word_embeddings:
        return False
    vocab = base.text_config().get("vocab_size")
    for adapter in adapters:
        for path, module in adapter.modules.items():
            if module.kind == "embedding" or f"{path}.weight" not in base.store or module.lora_B.shape[0] == vocab:
                return True
        for name, tensor in adapter.replacements.items():
            if name not in base.store or (tensor.dim() == 2 and tensor.shape[0] == vocab):
                return True
    return False


def module_layout(base: BaseModel, module: LoraModule, shape: tuple[int, ...], adapter: LoraAdapter) -> bool:
    """True when the base stores this weight transposed (in×out): Conv1D (fan_in_fan_out) and embeddings."""
    out_f, in_f = module.lora_B.shape[0], module.lora_A.shape[1]
    where = f"{adapter.weights_file}: adapter targets {module.path}"
    if module.kind == "embedding":
        if shape != (in_f, out_f):
            raise ShapeMismatchError(
                f"{where} (embedding {in_f}×{out_f}) but the base has {'×'.join(map(str, shape))}: is this adapter for another base model?"
            )
        return True
    if shape not in ((out_f, in_f), (in_f, out_f)):
        raise ShapeMismatchError(
            f"{where} (shape {out_f}×{in_f}) but the base has {'×'.join(map(str, shape))}: is this adapter for another base model?"
        )
    if out_f != in_f:
        return shape == (in_f, out_f)
    conv1d = base.is_conv1d(module.path)
    if conv1d is None:  # unknown architecture and a square weight: only the config can tell
        return bool(adapter.config.get("fan_in_fan_out"))
    return conv1d  # PEFT forces fan_in_fan_out from the module class, whatever the config says
