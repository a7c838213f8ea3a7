"""The FLOPs of one run of an ONNX graph at given input shapes, counted from the graph: every shape inferred by ONNX
Runtime's symbolic shape inference (which knows its contrib ops: MatMulNBits, GroupQueryAttention, …) from concrete
input shapes, then the multiply-adds of each matrix product counted as torch.utils.flop_counter counts them — 2·M·N·K
per product, 4·b·h·s_q·s_kv·d per attention — so that an ONNX row and a PyTorch row of one model agree exactly, and
"merged = base" is one equality on every backend. Element-wise ops, norms and softmax are not counted (as in PyTorch's
counter)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Ops that multiply matrices and are not counted here: a graph holding one gets no FLOPs (None), never a low number.
UNCOUNTED = {"Conv", "ConvTranspose", "Einsum", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
             "QAttention", "DecoderMaskedMultiHeadAttention", "PackedAttention", "SparseAttention"}  # fmt: skip


COUNTED = {"MatMul", "MatMulInteger", "FusedMatMul", "Gemm", "MatMulNBits", "GroupQueryAttention",
           "MultiHeadAttention", "Attention"}  # fmt: skip
MAX_RUN_BYTES = 1_800_000_000  # a graph run for its shapes is one protobuf (2 GB at most) plus its external data


def onnx_flops(path: Path, input_shapes: Mapping[str, Sequence[int]]) -> int | None:
    """FLOPs of one run of the graph at `input_shapes` (graph inputs by name; an input not given takes its
    initializer's shape, e.g. a shared graph's zero-rank LoRA defaults). Shapes come from ONNX Runtime's symbolic
    shape inference for graphs of its contrib ops (the GenAI builder's); for the rest (the dynamo exporter's shape
    arithmetic defeats it), or where it leaves one unknown, from one run of the graph
    in ONNX Runtime on zeros of those shapes with every counted node's values as outputs. None when the graph holds a
    matrix op this counter does not know, or is too large to run that way."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(n.op_type in UNCOUNTED for n in model.graph.node):
        return None
    defaults = {init.name: list(init.dims) for init in model.graph.initializer}
    given = {v.name: list(input_shapes.get(v.name, defaults.get(v.name, []))) for v in model.graph.input}
    counted = [n for n in model.graph.node if n.op_type in COUNTED]
    shapes: dict[str, list[int] | None] = {}
    if any(n.domain == "com.microsoft" for n in model.graph.node):  # ORT's inference knows these graphs' ops
        inferred = onnx.ModelProto()
        inferred.CopyFrom(model)
        shapes = _inferred_shapes(inferred, given, set(input_shapes))
    if any(_node_flops(n, shapes) is None for n in counted):
        try:
            shapes = _run_shapes(model, path, given, set(input_shapes), counted)
        except Exception:  # noqa: BLE001 — a graph ONNX Runtime cannot run on zeros here: no count, not a wrong one
            return None
        if shapes is None:
            return None
    flops = [_node_flops(n, shapes) for n in counted]
    return None if None in flops else sum(flops)  # type: ignore[arg-type]


def _inferred_shapes(model: Any, given: dict[str, list[int]], fed: set[str]) -> dict[str, list[int] | None]:
    """Shapes by symbolic inference on `model` (changed in place): the inputs pinned to `given`, and the defaults of
    the inputs the caller feeds (`fed`) dropped, so that their given shapes count."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    for init in [i for i in model.graph.initializer if i.name in fed]:
        model.graph.initializer.remove(init)
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, given[value.name], strict=False):
            dim.Clear()
            dim.dim_value = int(size)
    _constants_as_tensors(model.graph)
    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 — an op it cannot infer: the run below measures the shapes instead
        inferred = None
    return _shapes(inferred.graph) if inferred is not None else {}


def _run_shapes(
    model: Any, path: Path, given: dict[str, list[int]], fed: set[str], counted: list[Any]
) -> dict[str, list[int] | None] | None:
    """Every counted node's input and output shapes, from one run on zeros (ones for the attention mask) of the
    graph `model` read from `path` (ONNX Runtime reads its external weights from that folder); `fed`: the inputs the
    caller gives, overridable initializers included (a shared graph's LoRA A/B), the rest at their defaults."""
    import numpy as np
    import onnxruntime as ort
    from onnx import helper

    if model.ByteSize() > MAX_RUN_BYTES:  # weights held inside the graph: one protobuf holds 2 GB at most
        return None
    known = {v.name for v in (*model.graph.input, *model.graph.output)} | {i.name for i in model.graph.initializer}
    wanted = sorted({x for n in counted for x in (*n.input, *n.output) if x} - known)
    model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in wanted)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own nodes
    options.log_severity_level = 3
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent.resolve()))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {}
    initialized = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initialized and value.name not in fed:
            continue  # its default, as it is
        make = np.ones if value.name == "attention_mask" else np.zeros
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = make(given[value.name], dtype=dtype)
    names = [o.name for o in session.get_outputs()]
    shapes: dict[str, list[int] | None] = {n: list(a.shape) for n, a in zip(names, session.run(names, feeds))}
    shapes.update({i.name: list(i.dims) for i in model.graph.initializer})
    shapes.update(given)  # a fed input over its default
    return shapes


