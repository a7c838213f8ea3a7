"""The merged layout of a package: one merged, verified ONNX model per variant, each a folder a runtime loads as it
is. On the GenAI builder's graph every float32 variant is the base's builder graph (built once, by the shared
layout or here) with its own weights: the tensors its adapters left as they were point into common.data, a hard
link to the base graph's data file, so that a variant costs its changed tensors on disk. Elsewhere (the dynamo
graph, float16, int8/int4) each variant is exported on its own, and tensors identical across variants are stored
once afterwards (`dedupe_merged`)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..exporting.genai_builder import build_with_genai
from ..exporting.genai_reuse import COMMON, GraphTemplate, template_of
from ..exporting.onnx import OnnxOptions
from ..exporting.pipeline import ExportOptions, choose_exporter, merge_and_onnx
from ..io.hashing import adopt_written, written_hashes
from ..io.processes import WorkerPool, worker_count, worker_log
from ..io.tensorfiles import parameter_count
from ..merging.merge import MergeOptions
from ..model.loading import load_model
from ..records import MergedVariant
from ..verification.verify import VerifyOptions
from .external_data import load_with_data, write_external_data
from .genai_quantized import merged_self_references
from .references import reference_inputs, rerun_merged, torch_logits
from .variants import Variant

STAGING = ".base-graph"  # the base's builder graph when no shared layout built it; removed before the manifest


def merged_layout(
    base_dir: Path,
    variants: list[Variant],
    out: Path,
    log: Callable[[str], None],
    settings: Any,
    template: GraphTemplate | str | None,
    pool: WorkerPool | None = None,
) -> tuple[dict[str, MergedVariant], dict[str, Any] | None]:
    """Each variant's merged/NAME folder, merge-and-onnx'd; and how the variants share their tensors on disk.
    `template`: the shared layout's builder graph of the base, or why it cannot be one (None: no shared layout).
    `pool`: worker processes (`variant_workers`, started by the caller) that check the variants side by side."""
    results: dict[str, MergedVariant] = {}
    if template is None and _floats(variants) and not settings.quant.quantized:
        template = _base_template(base_dir, out, settings, log)
    if isinstance(template, str):
        log(f"merged layout: the builder runs for every variant ({template})")
    jobs = _jobs(variants, template if isinstance(template, GraphTemplate) else None)
    try:
        if pool is not None:
            log(f"merged layout: {len(variants)} variants, checked in {pool.workers} worker processes …")
            done = pool.run(
                [(v.name, _variant_job, (base_dir, v, out, settings, *job)) for v, job in zip(variants, jobs)]
            )
            for v, (merged, hashed) in zip(variants, done, strict=True):
                adopt_written(hashed)  # the files the worker hashed for its report are not read again here
                results[v.name] = merged
        else:
            for v, (reuse, verify) in zip(variants, jobs, strict=True):
                results[v.name] = _variant(base_dir, v, out, log, settings, reuse, verify)
    finally:
        shutil.rmtree(out / STAGING, ignore_errors=True)
    if not results or not all(all(c.passed for c in v.checks) for v in results.values()):
        return results, None
    if all(m.reused_graph for m in results.values()):
        return results, linked_sharing(out, results)
    if len(results) > 1:
        log("merged layout: storing tensors identical across variants once …")
        return dedupe_merged(out, results)
    return results, None


def _floats(variants: list[Variant]) -> list[Variant]:
    return [v for v in variants if v.dtype in ("auto", "float32")]


def _jobs(variants: list[Variant], reuse: GraphTemplate | None) -> list[tuple[Any, VerifyOptions]]:
    """Per variant: the base's builder graph to reuse (float32 variants), and its verify options (the FLOPs and
    operator calls counted once: every merged variant runs the base's graph)."""
    floats = _floats(variants)
    return [(reuse if v in floats else None, VerifyOptions(structure=i == 0)) for i, v in enumerate(variants)]


