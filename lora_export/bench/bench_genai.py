"""`lora-export bench --package DIR --backend genai`: what an LLM's users feel, in ONNX Runtime GenAI — the prefill
of a prompt and the milliseconds per generated token — for the base (the shared graph with no adapter active), each
variant's shared graph with its adapter active (og.Adapters), and each merged variant, beside an A/A control (the
base's folder loaded a second time) that says what this machine can resolve, and each graph's counted nodes. Batch 1; every model in every
round, the order rotating, the first round discarded; `min_length` pins the token count so that an early eos never
shortens a run."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..io.errors import InputError
from ..io.jsonio import read_json_object
from ..records import PackageManifest
from .timing import PACKAGE_METHOD, BenchOptions, BenchResult, Row, environment, summarize, verdicts
from .variants import OnnxFlops, add_graph_structure, graph_cells

NEW_TOKENS = 16


def bench_package_genai(
    package_dir: Path, manifest: PackageManifest, options: BenchOptions, log: Callable[[str], None]
) -> BenchResult:
    import onnxruntime_genai as og

    from ..exporting.runtime_files import GENAI_CONFIG, genai_model, genai_prompt
    from .bench_package import A_A_MERGED, A_A_SHARED, package_graphs

    runners: list[tuple[Row, Any, Any]] = []  # (row, og.Model, (og.Adapters, name) or None)
    if manifest.shared is not None:
        shared = genai_model(og, package_dir / "shared", options.device)
        adapters = og.Adapters(shared)
        runners.append((Row("base", "genai", 0, "shared graph, no adapter active"), shared, None))
        copy = genai_model(og, package_dir / "shared", options.device)
        runners.append((Row("base-copy", "genai", 0, A_A_SHARED), copy, None))
        for name, file in manifest.shared.adapters.items():
            adapters.load(str(package_dir / file), name)
            params = sum(int(np.prod(s)) for s in manifest.shared.parameters.get(name, {}).values())
            runners.append((Row(f"{name} shared+adapter", "genai", params, f"{file} active"), shared, (adapters, name)))
    for name, info in manifest.merged.items():
        model = genai_model(og, package_dir / info.folder, options.device)
        runners.append((Row(f"{name} merged", "genai", 0, info.graph), model, None))
    if runners[0][0].variant != "base":
        log("no shared graph in this package: ratios are to the first merged variant")
        runners[0][0].variant = "base"
        first = package_dir / next(iter(manifest.merged.values())).folder
        runners.insert(1, (Row("base-copy", "genai", 0, A_A_MERGED), genai_model(og, first, options.device), None))
    config_dir = package_dir / ("shared" if manifest.shared else next(iter(manifest.merged.values())).folder)
    rows, shapes = [r for r, _, _ in runners], []
    add_graph_structure(rows, package_graphs(package_dir, manifest, rows))
    vocab, context = _vocab(config_dir / GENAI_CONFIG)
    flops = OnnxFlops()
    for batch, seq in options.shapes:
        if seq + NEW_TOKENS > context:
            raise InputError(
                f"--shapes {batch}x{seq}: {seq} prompt tokens and {NEW_TOKENS} generated exceed the package's context "
                f"of {context} ({config_dir / GENAI_CONFIG}): give a prompt of at most {context - NEW_TOKENS} tokens"
            )
        if batch != 1:
            log(f"GenAI: batch 1 only here; skipping {batch}x{seq}")
            continue
        prompt = genai_prompt(config_dir / GENAI_CONFIG, vocab, seq, options.seed)
        log(f"measuring GenAI prefill of {seq} tokens and {NEW_TOKENS} generated tokens …")
        prefill, decode = _rounds(og, runners, prompt, options)
        names = (f"prefill 1/{seq}", f"decode ms/token 1/{seq}+{NEW_TOKENS}")
        for name, times in zip(names, (prefill, decode), strict=True):
            summarize(rows, name, {(r.variant, "genai"): times[r.variant] for r in rows}, options.seed)
            shapes.append(name)
        _genai_flops(runners, package_dir, manifest, seq, names, flops)
    graph_cells(rows)
    env = environment(options)
    env["model"] = f"package {package_dir.name} ({', '.join(manifest.variants)}), ONNX Runtime GenAI {og.__version__}"
    return BenchResult(env, shapes, rows, verdicts(rows, shapes), method=PACKAGE_METHOD)


def _genai_flops(
    runners: list[tuple[Row, Any, Any]],
    package_dir: Path,
    manifest: PackageManifest,
    seq: int,
    names: tuple[str, str],
    flops: OnnxFlops,
) -> None:
    """Each row's FLOPs from its graph: the prefill of `seq` tokens, and a generated token's average over the
    NEW_TOKENS steps (attention grows linearly with the past, so the mean of the first and last step is exact)."""
    from .bench_package import graph_paths

    paths = graph_paths(package_dir, manifest, [r for r, _, _ in runners])
    inputs = {path: graph_inputs(path) for path in set(paths.values())}
    for row, _, active in runners:
        path, graph = paths[row.variant], inputs[paths[row.variant]]
        more = manifest.shared.parameters.get(active[1], {}) if active and manifest.shared else None
        flops.fill(row, path, genai_input_shapes(graph, 1, seq, 0), names[0], more)
        first = flops.count(row, path, genai_input_shapes(graph, 1, 1, seq), more)
        last = flops.count(row, path, genai_input_shapes(graph, 1, 1, seq + NEW_TOKENS - 1), more)
        row.cells[names[1]].flops = None if first is None or last is None else (first + last) // 2


def graph_inputs(graph: Path) -> dict[str, list[int]]:
    """An ONNX graph's inputs and their declared dims (0 where symbolic), read without its weights."""
    import onnx

    inputs = onnx.load(str(graph), load_external_data=False).graph.input
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inputs}


