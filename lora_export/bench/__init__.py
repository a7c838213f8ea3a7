"""`lora-export bench`: latency of base, merged, unmerged LoRA and adapter layers, in PyTorch and ONNX Runtime."""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..lora_runtime import LoraLayer, load_model, load_unmerged, model_kind
from ..merge import MergeOptions, merge
from ..verify import DTYPES
from .baselines import insert_adapters, plan_adapters
from .runner import BenchOptions, BenchResult, Row, environment, measure, shape_name, summarize, verdicts

__all__ = ["BenchOptions", "BenchResult", "bench", "bench_package", "paper_table1"]


def lora_params(model: nn.Module) -> int:
    return sum(getattr(m, n).numel() for m in model.modules() if isinstance(m, LoraLayer) for n, _ in m.named_buffers(recurse=False) if n.startswith(("lora_A_", "lora_B_")))


def _torch_variants(base_dir: Path, adapters: Sequence[Path], merged_dir: Path, options: BenchOptions, adapter_params: dict[str, int] | None) -> list[tuple[Row, nn.Module]]:
    dtype, device = DTYPES[options.dtype], options.device
    unmerged = load_unmerged(base_dir, adapters, dtype=dtype, device=device)
    n_lora = lora_params(unmerged)
    variants: list[tuple[Row, nn.Module]] = [
        (Row("base", "torch", 0, "the base model as it is"), load_model(base_dir, dtype, device)),
        (Row("base-copy", "torch", 0, "a second load of the base: what two identical models differ by here (A/A control)"),
         load_model(base_dir, dtype, device)),
        (Row("merged", "torch", 0, "W0 + ΔW folded in (lora-export merge)"), load_model(merged_dir, dtype, device)),
        (Row("lora-unmerged", "torch", n_lora, "base + B·A·x at run time (lora_runtime)"), unmerged),
    ]
    for kind in ("H", "L"):
        model = load_model(base_dir, dtype, device)
        plan = plan_adapters(model, kind, (adapter_params or {}).get(kind) or options.adapter_params or n_lora)
        insert_adapters(model, plan, options.seed)
        desc = f"{'two per block (after attention, after MLP)' if kind == 'H' else 'one per block after the MLP, with LayerNorm'}, bottleneck {plan.bottleneck}"
        variants.append((Row(f"adapter-{kind}", "torch", plan.params, desc), model.eval()))
    materialize([model for _, model in variants])
    return variants


def materialize(models: Sequence[nn.Module]) -> None:
    """Copy every model's weights out of their memory-mapped files into ordinary memory, interleaved tensor by tensor
    across the models. transformers maps safetensors files privately, and a file written moments ago (the merged one)
    measured up to 10% slower; copied one model after the other, the model copied second measured 13–15% faster than
    the first with identical weights (GPT-2 medium, batch 1, this VM). Interleaved, each model's tensors are spread
    over the same memory, and who is copied first rotates, so placement does not pick a winner."""
    tensors = [list(m.parameters()) + list(m.buffers()) for m in models]
    with torch.no_grad():
        for i, group in enumerate(itertools.zip_longest(*tensors)):
            k = i % len(group)  # rotate who goes first: within a group the later copies measured faster
            for t in group[k:] + group[:k]:
                if t is not None:
                    t.data = t.data.clone()


def _inputs(model: nn.Module, shape: tuple[int, int], seed: int, device: str) -> dict[str, torch.Tensor]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(config.vocab_size), shape, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _torch_call(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], Any]:
    extra = {"use_cache": False} if model_kind(model) == "causal-lm" else {}

    def call() -> Any:
        with torch.inference_mode():
            return model(**inputs, **extra)

    return call


