"""The variants bench compares, loaded as PyTorch models or ONNX Runtime sessions, and their inputs."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..model.loading import load_model, model_kind, text_config
from ..verification.compare import DTYPES
from ..verification.lora_runtime import LoraLayer, load_unmerged
from .baselines import insert_adapters, plan_adapters
from .timing import BenchOptions, Row


def lora_params(model: nn.Module) -> int:
    return sum(
        getattr(m, n).numel()
        for m in model.modules()
        if isinstance(m, LoraLayer)
        for n, _ in m.named_buffers(recurse=False)
        if n.startswith(("lora_A_", "lora_B_"))
    )


def _torch_variants(
    base_dir: Path,
    adapters: Sequence[Path],
    merged_dir: Path,
    options: BenchOptions,
    adapter_params: dict[str, int] | None,
) -> list[tuple[Row, nn.Module]]:
    dtype, device = DTYPES[options.dtype], options.device
    unmerged = load_unmerged(base_dir, adapters, dtype=dtype, device=device)
    n_lora = lora_params(unmerged)
    variants: list[tuple[Row, nn.Module]] = [
        (Row("base", "torch", 0, "the base model as it is"), load_model(base_dir, dtype, device)),
        (
            Row(
                "base-copy",
                "torch",
                0,
                "a second load of the base: what two identical models differ by here (A/A control)",
            ),
            load_model(base_dir, dtype, device),
        ),
        (Row("merged", "torch", 0, "W0 + ΔW folded in (lora-export merge)"), load_model(merged_dir, dtype, device)),
        (Row("lora-unmerged", "torch", n_lora, "base + B·A·x at run time (lora_runtime)"), unmerged),
    ]
    for kind in ("H", "L"):
        model = load_model(base_dir, dtype, device)
        plan = plan_adapters(model, kind, (adapter_params or {}).get(kind) or options.adapter_params or n_lora)
        insert_adapters(model, plan, options.seed)
        where = (
            "two per block (after attention, after MLP)"
            if kind == "H"
            else "one per block after the MLP, with LayerNorm"
        )
        desc = f"{where}, bottleneck {plan.bottleneck}"
        variants.append((Row(f"adapter-{kind}", "torch", plan.params, desc), model.eval()))
    materialize([model for _, model in variants])
    return variants


def materialize(models: Sequence[nn.Module]) -> None:
    """Copy every model's weights out of their memory-mapped files into ordinary memory, interleaved tensor by tensor
    across the models. transformers maps safetensors files privately, and a file written moments ago (the merged one)
    measured up to 10% slower; copied one model after the other, the model copied second measured 13–15% faster than
    the first with identical weights (GPT-2 medium, batch 1, this VM). Interleaved, each model's tensors are spread
    over the same memory, and who is copied first rotates, so placement does not pick a winner."""
    tensors = [list(m.parameters()) + list(m.buffers()) for m in models]
    with torch.no_grad():
        for i, group in enumerate(itertools.zip_longest(*tensors)):
            k = i % len(group)  # rotate who goes first: within a group the later copies measured faster
            for t in group[k:] + group[:k]:
                if t is not None:
                    t.data = t.data.clone()


def _inputs(model: nn.Module, shape: tuple[int, int], seed: int, device: str) -> dict[str, torch.Tensor]:
    config = text_config(model.config)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(config.vocab_size), shape, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _torch_call(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], Any]:
    extra = {"use_cache": False} if model_kind(model) == "causal-lm" else {}

    def call() -> Any:
        with torch.inference_mode():
            return model(**inputs, **extra)

    return call


def _ort_calls(
    variants: list[tuple[Row, nn.Module]],
    workdir: Path,
    options: BenchOptions,
    onnx_dir: Path | None,
    log: Callable[[str], None],
) -> list[tuple[Row, Any]]:
    """Each torch variant exported (no past) and opened in ONNX Runtime; `onnx_dir` replaces the merged export."""
    import onnxruntime as ort

    from ..exporting.onnx import OnnxOptions, export_onnx
    from ..verification.structure import onnx_structure

    providers = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if options.device.startswith("cuda")
        else ["CPUExecutionProvider"]
    )
    out: list[tuple[Row, Any, Path]] = []
    graphs: dict[str, Any] = {}
    for row, model in variants:
        path = workdir / f"{row.variant}.onnx"
        if row.variant == "merged" and onnx_dir is not None:
            path = onnx_dir / "model.onnx"
        else:
            log(f"exporting {row.variant} to ONNX for the onnxruntime backend …")
            export_onnx(model, path, OnnxOptions(with_past=False))
        so = ort.SessionOptions()
        if options.threads:
            so.intra_op_num_threads = options.threads
        so.log_severity_level = 3
        ort_row = replace(row, backend="onnxruntime", cells={}, structure={})
        out.append((ort_row, ort.InferenceSession(str(path), so, providers=providers), path))
        graphs[row.variant] = onnx_structure(path)
    add_graph_structure([r for r, _, _ in out], graphs)
    return out


class OnnxFlops:
    """Each ONNX row's FLOPs at a cell's input shapes (lora_export.verification.onnx_flops), counted once per graph
    structure and shape: graphs equal up to initializer values (base, base-copy, merged) compute the same."""

    def __init__(self) -> None:
        self.counted: dict[tuple[str, str], int | None] = {}

    def count(self, row: Row, path: Path, shapes: dict[str, Any], more: dict[str, Any] | None = None) -> int | None:
        """`shapes`: the graph inputs' shapes, or the feeds themselves; `more`: the shapes of the inputs an active
        adapter supplies (its LoRA A/B, by input name)."""
        from ..verification.onnx_flops import onnx_flops

        dims = {
            name: tuple(np.shape(value)) if hasattr(value, "shape") else tuple(value) for name, value in shapes.items()
        }
        dims.update({name: tuple(d) for name, d in (more or {}).items()})
        key = (row.structure.get("signature") or str(path), repr(sorted(dims.items())))
        if key not in self.counted:
            self.counted[key] = onnx_flops(path, dims)
        return self.counted[key]

    def fill(self, row: Row, path: Path, shapes: dict[str, Any], cell: str, more: dict[str, Any] | None = None) -> None:
        row.cells[cell].flops = self.count(row, path, shapes, more)


def add_graph_structure(rows: Sequence[Row], graphs: dict[str, Any]) -> None:
    """Each ONNX row's graph against the base's: nodes and op types, and whether it is the base graph up to
    initializer values (lora_export.verification.structure.onnx_structure); what it adds when it is not."""
    base = graphs["base"]
    for row in rows:
        g = graphs[row.variant]
        row.structure = {
            "identical_to_base": g.same_as(base),
            "signature": g.signature,
            "graph_nodes": sum(g.ops.values()),
            "graph_ops": dict(sorted(g.ops.items())),
            "weight_bytes": g.param_bytes,
            "weights": g.weights,
        }
        if not row.structure["identical_to_base"]:
            added = g.added_over(base)
            row.structure["graph_adds"] = {k: added[k] for k in ("op_calls", "ops", "param_bytes")}


def _ort_feeds(session: Any, inputs: dict[str, torch.Tensor], model: Any) -> dict[str, Any]:
    """Feeds for an exported graph; `model` is a loaded model or just its config (for the cache's shape)."""

    from ..exporting.graphs import cache_shape, position_ids_for

    ids, mask = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu()
    feeds: dict[str, Any] = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = ids.numpy()
        elif inp.name == "attention_mask":
            feeds[inp.name] = mask.numpy()
        elif inp.name == "position_ids":
            feeds[inp.name] = position_ids_for(mask, ids.shape[1]).numpy()
        elif inp.name == "token_type_ids":
            feeds[inp.name] = np.zeros_like(ids.numpy())
        elif inp.name.startswith("past_key_values"):
            shape = cache_shape(getattr(model, "config", model))
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[inp.name] = np.zeros((ids.shape[0], shape.kv_heads, 0, shape.head_dim), dtype=dtype)
    return feeds


def graph_cells(rows: Sequence[Row]) -> None:
    """Each ONNX row's cells get its graph's node counts: a graph runs each node once per forward, at every shape."""
    for row in rows:
        if "graph_nodes" in row.structure:
            for cell in row.cells.values():
                cell.op_calls, cell.ops = row.structure["graph_nodes"], row.structure["graph_ops"]
