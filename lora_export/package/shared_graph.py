"""One base ONNX graph with swappable LoRA adapters (ONNX Runtime's multi-LoRA contract).

Each adapted module's A and B are graph inputs that also have default initializers with a zero rank dimension
(A: 0×in, B: out×0), so with no adapter active the graph computes the base model. A variant is an `.onnx_adapter`
file holding, per module, A (r×in) and B (out×r) with its scaling and weight folded into B; several adapters in one
variant are concatenated along r, which is their exact weighted sum. Plain LoRA on Linear/Conv1D layers only: DoRA,
lora_bias, embedding LoRA and modules_to_save change more than A and B and are refused for this layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..exporting.graphs import build_graph, cache_shape
from ..exporting.onnx import OnnxExport, OnnxOptions, export_onnx
from ..exporting.onnx_check import greedy_loop
from ..exporting.runtime_files import GENAI_CONFIG, GENAI_MISSING, genai_installed, genai_prompt, write_runtime_files
from ..io.errors import UnsupportedError
from ..model.adapters import LoraAdapter, LoraModule, load_adapter
from ..model.loading import load_model
from ..verification.lora_runtime import apply_lora, load_unmerged

WRAPPER_PREFIX = "model."  # the export wrapper holds the transformers model as `model`


@dataclass(frozen=True)
class SharedGraph:
    path: Path
    modules: list[str]  # adapted module paths, in graph order
    inputs: dict[str, tuple[str, str]]  # module → (A input name, B input name)
    export: OnnxExport


def input_names(module: str) -> tuple[str, str]:
    return f"{module}.lora_A", f"{module}.lora_B"


def check_shared_supported(adapter: LoraAdapter) -> None:
    for path, m in adapter.modules.items():
        if m.magnitude is not None or m.lora_bias is not None or m.kind != "linear":
            raise UnsupportedError(
                f"{adapter.path}: {path} uses {m.variant}; the shared-graph layout carries only A and B per module "
                "(plain LoRA on linear layers): use --mode merged for this variant"
            )
    if adapter.replacements:
        raise UnsupportedError(
            f"{adapter.path}: modules_to_save / trained biases replace base weights; the shared graph cannot swap them: use --mode merged"
        )


def variant_factors(adapters: Sequence[tuple[LoraAdapter, float]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per module: A (Σr × in) and B (out × Σr) with wᵢ·sᵢ folded into B, fp32."""
    parts: dict[str, list[tuple[LoraModule, float]]] = {}
    for adapter, weight in adapters:
        check_shared_supported(adapter)
        for path, m in adapter.modules.items():
            parts.setdefault(path, []).append((m, weight))
    out = {}
    for path, items in parts.items():
        a = torch.cat([m.lora_A.float() for m, _ in items], 0)
        b = torch.cat([m.lora_B.float() * (w * m.scaling) for m, w in items], 1)
        out[path] = (a.numpy().copy(), b.numpy().copy())
    return out


def build_shared_graph(
    base_dir: Path, modules: dict[str, tuple[int, int]], path: Path, options: OnnxOptions
) -> SharedGraph:
    """Export the base with a LoRA branch on every module in `modules` ({path: (out, in)}), then turn each branch's
    A and B into overridable inputs with zero-rank defaults."""
    import onnx
    from onnx import numpy_helper

    model = load_model(base_dir)
    g = torch.Generator().manual_seed(0)
    dummy = {
        p: LoraModule(p, "linear", 1, 1.0, 1.0, torch.randn(1, i, generator=g), torch.randn(o, 1, generator=g))
        for p, (o, i) in modules.items()
    }
    fake = LoraAdapter(base_dir, {}, base_dir / "shared-graph", "", dummy)
    layers = apply_lora(model, [fake])
    exported = export_onnx(model, path, options)
    graph = onnx.load(str(path), load_external_data=False)
    renames: dict[str, str] = {}
    for name, _layer in layers.items():
        a_name, b_name = input_names(name)
        renames[f"{WRAPPER_PREFIX}{name}.lora_A_0"] = a_name
        renames[f"{WRAPPER_PREFIX}{name}.lora_B_0"] = b_name
    found = set()
    for init in graph.graph.initializer:
        if init.name in renames:
            arr = numpy_helper.to_array(init)
            new = renames[init.name]
            empty = np.zeros((0, arr.shape[1]) if new.endswith("lora_A") else (arr.shape[0], 0), dtype=arr.dtype)
            init.CopyFrom(numpy_helper.from_array(empty, new))
            found.add(new)
            rank_axis = 0 if new.endswith("lora_A") else 1
            rank = f"rank:{new.rsplit('.', 1)[0]}"  # one symbol per module: variants differ in rank per module
            shape = [rank if ax == rank_axis else dim for ax, dim in enumerate(arr.shape)]
            graph.graph.input.append(onnx.helper.make_tensor_value_info(new, init.data_type, shape))
    missing = set(renames.values()) - found
    if missing:
        raise UnsupportedError(
            f"the exported graph lost the names of LoRA weights {sorted(missing)[:3]}…: cannot make them swappable"
        )
    for node in graph.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    del graph.graph.value_info[:]  # shapes inferred with the export's rank; ONNX Runtime infers them again
    onnx.save(graph, str(path))
    onnx.checker.check_model(str(path))
    return SharedGraph(path, list(layers), {m: input_names(m) for m in layers}, exported)