def _ort_calls(variants: list[tuple[Row, nn.Module]], workdir: Path, options: BenchOptions, onnx_dir: Path | None,
               log: Callable[[str], None]) -> list[tuple[Row, Any]]:
    """Each torch variant exported (no past) and opened in ONNX Runtime; `onnx_dir` replaces the merged export."""
    import onnxruntime as ort

    from ..exporters.onnx import OnnxOptions, export_onnx

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if options.device.startswith("cuda") else ["CPUExecutionProvider"]
    out = []
    for row, model in variants:
        path = workdir / f"{row.variant}.onnx"
        if row.variant == "merged" and onnx_dir is not None:
            path = onnx_dir / "model.onnx"
        else:
            log(f"exporting {row.variant} to ONNX for the onnxruntime backend …")
            export_onnx(model, path, OnnxOptions(with_past=False))
        so = ort.SessionOptions()
        if options.threads:
            so.intra_op_num_threads = options.threads
        so.log_severity_level = 3
        out.append((replace(row, backend="onnxruntime", cells={}), ort.InferenceSession(str(path), so, providers=providers)))
    return out


def _ort_feeds(session: Any, inputs: dict[str, torch.Tensor], model: Any) -> dict[str, Any]:
    """Feeds for an exported graph; `model` is a loaded model or just its config (for the cache's shape)."""
    import numpy as np

    from ..exporters.graphs import cache_shape, position_ids_for

    ids, mask = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu()
    feeds: dict[str, Any] = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = ids.numpy()
        elif inp.name == "attention_mask":
            feeds[inp.name] = mask.numpy()
        elif inp.name == "position_ids":
            feeds[inp.name] = position_ids_for(mask, ids.shape[1]).numpy()
        elif inp.name == "token_type_ids":
            feeds[inp.name] = np.zeros_like(ids.numpy())
        elif inp.name.startswith("past_key_values"):
            shape = cache_shape(getattr(model, "config", model))
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[inp.name] = np.zeros((ids.shape[0], shape.kv_heads, 0, shape.head_dim), dtype=dtype)
    return feeds


def bench(base_dir: Path | str, adapter_dirs: Sequence[Path | str], options: BenchOptions = BenchOptions(), merged_dir: Path | str | None = None,
          onnx_dir: Path | str | None = None, adapter_params: dict[str, int] | None = None, log: Callable[[str], None] = lambda s: None) -> BenchResult:
    """Measure every variant at every shape, interleaved; see lora_export.bench.runner for the method."""
    base_dir = Path(base_dir)
    adapters = [Path(a) for a in adapter_dirs]
    if not adapters:
        raise InputError("give at least one adapter folder (or use --paper-table1)")
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is visible to PyTorch here")
    if options.threads:
        torch.set_num_threads(options.threads)
    with tempfile.TemporaryDirectory(prefix="lora-export-bench-") as tmp:
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
        if "onnxruntime" in options.backends:
            probe = variants[0][1]
            for row, sess in _ort_calls(variants, work, options, Path(onnx_dir) if onnx_dir else None, log):
                calls.append((row, lambda inputs, s=sess: (lambda f=_ort_feeds(s, inputs, probe): s.run(None, f))))
        rows = [row for row, _ in calls]
        shapes = [shape_name(s) for s in options.shapes]
        for shape in options.shapes:
            inputs = _inputs(variants[0][1], shape, options.seed, options.device)
            bound = {f"{row.variant}@{row.backend}": make(inputs) for row, make in calls}
            log(f"measuring {shape_name(shape)} …")
            times = measure(bound, options, f"bench {shape_name(shape)}")
            summarize(rows, shape_name(shape), {(r.variant, r.backend): times[f"{r.variant}@{r.backend}"] for r in rows}, options.seed)
    env = environment(options)
    env["model"] = json.loads((base_dir / "config.json").read_text()).get("architectures", ["?"])[0]
    env["parameters"] = sum(p.numel() for p in variants[0][1].parameters())
    return BenchResult(env, shapes, rows, verdicts(rows, shapes))