def _base_template(base_dir: Path, out: Path, settings: Any, log: Callable[[str], None]) -> GraphTemplate | str | None:
    """The base's builder graph, built into the staging folder, where the builder is the exporter; else None."""
    use, _why = choose_exporter(ExportOptions(exporter=settings.exporter), base_dir, "causal-lm")
    if use != "genai":
        return None
    log("merged layout: the GenAI model builder's graph of the base, for every variant's weights …")
    (out / STAGING).mkdir()
    build_with_genai(base_dir, out / STAGING, "float32", log)
    return template_of(out / STAGING, base_dir)


SMALL_MODEL = 50_000_000  # parameters: below this a variant's checks take less than a worker's start (4–5 s here)
MEMORY_PER_FP32 = 2  # a worker's peak, in float32 copies of the model (one PyTorch model or GenAI's session at a time)


def variant_workers(base_dir: Path, variants: int, asked: int | None) -> int:
    """How many variants are checked at once, each in its own process (1: one after another in this one): `asked`
    (`package --workers`), else as many as the cores and the available memory allow, for models big enough that a
    variant takes longer than a worker's start."""
    parameters = parameter_count(base_dir)
    if asked is None and (variants < 2 or parameters < SMALL_MODEL):
        return 1
    per_worker = MEMORY_PER_FP32 * 4 * parameters + 2**30  # + the interpreter, torch and GenAI
    return worker_count(variants, per_worker, asked)


def worker_modules(base_dir: Path) -> list[str]:
    """What every worker imports (once, in the forkserver where there is one): torch, transformers, ONNX and its
    runtimes, the model's class."""
    from ..model.loading import model_class

    return ["lora_export.exporting.pipeline", model_class(base_dir).__module__]


def warm_worker(base_dir: Path) -> None:
    """A worker's imports before its first variant, made while the parent builds the shared layout: torch,
    transformers and the model's class, ONNX and its runtimes (seconds in a fresh interpreter)."""
    from ..exporting import pipeline  # noqa: F401  (torch, transformers, onnx)
    from ..model.loading import model_class

    model_class(base_dir)


def _variant_job(
    base_dir: Path, v: Variant, out: Path, settings: Any, reuse: GraphTemplate | None, verify: VerifyOptions
) -> tuple[MergedVariant, dict[Any, str]]:
    """_variant in a worker process: its log lines go to the parent's log; with the sha256s it computed."""
    return _variant(base_dir, v, out, worker_log, settings, reuse, verify), written_hashes()


def _variant(
    base_dir: Path,
    v: Variant,
    out: Path,
    log: Callable[[str], None],
    settings: Any,
    reuse: GraphTemplate | None,
    verify: VerifyOptions,
) -> MergedVariant:
    """merge-and-onnx of one variant into merged/NAME, and the reference outputs `package --check` re-runs. The
    FLOPs and operator calls are counted for the first variant only (`verify.structure`): every merged variant runs
    the base's graph."""
    log(f"merged layout: {v.name} …")
    folder = out / "merged" / v.name
    folder.parent.mkdir(exist_ok=True)
    options = MergeOptions(dtype=v.dtype, weights=tuple(w for _, w in v.adapters), progress=False)
    export = ExportOptions(
        onnx=OnnxOptions(max_new_tokens=8),
        exporter=settings.exporter,
        reuse=reuse,
        quant=settings.quant,
        references_as=v.name,  # the builder's graph: its GenAI check's references are what --check re-runs
    )
    result = merge_and_onnx(base_dir, [p for p, _ in v.adapters], folder, options, export, verify, log)
    section = result.report.export
    dtype = section.dtype if section is not None else v.dtype
    used = "genai" if section is not None and section.by_builder else "dynamo"
    graph, reused = f"merged/{v.name}/model.onnx", (section.reused_graph if section is not None else None) or ""
    merged = MergedVariant(f"merged/{v.name}", dtype, graph, result.checks, used, reused)
    if not result.passed:
        return merged  # the package fails; its report names this variant's failed checks
    if used == "genai" and settings.quant.quantized:  # --check re-runs GenAI's own outputs (genai_quantized)
        merged_self_references(folder, v.name)
    elif used != "genai":  # the dynamo graph's, in ONNX Runtime (the builder's GenAI check wrote its own)
        model = load_model(folder / "merged", torch.float16 if dtype == "float16" else torch.float32)
        _, feeds, _ = reference_inputs(model)
        logits = {f"logits:{v.name}": torch_logits(model, feeds)}
        np.savez(folder / "reference.npz", **{f"input:{k}": a for k, a in feeds.items()}, **logits)
    return merged