def write_adapter_file(
    path: Path, factors: dict[str, tuple[np.ndarray, np.ndarray]], dtype: np.dtype
) -> dict[str, list[int]]:
    """An .onnx_adapter file with A and B per module (names = the shared graph's inputs)."""
    import onnxruntime as ort

    arrays = {}
    for module, (a, b) in factors.items():
        a_name, b_name = input_names(module)
        arrays[a_name], arrays[b_name] = np.ascontiguousarray(a.astype(dtype)), np.ascontiguousarray(b.astype(dtype))
    values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()}  # keep both alive until written
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(values)
    fmt.export_adapter(str(path))
    del values
    return {k: list(v.shape) for k, v in arrays.items()}


def adapter_files(
    variants: Sequence[Any], loaded: dict[str, Any], shared: Path
) -> dict[str, tuple[Path, dict[str, list[int]]]]:
    """Per variant: its .onnx_adapter written into `shared`, and the shapes of its parameters."""
    out = {}
    for v in variants:
        path = shared / f"{v.name}.onnx_adapter"
        out[v.name] = path, write_adapter_file(path, variant_factors(loaded[v.name]), np.float32)
    return out


def variant_adapters(
    base_dir: Path, variants: Sequence[Any], loaded: dict[str, Any], shared: Path
) -> Iterator[tuple[Any, Path, dict[str, list[int]], torch.nn.Module]]:
    """Per variant: its .onnx_adapter written into `shared`, the shapes of its parameters, and its unmerged model in
    PyTorch (the reference the layout is checked against)."""
    written = adapter_files(variants, loaded, shared)
    for v in variants:
        unmerged = load_unmerged(base_dir, [p for p, _ in v.adapters], [w for _, w in v.adapters])
        yield v, *written[v.name], unmerged


def run_with_adapter(
    session: Any, feeds: dict[str, np.ndarray], adapter_file: Path | None, outputs: list[str]
) -> list[np.ndarray]:
    import onnxruntime as ort

    ro = ort.RunOptions()
    adapter = None
    if adapter_file is not None:
        adapter = ort.LoraAdapter()
        adapter.Load(str(adapter_file))
        ro.add_active_adapter(adapter)
    return session.run(outputs, feeds, ro)


def union_modules(
    base_dir: Path, variants: dict[str, list[tuple[Path, float]]]
) -> tuple[dict[str, tuple[int, int]], dict[str, list[tuple[LoraAdapter, float]]]]:
    loaded = {name: [(load_adapter(p), w) for p, w in items] for name, items in variants.items()}
    modules: dict[str, tuple[int, int]] = {}
    for items in loaded.values():
        for adapter, _ in items:
            check_shared_supported(adapter)
            for path, m in adapter.modules.items():
                shape = (m.lora_B.shape[0], m.lora_A.shape[1])
                if modules.setdefault(path, shape) != shape:
                    raise UnsupportedError(
                        f"{adapter.path}: {path} has shape {shape}, another variant's {modules[path]}: are they for the same base?"
                    )
    return modules, loaded


def greedy_reference(model: torch.nn.Module, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """PyTorch's greedy tokens after `prompt` through the exported graph's contract, and the logits after it."""
    graph = build_graph(model, with_past=True)
    logits: list[np.ndarray] = []

    def step(*a: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            out = [t.numpy() for t in graph.module(*[torch.from_numpy(x) for x in a])]
        logits.append(out[0][0, -1].astype(np.float64))
        return out

    tokens = greedy_loop(step, graph.cache, prompt, n, None, torch.float32)
    return tokens, logits[0]


def genai_runtime_files(
    shared: Path, base_dir: Path, base: torch.nn.Module, export: Any
) -> tuple[list[int] | None, list[str]]:
    """genai_config.json and tokenizer files for the shared graph; the prompt its GenAI check runs (None when GenAI
    cannot run it here, and the notes say why)."""
    notes = write_runtime_files(shared, base_dir, cache_shape(base.config), export.input_names, export.output_names)
    if not (shared / GENAI_CONFIG).is_file():
        return None, notes
    if not genai_installed():
        return None, [*notes, GENAI_MISSING]
    return genai_prompt(shared / GENAI_CONFIG, int(base.config.vocab_size), 6, 3), notes
