"""Proof that an ONNX model computes what PyTorch computes: ONNX Runtime and the PyTorch graph wrapper on the same
inputs (batch 1 and 4, short and long, left-padded, one decode step on the cache), every output compared on valid
tokens, and greedy generation with the KV cache in an ONNX Runtime loop."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io.tensorfiles import dtype_name as torch_dtype_name
from ..model.loading import context_of
from ..records import Check
from ..records.tolerances import tolerance
from ..verification.compare import Case, compare, compare_tokens, metrics_check
from .graphs import CacheShape, Graph, build_graph, cache_shape, position_ids_for
from .onnx import OnnxExport, OnnxOptions


def session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    from ..io.processes import RUNTIME_THREADS

    so = ort.SessionOptions()
    threads = threads or RUNTIME_THREADS  # in a worker process: its share of the cores
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _cases(
    graph: Graph, vocab: int, seed: int, dtype: torch.dtype, context: int | None = None
) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """(name, inputs in graph order) for batch 1 and 4, short and long, padded, within the model's context (one
    position left for the decode step)."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for batch, seq in ((1, min(6, context - 1 if context else 6)), (4, min(32, context - 1 if context else 32))):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        for row in range(1, batch):
            pad = int(torch.randint(1, seq // 2, (1,), generator=g))
            if graph.kind == "causal-lm":
                mask[row, :pad] = 0
            else:
                mask[row, seq - pad :] = 0
        name = f"{batch}×{seq}{' padded' if batch > 1 else ''}"
        if graph.kind != "causal-lm":
            extra = (torch.zeros_like(ids),) if "token_type_ids" in graph.input_names else ()
            cases.append((name, (ids, mask, *extra)))
        elif not graph.with_past:
            cases.append((name, (ids, mask, position_ids_for(mask, seq))))
        else:
            shape = graph.cache
            empty = tuple(
                torch.zeros(batch, shape.kv_heads, 0, shape.head_dim, dtype=dtype) for _ in range(2 * shape.layers)
            )
            cases.append((f"prefill {name}", (ids, mask, position_ids_for(mask, seq), *empty)))
    return cases


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _compare_outputs(
    graph: Graph, name: str, inputs: tuple[torch.Tensor, ...], ref: Sequence[torch.Tensor], got: Sequence[np.ndarray]
) -> list[Any]:
    mask = inputs[1]
    seq = inputs[0].shape[1]
    metrics = []
    for out_name, r, o in zip(graph.output_names, ref, got):
        o_t = torch.from_numpy(np.asarray(o)).float()
        r_t = r.float()
        if out_name.startswith("present"):  # (batch, heads, total, head_dim) → (batch, total, heads·head_dim)
            b, h, t, d = r_t.shape
            r_t, o_t = r_t.permute(0, 2, 1, 3).reshape(b, t, h * d), o_t.permute(0, 2, 1, 3).reshape(b, t, h * d)
            case = Case(name, {"attention_mask": mask})
        else:
            case = Case(name, {"attention_mask": mask[:, -seq:]})
        metrics.append(compare(case, out_name, r_t, o_t))
    return metrics


def verify_onnx(
    model: nn.Module,
    export: OnnxExport,
    options: OnnxOptions,
    seed: int = 0,
    prompt: list[int] | None = None,
    eos: int | None = None,
) -> tuple[list[Check], dict[str, Any] | None]:
    """Run the ONNX file in ONNX Runtime and the PyTorch model on the same inputs; compare; generate greedily."""
    dtype = next(model.parameters()).dtype
    dtype_name = torch_dtype_name(dtype)
    graph = build_graph(model, export.with_past)
    sess = session(export.path)
    have = {i.name for i in sess.get_inputs()}, {o.name for o in sess.get_outputs()}
    if have[0] != set(graph.input_names) or not set(graph.output_names) <= have[1]:
        found = f"inputs {sorted(have[0])}, outputs {sorted(have[1])}"
        expected = f"expected {graph.input_names} → {graph.output_names}, found {found}"
        failure = f"input/output names differ from the contract: {found}"
        return [Check("onnx names", "graph input and output names", dtype_name, False, expected, (failure,))], None
    vocab, context = int(model.config.get_text_config().vocab_size), context_of(model.config)
    # A half-precision graph is compared with PyTorch computing in float32 on the same (rounded) weights: PyTorch's
    # own float16 CPU path rounds between ops and measured 8× further from that than ONNX Runtime (SmolLM2, one
    # random 4×32 row: 0.062 vs 0.0075 of the logits' scale), so it is the worse reference for the artifact.
    with computing_in_float32(model):
        checks = [_outputs_check(graph, sess, vocab, seed, dtype, context)]
    generation = None
    if graph.kind == "causal-lm" and graph.with_past and options.max_new_tokens > 0:
        prompt = prompt or torch.randint(0, vocab, (8,), generator=torch.Generator().manual_seed(seed + 2)).tolist()
        check, generation = _generation_check(graph, sess, prompt, options.max_new_tokens, eos, dtype)
        checks.append(check)
    return checks, generation


@contextlib.contextmanager
def computing_in_float32(model: nn.Module) -> Iterator[None]:
    """The model's floating tensors in float32 for the block, then back to exactly their own dtypes (float16 and
    bfloat16 values are float32 values): the float32 reference without a second copy of the model."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    dtypes = [t.dtype for t in tensors]
    with torch.no_grad():
        for t in tensors:
            t.data = t.data.float()
    try:
        yield
    finally:
        with torch.no_grad():
            for t, dtype in zip(tensors, dtypes, strict=True):
                t.data = t.data.to(dtype)


def _reference_run(reference: Graph, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """PyTorch on `inputs`, cast to the dtype the model computes in (float32 inside computing_in_float32)."""
    dtype = next(reference.module.parameters()).dtype
    with torch.no_grad():
        return _as_tuple(reference.module(*[t.to(dtype) if t.is_floating_point() else t for t in inputs]))


def _outputs_check(graph: Graph, sess: Any, vocab: int, seed: int, dtype: torch.dtype, context: int | None) -> Check:
    """Every output at every case, then one decode step on top of the padded prefill's cache."""
    dtype_name = torch_dtype_name(dtype)
    metrics = []
    decode_from = None
    for name, inputs in _cases(graph, vocab, seed, dtype, context):
        ref = _reference_run(graph, inputs)
        feeds = {n: _to_numpy(t) for n, t in zip(graph.input_names, inputs, strict=True)}
        got = sess.run(graph.output_names, feeds)  # by name, not position
        metrics += _compare_outputs(graph, name, inputs, ref, got)
        decode_from = (inputs, ref)
    if graph.with_past and decode_from is not None:
        (ids, mask, _pos, *_), ref = decode_from
        step = torch.randint(0, vocab, (ids.shape[0], 1), generator=torch.Generator().manual_seed(seed + 1))
        mask2 = torch.cat([mask, torch.ones(ids.shape[0], 1, dtype=mask.dtype)], 1)
        inputs = (step, mask2, position_ids_for(mask2, 1), *[t.to(dtype) for t in ref[1:]])
        ref2 = _reference_run(graph, inputs)
        got2 = sess.run(graph.output_names, {n: _to_numpy(t) for n, t in zip(graph.input_names, inputs, strict=True)})
        metrics += _compare_outputs(graph, f"decode {ids.shape[0]}×1 past {ids.shape[1]}", inputs, ref2, got2)
    worst = max(metrics, key=lambda m: m.max_rel if m.max_rel == m.max_rel else float("inf"))
    limit = tolerance("runtime", dtype_name).max_rel
    summary = (
        f"worst rel {worst.max_rel:.2g} ({worst.case}/{worst.output}; ≤ {limit:g}), {len(metrics)} outputs compared"
    )
    compares = f"ONNX Runtime vs PyTorch eager, {dtype_name}"
    if dtype != torch.float32:
        compares = f"ONNX Runtime in {dtype_name} vs PyTorch eager in float32 on the same {dtype_name} weights"
    return metrics_check("onnx vs pytorch", compares, "runtime", dtype_name, metrics, summary)


def _generation_check(
    graph: Graph, sess: Any, prompt: list[int], n: int, eos: int | None, dtype: torch.dtype
) -> tuple[Check, dict[str, Any]]:
    """Greedy tokens with the KV cache: the PyTorch graph wrapper vs ONNX Runtime, each in the same loop."""

    def torch_step(*a: np.ndarray) -> list[np.ndarray]:
        return [_to_numpy(t) for t in _as_tuple(graph.module(*[torch.from_numpy(x) for x in a]))]

    def ort_step(*a: np.ndarray) -> list[np.ndarray]:
        return sess.run(graph.output_names, dict(zip(graph.input_names, a, strict=True)))

    torch_tokens = greedy_loop(torch_step, graph.cache, prompt, n, eos, dtype)
    ort_tokens = greedy_loop(ort_step, graph.cache, prompt, n, eos, dtype)
    generation = {**compare_tokens(torch_tokens, ort_tokens), "prompt_tokens": prompt}
    ok = generation["identical"]
    first = generation["first_difference"]
    check = Check(
        "onnx generation",
        f"{len(torch_tokens)} greedy tokens with the KV cache, ONNX Runtime vs PyTorch",
        torch_dtype_name(dtype),
        ok,
        "identical" if ok else f"first difference at token {first}",
        () if ok else (f"greedy tokens differ from token {first}",),
        details=generation,
    )
    return check, generation


def _as_tuple(x: Any) -> tuple[torch.Tensor, ...]:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


@torch.no_grad()
def greedy_loop(
    run: Callable[..., Sequence[np.ndarray]],
    shape: CacheShape,
    prompt: list[int],
    n: int,
    eos: int | None,
    dtype: torch.dtype,
) -> list[int]:
    """Greedy decoding with the exported graph's contract: prefill with an empty cache, then one token per step."""
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    past = [np.zeros((1, shape.kv_heads, 0, shape.head_dim), dtype=np_dtype) for _ in range(2 * shape.layers)]
    ids = np.asarray([prompt], dtype=np.int64)
    mask = np.ones((1, len(prompt)), dtype=np.int64)
    tokens: list[int] = []
    for _ in range(n):
        pos = position_ids_for(torch.from_numpy(mask), ids.shape[1]).numpy()
        out = run(ids, mask, pos, *past)
        nxt = int(np.asarray(out[0])[0, -1].argmax())
        tokens.append(nxt)
        if eos is not None and nxt == eos:
            break
        past = [np.asarray(p) for p in out[1:]]
        ids = np.asarray([[nxt]], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
    return tokens


def onnx_generate(folder: Path, prompt: str, max_new_tokens: int) -> str:
    """Answer a chat prompt with the ONNX model in `folder` (model.onnx + tokenizer + config), in ONNX Runtime."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    shape = cache_shape(AutoConfig.from_pretrained(folder, local_files_only=True))
    sess = session(folder / "model.onnx")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    names = [i.name for i in sess.get_inputs()]
    outputs = ["logits"] + [
        n.replace("past_key_values", "present") for n in names[3:]
    ]  # presents in the order of the pasts
    dtype = torch.float16 if sess.get_inputs()[3].type == "tensor(float16)" else torch.float32
    tokens = greedy_loop(
        lambda *a: sess.run(outputs, dict(zip(names, a))), shape, ids, max_new_tokens, tokenizer.eos_token_id, dtype
    )
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()