def linked_sharing(out: Path, merged: dict[str, MergedVariant]) -> dict[str, Any]:
    """How the variants on the base's graph share its tensors: common.data in each folder (one file on disk where
    hard links work), each variant's own tensors in its model.onnx.data."""
    import onnx

    first = out / next(iter(merged.values())).folder
    referenced: dict[str, int] = {}
    common = set()
    for name, m in merged.items():
        graph = onnx.load(str(out / m.graph), load_external_data=False).graph
        at = [{e.key: e.value for e in i.external_data} for i in graph.initializer]
        shared = [e for e in at if e.get("location") == COMMON]
        referenced[name] = sum(int(e["length"]) for e in shared)
        common |= {e["offset"] for e in shared}
    common_bytes = (first / COMMON).stat().st_size
    inodes = {(out / m.folder / COMMON).stat().st_ino for m in merged.values()}
    shared = out / "shared" / "model.onnx.data"  # the shared layout's data file: common.data costs nothing more
    extra = 0 if shared.is_file() and inodes == {shared.stat().st_ino} else common_bytes * len(inodes)
    where = "hard links to the shared graph's data" if extra == 0 else "hard links to one file"
    return {
        "common_tensors": len(common),
        "saved_bytes": sum(referenced.values()) - extra,
        "common_bytes": common_bytes,
        "common_file": f"{COMMON} in each variant's folder: the base graph's tensors, "
        + (where if len(inodes) == 1 else "copies"),
        "per_variant_bytes": {n: (out / m.folder / "model.onnx.data").stat().st_size for n, m in merged.items()},
    }


def dedupe_merged(out: Path, merged: dict[str, MergedVariant]) -> tuple[dict[str, MergedVariant], dict[str, Any]]:
    """Keep each merged variant a folder a runtime loads as it is (merged/NAME/model.onnx beside its config,
    tokenizer and genai_config.json), while storing the tensors identical in every variant once: they go to
    common.data, hard-linked into each variant's folder (ONNX Runtime wants external data beside the graph), the
    rest to the variant's model.onnx.data. Each rewritten graph is checked against the variant's reference outputs."""

    names = list(merged)
    folders = {n: out / merged[n].folder for n in names}
    models = {n: load_with_data(out / merged[n].graph) for n in names}  # with their weights, before the rewrite
    for folder in folders.values():  # common.data too: it may be a link to the shared graph's data, never written into
        for f in [*folder.glob("model.onnx*"), folder / COMMON]:
            f.unlink(missing_ok=True)
    common, saved, linked = write_external_data(models, folders, out / "merged" / ".common.data")
    updated = {}
    for n in names:
        name = f"{merged[n].folder}/model.onnx (shared tensors) vs reference"
        check = replace(rerun_merged(out, n, merged[n]), name=name)
        updated[n] = replace(merged[n], graph=f"{merged[n].folder}/model.onnx", checks=(*merged[n].checks, check))
    sharing = {
        "common_tensors": common,
        "saved_bytes": saved if linked else 0,
        "common_bytes": (folders[names[0]] / COMMON).stat().st_size,
        "common_file": f"{COMMON} in each variant's folder, " + ("hard links to one file" if linked else "copies"),
        "per_variant_bytes": {n: (folders[n] / "model.onnx.data").stat().st_size for n in names},
    }
    return updated, sharing
