"""`lora-export bench` on a model and adapters, and on the LoRA paper's Table 1 setting."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..io.errors import InputError, UnsupportedError
from ..merging.merge import MergeOptions, merge
from ..model.config import ModelConfig
from ..model.hub import folder_of
from .timing import BenchOptions, BenchResult, Row, environment, measure, shape_name, summarize, torch_threads, verdicts
from .variants import OnnxFlops, _inputs, _ort_calls, _ort_feeds, _torch_call, _torch_variants, graph_cells


def add_structure(variants: list[tuple[Row, Any]], inputs: dict[str, torch.Tensor], shape: str) -> None:
    """Each PyTorch row's counted structure at this shape: FLOPs and operator calls into its cell, and whether it is
    the base's computation (else what it adds) into the row, across every shape measured."""
    from ..verification.structure import torch_structure

    counted = {row.variant: torch_structure(model, inputs) for row, model in variants}
    base = counted["base"]
    for row, _ in variants:
        s = counted[row.variant]
        cell = row.cells[shape]
        cell.flops, cell.op_calls, cell.ops = s.flops, sum(s.ops.values()), dict(sorted(s.ops.items()))
        same = s.same_as(base)
        row.structure["identical_to_base"] = row.structure.get("identical_to_base", True) and same
        if not same:
            row.structure.setdefault("adds_per_forward", {})[shape] = s.added_over(base)


def check_shapes_fit(base_dir: Path, shapes: Sequence[tuple[int, int]]) -> None:
    """Every --shapes sequence length within the model's context, before anything is loaded."""
    context = ModelConfig.load(base_dir).context
    too_long = [f"{b}x{s}" for b, s in shapes if context and s > int(context)]
    if too_long:
        raise InputError(f"--shapes {', '.join(too_long)}: longer than the model's context of {context} tokens")


def _check_inputs(base_dir: Path, onnx_dir: Path | str | None, options: BenchOptions) -> None:
    """What bench can time, before anything is loaded: the device, the model's kind and context, and --onnx (a folder
    with model.onnx, timed by the onnxruntime backend)."""
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is visible to PyTorch here")
    if ModelConfig.load(base_dir).encoder_decoder:
        raise UnsupportedError(
            f"{base_dir} is an encoder-decoder: bench times decoders and encoders (its inputs are token ids alone); "
            "`lora-export verify` reports what unmerged LoRA adds to an encoder-decoder's FLOPs and operator calls"
        )
    check_shapes_fit(base_dir, options.shapes)
    if onnx_dir is not None and not (Path(onnx_dir) / "model.onnx").is_file():
        raise InputError(f"--onnx {onnx_dir}: no model.onnx there; give a folder written by merge-and-onnx or export")
    if onnx_dir is not None and "onnxruntime" not in options.backends:
        raise InputError(f"--onnx {onnx_dir} is timed by ONNX Runtime: add --backend onnxruntime (or all)")


