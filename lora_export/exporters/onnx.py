"""ONNX export (torch.onnx.export, dynamo=True) and its proof: ONNX Runtime against PyTorch on several shapes, and
greedy generation with the KV cache in an ONNX Runtime loop."""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ExportError, UnsupportedError
from ..tensors import DISK_ERRNOS, dtype_name as torch_dtype_name
from ..verify import TOLERANCES, Case, Check, compare, compare_tokens, metrics_check
from .graphs import CacheShape, Graph, build_graph, cache_shape, position_ids_for

TWO_GB = 2 * 1024**3


@dataclass(frozen=True)
class OnnxOptions:
    opset: int = 20
    optimize: bool = False  # ONNX Runtime's extended graph optimisations, saved in place of the plain graph
    with_past: bool = True  # decoders: past_key_values inputs and present outputs
    max_new_tokens: int = 16  # greedy tokens generated in ONNX Runtime and in PyTorch


@dataclass
class OnnxExport:
    path: Path
    exporter: str
    seconds: float
    kind: str
    with_past: bool
    input_names: list[str]
    output_names: list[str]
    external_data: bool
    optimized: bool
    opset: int
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _quiet() -> Any:
    """The dynamo exporter prints progress lines on stdout (a command printing JSON cannot have them there) and
    warnings about axis names and deprecations that are not the user's to act on."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        registration.setLevel(level)


def export_onnx(model: nn.Module, path: Path, options: OnnxOptions = OnnxOptions(), log: Callable[[str], None] = lambda s: None) -> OnnxExport:
    """Export `model` (a loaded transformers model) to `path`; weights in `path.data` when over 2 GB."""
    dtype = next(model.parameters()).dtype
    if dtype == torch.bfloat16:
        raise UnsupportedError(
            "bfloat16 ONNX: ONNX Runtime's CPU provider has no bfloat16 kernels for the ops these models use "
            "(MatMul, Softmax, …), so the artifact could not be verified here: export float16 or float32"
        )
    graph = build_graph(model, options.with_past)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = nbytes > TWO_GB * 0.9
    started = time.perf_counter()
    exporter, notes = "torch.onnx.export(dynamo=True)", []
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(graph.module, graph.example, dynamo=True, dynamic_shapes=graph.dynamic_shapes,
                                        input_names=graph.input_names, output_names=graph.output_names,
                                        opset_version=options.opset, verbose=False,
                                        # onnxscript's optimiser takes ~40% of the export time (28 of 70 s on SmolLM2)
                                        # and changed nothing measurable in ONNX Runtime, which optimises at load
                                        optimize=False)
            program.save(str(path), external_data=external)
    except Exception as e:  # the recommended exporter failed: say why, then try the TorchScript-based one
        if (disk := _os_error_in(e)) is not None:  # a full or read-only disk fails any exporter alike
            raise disk from None
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        log(f"note: the dynamo exporter failed ({reason}); falling back to the TorchScript-based exporter (deprecated)")
        notes.append(f"dynamo exporter failed: {reason}")
        exporter = "torch.onnx.export(dynamo=False) fallback"
        _export_torchscript_based(graph, path, options.opset)
    seconds = time.perf_counter() - started
    result = OnnxExport(path, exporter, seconds, graph.kind, graph.with_past, graph.input_names, graph.output_names,
                        external, False, options.opset, notes)
    _check_model(path)
    if options.optimize:
        optimize_in_place(path, external)
        result.optimized = True
        _check_model(path)
    return result


def _export_torchscript_based(graph: Graph, path: Path, opset: int) -> None:
    axes: dict[str, dict[int, str]] = {}
    for name in graph.input_names + graph.output_names:
        if name.startswith(("past_key_values", "present")):
            axes[name] = {0: "batch", 2: "past_sequence" if name.startswith("past") else "total_sequence"}
        elif name in ("logits", "last_hidden_state"):
            axes[name] = {0: "batch", 1: "sequence"}
        elif name == "attention_mask" and graph.with_past:
            axes[name] = {0: "batch", 1: "total_sequence"}
        else:
            axes[name] = {0: "batch", 1: "sequence"} if name != "pooler_output" else {0: "batch"}
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(graph.module, graph.example, str(path), dynamo=False, input_names=graph.input_names,
                              output_names=graph.output_names, dynamic_axes=axes, opset_version=opset)
    except Exception as e:
        if (disk := _os_error_in(e)) is not None:
            raise disk from None
        raise ExportError(f"ONNX export failed with both exporters: {type(e).__name__}: {e}") from None


def _os_error_in(e: BaseException) -> OSError | None:
    """A disk's OSError (full, read-only) that an exporter wrapped in its own exception: not an exporter problem."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _check_model(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)  # by path: works for external data too
    except Exception as e:
        raise ExportError(f"{path}: the exported graph fails onnx.checker: {e}") from None


