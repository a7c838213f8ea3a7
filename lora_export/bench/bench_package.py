"""`lora-export bench --package`: a package's layouts side by side in ONNX Runtime."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..records import PackageManifest
from .timing import (
    PACKAGE_METHOD,
    BenchOptions,
    BenchResult,
    Row,
    environment,
    measure,
    shape_name,
    summarize,
    verdicts,
)
from .variants import OnnxFlops, _ort_feeds, add_graph_structure, graph_cells

A_A_SHARED = "the shared graph opened a second time, no adapter: what two identical sessions differ by (A/A control)"
A_A_MERGED = "the first merged graph opened a second time (A/A control)"


def package_graphs(package_dir: Path, manifest: PackageManifest, rows: list[Row]) -> dict[str, Any]:
    """Each row's graph, counted (lora_export.verification.structure.onnx_structure): the shared graph for base, base-copy and
    every shared+adapter row (an adapter changes input values, not the graph), each merged variant's own graph."""
    from ..verification.structure import onnx_structure

    shared = onnx_structure(package_dir / manifest.shared.graph) if manifest.shared else None
    merged = {f"{name} merged": package_dir / info.graph for name, info in manifest.merged.items()}
    counted = {str(path): onnx_structure(path) for path in set(merged.values())}
    graphs = {r.variant: counted[str(merged[r.variant])] if r.variant in merged else shared for r in rows}
    if shared is None:  # no shared graph: base and base-copy are the first merged variant's
        graphs["base"] = graphs["base-copy"] = counted[str(next(iter(merged.values())))]
    return graphs


def graph_paths(package_dir: Path, manifest: PackageManifest, rows: list[Row]) -> dict[str, Path]:
    """Each row's graph file (as package_graphs counts them)."""
    merged = {f"{name} merged": package_dir / info.graph for name, info in manifest.merged.items()}
    first = next(iter(merged.values()), None)
    shared = package_dir / manifest.shared.graph if manifest.shared else first
    return {r.variant: merged.get(r.variant) or shared for r in rows}  # type: ignore[misc]


def bench_package(
    package_dir: Path | str, options: BenchOptions = BenchOptions(), log: Callable[[str], None] = lambda s: None
) -> BenchResult:
    """A package's layouts in ONNX Runtime, per variant: the shared graph with no adapter (the base), the shared
    graph with the variant's adapter active (what hot-swapping costs per request) and the variant's merged model."""
    from transformers import AutoConfig

    package_dir = Path(package_dir)
    manifest = PackageManifest.load(package_dir)
    if "genai" in options.backends:
        from .bench_genai import bench_package_genai

        return bench_package_genai(package_dir, manifest, options, log)
    config_dir = package_dir / ("shared" if manifest.shared else next(iter(manifest.merged.values())).folder)
    config = AutoConfig.from_pretrained(config_dir, local_files_only=True)
    runners = _ort_runners(package_dir, manifest, options.threads or None, log)
    rows = [r for r, _, _ in runners]
    add_graph_structure(rows, package_graphs(package_dir, manifest, rows))
    paths = graph_paths(package_dir, manifest, rows)
    flops = OnnxFlops()
    shapes = [shape_name(s) for s in options.shapes]
    g = torch.Generator().manual_seed(options.seed)
    for shape in options.shapes:
        ids = torch.randint(0, int(config.get_text_config().vocab_size), shape, generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        calls = {}
        for row, sess, extra in runners:
            feeds = _ort_feeds(sess, inputs, config)
            ro = extra[0] if extra else None
            calls[row.variant] = lambda s=sess, f=feeds, r=ro: s.run(["logits"], f, r)
        log(f"measuring {shape_name(shape)} …")
        times = measure(calls, options, f"package {shape_name(shape)}")
        summarize(rows, shape_name(shape), {(r.variant, r.backend): times[r.variant] for r in rows}, options.seed)
        for row, sess, extra in runners:  # an active adapter's A/B are inputs too: counted at their shapes
            more = manifest.shared.parameters.get(extra[2], {}) if extra and manifest.shared else None
            flops.fill(row, paths[row.variant], _ort_feeds(sess, inputs, config), shape_name(shape), more)
    graph_cells(rows)
    env = environment(options)
    env["model"] = f"package {package_dir.name} ({', '.join(manifest.variants)})"
    return BenchResult(env, shapes, rows, verdicts(rows, shapes), method=PACKAGE_METHOD)


def _ort_runners(
    package_dir: Path, manifest: PackageManifest, threads: int | None, log: Callable[[str], None]
) -> list[tuple[Row, Any, Any]]:
    """(row, session, (run options, adapter, its name) or None) for base, its A/A copy, each shared+adapter and each
    merged."""
    import onnxruntime as ort

    from ..exporting.onnx_check import session

    runners: list[tuple[Row, Any, Any]] = []  # (row, session, run options)
    if manifest.shared is not None:
        shared = session(package_dir / manifest.shared.graph, threads)
        runners.append((Row("base", "onnxruntime", 0, "shared graph, no adapter active"), shared, None))
        copy = session(package_dir / manifest.shared.graph, threads)
        runners.append((Row("base-copy", "onnxruntime", 0, A_A_SHARED), copy, None))
        for name, file in manifest.shared.adapters.items():
            adapter = ort.LoraAdapter()
            adapter.Load(str(package_dir / file))
            ro = ort.RunOptions()
            ro.add_active_adapter(adapter)
            params = sum(int(np.prod(s)) for s in manifest.shared.parameters.get(name, {}).values())
            row = Row(f"{name} shared+adapter", "onnxruntime", params, f"shared graph with {file} active")
            runners.append((row, shared, (ro, adapter, name)))
    for name, info in manifest.merged.items():
        runners.append(
            (Row(f"{name} merged", "onnxruntime", 0, info.graph), session(package_dir / info.graph, threads), None)
        )
    if not runners or runners[0][0].variant != "base":
        log("no shared graph in this package: ratios are to the first merged variant")
        runners[0][0].variant = "base"
        first = next(iter(manifest.merged.values())).graph
        runners.insert(1, (Row("base-copy", "onnxruntime", 0, A_A_MERGED), session(package_dir / first, threads), None))
    return runners
