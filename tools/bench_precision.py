"""Precision, measured side by side on SmolLM2-135M-Instruct (the real model, from the demo's cache): for the demo
adapter and a subtle q/v adapter (r=4, made here with PEFT, effect KL ≈ 0.004 on the built-in text), at int8 and
int4, `merge-and-onnx --precision` through the library (verdicts, quality, adapter effect, size, time), the builder's
`-p int4` alone for comparison, and decode speed in ONNX Runtime GenAI of the demo merge at fp32, int8 and int4 beside
an A/A control (the fp32 folder loaded twice): batch 1, a 128-token prompt, 32 tokens, every model in every round,
the order rotating, the first round discarded. Writes benchmarks/precision.json and benchmarks/precision.md
(tests/test_quantized.py checks the figures in the JSON).

    python tools/bench_precision.py [--rounds 7]      # about 15 minutes on 2 cores
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
OUT_JSON, OUT_MD = REPO / "benchmarks" / "precision.json", REPO / "benchmarks" / "precision.md"
PROMPT_TOKENS, NEW_TOKENS = 128, 32


def subtle_adapter(base: Path, out: Path) -> Path:
    """q/v, r=4, lora_B random × 0.027: an adapter whose effect (KL ≈ 0.004) is below int4's noise."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.027)
    peft_model.save_pretrained(out)
    return out


def pipeline_row(base: Path, adapter: Path, precision: str, out: Path) -> dict[str, Any]:
    from lora_export import ExportOptions, MergeOptions, VerifyOptions, merge_and_onnx
    from lora_export.exporting.quantized import QuantOptions

    started = time.perf_counter()
    options = ExportOptions(quant=QuantOptions(precision=precision))
    result = merge_and_onnx(
        base, [adapter], out, MergeOptions(progress=False), options, VerifyOptions(max_new_tokens=8)
    )
    export = result.report.export
    return {
        "passed": result.passed,
        "failed": [c.name for c in result.checks if not c.passed],
        "seconds": round(time.perf_counter() - started, 1),
        "quantization": dict(export.quantization or {}),
        "quality": dict(export.quality or {}),
        "adapter_effect": dict(export.adapter_effect or {}),
    }


def builder_alone(src: Path, out: Path, precision: str) -> float:
    from lora_export.exporting.genai_builder import genai_build
    from lora_export.exporting.quantized import QuantOptions

    started = time.perf_counter()
    with genai_build(src, out, "float32", lambda s: None, QuantOptions(precision=precision)) as finish:
        finish()
    return time.perf_counter() - started


