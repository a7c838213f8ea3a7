"""LoRA applied at run time, unmerged, without PEFT: h = W0·x + Σ wᵢ·sᵢ·Bᵢ·Aᵢ·x (and DoRA's rescaling).

It is the reference the merge is checked against (verify), a variant of the latency benchmark, and the graph that
keeps adapters swappable. It reads the same LoraAdapter objects as the merge, so the two can only differ in the
arithmetic: the merge folds B·A into W0, this module multiplies x by A then B.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..io.errors import InputError, ShapeMismatchError, UnsupportedError
from ..merging.delta import dora_scale
from ..model.adapters import LoraAdapter, LoraModule, load_adapter
from ..model.loading import Placement, execution_device, is_offloaded, load_model, materialized


@dataclass(frozen=True)
class Branch:
    """One adapter's LoRA on one layer. Its tensors are buffers of the layer: lora_A_i (r×in), lora_B_i (out×r, times
    the scaling s), and when present lora_bias_i (s·lora_B.bias) and dora_scale_i (m / ‖W0 + ΔW‖ per output)."""

    adapter: int
    weight: float
    dora: bool
    bias: bool


class LoraLayer(nn.Module):
    """A base nn.Linear, transformers Conv1D or nn.Embedding with unmerged LoRA branches beside it."""

    def __init__(self, base_layer: nn.Module, kind: str, transposed: bool):
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind  # "linear" or "embedding"
        self.transposed = transposed  # the base stores its weight in×out (Conv1D) or vocab×dim (embedding)
        self.branches: list[Branch] = []
        self.weights: list[float] = []

    def add(self, module: LoraModule, adapter: int, weight: float) -> None:
        dtype = self.base_layer.weight.dtype
        i = len(self.branches)
        self.register_buffer(f"lora_A_{i}", module.lora_A.to(dtype))  # (r, in) or (r, vocab)
        self.register_buffer(f"lora_B_{i}", (module.scaling * module.lora_B.float()).to(dtype))  # (out, r) or (dim, r)
        if module.lora_bias is not None:
            self.register_buffer(f"lora_bias_{i}", (module.scaling * module.lora_bias.float()).to(dtype))
        if module.magnitude is not None:
            with materialized(self.base_layer):
                scale = dora_scale(module, self.base_layer.weight.detach().float(), self.transposed)
            self.register_buffer(f"dora_scale_{i}", scale.to(dtype))
        self.branches.append(Branch(adapter, weight, module.magnitude is not None, module.lora_bias is not None))

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "embedding":
            return self.base_layer(x) / self._embed_scale()
        with materialized(self.base_layer):
            w0 = self.base_layer.weight
            return x @ w0 if self.transposed else F.linear(x, w0)

    def _embed_scale(self) -> Any:
        return getattr(self.base_layer, "embed_scale", 1.0)  # scaled embeddings (Gemma) multiply inside forward

    def lora(self, x: torch.Tensor, i: int) -> torch.Tensor:
        a, b = getattr(self, f"lora_A_{i}"), getattr(self, f"lora_B_{i}")
        if self.kind == "embedding":
            e = self.base_layer
            after_a = F.embedding(
                x, a.T, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse
            )  # (…, r)
            return after_a @ b.T
        return F.linear(F.linear(x, a), b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        plain = None
        for i, br in enumerate(self.branches):
            delta = self.lora(x, i)
            if br.dora:  # W = scale·(W0 + ΔW), scale = m/‖W0 + ΔW‖: the branch adds scale·(W0·x + ΔW·x) − W0·x
                scale = getattr(self, f"dora_scale_{i}")
                plain = self.base_without_bias(x) if plain is None else plain
                delta = (scale - 1) * plain + scale * delta
            if self.kind == "embedding":
                delta = delta * self._embed_scale()
            if br.bias:
                delta = delta + getattr(self, f"lora_bias_{i}")
            out = out + br.weight * delta
        return out

    def effective_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W0 + Σ wᵢ·ΔWᵢ and the bias plus Σ wᵢ·sᵢ·lora_biasᵢ, fp32, in the base's layout: what a correct merge holds."""
        with materialized(self.base_layer):
            w0 = self.base_layer.weight.detach().float().cpu()
            bias = getattr(self.base_layer, "bias", None)
            bias = None if bias is None else bias.detach().float().cpu().clone()
        w = w0.clone()
        for i, br in enumerate(self.branches):
            d = getattr(self, f"lora_B_{i}").float().cpu() @ getattr(self, f"lora_A_{i}").float().cpu()
            d = d.T if self.transposed else d
            if br.dora:
                scale = getattr(self, f"dora_scale_{i}").float().cpu()
                d = (w0 + d) * (scale if self.transposed else scale.unsqueeze(1)) - w0
            w += br.weight * d
            if br.bias and bias is not None:
                bias += br.weight * getattr(self, f"lora_bias_{i}").float().cpu()
        return w, bias


