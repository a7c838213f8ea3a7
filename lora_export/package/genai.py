"""The package's layouts on the GenAI model builder's graph (`package --exporter genai`, or auto where it applies).

Shared: the builder's graph of the base with every adapted module's A and B as overridable inputs (rank-0
defaults), one `.onnx_adapter` per variant, checked in ONNX Runtime GenAI: the base's logits at every step and
tokens, and per variant (og.Adapters) the logits after the prompt and the greedy tokens, against PyTorch's unmerged
model. The references (prompt, tokens, logits) are stored in reference.npz so that `package --check` re-runs them in
GenAI, where the graph runs: its inputs (no position_ids, a KV buffer GenAI owns) are GenAI's contract, not ours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..exporting.genai_builder import (
    check_prompt,
    genai_build,
    genai_logits_check,
    pytorch_references,
    save_references,
)
from ..exporting.genai_reuse import GraphTemplate, template_of
from ..exporting.runtime_files import (
    GENAI_CONFIG,
    copy_side_files,
    genai_adapters_check,
    genai_installed,
    genai_special_ids,
    model_special_ids,
)
from ..io.errors import InputError, UnsupportedError
from ..model.adapters import LoraAdapter
from ..model.config import ModelConfig
from ..model.loading import load_model
from ..records import Check, MergedVariant, SharedLayout
from ..records.package import PACKAGE_FIX
from ..verification.lora_runtime import load_unmerged
from .genai_lora import add_lora_inputs
from .shared_graph import adapter_files, greedy_reference, input_names
from .variants import Variant

NEW_TOKENS = 8
References = dict[str, tuple[list[int], np.ndarray]]  # variant → (greedy tokens, logits after the prompt)


def dtype_notes(variants: list[Variant]) -> list[str]:
    return [
        f"variant {v.name}: dtype {v.dtype} applies to its merged layout; the shared graph and its adapters are float32"
        for v in variants
        if v.dtype not in ("auto", "float32")
    ]


def rerun_genai_references(folder: Path, ref_path: Path, adapters: dict[str, Path], dtype: str = "float32") -> Check:
    """Re-run the stored GenAI references of a folder (with its adapters, if any) in ONNX Runtime GenAI."""
    if not genai_installed():
        return Check(
            "genai adapters",
            "stored references in ONNX Runtime GenAI",
            dtype,
            False,
            "could not run",
            ("this layout runs in ONNX Runtime GenAI, which is not installed (pip install 'lora-export[genai]')",),
        )
    try:
        ref = np.load(ref_path)
        prompt = ref["genai:prompt"].tolist()
        names = [k.split(":", 1)[1] for k in ref.files if k.startswith("tokens:")]
        references = {n: (ref[f"tokens:{n}"].tolist(), ref[f"logits:{n}"]) for n in names}
    except Exception as e:  # a damaged archive under a manifest that hashes it: the package was built so
        raise InputError(f"{ref_path}: cannot read the reference outputs ({e}); {PACKAGE_FIX}") from None
    return genai_adapters_check(folder, adapters, prompt, references, dtype)


@dataclass(frozen=True)
class PendingAdapters:
    """A shared layout on the builder's graph whose adapters are checked in GenAI after the merged layout
    (`finish_adapters`): against the PyTorch references each merged variant's own GenAI check computed on the same
    prompt — one PyTorch pass per variant for both layouts — or, where a variant has none, its unmerged model's."""

    shared: Path
    lora: list[str]
    files: dict[str, str]
    parameters: dict[str, dict[str, list[int]]]
    checks: tuple[Check, ...]
    notes: tuple[str, ...]
    prompt: list[int]
    base: tuple[list[int], np.ndarray]  # the base's greedy tokens and logits after the prompt


def shared_genai(
    base_dir: Path,
    variants: list[Variant],
    out: Path,
    modules: dict[str, tuple[int, int]],
    loaded: dict[str, list[tuple[LoraAdapter, float]]],
    log: Callable[[str], None],
    defer: bool = False,
) -> tuple[SharedLayout | PendingAdapters, GraphTemplate | str]:
    """The shared layout on the builder's graph, in out/shared (which exists and is empty); and the builder's graph
    of the base as it was before the LoRA inputs, the merged variants' template (or why it cannot be one). With
    `defer` (a merged layout follows), its adapters are checked after it: PendingAdapters."""

    shared = out / "shared"
    with genai_build(base_dir, shared, "float32", log) as finish:  # PyTorch's references while the builder runs
        prompt, references, base_references = _references(base_dir, [] if defer else variants)
        finish()
    if set(prompt) & genai_special_ids(shared / GENAI_CONFIG):  # GenAI would read the prompt otherwise than PyTorch
        raise UnsupportedError("the builder's genai_config.json names special tokens that config.json does not")
    copy_side_files(base_dir, shared)  # config.json and generation_config.json, which the builder does not write
    template = template_of(shared, base_dir)
    log("shared layout: LoRA inputs with rank-0 defaults on the GenAI graph …")
    lora = add_lora_inputs(shared / "model.onnx", modules, ModelConfig.load(base_dir))
    checks = (genai_logits_check(shared, [prompt], base_references, "float32"),)
    written = adapter_files(variants, loaded, shared)
    files = {n: f"shared/{path.name}" for n, (path, _) in written.items()}
    parameters = {n: shapes for n, (_, shapes) in written.items()}
    notes = (
        *dtype_notes(variants),
        "graph: ONNX Runtime GenAI's model builder, with LoRA inputs added; runs in GenAI (og.Adapters)",
    )
    pending = PendingAdapters(shared, lora, files, parameters, checks, notes, prompt, references["__base__"])
    if defer:
        return pending, template
    return _check_adapters(pending, out, references, log), template


