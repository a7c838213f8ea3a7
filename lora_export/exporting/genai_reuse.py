"""Merged variants share one builder graph: a merged model's graph differs from the base's only in its weights.

The builder's initializers are the transformers tensors renamed, transposed (a MatMul weight is [in, out]) and, for
q/k/v, concatenated into `qkv_proj`. `recipes` reads how each initializer is made from the names alone, and the
recipes are trusted only after they rebuild every initializer of the base's builder graph, bit for bit, from the
base folder; besides those, only the rotary caches and integer constants (which no adapter changes) may stay as they
are. Anything else — a bias the builder fused, another precision — and the builder runs for every variant. A
variant's tensors that equal the base's are not written again: its graph points at them in common.data, a hard link
to the base graph's data file. Every variant's graph is then checked in GenAI against PyTorch like any other.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..io.tensorfiles import TensorStore
from ..records.sections import ExportSection
from .genai_builder import export_section

RUNTIME_FILES = ("genai_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "tokenizer.model", "added_tokens.json")  # fmt: skip
UNCHANGED = {"cos_cache", "sin_cache"}  # the rotary tables: from the config, never from an adapter
Recipe = tuple[str, list[str]]  # ("same" | "T" | "cat-T", transformers tensor names)
COMMON = "common.data"  # a merged variant's tensors that are the base's: the base graph's data file, linked


def _source(name: str, stored: set[str]) -> Recipe | None:
    if name.endswith(".MatMul.weight"):
        module = re.sub(r"\.attn\.", ".self_attn.", name.removesuffix(".MatMul.weight"))
        if module.endswith(".qkv_proj") and f"{module}.weight" not in stored:
            stem = module.removesuffix("qkv_proj")
            return "cat-T", [f"{stem}{p}_proj.weight" for p in "qkv"]
        if module == "lm_head" and "lm_head.weight" not in stored:  # tied: the embedding
            return "T", ["model.embed_tokens.weight"]
        return "T", [f"{module}.weight"]
    if re.fullmatch(r"model\.layers\.\d+\.final_norm_layernorm\.weight", name):
        return "same", ["model.norm.weight"]
    return ("same", [name]) if name in stored else None


def _make(recipe: Recipe, store: TensorStore) -> np.ndarray:
    kind, names = recipe
    arrays = [store.read(n).float().numpy() for n in names]
    if kind == "same":
        return arrays[0]
    return np.ascontiguousarray(np.concatenate([a.T for a in arrays], axis=1))


def recipes(model: Any, source: Path) -> dict[str, Recipe] | str:
    """Per initializer of `model` (a builder graph, its external data loaded), how to make it from a model folder;
    or why the graph cannot be reused. Checked against `source`, the folder the builder read."""
    import onnx
    from onnx import numpy_helper

    files = sorted(source.glob("*.safetensors"))
    if not files:
        return f"{source} has no safetensors weights to read the graph's tensors from"
    store = TensorStore.open_safetensors(files)
    try:
        stored = set(store.names())
        out: dict[str, Recipe] = {}
        for init in model.graph.initializer:
            recipe = _source(init.name, stored)
            if recipe is None:
                if init.name in UNCHANGED or init.data_type != onnx.TensorProto.FLOAT:
                    continue
                return f"the builder's initializer {init.name} is not a tensor of the merged folder"
            if any(n not in stored for n in recipe[1]):
                return f"{init.name}: the merged folder has no {[n for n in recipe[1] if n not in stored]}"
            if init.data_type != onnx.TensorProto.FLOAT:
                return f"{init.name} is not float32 in the builder's graph"
            if not np.array_equal(_make(recipe, store), numpy_helper.to_array(init)):
                return f"{init.name} is not {recipe[0]} of {recipe[1]} in the builder's graph"
            out[init.name] = recipe
        return out
    finally:
        store.close()


@dataclass(frozen=True)
class GraphTemplate:
    """The base's builder graph, which every float32 merged variant reuses with its own weights: the graph as the
    builder wrote it (bytes: the shared layout then adds LoRA inputs to its own copy), the folder that holds its
    data file and runtime files, and the recipes of its initializers."""

    folder: Path
    graph: bytes
    data: str  # the graph's external data file in `folder`
    recipes: dict[str, Recipe]


def template_of(folder: Path, source: Path) -> GraphTemplate | str:
    """The builder graph in `folder` (built from the model folder `source`) as a template, or why it cannot be one:
    its recipes must rebuild every initializer from `source`, bit for bit, and its tensors lie in one data file."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    graph = (folder / "model.onnx").read_bytes()
    model = onnx.load_model_from_string(graph)
    locations = {_entries(i)["location"] for i in model.graph.initializer if uses_external_data(i)}
    if len(locations) != 1:
        return f"the builder's graph keeps its tensors in {len(locations)} files, not one"
    load_external_data_for_model(model, str(folder))
    found = recipes(model, source)
    return found if isinstance(found, str) else GraphTemplate(folder, graph, locations.pop(), found)


