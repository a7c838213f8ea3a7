"""Swappable LoRA on the GenAI model builder's graph: the shared multi-LoRA layout on the fast graph.

The builder names every projection's MatMul after the module (`/model/layers.3/attn/o_proj/MatMul`, weight
[in, out]; in its int4/int8 graphs a MatMulNBits `…/MatMul_Q4`, whose K × N is that shape: the LoRA stays float
beside the quantized weight, so one quantized base serves exact adapters) and packs q, k and v into one `qkv_proj` MatMul (columns q | k | v). Beside each adapted MatMul this adds
x·Aᵀ·Bᵀ, with A (r × in) and B (out × r) graph inputs whose defaults have rank 0 — the same names, shapes and
`.onnx_adapter` files as the dynamo shared graph — and adds it to the MatMul's output before anything reads it.
For a packed MatMul, q, k and v each get inputs (rank 0 where no variant adapts them) and their three products are
concatenated in the packed order. A module whose MatMul is not found, or whose weight shape disagrees, is refused:
the graph is never guessed at. The numbers are then checked in ONNX Runtime GenAI, base and every variant.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..io.errors import UnsupportedError
from ..model.config import ModelConfig

PACKED = {"q_proj": 0, "k_proj": 1, "v_proj": 2}  # order of the builder's packed qkv_proj columns


def node_path(module: str) -> str:
    """The builder's node prefix for a transformers module path: model.layers.3.self_attn.q_proj →
    /model/layers.3/attn/q_proj."""
    module = re.sub(r"\.layers\.(\d+)\.", r"/layers.\1/", module.replace("self_attn", "attn"))
    return "/" + module.replace(".", "/").replace("/layers/", "/layers.")


def _packed_widths(config: ModelConfig) -> tuple[int, int, int]:
    """The q, k and v widths of the builder's packed qkv_proj."""
    return config.heads * config.head_size, config.kv_heads * config.head_size, config.kv_heads * config.head_size


def plan_branches(
    graph: Any, modules: dict[str, tuple[int, int]], config: ModelConfig
) -> dict[str, list[tuple[str, int, int]]]:
    """MatMul node name → [(module, out, in)] in the order of its output columns; refuses what it cannot place."""
    nodes = {_float_name(n.name): n for n in graph.node if n.op_type in ("MatMul", "MatMulNBits")}
    plan: dict[str, list[tuple[str, int, int]]] = {}
    for module, (out, inp) in sorted(modules.items()):
        prefix = node_path(module)
        name, leaf = f"{prefix}/MatMul", prefix.rsplit("/", 1)[-1]
        if name not in nodes and leaf in PACKED:
            name = f"{prefix.rsplit('/', 1)[0]}/qkv_proj/MatMul"
            widths = _packed_widths(config)
            base = module.rsplit(".", 1)[0]
            plan[name] = [(f"{base}.{p}", widths[i], inp) for p, i in PACKED.items()]
            if widths[PACKED[leaf]] != out:
                raise UnsupportedError(f"{module}: {out} outputs, but the builder's packed q/k/v gives it {widths}")
            continue
        if name not in nodes:
            raise UnsupportedError(f"{module}: the GenAI builder's graph has no MatMul {name} to attach its LoRA to")
        plan[name] = [(module, out, inp)]
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    for name, parts in plan.items():
        weight = _weight_shape(nodes[name], shapes)
        expected = [parts[0][2], sum(out for _, out, _ in parts)]
        if weight != expected:
            raise UnsupportedError(f"{name}: weight shape {weight}, expected {expected} for {[p[0] for p in parts]}")
    return {nodes[name].name: parts for name, parts in plan.items()}


def _float_name(node: str) -> str:
    """A projection's node name as in the float graph: the builder's int4/int8 graphs name it MatMul_Q4/MatMul_Q8."""
    return re.sub(r"/MatMul_Q\d+$", "/MatMul", node)


def _weight_shape(node: Any, shapes: dict[str, list[int]]) -> list[int] | None:
    """[in, out] of a projection: its float weight's shape, or a MatMulNBits' K and N (its weight is packed blocks)."""
    if node.op_type == "MatMulNBits":
        attrs = {a.name: a.i for a in node.attribute}
        return [attrs.get("K", -1), attrs.get("N", -1)]
    return shapes.get(node.input[1])


def add_lora_inputs(path: Path, modules: dict[str, tuple[int, int]], config: ModelConfig) -> list[str]:
    """Rewrite the builder graph at `path` (its external data untouched) with a LoRA branch per module; returns the
    modules that have inputs (q, k and v of a packed MatMul all do)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    plan = plan_branches(graph, modules, config)
    if any(i.data_type != TensorProto.FLOAT for i in graph.initializer if i.name.endswith("MatMul.weight")):
        raise UnsupportedError("the shared layout on the GenAI graph is float32; this graph's weights are not")
    nodes = {n.name: n for n in graph.node}
    branches: dict[str, list[Any]] = {}
    added: list[str] = []
    for name, parts in plan.items():
        x, y = nodes[name].input[0], nodes[name].output[0]
        new, deltas = [], []
        for module, out, inp in parts:
            a, b = f"{module}.lora_A", f"{module}.lora_B"
            rank = f"rank:{module}"  # one symbol per module: variants differ in rank per module
            graph.input.append(helper.make_tensor_value_info(a, TensorProto.FLOAT, [rank, inp]))
            graph.input.append(helper.make_tensor_value_info(b, TensorProto.FLOAT, [out, rank]))
            graph.initializer.append(numpy_helper.from_array(np.zeros((0, inp), np.float32), a))
            graph.initializer.append(numpy_helper.from_array(np.zeros((out, 0), np.float32), b))
            stem = f"{node_path(module)}/lora"
            new += [
                helper.make_node("Transpose", [a], [f"{stem}/At"], f"{stem}/TransposeA", perm=[1, 0]),
                helper.make_node("Transpose", [b], [f"{stem}/Bt"], f"{stem}/TransposeB", perm=[1, 0]),
                helper.make_node("MatMul", [x, f"{stem}/At"], [f"{stem}/xA"], f"{stem}/MatMulA"),
                helper.make_node("MatMul", [f"{stem}/xA", f"{stem}/Bt"], [f"{stem}/delta"], f"{stem}/MatMulB"),
            ]
            deltas.append(f"{stem}/delta")
            added.append(module)
        delta = deltas[0]
        if len(deltas) > 1:
            delta = f"{name}/lora/delta"
            new.append(helper.make_node("Concat", deltas, [delta], f"{name}/lora/Concat", axis=-1))
        nodes[name].output[0] = f"{y}/without_lora"  # the sum takes the MatMul's output name: readers stay
        new.append(helper.make_node("Add", [f"{y}/without_lora", delta], [y], f"{name}/lora/Add"))
        branches[name] = new
    ordered = []
    for node in graph.node:  # each branch right after its MatMul: the order stays topological
        ordered += [node, *branches.get(node.name, [])]
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.save(model, str(path))
    return added