def decode_timings(folders: dict[str, Path], rounds: int) -> dict[str, dict[str, float]]:
    """Per model: median prefill ms (128 tokens) and decode ms/token (32 tokens) over the rounds after the first."""
    import onnxruntime_genai as og

    from lora_export.exporting.runtime_files import genai_model

    models = {name: genai_model(og, folder) for name, folder in folders.items()}
    prompt = [int(t) for t in torch.randint(100, 40000, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0))]
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    names = list(models)
    for r in range(rounds + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            params = og.GeneratorParams(models[name])
            params.set_search_options(
                do_sample=False, max_length=PROMPT_TOKENS + NEW_TOKENS, min_length=PROMPT_TOKENS + NEW_TOKENS
            )
            generator = og.Generator(models[name], params)
            t0 = time.perf_counter()
            generator.append_tokens(prompt)
            t1 = time.perf_counter()
            for _ in range(NEW_TOKENS - 1):
                generator.generate_next_token()
            t2 = time.perf_counter()
            if r:
                samples[name].append(((t1 - t0) * 1e3, (t2 - t1) * 1e3 / (NEW_TOKENS - 1)))
    return {
        name: {
            "prefill_ms": statistics.median(p for p, _ in s),
            "decode_ms_per_token": statistics.median(d for _, d in s),
        }
        for name, s in samples.items()
    }


def render(data: dict[str, Any]) -> str:
    lines = [
        "# Precision: SmolLM2-135M-Instruct at int8 and int4",
        "",
        f"Measured {data['date']} by `python tools/bench_precision.py` on {data['machine']} "
        "(the real model; the builder's defaults: block 32, symmetric, RTN, accuracy level 4).",
        "",
        "| adapter | precision | verdict | size vs fp32 | KL mean · p99 | same top-1 | perplexity | delta cosine · ratio | noise floor KL | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["pipeline"]:
        q, e, s = row["quality"], row["adapter_effect"], row["quantization"]
        verdict = "pass" if row["passed"] else "fail: " + ", ".join(row["failed"])
        lines.append(
            f"| {row['adapter']} | {row['precision']} | {verdict} | {s.get('size_ratio', 0):.2f}× | "
            f"{q['kl_mean']:.2g} · {q['kl_p99']:.2g} | {q['top1_agreement']:.1%} | ×{q['ppl_ratio']:.3f} | "
            f"{e['delta_cosine']:.2f} · {e['norm_ratio']:.2f} | {e['noise_floor_kl']:.2g} | {row['seconds']:.0f} |"
        )
    b = data["builder_alone_int4_seconds"]
    int4 = [r["seconds"] for r in data["pipeline"] if r["precision"] == "int4"]
    lines += ["", f"The builder's `-p int4` alone on the merged folder: {b:.0f} s; `merge-and-onnx --precision int4` with "
              f"every check: {' and '.join(f'{x:.0f}' for x in int4)} s, one run per adapter "
              f"({min(int4) / b:.1f}–{max(int4) / b:.1f}×).", ""]  # fmt: skip
    t = data["timings"]
    fp32 = t["fp32"]
    band = abs(t["fp32 (A/A copy)"]["decode_ms_per_token"] / fp32["decode_ms_per_token"] - 1)
    lines += [
        f"Decode in ONNX Runtime GenAI (CPU, batch 1, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} tokens, median of "
        f"{data['rounds']} interleaved rounds; A/A band: the fp32 folder loaded twice differs by {band:.1%}):",
        "",
        "| model | prefill ms | decode ms/token | decode vs fp32 |",
        "|---|---|---|---|",
    ]
    for name, row in t.items():
        ratio = row["decode_ms_per_token"] / fp32["decode_ms_per_token"]
        lines.append(f"| {name} | {row['prefill_ms']:.0f} | {row['decode_ms_per_token']:.1f} | {ratio:.2f}× |")
    return "\n".join(lines) + "\n"


def main(rounds: int) -> None:
    import platform

    from lora_export import MergeOptions, merge

    base = REPO / ".cache" / "lora-export-demo" / "smollm2-135m-instruct"
    demo = REPO / "lora_export" / "data" / "demo-adapter-caps"
    if not (base / "config.json").is_file():
        sys.exit(f"{base}: run the README's first command (the demo) once to unpack SmolLM2")
    data: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "rounds": rounds, "pipeline": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        root = Path(tmp)
        subtle = subtle_adapter(base, root / "subtle")
        for name, adapter in (("demo (caps)", demo), ("subtle q/v r=4", subtle)):
            for precision in ("int8", "int4"):
                print(f"{name} {precision} …", flush=True)
                row = pipeline_row(base, adapter, precision, root / f"{len(data['pipeline'])}")
                data["pipeline"].append({"adapter": name, "precision": precision, **row})
        data["pipeline_int4_seconds"] = data["pipeline"][1]["seconds"]
        merged = root / "merged"
        merge(base, [demo], merged, MergeOptions(progress=False))
        data["builder_alone_int4_seconds"] = builder_alone(merged, root / "int4", "int4")
        builder_alone(merged, root / "fp32", "fp32")
        builder_alone(merged, root / "int8", "int8")
        folders = {
            "fp32": root / "fp32",
            "fp32 (A/A copy)": root / "fp32",
            "int8": root / "int8",
            "int4": root / "int4",
        }
        data["timings"] = decode_timings(folders, rounds)
    OUT_JSON.write_text(json.dumps(data, indent=1) + "\n")
    OUT_MD.write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    if "--render" in sys.argv:  # the page again from the committed JSON, nothing measured
        OUT_MD.write_text(render(json.loads(OUT_JSON.read_text())))
    else:
        main(int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 7)
