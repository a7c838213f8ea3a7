"""What a forward pass computes, counted exactly: the structural side of "a merged model adds no latency".

Timing on a shared machine cannot resolve ±1% (two identical models differ by several percent with placement and
order); the claim itself is structural — a merged model runs the base's computation with other numbers — and that can
be shown exactly on any machine. PyTorch: every ATen operator a forward pass dispatches, its FLOPs
(torch.utils.flop_counter) and the bytes of parameters it holds. ONNX: node count, op types, and a signature of the
graph up to initializer values (nodes in order with their inputs, outputs and attributes; initializer names, shapes
and dtypes), so that "the merged graph is the base graph with other numbers" is one equality.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Structure:
    flops: int  # per forward at the measured shape
    ops: dict[str, int]  # ATen operator (or ONNX op type) → calls (nodes) per forward
    param_bytes: int  # parameters and buffers the forward reads
    signature: str = ""  # ONNX only: sha256 of the graph up to initializer values
    weights: str = ""  # ONNX only: how the weights are stored, e.g. "int4 MatMulNBits ×211 + float32"

    def to_dict(self) -> dict[str, Any]:
        return {
            "flops": self.flops,
            "op_calls": sum(self.ops.values()),
            "ops": dict(sorted(self.ops.items())),
            "param_bytes": self.param_bytes,
            **({"signature": self.signature} if self.signature else {}),
        }

    def same_as(self, other: Structure) -> bool:
        """The same computation: equal FLOPs, the same operators as often, the same parameter bytes (and for ONNX
        the same graph up to initializer values)."""
        return (self.flops, self.ops, self.param_bytes, self.signature) == (
            other.flops,
            other.ops,
            other.param_bytes,
            other.signature,
        )

    def added_over(self, base: Structure) -> dict[str, Any]:
        """What this computation adds to `base`: FLOPs, operator calls per operator, parameter bytes."""
        ops = {k: self.ops.get(k, 0) - base.ops.get(k, 0) for k in set(self.ops) | set(base.ops)}
        return {
            "flops": self.flops - base.flops,
            "op_calls": sum(self.ops.values()) - sum(base.ops.values()),
            "ops": {k: v for k, v in sorted(ops.items()) if v},
            "param_bytes": self.param_bytes - base.param_bytes,
        }


def torch_structure(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Structure:
    """One forward pass of `model` on `inputs`, counted: ATen operators dispatched, FLOPs, parameter bytes."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    calls: Counter[str] = Counter()

    class CountOps(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            calls[str(func.overloadpacket).removeprefix("aten.")] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_cpu_attention()) as flops, CountOps():
        model(**inputs)
    tensors = (*model.parameters(), *model.buffers())  # LoRA factors run at run time are buffers here
    params = {id(t): t.numel() * t.element_size() for t in tensors}  # tied weights once
    return Structure(int(flops.get_total_flops()), dict(calls), sum(params.values()))


def _cpu_attention() -> dict[Any, Any]:
    """torch.utils.flop_counter counts the CUDA kernels of scaled_dot_product_attention but not the CPU one it
    dispatches to here (aten._scaled_dot_product_flash_attention_for_cpu): without this an attention layer counted 0
    FLOPs on CPU. The same formula as the CUDA kernels' (QKᵀ and softmax·V: 4·b·h·s_q·s_kv·d)."""
    from torch.utils.flop_counter import sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return {}

    def flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(query, key, value)

    return {op: flops}


def onnx_structure(path: Path) -> Structure:
    """An ONNX graph's nodes and op types, its initializers' bytes, and its signature up to initializer values."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    h = hashlib.sha256()
    for value in (*graph.input, *graph.output):
        h.update(f"io {value.name} {value.type.SerializeToString().hex()}\n".encode())
    for node in graph.node:
        attributes = sorted((a.name, a.SerializeToString().hex()) for a in node.attribute)
        h.update(f"node {node.domain} {node.op_type} {list(node.input)} {list(node.output)} {attributes}\n".encode())
    size = 0
    for init in graph.initializer:
        h.update(f"init {init.name} {list(init.dims)} {init.data_type}\n".encode())
        count = 1
        for d in init.dims:
            count *= d
        size += count * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    ops = Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in graph.node)
    return Structure(0, dict(ops), size, h.hexdigest(), _weights(graph))


def _weights(graph: Any) -> str:
    """The weights' storage: MatMulNBits' bits and count (the builder's int8/int4), then the float initializers' dtypes
    by bytes, largest first."""
    import onnx

    bits = Counter(
        next((a.i for a in n.attribute if a.name == "bits"), 4) for n in graph.node if n.op_type == "MatMulNBits"
    )
    by_dtype: Counter[str] = Counter()
    for init in graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        if dtype.kind == "f":
            count = 1
            for d in init.dims:
                count *= d
            by_dtype[str(dtype)] += count * dtype.itemsize
    parts = [f"int{b} MatMulNBits ×{n}" for b, n in sorted(bits.items())]
    parts += [name for name, _ in by_dtype.most_common()]
    return " + ".join(parts)
