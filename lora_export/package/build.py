"""`lora-export package`: task variants (one base, many adapters) for production runtimes, and `--check`.

Layouts: `merged` — one merged, verified ONNX model per variant (merge-and-onnx each); `shared` — one base ONNX graph
whose LoRA A/B are overridable inputs with zero-rank defaults, plus one `.onnx_adapter` file per variant, selected per
request with `RunOptions.add_active_adapter`. `manifest.json` records every file's sha256 and size, the variants,
the checks with their tolerances, and the storage each layout takes. Each layout keeps reference inputs and outputs
(`reference.npz`) so that `package --check` re-verifies a package with ONNX Runtime alone: hashes first, then numbers.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..exporting.genai_reuse import GraphTemplate, recipes
from ..exporting.graphs import build_graph, position_ids_for, refuse_encoder_decoder
from ..exporting.onnx import OnnxOptions
from ..exporting.onnx_check import session
from ..exporting.pipeline import ExportOptions, choose_exporter, merge_and_onnx
from ..exporting.quantized import QuantOptions
from ..exporting.quantized_build import refuse_unquantizable
from ..exporting.runtime_files import copy_side_files, genai_adapters_check
from ..io.errors import InputError, UnsupportedError
from ..io.outputs import DiscardOutput, atomic_output_dir, check_output_location
from ..merging.merge import MergeOptions
from ..model.adapters import load_adapter
from ..model.hub import check_bases, folder_of, source_field, source_of
from ..model.loading import load_model
from ..records import MergedVariant, PackageManifest, SharedLayout, files_of, versions
from ..records.tolerances import tolerances_for
from .external_data import write_external_data
from .genai import dtype_notes, merged_references, shared_genai
from .genai_quantized import merged_self_references, shared_genai_quantized
from .references import compare_logits, rerun_merged
from .shared_graph import (
    build_shared_graph,
    genai_runtime_files,
    greedy_reference,
    run_with_adapter,
    union_modules,
    variant_adapters,
)
from .variants import Variant, read_variants

MODES = ("merged", "shared", "both")


def _reference_inputs(model: torch.nn.Module, seed: int = 0) -> tuple[list[str], dict[str, np.ndarray], torch.Tensor]:
    graph = build_graph(model, with_past=True)
    vocab = int(model.config.get_text_config().vocab_size)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # one left-padded row
    dtype = next(model.parameters()).dtype
    empty = [
        torch.zeros(2, graph.cache.kv_heads, 0, graph.cache.head_dim, dtype=dtype)
        for _ in range(2 * graph.cache.layers)
    ]
    inputs = (ids, mask, position_ids_for(mask, 9), *empty)
    return graph.input_names, {n: t.numpy() for n, t in zip(graph.input_names, inputs)}, mask


def _logits(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    graph = build_graph(model, with_past=True)
    with torch.no_grad():
        return graph.module(*[torch.from_numpy(feeds[n]) for n in graph.input_names])[0].float().numpy()


def _shared(
    base_dir: Path, variants: list[Variant], out: Path, log: Callable[[str], None], options: PackageOptions
) -> SharedLayout:
    modules, loaded = union_modules(base_dir, {v.name: v.adapters for v in variants})
    shared, exporter = out / "shared", options.exporter
    shared.mkdir()
    if options.quant.quantized:
        log(f"shared layout: the GenAI model builder's {options.quant.precision} graph of the base …")
        return shared_genai_quantized(base_dir, variants, out, modules, loaded, log, options.quant)
    use, why = choose_exporter(ExportOptions(exporter=exporter), base_dir, "causal-lm")
    if use == "genai":
        log(f"shared layout: the GenAI model builder's graph of the base ({why}) …")
        try:
            layout = shared_genai(base_dir, variants, out, modules, loaded, log)
            return replace(layout, notes=(*layout.notes, f"exporter: genai ({why})"))
        except UnsupportedError as e:
            if exporter == "genai":
                raise
            why = f"auto: {e}"
            shutil.rmtree(shared)
            shared.mkdir()
    layout = _shared_dynamo(base_dir, variants, out, modules, loaded, log)
    return replace(layout, notes=(*layout.notes, f"exporter: dynamo ({why})"))


def _shared_dynamo(
    base_dir: Path,
    variants: list[Variant],
    out: Path,
    modules: dict[str, tuple[int, int]],
    loaded: dict[str, Any],
    log: Callable[[str], None],
) -> SharedLayout:
    log("shared layout: exporting the base graph with swappable LoRA inputs …")
    shared = out / "shared"
    graph = build_shared_graph(base_dir, modules, shared / "model.onnx", OnnxOptions(with_past=True))
    copy_side_files(base_dir, shared)
    base = load_model(base_dir)
    names, feeds, mask = _reference_inputs(base)
    sess = session(graph.path)
    references = {"__base__": _logits(base, feeds)}
    prompt, runtime_notes = genai_runtime_files(shared, base_dir, base, graph.export)
    greedy = {"__base__": greedy_reference(base, prompt, 8)} if prompt else {}
    got = run_with_adapter(sess, feeds, None, ["logits"])[0]
    checks = [compare_logits("shared graph, no adapter vs base (PyTorch)", references["__base__"], got, mask.numpy())]
    files, parameters = {}, {}
    for v, path, shapes, unmerged in variant_adapters(base_dir, variants, loaded, shared):
        files[v.name], parameters[v.name] = f"shared/{path.name}", shapes
        references[v.name] = _logits(unmerged, feeds)
        if prompt:  # the same model, for the GenAI check below
            greedy[v.name] = greedy_reference(unmerged, prompt, 8)
        got = run_with_adapter(sess, feeds, path, ["logits"])[0]
        checks.append(
            compare_logits(f"shared graph + {path.name} vs {v.name} in PyTorch", references[v.name], got, mask.numpy())
        )
    if prompt:
        adapters = {name: out / file for name, file in files.items()}
        checks.append(genai_adapters_check(shared, adapters, prompt, greedy))
    np.savez(
        shared / "reference.npz",
        **{f"input:{k}": v for k, v in feeds.items()},
        **{f"logits:{k}": v for k, v in references.items()},
    )
    notes = dtype_notes(variants) + runtime_notes
    return SharedLayout(
        "shared/model.onnx",
        "float32",
        tuple(names),
        tuple(graph.export.output_names),
        {m: list(v) for m, v in graph.inputs.items()},
        files,
        parameters,
        tuple(checks),
        tuple(notes),
    )


def _merged(
    base_dir: Path, variants: list[Variant], out: Path, log: Callable[[str], None], settings: PackageOptions
) -> dict[str, MergedVariant]:
    results: dict[str, MergedVariant] = {}
    template: GraphTemplate | None = None  # the first builder graph: every later float32 variant reuses it
    for v in variants:
        log(f"merged layout: {v.name} …")
        folder = out / "merged" / v.name
        folder.parent.mkdir(exist_ok=True)
        options = MergeOptions(dtype=v.dtype, weights=tuple(w for _, w in v.adapters), progress=False)
        reuse = template if v.dtype in ("auto", "float32") and not settings.quant.quantized else None
        onnx = OnnxOptions(max_new_tokens=8)
        export = ExportOptions(onnx=onnx, exporter=settings.exporter, reuse=reuse, quant=settings.quant)
        result = merge_and_onnx(base_dir, [p for p, _ in v.adapters], folder, options, export, log=log)
        section = result.report.export
        dtype = section.dtype if section is not None else v.dtype
        used = "genai" if section is not None and section.by_builder else "dynamo"
        graph, reused = f"merged/{v.name}/model.onnx", (section.reused_graph if section is not None else None) or ""
        results[v.name] = MergedVariant(f"merged/{v.name}", dtype, graph, result.checks, used, reused)
        if not result.passed:
            continue  # the package fails; its report names this variant's failed checks
        if used == "genai" and settings.quant.quantized:  # --check re-runs GenAI's own outputs (genai_quantized)
            merged_self_references(folder, v.name)
            continue
        if used == "genai":
            merged_references(folder, v.name, dtype)
            if template is None and dtype == "float32":
                template = _template(folder, log)
            continue
        model = load_model(folder / "merged", torch.float16 if dtype == "float16" else torch.float32)
        _, feeds, _ = _reference_inputs(model)
        logits = {f"logits:{v.name}": _logits(model, feeds)}
        np.savez(folder / "reference.npz", **{f"input:{k}": a for k, a in feeds.items()}, **logits)
    return results


def _template(folder: Path, log: Callable[[str], None]) -> GraphTemplate | None:
    """The variant's builder graph as the others' template, when its weights can be told apart from its graph."""
    found = recipes(folder)
    if isinstance(found, str):
        log(f"merged layout: the builder runs for every variant ({found})")
        return None
    return GraphTemplate(folder, found)


def dedupe_merged(out: Path, merged: dict[str, MergedVariant]) -> tuple[dict[str, MergedVariant], dict[str, Any]]:
    """Keep each merged variant a folder a runtime loads as it is (merged/NAME/model.onnx beside its config,
    tokenizer and genai_config.json), while storing the tensors identical in every variant once: they go to
    common.data, hard-linked into each variant's folder (ONNX Runtime wants external data beside the graph), the
    rest to the variant's model.onnx.data. Each rewritten graph is checked against the variant's reference outputs."""
    import onnx

    names = list(merged)
    folders = {n: out / merged[n].folder for n in names}
    models = {n: onnx.load(str(out / merged[n].graph)) for n in names}  # with their weights, before the rewrite
    for folder in folders.values():
        for f in folder.glob("model.onnx*"):
            f.unlink()
    common, saved, linked = write_external_data(models, folders, out / "merged" / ".common.data")
    updated = {}
    for n in names:
        name = f"{merged[n].folder}/model.onnx (shared tensors) vs reference"
        check = replace(rerun_merged(out, n, merged[n]), name=name)
        updated[n] = replace(merged[n], graph=f"{merged[n].folder}/model.onnx", checks=(*merged[n].checks, check))
    sharing = {
        "common_tensors": common,
        "saved_bytes": saved if linked else 0,
        "common_bytes": (folders[names[0]] / "common.data").stat().st_size,
        "common_file": "common.data in each variant's folder, " + ("hard links to one file" if linked else "copies"),
        "per_variant_bytes": {n: (folders[n] / "model.onnx.data").stat().st_size for n in names},
    }
    return updated, sharing


@dataclass(frozen=True)
class PackageOptions:
    """How `package` builds: the layouts (`mode`), the exporter, replacing OUT_DIR, refusing adapters of another base."""

    mode: str = "both"
    exporter: str = "auto"
    overwrite: bool = False
    strict_base: bool = False
    quant: QuantOptions = QuantOptions()  # int8/int4: both layouts on the builder's MatMulNBits graphs

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")


def package(
    base_dir: Path | str,
    variants_file: Path | str,
    out_dir: Path | str,
    options: PackageOptions = PackageOptions(),
    log: Callable[[str], None] = lambda s: None,
) -> PackageManifest:
    """Build the package; returns its manifest, passed or not. When a check failed, OUT_DIR is not written.
    Adapters that name another base than `base_dir` are a warning through `log` (InputError with `strict_base`)."""
    base_dir, variants_file, out_dir = folder_of(base_dir, "base"), Path(variants_file), Path(out_dir)
    variants = read_variants(variants_file)
    adapters = list(dict.fromkeys(p for v in variants for p, _ in v.adapters))
    check_bases(base_dir, adapters, options.strict_base, log)
    refuse_encoder_decoder(base_dir, "package")
    if options.quant.quantized:
        refuse_unquantizable(base_dir, ExportOptions(exporter=options.exporter, quant=options.quant), "float32")
    check_output_location(out_dir, [base_dir, *adapters], options.overwrite)
    try:
        with atomic_output_dir(out_dir, options.overwrite) as tmp:
            return _package(base_dir, variants, tmp, options, log)
    except DiscardOutput as failed:
        return failed.report


def _package(
    base_dir: Path, variants: list[Variant], tmp: Path, options: PackageOptions, log: Callable[[str], None]
) -> PackageManifest:
    started, mode = time.perf_counter(), options.mode
    shared = _shared(base_dir, variants, tmp, log, options) if mode in ("shared", "both") else None
    merged: dict[str, MergedVariant] = {}
    if mode in ("merged", "both"):
        merged = _merged(base_dir, variants, tmp, log, options)
    sharing = None
    if len(merged) > 1 and all(all(c.passed for c in v.checks) for v in merged.values()):
        log("merged layout: storing tensors identical across variants once …")
        merged, sharing = dedupe_merged(tmp, merged)
    variant_info = {
        v.name: {
            "dtype": v.dtype,
            "adapters": [
                {"path": str(p), "weight": w, "sha256": load_adapter(p).sha256, **source_field(p)}
                for p, w in v.adapters
            ],
        }
        for v in variants
    }
    dtypes = {"float32"} | {m.dtype for m in merged.values()}
    manifest = PackageManifest(
        base=str(base_dir),
        base_source=source_of(base_dir),
        mode=mode,
        versions=versions(),
        tolerances=tolerances_for(*(("runtime", d) for d in sorted(dtypes))),
        variants=variant_info,
        shared=shared,
        merged=merged,
        merged_sharing=sharing,
        storage=storage_summary(tmp, variants, mode),
        files=files_of(tmp),
        seconds=time.perf_counter() - started,
    )
    if not manifest.passed:
        raise DiscardOutput(manifest)
    manifest.write(tmp)
    return manifest


def storage_summary(folder: Path, variants: list[Variant], mode: str) -> dict[str, Any]:
    """Bytes on disk: N merged models vs one base graph plus N adapter files (the paper's storage argument)."""

    def size(pattern: str) -> int:  # a hard-linked file is stored once
        stats = {(st.st_dev, st.st_ino): st.st_size for p in folder.glob(pattern) if p.is_file() and (st := p.stat())}
        return sum(stats.values())

    out: dict[str, Any] = {"variants": len(variants)}
    if mode in ("shared", "both"):
        graph = size("shared/model.onnx*")
        adapters = size("shared/*.onnx_adapter")
        out["shared"] = {"base_graph_bytes": graph, "adapter_files_bytes": adapters, "total_bytes": graph + adapters}
        out["merged_estimate_bytes"] = graph * len(variants)
    if mode in ("merged", "both"):
        out["merged"] = {
            "onnx_bytes": size("merged/*/model.onnx*") + size("merged/*/common.data"),
            "with_merged_folders_bytes": size("merged/**/*"),
        }
    return out