# ---------------------------------------------------------------------------------------------------------------------
# The paper's Table 1

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

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=24, n_embd=1024, n_head=16, n_positions=1024)
    model = GPT2LMHeadModel(config)
    base = folder / "gpt2-medium-random"
    model.save_pretrained(base)
    adapter = folder / "lora-r4"
    adapter.mkdir()
    tensors = {}
    for i in range(config.n_layer):
        prefix = f"base_model.model.transformer.h.{i}.attn.c_attn"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, 1024) * 0.01
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(3 * 1024, rank) * 0.01
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["c_attn"], "fan_in_fan_out": True,
        "bias": "none", "task_type": "CAUSAL_LM",
    }))
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
            results.append(bench(base, [adapter], replace(options, shapes=(shape,)), adapter_params={"H": params, "L": params}, log=log))
    merged = results[0]
    for r in results[1:]:
        for row, other in zip(merged.rows, r.rows):
            row.cells.update(other.cells)
            if row.variant.startswith("adapter"):
                row.description += f"; {other.description.rsplit('bottleneck', 1)[-1].strip()} at {list(other.cells)[0]}"
        merged.shapes += r.shapes
        merged.verdicts += r.verdicts
    merged.extra["paper"] = PAPER_TABLE1
    merged.environment["model"] = "GPT-2 medium (random weights, 24 layers, d=1024), LoRA r=4 on c_attn"
    return merged


def bench_package(package_dir: Path | str, options: BenchOptions = BenchOptions(), log: Callable[[str], None] = lambda s: None) -> BenchResult:
    """A package's layouts in ONNX Runtime, per variant: the shared graph with no adapter (the base), the shared
    graph with the variant's adapter active (what hot-swapping costs per request) and the variant's merged model."""
    import onnxruntime as ort
    from transformers import AutoConfig

    from ..exporters.onnx import session

    package_dir = Path(package_dir)
    manifest_path = package_dir / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{package_dir} has no manifest.json: is it a lora-export package?")
    manifest = json.loads(manifest_path.read_text())
    config_dir = package_dir / ("shared" if "shared" in manifest else next(iter(manifest["merged"].values()))["folder"])
    config = AutoConfig.from_pretrained(config_dir, local_files_only=True)
    threads = options.threads or None
    runners: list[tuple[Row, Any, Any]] = []  # (row, session, run options)
    if "shared" in manifest:
        shared = session(package_dir / "shared" / "model.onnx", threads)
        runners.append((Row("base", "onnxruntime", 0, "shared graph, no adapter active"), shared, None))
        for name, info in manifest["shared"]["adapters"].items():
            adapter = ort.LoraAdapter()
            adapter.Load(str(package_dir / "shared" / info["file"]))
            ro = ort.RunOptions()
            ro.add_active_adapter(adapter)
            params = sum(int(np.prod(s)) for s in info["parameters"].values())
            runners.append((Row(f"{name} shared+adapter", "onnxruntime", params, f"shared graph with {info['file']} active"), shared, (ro, adapter)))
    for name, info in manifest.get("merged", {}).items():
        runners.append((Row(f"{name} merged", "onnxruntime", 0, f"{info['folder']}/model.onnx"), session(package_dir / info["folder"] / "model.onnx", threads), None))
    if not runners or runners[0][0].variant != "base":
        log("no shared graph in this package: ratios are to the first merged variant")
        runners[0][0].variant = "base"
    rows = [r for r, _, _ in runners]
    shapes = [shape_name(s) for s in options.shapes]
    g = torch.Generator().manual_seed(options.seed)
    for shape in options.shapes:
        ids = torch.randint(0, int(config.get_text_config().vocab_size), shape, generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        calls = {}
        for row, sess, extra in runners:
            feeds = _ort_feeds(sess, inputs, config)
            ro = extra[0] if extra else None
            calls[row.variant] = (lambda s=sess, f=feeds, r=ro: s.run(["logits"], f, r))
        log(f"measuring {shape_name(shape)} …")
        times = measure(calls, options, f"package {shape_name(shape)}")
        summarize(rows, shape_name(shape), {(r.variant, r.backend): times[r.variant] for r in rows}, options.seed)
    env = environment(options)
    env["model"] = f"package {package_dir.name} ({', '.join(manifest['variants'])})"
    return BenchResult(env, shapes, rows, verdicts(rows, shapes))
