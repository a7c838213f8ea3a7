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
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..exporting.genai_reuse import GraphTemplate
from ..exporting.graphs import refuse_encoder_decoder
from ..exporting.onnx import OnnxOptions
from ..exporting.onnx_check import session
from ..exporting.pipeline import ExportOptions, choose_exporter
from ..exporting.quantized import QuantOptions
from ..exporting.quantized_build import refuse_unquantizable
from ..exporting.runtime_files import copy_side_files, genai_adapters_check
from ..io.errors import InputError, UnsupportedError
from ..io.outputs import DiscardOutput, atomic_output_dir, check_output_location
from ..io.processes import WorkerPool
from ..model.adapters import load_adapter
from ..model.hub import check_bases, folder_of, source_field, source_of
from ..model.loading import load_model
from ..records import MergedVariant, PackageManifest, SharedLayout, files_of, versions
from ..records.package import PackagePart
from ..records.tolerances import tolerances_for
from .genai import PendingAdapters, dtype_notes, finish_adapters, shared_genai
from .genai_quantized import shared_genai_quantized
from .merged import merged_layout, variant_workers, warm_worker, worker_modules
from .references import compare_logits, reference_inputs, torch_logits
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


def _shared(
    base_dir: Path,
    every: list[Variant],
    variants: list[Variant],
    out: Path,
    log: Callable[[str], None],
    options: PackageOptions,
) -> tuple[SharedLayout | PendingAdapters, GraphTemplate | str | None]:
    """The shared layout of `variants` in out/shared, its graph with the LoRA inputs of `every` variant; and, on the
    builder's float32 graph, that graph of the base as the merged variants' template (or why it cannot be one). On
    the builder's graph with a merged layout to follow, its adapters are checked after it (PendingAdapters)."""
    modules, loaded = union_modules(base_dir, {v.name: v.adapters for v in every})
    shared, exporter = out / "shared", options.exporter
    shared.mkdir()
    if options.quant.quantized:
        log(f"shared layout: the GenAI model builder's {options.quant.precision} graph of the base …")
        return shared_genai_quantized(base_dir, variants, out, modules, loaded, log, options.quant), None
    use, why = choose_exporter(ExportOptions(exporter=exporter), base_dir, "causal-lm")
    if use == "genai":
        log(f"shared layout: the GenAI model builder's graph of the base ({why}) …")
        try:
            layout, template = shared_genai(base_dir, variants, out, modules, loaded, log, options.mode == "both")
            return replace(layout, notes=(*layout.notes, f"exporter: genai ({why})")), template
        except UnsupportedError as e:
            if exporter == "genai":
                raise
            why = f"auto: {e}"
            shutil.rmtree(shared)
            shared.mkdir()
    layout = _shared_dynamo(base_dir, variants, out, modules, loaded, log)
    return replace(layout, notes=(*layout.notes, f"exporter: dynamo ({why})")), None


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
    names, feeds, mask = reference_inputs(base)
    sess = session(graph.path)
    references = {"__base__": torch_logits(base, feeds)}
    prompt, runtime_notes = genai_runtime_files(shared, base_dir, base, graph.export)
    greedy = {"__base__": greedy_reference(base, prompt, 8)} if prompt else {}
    got = run_with_adapter(sess, feeds, None, ["logits"])[0]
    checks = [compare_logits("shared graph, no adapter vs base (PyTorch)", references["__base__"], got, mask.numpy())]
    files, parameters = {}, {}
    for v, path, shapes, unmerged in variant_adapters(base_dir, variants, loaded, shared):
        files[v.name], parameters[v.name] = f"shared/{path.name}", shapes
        references[v.name] = torch_logits(unmerged, feeds)
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


@dataclass(frozen=True)
class PackageOptions:
    """How `package` builds: the layouts (`mode`), the exporter, replacing OUT_DIR, refusing adapters of another base."""

    mode: str = "both"
    exporter: str = "auto"
    overwrite: bool = False
    strict_base: bool = False
    quant: QuantOptions = QuantOptions()  # int8/int4: both layouts on the builder's MatMulNBits graphs
    only: str | None = None  # one variant's part (`package --assemble` joins the parts): its files as a full build's
    workers: int | None = None  # merged variants checked at once, in worker processes (None: as cores and memory allow)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.workers is not None and self.workers < 1:
            raise InputError(f"workers must be at least 1, not {self.workers}")


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
    if options.only is not None and options.only not in [v.name for v in variants]:
        raise InputError(
            f"{variants_file}: no variant {options.only!r} (--only): it names {[v.name for v in variants]}"
        )
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
    """The layouts into `tmp`; with `options.only`, that variant's part: the shared graph still has the LoRA inputs of
    every variant, so that each part's graphs are the one-run build's, byte for byte."""
    started, mode = time.perf_counter(), options.mode
    every, part = variants, None
    if options.only is not None:
        variants = [v for v in every if v.name == options.only]
        part = PackagePart(tuple(v.name for v in every), options.only)
    shared, template = None, None
    merged: dict[str, MergedVariant] = {}
    sharing = None
    with ExitStack() as stack:
        workers = variant_workers(base_dir, len(variants), options.workers) if mode != "shared" else 1
        pool = None
        if workers > 1:  # started now: the workers import while the shared layout is built
            log(f"merged layout: starting {workers} worker processes for {len(variants)} variants …")
            pool = stack.enter_context(
                WorkerPool(workers, log, partial(warm_worker, base_dir), worker_modules(base_dir))
            )
        if mode in ("shared", "both"):
            shared, template = _shared(base_dir, every, variants, tmp, log, options)
        if mode in ("merged", "both"):
            merged, sharing = merged_layout(base_dir, variants, tmp, log, options, template, pool)
    if isinstance(shared, PendingAdapters):  # on the merged variants' references: one PyTorch pass each
        shared = finish_adapters(shared, base_dir, variants, tmp, merged, log)
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
        part=part,
    )
    if not manifest.passed:
        raise DiscardOutput(manifest)
    manifest.write(tmp)
    return manifest


def storage_summary(folder: Path, variants: Sequence[object], mode: str) -> dict[str, Any]:
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
