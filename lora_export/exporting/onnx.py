"""ONNX export (torch.onnx.export, dynamo=True) and its proof: ONNX Runtime against PyTorch on several shapes, and
greedy generation with the KV cache in an ONNX Runtime loop."""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.errors import ExportError, UnsupportedError
from ..io.outputs import DISK_ERRNOS
from .graphs import Graph, build_graph

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


def export_onnx(
    model: nn.Module, path: Path, options: OnnxOptions = OnnxOptions(), log: Callable[[str], None] = lambda s: None
) -> OnnxExport:
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
            program = torch.onnx.export(
                graph.module,
                graph.example,
                dynamo=True,
                dynamic_shapes=graph.dynamic_shapes,
                input_names=graph.input_names,
                output_names=graph.output_names,
                opset_version=options.opset,
                verbose=False,
                # onnxscript's optimiser takes ~40% of the export time (28 of 70 s on SmolLM2)
                # and changed nothing measurable in ONNX Runtime, which optimises at load
                optimize=False,
            )
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
    result = OnnxExport(
        path,
        exporter,
        seconds,
        graph.kind,
        graph.with_past,
        graph.input_names,
        graph.output_names,
        external,
        False,
        options.opset,
        notes,
    )
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
            torch.onnx.export(
                graph.module,
                graph.example,
                str(path),
                dynamo=False,
                input_names=graph.input_names,
                output_names=graph.output_names,
                dynamic_axes=axes,
                opset_version=opset,
            )
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


def onnx_files(path: Path) -> list[Path]:
    data = path.with_name(path.name + ".data")
    return [path] + ([data] if data.exists() else [])
