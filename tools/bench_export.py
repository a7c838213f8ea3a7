"""Export benchmark: lora-export vs Optimum on SmolLM2-135M-Instruct, side by side in one run.

1. Wall time, interleaved per round: `lora-export merge-and-onnx` (merge + verify + export + ONNX Runtime checks),
   `lora-export export MERGED --format onnx` (export + checks only), and `optimum-cli export onnx --task
   text-generation-with-past` on the same merged folder (Optimum validates against PyTorch too, atol 1e-5).
   optimum-onnx needs transformers < 4.58, so it runs from its own virtual environment (.cache/optimum-venv,
   created on first use).
2. Both ONNX models checked against PyTorch with lora-export's ONNX Runtime comparison (several shapes, decode step,
   greedy generation with the KV cache).
3. ONNX Runtime latency of both models, interleaved with the order rotating per round, 2 intra-op threads: prefill batch 1 ×
   128 tokens (empty cache) and one decode step with a 128-token cache. Median, p10–p90 and the ratio.

    python tools/bench_export.py [--rounds 1] [--runs 30] [--workdir /tmp/bench-export]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OPTIMUM_VENV = REPO / ".cache" / "optimum-venv"


def optimum_cli() -> Path:
    exe = OPTIMUM_VENV / "bin" / "optimum-cli"
    if not exe.exists():
        print(f"creating {OPTIMUM_VENV} (torch 2.13 CPU, transformers 4.57, optimum-onnx) …", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(OPTIMUM_VENV)], check=True)
        subprocess.run(
            [
                str(OPTIMUM_VENV / "bin" / "pip"),
                "install",
                "-q",
                "torch==2.13.0",
                "transformers>=4.57,<4.58",
                "optimum-onnx",
                "onnxruntime",
            ],
            check=True,
        )
    return exe


def timed(cmd: list[str], cwd: Path | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds


def latency(paths: dict[str, Path], runs: int, threads: int) -> dict[str, dict[str, list[float]]]:
    import numpy as np
    import onnxruntime as ort

    sessions = {}
    for name, path in paths.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    results: dict[str, dict[str, list[float]]] = {}
    for label, seq, past in (("prefill 1×128", 128, 0), ("decode 1 token, cache 128", 1, 128)):
        feeds = {}
        for name, sess in sessions.items():
            f = {}
            for inp in sess.get_inputs():
                if inp.name == "input_ids":
                    f[inp.name] = rng.integers(0, 49152, (1, seq), dtype=np.int64)
                elif inp.name == "attention_mask":
                    f[inp.name] = np.ones((1, past + seq), dtype=np.int64)
                elif inp.name == "position_ids":
                    f[inp.name] = np.arange(past, past + seq, dtype=np.int64)[None]
                elif inp.name.startswith("past_key_values"):
                    f[inp.name] = rng.standard_normal((1, 3, past, 64), dtype=np.float32)
            feeds[name] = f
        for name, sess in sessions.items():  # warm-up, discarded
            for _ in range(3):
                sess.run(None, feeds[name])
        times: dict[str, list[float]] = {name: [] for name in sessions}
        names = list(sessions)
        for r in range(
            runs
        ):  # interleaved, and the order rotates: the first model of a round runs measurably slower here
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t = time.perf_counter()
                sessions[name].run(None, feeds[name])
                times[name].append(time.perf_counter() - t)
        results[label] = times
    return results


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def time_exports(args: argparse.Namespace, base: Path, adapter: Path) -> tuple[dict[str, list[float]], Path, Path]:
    """Interleaved rounds: lora-export merge-and-onnx, lora-export export, Optimum's export; wall seconds each."""
    cli = str(Path(sys.executable).with_name("lora-export"))
    optimum = str(optimum_cli())
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    ours, ours_export, theirs = args.workdir / "ours", args.workdir / "ours-export", args.workdir / "optimum"
    walls: dict[str, list[float]] = {
        "lora-export merge-and-onnx (merge + verify + export + checks)": [],
        "lora-export export --format onnx (export + checks)": [],
        "optimum-cli export onnx --task text-generation-with-past (export + its validation)": [],
    }
    keys = list(walls)
    optimum_args = ["export", "onnx", "--model", str(ours / "merged"), "--task", "text-generation-with-past"]
    for r in range(args.rounds):
        for path in (ours, ours_export, theirs):
            shutil.rmtree(path, ignore_errors=True)
        walls[keys[0]].append(timed([cli, "merge-and-onnx", str(base), str(adapter), "-o", str(ours)]))
        walls[keys[1]].append(timed([cli, "export", str(ours / "merged"), "-o", str(ours_export)]))
        walls[keys[2]].append(timed([optimum, *optimum_args, str(theirs)], cwd=args.workdir))
        print(f"round {r + 1}: " + ", ".join(f"{walls[k][-1]:.1f} s" for k in keys), flush=True)
    return walls, ours, theirs