def finish_adapters(
    pending: PendingAdapters,
    base_dir: Path,
    variants: list[Variant],
    out: Path,
    merged: dict[str, MergedVariant],
    log: Callable[[str], None],
) -> SharedLayout:
    """The deferred adapters check, on the merged variants' references where they have float32 ones on this
    prompt; the others' from their unmerged models."""
    references = {"__base__": pending.base}
    for v in variants:
        found = _merged_reference(out, v.name, merged.get(v.name), pending.prompt)
        if found is None:
            unmerged = load_unmerged(base_dir, [p for p, _ in v.adapters], [w for _, w in v.adapters])
            found = greedy_reference(unmerged, pending.prompt, NEW_TOKENS)
            del unmerged
        references[v.name] = found
    return _check_adapters(pending, out, references, log)


def _merged_reference(
    out: Path, name: str, merged: MergedVariant | None, prompt: list[int]
) -> tuple[list[int], np.ndarray] | None:
    """A merged variant's PyTorch references on `prompt` (float32, checked), as its GenAI check stored them."""
    if merged is None or merged.exporter != "genai" or merged.dtype != "float32":
        return None
    path = out / merged.folder / "reference.npz"
    if not all(c.passed for c in merged.checks) or not path.is_file():
        return None
    with np.load(path) as ref:
        if ref["genai:prompt"].tolist() != prompt or f"tokens:{name}" not in ref.files:
            return None
        return ref[f"tokens:{name}"].tolist(), ref[f"logits:{name}"]


def _check_adapters(
    pending: PendingAdapters, out: Path, references: References, log: Callable[[str], None]
) -> SharedLayout:
    log("shared layout: checking the base and every adapter in ONNX Runtime GenAI …")
    adapters = {n: out / f for n, f in pending.files.items()}
    check = genai_adapters_check(pending.shared, adapters, pending.prompt, references)
    save_references(pending.shared / "reference.npz", pending.prompt, references)
    checks = [*pending.checks, check]
    return builder_shared_layout(
        pending.shared, pending.lora, pending.files, pending.parameters, checks, list(pending.notes)
    )


def _references(base_dir: Path, variants: list[Variant]) -> tuple[list[int], References, Any]:
    """The GenAI check's prompt and PyTorch's references: the base's (logits at every step) and each variant's
    unmerged model's (tokens, logits after the prompt); one model in memory at a time."""
    base = load_model(base_dir)
    vocab = int(base.config.get_text_config().vocab_size)
    prompt = check_prompt(vocab, model_special_ids(base_dir))  # the merged variants' GenAI check's prompt too
    ((tokens, steps),) = base_references = pytorch_references(base, [prompt], NEW_TOKENS)
    references = {"__base__": (tokens, steps[0].numpy().reshape(-1))}  # the same run: no second one on the base
    del base
    for v in variants:
        unmerged = load_unmerged(base_dir, [p for p, _ in v.adapters], [w for _, w in v.adapters])
        references[v.name] = greedy_reference(unmerged, prompt, NEW_TOKENS)
        del unmerged
    return prompt, references, base_references


def builder_shared_layout(
    shared: Path,
    lora: list[str],
    files: dict[str, str],
    parameters: dict[str, dict[str, list[int]]],
    checks: list[Check],
    notes: list[str],
) -> SharedLayout:
    """The manifest's record of a shared layout on the builder's graph (float or quantized): its inputs less the
    LoRA ones, its outputs, each module's LoRA inputs, the adapter files and their parameters, checks and notes."""
    import onnx

    graph = onnx.load(str(shared / "model.onnx"), load_external_data=False).graph
    lora_names = {n for m in lora for n in input_names(m)}
    return SharedLayout(
        "shared/model.onnx",
        "float32",
        tuple(i.name for i in graph.input if i.name not in lora_names),
        tuple(o.name for o in graph.output),
        {m: list(input_names(m)) for m in lora},
        files,
        parameters,
        tuple(checks),
        tuple(notes),
        exporter="genai",
    )