def _find_module(model: nn.Module, path: str, adapter: LoraAdapter) -> tuple[str, nn.Module]:
    modules = dict(model.named_modules())
    candidates = [path]
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and path.startswith(prefix + "."):  # trained on a *ForXxx head model, loaded as the bare model
        candidates.append(path[len(prefix) + 1 :])
    elif prefix:
        candidates.append(f"{prefix}.{path}")
    for name in candidates:
        if name in modules:
            return name, modules[name]
    raise ShapeMismatchError(
        f"{adapter.weights_file}: adapter targets {path}, which this model ({type(model).__name__}) does not have: is this adapter for another base model?"
    )


def _layout(module: nn.Module, lora: LoraModule, name: str, adapter: LoraAdapter) -> bool:
    """Whether the base weight is stored transposed; refuses module types and shapes that do not fit."""
    cls = type(module).__name__
    weight = getattr(module, "weight", None)
    out_f, in_f = lora.lora_B.shape[0], lora.lora_A.shape[1]
    if lora.kind == "embedding":
        ok, transposed = isinstance(module, nn.Embedding), True
        expected = (in_f, out_f)
    elif isinstance(module, nn.Linear):
        ok, transposed, expected = True, False, (out_f, in_f)
    elif cls == "Conv1D":
        ok, transposed, expected = True, True, (in_f, out_f)
    else:
        raise UnsupportedError(
            f"{adapter.weights_file}: {name} is a {cls}; LoRA at run time supports nn.Linear, Conv1D and nn.Embedding"
        )
    if not ok:
        raise ShapeMismatchError(f"{adapter.weights_file}: embedding LoRA on {name}, which is a {cls}")
    if weight is None or tuple(weight.shape) != expected:
        found = "none" if weight is None else "×".join(map(str, weight.shape))
        raise ShapeMismatchError(
            f"{adapter.weights_file}: adapter targets {name} (expects {'×'.join(map(str, expected))}) but the model has {found}: is this adapter for another base model?"
        )
    return transposed


def apply_lora(
    model: nn.Module, adapters: Sequence[LoraAdapter], weights: Sequence[float] | None = None
) -> dict[str, LoraLayer]:
    """Wrap the targeted layers of `model` (in place) with LoraLayer; apply modules_to_save and trained biases.

    Replaced tensors get new Parameters on their own module, so a tied embedding stays as it was on the other side,
    as in PEFT's unmerged model. Returns {module name: LoraLayer}.
    """
    weights = tuple(weights) if weights else (1.0,) * len(adapters)
    if len(weights) != len(adapters):
        raise InputError(f"{len(weights)} weights given for {len(adapters)} adapters")
    layers: dict[str, LoraLayer] = {}
    for i, (adapter, w) in enumerate(zip(adapters, weights)):
        for path, lora in adapter.modules.items():
            name, module = _find_module(model, path, adapter)
            if name not in layers:
                base = module.base_layer if isinstance(module, LoraLayer) else module
                layers[name] = LoraLayer(base, lora.kind, _layout(base, lora, name, adapter))
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, layers[name])
            layers[name].add(lora, i, w)
        for tensor_name, tensor in adapter.replacements.items():
            module_path, _, param = tensor_name.rpartition(".")
            name, module = _find_module(model, module_path, adapter)
            target = module.base_layer if isinstance(module, LoraLayer) else module
            if is_offloaded(target):
                raise UnsupportedError(
                    f"{adapter.weights_file}: {tensor_name} replaces a weight of {name}, which the device map offloads; "
                    "give --max-memory enough room to keep that module on a device"
                )
            old = getattr(target, param, None)
            if old is None or tuple(old.shape) != tuple(tensor.shape):
                raise ShapeMismatchError(
                    f"{adapter.weights_file}: {tensor_name} has shape {tuple(tensor.shape)}; the model's is {None if old is None else tuple(old.shape)}"
                )
            setattr(target, param, nn.Parameter(tensor.to(old.dtype).clone(), requires_grad=False))
    for layer in layers.values():  # the LoRA tensors go where the base layer runs; the base layer stays put
        device = execution_device(layer.base_layer)
        for key, buf in layer.named_buffers(recurse=False):
            layer._buffers[key] = buf.to(device)
    return layers


def effective_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict a correct merge of this LoRA-wrapped model has: W0 + ΔW per wrapped layer (fp32, on the CPU)."""
    return dict(iter_effective_state(model))


def iter_effective_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """effective_state one tensor at a time: a wrapped layer's W0 + ΔW exists only until the next is asked for.

    Read module by module, so weights that a device map offloaded to the CPU or disk are fetched for the read.
    """
    inside_lora: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside_lora):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, LoraLayer):
            inside_lora.append(name)
            w, b = module.effective_weight()
            yield prefix + "weight", w
            if b is not None:
                yield prefix + "bias", b
            continue
        offloaded = is_offloaded(module)
        with materialized(module):  # fetched weights are copied to the CPU; the others are referenced, not copied
            for key, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                yield prefix + key, (t.detach().cpu() if offloaded else t.detach())


def load_unmerged(
    base_dir: Path | str,
    adapter_dirs: Sequence[Path | str],
    weights: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    device: str | Placement = "cpu",
) -> nn.Module:
    """The base model with the adapters applied at run time (the reference of verify)."""
    adapters = [load_adapter(Path(a), allow_pickle) for a in adapter_dirs]
    model = load_model(base_dir, dtype, device)
    apply_lora(model, adapters, weights)
    return model.eval()