def optimize_in_place(path: Path, external: bool) -> None:
    """Apply ONNX Runtime's extended (portable) graph optimisations and save the result over `path`."""
    import onnxruntime as ort

    tmp = path.with_name(path.stem + ".optimized.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp)
    if external:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", tmp.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    tmp.replace(path)
    tmp_data = tmp.with_name(tmp.name + ".data")
    if tmp_data.exists():  # the graph refers to its data file by name: keep that name
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        for t in model.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = data.name
        tmp_data.replace(data)
        onnx.save(model, str(path))


# ---------------------------------------------------------------------------------------------------------------------
# Proof: ONNX Runtime vs PyTorch


def session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _cases(graph: Graph, vocab: int, seed: int, dtype: torch.dtype) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """(name, inputs in graph order) for batch 1 and 4, short and long, padded; a decode step."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for batch, seq in ((1, 6), (4, 32)):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        for row in range(1, batch):
            pad = int(torch.randint(1, seq // 2, (1,), generator=g))
            if graph.kind == "causal-lm":
                mask[row, :pad] = 0
            else:
                mask[row, seq - pad:] = 0
        name = f"{batch}×{seq}{' padded' if batch > 1 else ''}"
        if graph.kind != "causal-lm":
            extra = (torch.zeros_like(ids),) if "token_type_ids" in graph.input_names else ()
            cases.append((name, (ids, mask, *extra)))
        elif not graph.with_past:
            cases.append((name, (ids, mask, position_ids_for(mask, seq))))
        else:
            shape = graph.cache
            empty = tuple(torch.zeros(batch, shape.kv_heads, 0, shape.head_dim, dtype=dtype) for _ in range(2 * shape.layers))
            cases.append((f"prefill {name}", (ids, mask, position_ids_for(mask, seq), *empty)))
    return cases


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _compare_outputs(graph: Graph, name: str, inputs: tuple[torch.Tensor, ...], ref: Sequence[torch.Tensor], got: Sequence[np.ndarray]) -> list[Any]:
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


def verify_onnx(model: nn.Module, export: OnnxExport, options: OnnxOptions, seed: int = 0, prompt: list[int] | None = None,
                eos: int | None = None) -> tuple[list[Check], dict[str, Any] | None]:
    """Run the ONNX file in ONNX Runtime and the PyTorch model on the same inputs; compare; generate greedily."""
    dtype = next(model.parameters()).dtype
    dtype_name = torch_dtype_name(dtype)
    graph = build_graph(model, export.with_past)
    sess = session(export.path)
    have = {i.name for i in sess.get_inputs()}, {o.name for o in sess.get_outputs()}
    if have[0] != set(graph.input_names) or not set(graph.output_names) <= have[1]:
        found = f"inputs {sorted(have[0])}, outputs {sorted(have[1])}"
        return [Check("onnx names", "graph input and output names", dtype_name, False, f"expected {graph.input_names} → {graph.output_names}, found {found}",
                      [f"input/output names differ from the contract: {found}"])], None
    vocab = int(model.config.get_text_config().vocab_size)
    metrics = []
    decode_from = None
    for name, inputs in _cases(graph, vocab, seed, dtype):
        with torch.no_grad():
            ref = graph.module(*inputs)
        ref = (ref,) if isinstance(ref, torch.Tensor) else ref
        got = sess.run(graph.output_names, {n: _to_numpy(t) for n, t in zip(graph.input_names, inputs)})  # by name, not position
        metrics += _compare_outputs(graph, name, inputs, ref, got)
        decode_from = (inputs, ref)
    if graph.with_past and decode_from is not None:  # one decode step on top of the padded prefill's cache
        (ids, mask, _pos, *_), ref = decode_from
        g = torch.Generator().manual_seed(seed + 1)
        step = torch.randint(0, vocab, (ids.shape[0], 1), generator=g)
        mask2 = torch.cat([mask, torch.ones(ids.shape[0], 1, dtype=mask.dtype)], 1)
        inputs = (step, mask2, position_ids_for(mask2, 1), *ref[1:])
        with torch.no_grad():
            ref2 = graph.module(*inputs)
        got2 = sess.run(graph.output_names, {n: _to_numpy(t) for n, t in zip(graph.input_names, inputs)})
        metrics += _compare_outputs(graph, f"decode {ids.shape[0]}×1 past {ids.shape[1]}", inputs, ref2, got2)
    worst = max(metrics, key=lambda m: m.max_rel if m.max_rel == m.max_rel else float("inf"))
    summary = f"worst rel {worst.max_rel:.2g} ({worst.case}/{worst.output}; ≤ {TOLERANCES[dtype_name].max_rel:g}), {len(metrics)} outputs compared"
    check = metrics_check("onnx vs pytorch", f"ONNX Runtime vs PyTorch eager, {dtype_name}", dtype_name, metrics, summary)
    checks = [check]
    generation = None
    if graph.kind == "causal-lm" and graph.with_past and options.max_new_tokens > 0:
        prompt = prompt or torch.randint(0, vocab, (8,), generator=torch.Generator().manual_seed(seed + 2)).tolist()
        torch_tokens = greedy_loop(lambda *a: [_to_numpy(t) for t in _as_tuple(graph.module(*[torch.from_numpy(x) for x in a]))], graph.cache, prompt, options.max_new_tokens, eos, dtype)
        ort_tokens = greedy_loop(lambda *a: sess.run(graph.output_names, dict(zip(graph.input_names, a))), graph.cache, prompt, options.max_new_tokens, eos, dtype)
        generation = compare_tokens(torch_tokens, ort_tokens)
        generation["prompt_tokens"] = prompt
        ok = generation["identical"]
        checks.append(Check("onnx generation", f"{len(torch_tokens)} greedy tokens with the KV cache, ONNX Runtime vs PyTorch", dtype_name, ok,
                            "identical" if ok else f"first difference at token {generation['first_difference']}",
                            [] if ok else [f"greedy tokens differ from token {generation['first_difference']}"], details=generation))
    return checks, generation


def _as_tuple(x: Any) -> tuple[torch.Tensor, ...]:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


@torch.no_grad()
def greedy_loop(run: Callable[..., Sequence[np.ndarray]], shape: CacheShape, prompt: list[int], n: int, eos: int | None, dtype: torch.dtype) -> list[int]:
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


def onnx_files(path: Path) -> list[Path]:
    data = path.with_name(path.name + ".data")
    return [path] + ([data] if data.exists() else [])



def onnx_generate(folder: Path, prompt: str, max_new_tokens: int) -> str:
    """Answer a chat prompt with the ONNX model in `folder` (model.onnx + tokenizer + config), in ONNX Runtime."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    shape = cache_shape(AutoConfig.from_pretrained(folder, local_files_only=True))
    sess = session(folder / "model.onnx")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    names = [i.name for i in sess.get_inputs()]
    outputs = ["logits"] + [n.replace("past_key_values", "present") for n in names[3:]]  # presents in the order of the pasts
    dtype = torch.float16 if sess.get_inputs()[3].type == "tensor(float16)" else torch.float32
    tokens = greedy_loop(lambda *a: sess.run(outputs, dict(zip(names, a))), shape, ids, max_new_tokens, tokenizer.eos_token_id, dtype)
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()