def genai_input_shapes(inputs: dict[str, list[int]], batch: int, seq: int, past: int) -> dict[str, tuple[int, ...]]:
    """A builder graph's inputs (graph_inputs) for `seq` new tokens after `past`: ids and positions (batch, seq), the
    mask over every token, each past key/value (batch, kv heads, past, head dim)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, dims in inputs.items():
        if name == "attention_mask":
            shapes[name] = (batch, past + seq)
        elif name.startswith("past_key_values"):
            shapes[name] = (batch, dims[1], past, dims[3])
        elif name in ("input_ids", "position_ids"):
            shapes[name] = (batch, seq)
    return shapes


def _vocab(config_path: Path) -> tuple[int, int]:
    """The vocabulary size and the context length genai_config.json gives the model."""
    model = read_json_object(config_path, "the package's GenAI graph has no genai_config.json")["model"]
    return int(model["vocab_size"]), int(model.get("context_length") or 1 << 31)


def _rounds(
    og: Any, runners: list[tuple[Row, Any, Any]], prompt: list[int], options: BenchOptions
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    prefill: dict[str, list[float]] = {r.variant: [] for r, _, _ in runners}
    decode: dict[str, list[float]] = {r.variant: [] for r, _, _ in runners}
    length = len(prompt) + NEW_TOKENS
    started, rounds = time.perf_counter(), 0
    while rounds <= options.min_rounds or (
        time.perf_counter() - started < options.budget_s * 4 and rounds <= options.max_rounds
    ):
        k = rounds % len(runners)
        for row, model, active in runners[k:] + runners[:k]:
            params = og.GeneratorParams(model)
            params.set_search_options(do_sample=False, max_length=length, min_length=length)
            generator = og.Generator(model, params)
            if active is not None:
                generator.set_active_adapter(*active)
            t = time.perf_counter()
            generator.append_tokens(prompt)
            p = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(NEW_TOKENS):
                generator.generate_next_token()
            d = (time.perf_counter() - t) / NEW_TOKENS
            if rounds:  # the first round warms every model up
                prefill[row.variant].append(p * 1e3)
                decode[row.variant].append(d * 1e3)
        rounds += 1
    return prefill, decode