def _constants_as_tensors(graph: Any) -> None:
    """Constant nodes written with value_int(s) / value_float(s) (the dynamo exporter's) rewritten with a `value`
    tensor, the form ONNX Runtime's symbolic shape inference reads."""
    import numpy as np
    from onnx import helper, numpy_helper

    kinds = {"value_int": np.int64, "value_ints": np.int64, "value_float": np.float32, "value_floats": np.float32}
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
            continue
        attribute = node.attribute[0]
        if attribute.name in kinds:
            value = np.array(helper.get_attribute_value(attribute), dtype=kinds[attribute.name])
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value)))


def _shapes(graph: Any) -> dict[str, list[int] | None]:
    """Every value's shape: concrete dims, or None when any dim is unknown."""
    out: dict[str, list[int] | None] = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        dims = value.type.tensor_type.shape.dim
        known = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        out[value.name] = None if None in known else known  # type: ignore[assignment]
    for init in graph.initializer:
        out[init.name] = list(init.dims)
    return out


def _attribute(node: Any, name: str, default: int = 0) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _node_flops(node: Any, shapes: dict[str, list[int] | None]) -> int | None:
    """One node's FLOPs (0 for an op that multiplies no matrices); None when a shape it needs is unknown."""
    op = node.op_type

    def shape(i: int) -> list[int] | None:
        return shapes.get(node.input[i]) if len(node.input) > i and node.input[i] else None

    if op in ("MatMul", "MatMulInteger", "FusedMatMul"):
        a, out = shape(0), shapes.get(node.output[0])
        if a is None or out is None:
            return None
        k = a[-2] if op == "FusedMatMul" and _attribute(node, "transA") else a[-1]
        return 2 * math.prod(out) * k
    if op == "Gemm":
        a, out = shape(0), shapes.get(node.output[0])
        if a is None or out is None:
            return None
        return 2 * math.prod(out) * (a[0] if _attribute(node, "transA") else a[1])
    if op == "MatMulNBits":
        a = shape(0)
        return None if a is None else 2 * math.prod(a[:-1]) * _attribute(node, "K") * _attribute(node, "N")
    if op in ("GroupQueryAttention", "MultiHeadAttention"):
        return _packed_attention(node, shape(0), shape(3) if op == "GroupQueryAttention" else shape(6))
    if op == "Attention" and node.domain in ("", "ai.onnx"):  # ONNX 23: Q, K, V 4-D (b, h, s, d) or 3-D
        q, k, out = shape(0), shape(1), shapes.get(node.output[0])
        if q is None or k is None or out is None:
            return None
        heads = _attribute(node, "q_num_heads") or (q[1] if len(q) == 4 else 1)
        d = q[-1] if len(q) == 4 else q[-1] // heads
        s_q, s_kv = q[-2], k[-2]
        past = shape(4)
        return 4 * q[0] * heads * s_q * (s_kv + (past[-2] if past else 0)) * d
    return 0


def _packed_attention(node: Any, query: list[int] | None, past_key: list[int] | None) -> int | None:
    """GroupQueryAttention / MultiHeadAttention: query (b, s, h·d); the keys are the past (b, kv_h, p, d) and the s
    new ones — QKᵀ and softmax·V over every (query, key) pair, as PyTorch's counter counts its attention."""
    if query is None:
        return None
    b, s, width = query
    heads = _attribute(node, "num_heads")
    packed = len(node.input) < 2 or not node.input[1]  # query holds Q, K and V side by side (h + 2·kv_h heads)
    d = width // (heads + 2 * _attribute(node, "kv_num_heads", heads)) if packed else width // heads
    past = past_key[2] if past_key is not None and len(past_key) == 4 else 0
    return 4 * b * heads * s * (past + s) * d
