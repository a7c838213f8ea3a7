"""TorchScript (`torch.jit.trace` → .pt) and torch.export (`torch.export.export` → .pt2), each reloaded in a fresh
process and compared with PyTorch eager on shapes other than the export's.

On torch 2.13 `torch.jit.trace` works but is deprecated, and `torch.jit.script` cannot compile transformers models; a
traced graph bakes Python-level shape decisions in, which is why it is checked at several shapes. torch.export keeps
dynamic batch and sequence axes. Both export the graph without past key/values.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..io.errors import ExportError, UnsupportedError
from ..io.tensorfiles import dtype_name as torch_dtype_name
from ..model.loading import context_of, model_kind
from ..records import Check
from ..records.sections import ExportSection
from ..records.tolerances import tolerance
from ..verification.compare import Case, compare, metrics_check
from .graphs import build_graph, position_ids_for

FILES = {"torchscript": "model.pt", "pt2": "model.pt2"}

_RELOAD = """
import sys, torch
kind, artifact, inputs_path, out_path = sys.argv[1:5]
inputs = torch.load(inputs_path, weights_only=True)
if kind == "torchscript":
    module = torch.jit.load(artifact)
else:
    module = torch.export.load(artifact).module()
results = []
with torch.no_grad():
    for args in inputs:
        out = module(*args)
        results.append([out] if isinstance(out, torch.Tensor) else list(out))
torch.save(results, out_path)
"""


def _cases(
    kind: str, input_names: list[str], vocab: int, seed: int, context: int | None = None
) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    g = torch.Generator().manual_seed(seed)
    cases = []
    for batch, seq in ((1, min(7, context or 7)), (3, min(19, context or 19))):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if batch > 1:
            if kind == "causal-lm":
                mask[1, :4] = 0
            else:
                mask[1, seq - 4 :] = 0
        if kind == "causal-lm":
            args: tuple[torch.Tensor, ...] = (ids, mask, position_ids_for(mask, seq))
        else:
            args = (ids, mask) + ((torch.zeros_like(ids),) if "token_type_ids" in input_names else ())
        cases.append((f"{batch}×{seq}{' padded' if batch > 1 else ''}", args))
    return cases


def export_torch(model: nn.Module, out: Path, fmt: str, dtype: str, seed: int = 0) -> tuple[ExportSection, list[Check]]:
    """Write out/model.pt or out/model.pt2; reload it in a fresh Python process; compare with eager."""
    if model_kind(model) == "causal-lm" and _transformers_major() < 5:
        raise UnsupportedError(
            f"{fmt} with transformers 4.x: its decoders build attention masks with torch.vmap, which torch.jit.trace cannot "
            "record (RuntimeError: unordered_map::at) and torch.export cannot save (SerializeError on flat_apply). "
            "Use --format onnx, or transformers 5"
        )
    graph = build_graph(model, with_past=False)
    path = out / FILES[fmt]
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter(
                "ignore"
            )  # jit.trace's deprecation and tracer warnings: the shape checks below decide
            if fmt == "torchscript":
                traced = torch.jit.trace(graph.module, graph.example, check_trace=False, strict=False)
                torch.jit.save(traced, str(path))
            else:
                program = torch.export.export(
                    graph.module,
                    graph.example,
                    dynamic_shapes=graph.dynamic_shapes,
                    strict=False,
                    prefer_deferred_runtime_asserts_over_guards=True,
                )
                torch.export.save(program, str(path))
    except Exception as e:
        raise ExportError(
            f"{fmt} export of {type(model).__name__} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    seconds = time.perf_counter() - started
    section = ExportSection(
        format=fmt,
        dtype=dtype,
        exporter="torch.jit.trace (deprecated in this torch)" if fmt == "torchscript" else "torch.export.export",
        seconds=seconds,
        file=path.name,
        kind=graph.kind,
        with_past=False,
        input_names=tuple(graph.input_names),
        output_names=tuple(graph.output_names),
    )
    return section, [check_torch_artifact(model, fmt, path, seed)]


def check_torch_artifact(model: nn.Module, fmt: str, path: Path, seed: int = 0) -> Check:
    """The artifact, reloaded in a fresh process, against `model` in eager mode at shapes other than the export's."""
    graph = build_graph(model, with_past=False)
    dtype = next(model.parameters()).dtype
    dtype_name = torch_dtype_name(dtype)
    vocab = int(model.config.get_text_config().vocab_size)
    cases = _cases(graph.kind, graph.input_names, vocab, seed, context_of(model.config))
    with torch.no_grad():
        expected = [
            [t for t in ((o,) if isinstance(o, torch.Tensor) else o)]
            for o in (graph.module(*args) for _, args in cases)
        ]
    got = reload_and_run(fmt, path, [args for _, args in cases])
    metrics = []
    for (name, args), ref, res in zip(cases, expected, got):
        seq = args[0].shape[1]
        for out_name, r, o in zip(graph.output_names, ref, res):
            metrics.append(compare(Case(name, {"attention_mask": args[1][:, -seq:]}), out_name, r.float(), o.float()))
    worst = max(m.max_rel for m in metrics)
    limit = tolerance("runtime", dtype_name).max_rel
    shapes = ", ".join(n for n, _ in cases)
    summary = f"worst rel {worst:.2g} (≤ {limit:g}) at shapes {shapes}"
    return metrics_check(
        f"{fmt} vs pytorch",
        f"{path.name} reloaded in a fresh process vs PyTorch eager, {dtype_name}",
        "runtime",
        dtype_name,
        metrics,
        summary,
    )


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def reload_and_run(fmt: str, path: Path, inputs: list[tuple[torch.Tensor, ...]]) -> list[list[torch.Tensor]]:
    """Load the artifact in a fresh Python process (nothing shared with this one) and run it on `inputs`."""
    with tempfile.TemporaryDirectory(prefix="lora-export-reload-") as tmp:
        inputs_path, out_path = Path(tmp) / "inputs.pt", Path(tmp) / "outputs.pt"
        torch.save([list(a) for a in inputs], inputs_path)
        proc = subprocess.run(
            [sys.executable, "-c", _RELOAD, fmt, str(path), str(inputs_path), str(out_path)],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ExportError(f"{path.name} does not load or run in a fresh process: {tail}")
        return torch.load(out_path, weights_only=True)
