"""Merged variants share one builder graph: a merged model's graph differs from the base's only in its weights.

The builder's initializers are the transformers tensors renamed, transposed (a MatMul weight is [in, out]) and, for
q/k/v, concatenated into `qkv_proj`. `recipes` reads how each initializer is made from the names alone, and the
recipes are trusted only after they rebuild every initializer of the graph they were read from, bit for bit, from
that graph's own merged folder; besides those, only the rotary caches and integer constants (which no adapter
changes) may stay as they are. Anything else — a bias the builder fused, another precision — and the builder runs
again for the variant. Every variant's graph is then checked in GenAI against PyTorch like any other.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..io.tensorfiles import TensorStore
from .genai_builder import export_section

RUNTIME_FILES = ("genai_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "tokenizer.model", "added_tokens.json")  # fmt: skip
UNCHANGED = {"cos_cache", "sin_cache"}  # the rotary tables: from the config, never from an adapter
Recipe = tuple[str, list[str]]  # ("same" | "T" | "cat-T", transformers tensor names)


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


def recipes(template: Path) -> dict[str, Recipe] | str:
    """Per initializer of template/model.onnx, how to make it from a merged folder; or why the graph cannot be
    reused. Checked against template/merged, the folder the builder read."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(template / "model.onnx"))  # external data from the graph's folder
    store = TensorStore.open_safetensors(sorted((template / "merged").glob("*.safetensors")))
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
    """A builder output folder whose graph other merged folders of the same base may reuse, with its recipes."""

    folder: Path
    recipes: dict[str, Recipe]


def reuse_graph(template: GraphTemplate, merged_dir: Path, out: Path) -> dict[str, Any]:
    """The template's builder graph with merged_dir's tensors, into out (model.onnx, model.onnx.data, and the
    template's genai_config.json and tokenizer files); returns the report's export section."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    started = time.perf_counter()
    found, template_dir = template.recipes, template.folder
    model = onnx.load(str(template_dir / "model.onnx"), load_external_data=False)  # the weights come from merged_dir
    store = TensorStore.open_safetensors(sorted(merged_dir.glob("*.safetensors")))
    try:
        for init in model.graph.initializer:
            if init.name in found:
                init.CopyFrom(numpy_helper.from_array(_make(found[init.name], store), init.name))
            elif uses_external_data(init):  # the rotary tables: read from the template's data, the rest never is
                load_external_data_for_tensor(init, str(template_dir))
                del init.external_data[:]
                init.data_location = onnx.TensorProto.DEFAULT
    finally:
        store.close()
    onnx.save(model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    for name in RUNTIME_FILES:
        if (template_dir / name).is_file() and not (out / name).exists():
            shutil.copy2(template_dir / name, out / name)
    section = export_section(out, "float32", "fp32", "cpu", time.perf_counter() - started)
    return replace(
        section, reused_graph=f"{template_dir.name}'s builder graph with this model's {len(found)} weight tensors"
    )