def print_tables(
    walls: dict[str, list[float]], checks: dict[str, Any], lat: dict[str, Any], dirs: dict[str, Path], threads: int
) -> None:
    import onnxruntime
    import torch

    print(
        f"\nSmolLM2-135M-Instruct + demo adapter, float32; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {threads} ORT threads\n"
    )
    print("| step | wall s (median) | runs |\n|---|---|---|")
    for k, v in walls.items():
        print(f"| {k} | {statistics.median(v):.1f} | {', '.join(f'{x:.1f}' for x in v)} |")
    print("\n| model | checks vs PyTorch | size |\n|---|---|---|")
    for name, result in checks.items():
        size = sum(p.stat().st_size for p in dirs[name].glob("model.onnx*"))
        verdicts = "; ".join(f"{'PASS' if c.passed else 'FAIL'} {c.name}: {c.summary}" for c in result)
        print(f"| {name} | {verdicts} | {size / 1e6:.0f} MB |")
    print("\n| shape | lora-export ms (p10–p90) | optimum ms (p10–p90) | ratio |\n|---|---|---|---|")
    for label, times in lat.items():
        a, b = times["lora-export"], times["optimum"]
        ma, mb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
        spread_a = f"{pct(a, 0.1) * 1e3:.1f}–{pct(a, 0.9) * 1e3:.1f}"
        spread_b = f"{pct(b, 0.1) * 1e3:.1f}–{pct(b, 0.9) * 1e3:.1f}"
        print(f"| {label} | {ma:.2f} ({spread_a}) | {mb:.2f} ({spread_b}) | {ma / mb:.3f} |")
    keys = list(walls)
    step = statistics.median(walls[keys[1]]) / statistics.median(walls[keys[2]])
    print(f"\nexport wall time, lora-export export / optimum: {step:.2f}× (target ≤ 1.00×)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-export"))
    ap.add_argument("--rounds", type=int, default=1, help="export timings per variant (interleaved)")
    ap.add_argument("--runs", type=int, default=60, help="timed ONNX Runtime runs per model and shape")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from lora_export.demo import demo_adapter_dir
    from lora_export.exporters.onnx import OnnxExport, OnnxOptions
    from lora_export.exporters.onnx_check import verify_onnx
    from lora_export.lora_runtime import load_model
    from lora_export.zoo import smollm2_dir

    walls, ours, theirs = time_exports(args, smollm2_dir(REPO / ".cache"), demo_adapter_dir())
    model = load_model(ours / "merged")
    checks = {}
    for name, path in (("lora-export", ours / "model.onnx"), ("optimum", theirs / "model.onnx")):
        exported = OnnxExport(path, name, 0.0, "causal-lm", True, [], [], False, False, 20)
        checks[name], _ = verify_onnx(model, exported, OnnxOptions(max_new_tokens=16))
    lat = latency({"lora-export": ours / "model.onnx", "optimum": theirs / "model.onnx"}, args.runs, args.threads)
    print_tables(walls, checks, lat, {"lora-export": ours, "optimum": theirs}, args.threads)


if __name__ == "__main__":
    main()
