"""Export benchmark on SmolLM2-135M-Instruct + the demo adapter, float32, side by side in one run.

1. Wall time and peak RSS, interleaved per round with the order rotating: `lora-export merge-and-onnx` with its
   default exporter (auto: the GenAI model builder here) and with `--exporter dynamo` (each: merge + verify + export
   + every check), the GenAI model builder alone on the merged folder (no checks), and with --optimum
   `optimum-cli export onnx --task text-generation-with-past` (its own venv: optimum-onnx needs transformers < 4.58).
   Peak RSS: the largest of the command and the children it waited for (the builder runs in a child of ours).
2. The graphs with the dynamo/Optimum contract checked against PyTorch with lora-export's ONNX Runtime checks.
3. Latency: plain ONNX Runtime (prefill 1×128, one decode step with a 128-token cache) for those graphs, and in
   ONNX Runtime GenAI for the builder's graph, our default output and our dynamo output: prefill of a 128-token
   prompt and ms per generated token over 31 tokens, rounds rotating, the first discarded.

    python tools/bench_export.py [--rounds 2] [--genai-rounds 5] [--optimum] [--workdir /tmp/bench-export]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
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


# Linux carries a process's peak RSS across fork and exec: a command started by this (possibly large) process would
# report at least this process's peak. It is started by a small launcher instead, which reports the command's own.
LAUNCHER = """import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def timed(cmd: list[str], cwd: Path | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS in bytes of one command (the largest of it and the children it waited for), started
    with nothing left to write back (a package writes gigabytes: the next command must not pay for them)."""
    os.sync()  # the previous command's gigabytes written back first: not charged to this one
    with tempfile.TemporaryFile("w+") as log, tempfile.NamedTemporaryFile("r") as peak:
        start = time.perf_counter()
        code = subprocess.run(
            [sys.executable, "-c", LAUNCHER, peak.name, *cmd], cwd=cwd, stdout=log, stderr=subprocess.STDOUT
        ).returncode
        seconds = time.perf_counter() - start
        if code != 0:
            log.seek(0)
            sys.exit(f"failed ({code}): {' '.join(cmd)}\n{log.read()[-4000:]}")
        return seconds, int(peak.read()) * 1024


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


def time_exports(args: argparse.Namespace, base: Path, adapter: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """Interleaved rounds, the order rotating: each contender's wall seconds and peak RSS."""
    cli = str(Path(sys.executable).with_name("lora-export"))
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    merged = args.workdir / "merged"  # the builder and Optimum start from the merged folder, as a user would
    timed([cli, "merge", str(base), str(adapter), "-o", str(merged)])
    dirs = {name: args.workdir / name for name in ("default", "dynamo", "builder", "optimum")}
    commands = {
        "default": ("lora-export merge-and-onnx (default exporter; merge + verify + export + checks)",
                    [cli, "merge-and-onnx", str(base), str(adapter), "-o", str(dirs["default"])]),
        "dynamo": ("lora-export merge-and-onnx --exporter dynamo (merge + verify + export + checks)",
                   [cli, "merge-and-onnx", str(base), str(adapter), "-o", str(dirs["dynamo"]), "--exporter", "dynamo"]),
        "builder": ("GenAI model builder alone on the merged folder (fp32, cpu; no checks)",
                    [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(merged), "-o",
                     str(dirs["builder"]), "-p", "fp32", "-e", "cpu", "-c", str(args.workdir / "builder-cache")]),
    }  # fmt: skip
    if args.optimum:
        commands["optimum"] = (
            "optimum-cli export onnx --task text-generation-with-past (export + its validation)",
            [str(optimum_cli()), "export", "onnx", "--model", str(merged), "--task", "text-generation-with-past",
             str(dirs["optimum"])],
        )  # fmt: skip
    results: dict[str, Any] = {name: {"label": label, "wall": [], "rss": []} for name, (label, _) in commands.items()}
    names = list(commands)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            shutil.rmtree(dirs[name], ignore_errors=True)
            wall, rss = timed(commands[name][1], cwd=args.workdir)
            results[name]["wall"].append(wall)
            results[name]["rss"].append(rss)
        print(f"round {r + 1}: " + ", ".join(f"{n} {results[n]['wall'][-1]:.1f} s" for n in names), flush=True)
    return results, {n: d for n, d in dirs.items() if n in commands}


def genai_latency(
    dirs: dict[str, Path], prompt_len: int, tokens: int, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """ONNX Runtime GenAI, greedy, batch 1: prefill ms (prompt_len tokens) and ms per generated token, each model in
    every round, the order rotating; the first round is a warm-up and discarded."""
    import numpy as np
    import onnxruntime_genai as og

    models = {name: og.Model(str(path)) for name, path in dirs.items()}
    prompt = np.random.default_rng(0).integers(100, 40000, prompt_len).tolist()
    out: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in models}
    names = list(models)
    for r in range(rounds + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            params = og.GeneratorParams(models[name])
            params.set_search_options(do_sample=False, max_length=prompt_len + tokens, min_length=prompt_len + tokens)
            generator = og.Generator(models[name], params)
            t = time.perf_counter()
            generator.append_tokens(prompt)
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(tokens - 1):
                generator.generate_next_token()
            if r:
                out[name]["prefill"].append(prefill * 1e3)
                out[name]["decode"].append((time.perf_counter() - t) * 1e3 / (tokens - 1))
    return out


def print_tables(results: dict[str, Any], checks: dict[str, Any], lat: dict[str, Any], gen: dict[str, Any],
                 dirs: dict[str, Path], threads: int) -> None:  # fmt: skip
    import onnxruntime
    import onnxruntime_genai
    import torch

    print(
        f"\nSmolLM2-135M-Instruct + demo adapter, float32; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, onnxruntime-genai "
        f"{onnxruntime_genai.__version__}, {threads} ORT threads\n"
    )
    print("| contender | wall s (median) | runs | peak RSS GB (max) |\n|---|---|---|---|")
    for r in results.values():
        runs = ", ".join(f"{x:.1f}" for x in r["wall"])
        print(f"| {r['label']} | {statistics.median(r['wall']):.1f} | {runs} | {max(r['rss']) / 1e9:.2f} |")
    builder = statistics.median(results["builder"]["wall"])
    for name in ("default", "dynamo", "optimum"):
        if name in results:
            print(f"- {name} / builder wall: {statistics.median(results[name]['wall']) / builder:.2f}×")
    print("\n| model | checks vs PyTorch | size |\n|---|---|---|")
    for name, result in checks.items():
        size = sum(p.stat().st_size for p in dirs[name].glob("model.onnx*"))
        verdicts = "; ".join(f"{'PASS' if c.passed else 'FAIL'} {c.name}: {c.summary}" for c in result)
        print(f"| {name} | {verdicts} | {size / 1e6:.0f} MB |")
    for title, table in (("ONNX Runtime (plain), 1×128 prefill and one decode step", lat), ("ONNX Runtime GenAI", gen)):
        print(f"\n{title}, ms: median (p10–p90) and ratio to the first column\n")
        for label in {k for t in table.values() for k in t}:
            cells = {n: t[label] for n, t in table.items() if label in t}
            first = statistics.median(next(iter(cells.values())))
            row = " | ".join(
                f"{n}: {statistics.median(v):.2f} ({pct(v, 0.1):.2f}–{pct(v, 0.9):.2f}) ×{statistics.median(v) / first:.3f}"
                for n, v in cells.items()
            )
            print(f"| {label} | {row} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-export"))
    ap.add_argument("--rounds", type=int, default=2, help="export timings per contender (interleaved, rotating)")
    ap.add_argument("--runs", type=int, default=60, help="timed ONNX Runtime runs per model and shape")
    ap.add_argument("--genai-rounds", type=int, default=5, help="GenAI generations per model (rotating)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--optimum", action="store_true", help="also Optimum (creates .cache/optimum-venv on first use)")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from lora_export.demo.demo import demo_adapter_dir
    from lora_export.exporting.onnx import OnnxExport, OnnxOptions
    from lora_export.exporting.onnx_check import verify_onnx
    from lora_export.model.loading import load_model
    from lora_export.model.zoo import smollm2_dir

    results, dirs = time_exports(args, smollm2_dir(REPO / ".cache"), demo_adapter_dir())
    model = load_model(args.workdir / "merged")
    checks, plain = {}, {}
    for name in [n for n in ("dynamo", "optimum") if n in dirs]:  # the graphs with the dynamo/Optimum contract
        exported = OnnxExport(dirs[name] / "model.onnx", name, 0.0, "causal-lm", True, [], [], False, False, 20)
        checks[name], _ = verify_onnx(model, exported, OnnxOptions(max_new_tokens=16))
        plain[name] = dirs[name] / "model.onnx"
    lat = latency(plain, args.runs, args.threads)
    by_model = {n: {label: [x * 1e3 for x in t[n]] for label, t in lat.items()} for n in plain}
    genai_dirs = {n: dirs[n] for n in ("builder", "default", "dynamo")}
    gen = genai_latency(genai_dirs, 128, 32, args.genai_rounds)
    print_tables(results, checks, by_model, gen, dirs, args.threads)


if __name__ == "__main__":
    main()
