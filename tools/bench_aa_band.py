"""What this machine can resolve by timing: the A/A band (how far two runs of the *same* model stray from 1.00 at the
95% interval) under three ways of placing the two, measured side by side so that each can be judged against the
others (issue 15: does reducing placement effects narrow the band?).

- two-loads: the model loaded twice in one process, weights copied out interleaved (what `lora-export bench` does);
- one-model: one model timed twice per round (the same buffers: only order and time differ);
- processes: each copy in its own worker process, alternated (one runs while the other waits).

Every regime: warm-up, then rounds whose order rotates; ratio of medians with a paired bootstrap 95% CI. The regimes
themselves run in rotating order, `--repeats` times, so that drift over the run hits all of them.

    python tools/bench_aa_band.py [MODEL_DIR] [--shape 1x128] [--rounds 40] [--repeats 3] [--threads 2]
                                  [--markdown FILE]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lora_export.bench.timing import bootstrap_ratio
from lora_export.bench.variants import _inputs, _torch_call, materialize
from lora_export.model.loading import load_model

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / ".cache" / "smollm2-135m-instruct"


def _ms(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def _worker(conn: Any, model_dir: str, shape: tuple[int, int], threads: int) -> None:
    torch.set_num_threads(threads)
    model = load_model(Path(model_dir)).eval()
    materialize([model])
    call = _torch_call(model, _inputs(model, shape, 0, "cpu"))
    conn.send("ready")
    while conn.recv() == "go":
        conn.send(_ms(call))


def _rounds(pair: tuple[Any, Any], rounds: int, warmup: int) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        pair[0](), pair[1]()
    a: list[float] = []
    b: list[float] = []
    for i in range(rounds):
        order = ((0, a), (1, b)) if i % 2 == 0 else ((1, b), (0, a))
        for k, times in order:
            times.append(pair[k]())
    return a, b


def two_loads(model_dir: Path, shape: tuple[int, int]) -> tuple[Any, Any, Any]:
    m1, m2 = load_model(model_dir).eval(), load_model(model_dir).eval()
    materialize([m1, m2])
    inputs = _inputs(m1, shape, 0, "cpu")
    c1, c2 = _torch_call(m1, inputs), _torch_call(m2, inputs)
    return (lambda: _ms(c1)), (lambda: _ms(c2)), None


def one_model(model_dir: Path, shape: tuple[int, int]) -> tuple[Any, Any, Any]:
    m = load_model(model_dir).eval()
    materialize([m])
    call = _torch_call(m, _inputs(m, shape, 0, "cpu"))
    return (lambda: _ms(call)), (lambda: _ms(call)), None


def processes(model_dir: Path, shape: tuple[int, int], threads: int) -> tuple[Any, Any, Any]:
    ctx = mp.get_context("spawn")
    conns, procs = [], []
    for _ in range(2):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(child, str(model_dir), shape, threads), daemon=True)
        p.start()
        conns.append(parent)
        procs.append(p)
    for c in conns:
        assert c.recv() == "ready"

    def remote(c: Any) -> float:
        c.send("go")
        return float(c.recv())

    def close() -> None:
        for c, p in zip(conns, procs):
            c.send("stop")
            p.join(timeout=30)

    return (lambda: remote(conns[0])), (lambda: remote(conns[1])), close


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--shape", default="1x128")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b, s = (int(x) for x in args.shape.split("x"))
    makers = {
        "two-loads": lambda: two_loads(args.model, (b, s)),
        "one-model": lambda: one_model(args.model, (b, s)),
        "processes": lambda: processes(args.model, (b, s), args.threads),
    }
    names = list(makers)
    results: list[tuple[str, int, float, float, float, float]] = []
    for rep in range(args.repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            first, second, close = makers[name]()
            a, c = _rounds((first, second), args.rounds, args.warmup)
            if close:
                close()
            ratio = statistics.median(c) / statistics.median(a)
            lo, hi = bootstrap_ratio(c, a, seed=rep)
            band = max(1 - lo, hi - 1)
            results.append((name, rep, statistics.median(a), ratio, lo, hi))
            print(
                f"{name:<10} repeat {rep}: {statistics.median(a):8.2f} ms  A/A {ratio:.3f} ({lo:.3f}–{hi:.3f}) ±{band:.1%}"
            )
    lines = [
        f"A/A band by placement: {args.model.name}, {args.shape}, fp32, {args.threads} threads, "
        f"{args.rounds} rounds per regime, {args.repeats} repeats (regime order rotating)",
        "",
        "| regime | repeat | median ms | A/A ratio | 95% CI | band |",
        "|---|---|---|---|---|---|",
    ]
    for name, rep, ms, ratio, lo, hi in sorted(results):
        lines.append(f"| {name} | {rep} | {ms:.2f} | {ratio:.3f} | {lo:.3f}–{hi:.3f} | ±{max(1 - lo, hi - 1):.1%} |")
    lines += ["", "| regime | median band over repeats | widest |", "|---|---|---|"]
    for name in names:
        bands = [max(1 - lo, hi - 1) for n, _, _, _, lo, hi in results if n == name]
        lines.append(f"| {name} | ±{statistics.median(bands):.1%} | ±{max(bands):.1%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