def bench(
    base_dir: Path | str,
    adapter_dirs: Sequence[Path | str],
    options: BenchOptions = BenchOptions(),
    merged_dir: Path | str | None = None,
    onnx_dir: Path | str | None = None,
    adapter_params: dict[str, int] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> BenchResult:
    """Measure every variant at every shape, interleaved; see lora_export.bench.timing for the method."""
    base_dir = folder_of(base_dir, "base")
    adapters = [folder_of(a, "adapter") for a in adapter_dirs]
    if not adapters:
        raise InputError("give at least one adapter folder (or use --paper-table1)")
    _check_inputs(base_dir, onnx_dir, options)
    with torch_threads(options.threads), tempfile.TemporaryDirectory(prefix="lora-export-bench-") as tmp:
        work = Path(tmp)
        if merged_dir is None:
            log("merging (no --merged given) …")
            merged_dir = work / "merged"
            merge(base_dir, adapters, merged_dir, MergeOptions(dtype=options.dtype, progress=False))
            os.sync()  # let the kernel write the new file back before anything is timed
        log("loading variants: base, base-copy, merged, lora-unmerged, adapter-H, adapter-L …")
        variants = _torch_variants(base_dir, adapters, Path(merged_dir), options, adapter_params)
        calls: list[tuple[Row, Callable[[dict[str, torch.Tensor]], Callable[[], Any]]]] = []
        if "torch" in options.backends:
            calls += [(row, lambda inputs, m=model: _torch_call(m, inputs)) for row, model in variants]
        graphs: list[tuple[Row, Any, Path]] = []
        if "onnxruntime" in options.backends:
            probe = variants[0][1]
            graphs = _ort_calls(variants, work, options, Path(onnx_dir) if onnx_dir else None, log)
            for row, sess, _ in graphs:
                calls.append((row, lambda inputs, s=sess: lambda f=_ort_feeds(s, inputs, probe): s.run(None, f)))
        rows = [row for row, _ in calls]
        flops = OnnxFlops()
        shapes = [shape_name(s) for s in options.shapes]
        for shape in options.shapes:
            inputs = _inputs(variants[0][1], shape, options.seed, options.device)
            bound = {f"{row.variant}@{row.backend}": make(inputs) for row, make in calls}
            log(f"measuring {shape_name(shape)} …")
            times = measure(bound, options, f"bench {shape_name(shape)}")
            summarize(
                rows,
                shape_name(shape),
                {(r.variant, r.backend): times[f"{r.variant}@{r.backend}"] for r in rows},
                options.seed,
            )
            if "torch" in options.backends:
                add_structure(variants, inputs, shape_name(shape))
            for row, sess, path in graphs:
                flops.fill(row, path, _ort_feeds(sess, inputs, variants[0][1]), shape_name(shape))
    graph_cells(rows)
    env = environment(options)
    env["model"] = ModelConfig.load(base_dir).architecture or "?"
    env["parameters"] = sum(p.numel() for p in variants[0][1].parameters())
    return BenchResult(env, shapes, rows, verdicts(rows, shapes))


PAPER_TABLE1 = {  # GPT-2 medium, ms, NVIDIA Quadro RTX8000 (Hu et al. 2021, Table 1)
    "shapes": ["32/512", "16/256", "1/128"],
    "adapter_params": {"32/512": 500_000, "16/256": 11_000_000, "1/128": 11_000_000},
    "rows": {
        "merged": ["1449.4 ± 0.8", "338.0 ± 0.6", "19.8 ± 2.7"],
        "adapter-L": ["1482.0 ± 1.0 (+2.2%)", "354.8 ± 0.5 (+5.0%)", "23.9 ± 2.1 (+20.7%)"],
        "adapter-H": ["1492.2 ± 1.0 (+3.0%)", "366.3 ± 0.5 (+8.4%)", "25.8 ± 2.2 (+30.3%)"],
    },
}


def build_paper_model(folder: Path, rank: int = 4, seed: int = 0) -> tuple[Path, Path]:
    """GPT-2 medium with random weights (24 layers, d=1024) and a PEFT-format LoRA adapter, r=4, on the fused
    q/k/v projection `c_attn` (GPT-2 fuses them; the paper adapts q and v), written without PEFT."""
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=24, n_embd=1024, n_head=16, n_positions=1024)
    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's global RNG left as it was
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    base = folder / "gpt2-medium-random"
    model.save_pretrained(base)
    adapter = folder / "lora-r4"
    adapter.mkdir()
    tensors = {}
    g = torch.Generator().manual_seed(seed)
    for i in range(config.n_layer):
        prefix = f"base_model.model.transformer.h.{i}.attn.c_attn"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, 1024, generator=g) * 0.01
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(3 * 1024, rank, generator=g) * 0.01
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": 2 * rank,
                "target_modules": ["c_attn"],
                "fan_in_fan_out": True,
                "bias": "none",
                "task_type": "CAUSAL_LM",
            }
        )
    )
    return base, adapter


def paper_table1(options: BenchOptions, log: Callable[[str], None] = lambda s: None) -> BenchResult:
    """Table 1's experiment on this machine: adapters sized as in the paper per shape, LoRA r=4."""
    results = []
    with tempfile.TemporaryDirectory(prefix="lora-export-table1-") as tmp:
        log("building GPT-2 medium (random weights) and a rank-4 LoRA adapter …")
        base, adapter = build_paper_model(Path(tmp))
        for shape in options.shapes:
            name = shape_name(shape)
            params = PAPER_TABLE1["adapter_params"].get(name, 11_000_000 if shape[0] < 32 else 500_000)
            log(f"{name}: adapters with |Θ| = {params / 1e6:g}M")
            results.append(
                bench(
                    base,
                    [adapter],
                    replace(options, shapes=(shape,)),
                    adapter_params={"H": params, "L": params},
                    log=log,
                )
            )
    merged = results[0]
    for r in results[1:]:
        for row, other in zip(merged.rows, r.rows):
            row.cells.update(other.cells)
            if "identical_to_base" in other.structure:  # every shape's structure, not just the first's
                row.structure["identical_to_base"] = (
                    row.structure["identical_to_base"] and other.structure["identical_to_base"]
                )
                if other.structure.get("adds_per_forward"):
                    row.structure.setdefault("adds_per_forward", {}).update(other.structure["adds_per_forward"])
            if row.variant.startswith("adapter"):
                row.description += (
                    f"; {other.description.rsplit('bottleneck', 1)[-1].strip()} at {list(other.cells)[0]}"
                )
        merged.shapes += r.shapes
        merged.verdicts += r.verdicts
    merged.extra["paper"] = PAPER_TABLE1
    merged.environment["model"] = "GPT-2 medium (random weights, 24 layers, d=1024), LoRA r=4 on c_attn"
    return merged