def reuse_graph(template: GraphTemplate, merged_dir: Path, out: Path) -> ExportSection:
    """The template's graph with merged_dir's tensors, into `out`: the tensors equal to the template's point into
    common.data, a hard link to the template's data file (a copy where links fail), the others go to
    model.onnx.data; the template's genai_config.json and tokenizer files beside. Returns the report's export
    section."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    started = time.perf_counter()
    model = onnx.load_model_from_string(template.graph)
    base = np.memmap(template.folder / template.data, dtype=np.uint8, mode="r")
    linked = link_or_copy(template.folder / template.data, out / COMMON)
    store = TensorStore.open_safetensors(sorted(merged_dir.glob("*.safetensors")))
    changed = 0
    try:
        with (out / "model.onnx.data").open("wb") as own:
            for init in model.graph.initializer:
                recipe = template.recipes.get(init.name)
                if not uses_external_data(init):  # a small tensor kept in the graph
                    if recipe is not None:
                        init.CopyFrom(onnx.numpy_helper.from_array(_make(recipe, store), init.name))
                    continue
                entries = _entries(init)
                at, length = int(entries.get("offset", 0)), int(entries["length"])
                raw = _make(recipe, store).reshape(-1).view(np.uint8) if recipe is not None else None
                if raw is None or np.array_equal(raw, base[at : at + length]):
                    point(init, [("location", COMMON), ("offset", str(at)), ("length", str(length))])
                else:
                    point(init, place(own, "model.onnx.data", raw.tobytes()))
                    changed += 1
    finally:
        store.close()
        del base
    onnx.save(model, str(out / "model.onnx"))
    for name in RUNTIME_FILES:
        if (template.folder / name).is_file() and not (out / name).exists():
            shutil.copy2(template.folder / name, out / name)
    section = export_section(out, "float32", "fp32", "cpu", time.perf_counter() - started)
    shared = f"{COMMON} ({'a hard link to' if linked else 'a copy of'} the base graph's data)"
    return replace(
        section,
        files=(*section.files, COMMON),
        reused_graph=f"the base's builder graph with this model's weights: {changed} of {len(template.recipes)} "
        f"weight tensors its own, the rest in {shared}",
    )


def _entries(init: Any) -> dict[str, str]:
    return {e.key: e.value for e in init.external_data}


def link_or_copy(source: Path, target: Path) -> bool:
    """`target` as a hard link to `source` (True), or a copy of it where the file system has no hard links."""
    try:
        os.link(source, target)
        return True
    except OSError:
        shutil.copyfile(source, target)
        return False


def place(data: Any, location: str, raw: bytes) -> list[tuple[str, str]]:
    """Append `raw` to the open data file `data` (named `location`), 64-byte aligned as ONNX Runtime prefers for
    memory mapping; the tensor's external-data entries."""
    data.write(b"\0" * (-data.tell() % 64))
    offset = data.tell()
    data.write(raw)
    return [("location", location), ("offset", str(offset)), ("length", str(len(raw)))]


def point(tensor: Any, entries: list[tuple[str, str]]) -> None:
    """Make `tensor` an external one at `entries` (location, offset, length), its inline data dropped."""
    import onnx

    for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(f)
    del tensor.external_data[:]
    for key, value in entries:
        tensor.external_data.add(key=key, value=value)
    tensor.data_location = onnx.TensorProto.EXTERNAL
