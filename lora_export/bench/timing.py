"""Latency of base vs merged vs unmerged LoRA vs adapter layers, measured side by side (the method is METHOD)."""

from __future__ import annotations

import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

VERDICT_BAND = 0.02
UNRESOLVED_BAND = 0.10  # an A/A band wider than this: the run's timing tells nothing at the few-percent level
# Printed into every report: what was done, not what was seen on the machine this code was written on.
METHOD = (
    "Weights copied into ordinary memory (not left memory-mapped from their files); every variant warmed up (runs "
    "discarded); then the variants run interleaved in rounds whose order rotates (A B C D, B C D A, …), so drift and "
    "position in the round hit all alike, for as many rounds as the time budget allows. On CUDA, events around the "
    "forward pass and a synchronize. Thread count fixed and recorded. Per cell: median, p10/p90, and the ratio of "
    "medians to `base` with a paired bootstrap 95% interval over rounds. `merged` is indistinguishable from `base` "
    "when that interval contains 1.00 and stays within the A/A band: how far `base-copy` (the base loaded twice) "
    "strays from 1.00, at least ±2%. PyTorch rows also carry counted structure per forward: FLOPs and ATen "
    "operator calls (torch.utils.flop_counter and a dispatch counter), exact on any machine; ONNX rows their graph's "
    "nodes and whether it is the base's graph up to initializer values."
)
PACKAGE_METHOD = (  # bench --package: sessions over the package's own files, nothing loaded into torch
    "Every graph of the package opened as it was written (ONNX Runtime sessions, or ONNX Runtime GenAI models); "
    "every variant warmed up (runs discarded); then the variants run interleaved in rounds whose order rotates, for as "
    "many rounds as the time budget allows. Thread count fixed and recorded. Per cell: median, p10/p90, and the ratio "
    "of medians to `base` (the shared graph with no adapter active, or the first merged variant) with a paired "
    "bootstrap 95% interval over rounds; `base-copy` (the same graph opened a second time) is the A/A control whose "
    "interval is the band timing can resolve in this run. Every row carries its graph's nodes per op type and "
    "whether it is the base's graph up to initializer values (an active adapter changes input values, not the graph)."
)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with torch's intra-op thread count set to `n` (None: leave it), and restore it afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class BenchOptions:
    shapes: tuple[tuple[int, int], ...] = ((1, 128), (16, 256), (32, 512))
    device: str = "cpu"
    backends: tuple[str, ...] = ("torch",)
    dtype: str = "float32"
    budget_s: float = 3.0  # per shape, all variants together
    min_rounds: int = 7
    max_rounds: int = 200
    warmup: int = 2
    threads: int | None = None
    adapter_params: int | None = None  # adapters' parameter count; None: the LoRA adapter's
    seed: int = 0
    progress: bool = True


@dataclass
class Cell:
    runs_ms: list[float]
    median_ms: float
    p10_ms: float
    p90_ms: float
    ratio: float | None = None  # median / base's median
    ci_low: float | None = None
    ci_high: float | None = None
    flops: int | None = None  # per forward at this shape, counted (PyTorch rows)
    op_calls: int | None = None  # ATen operator calls (ONNX: graph nodes) per forward
    ops: dict[str, int] | None = None  # those calls per operator (ONNX: nodes per op type)


@dataclass
class Row:
    variant: str
    backend: str
    params: int  # parameters added to the base (0 for base and merged)
    description: str
    cells: dict[str, Cell] = field(default_factory=dict)
    structure: dict[str, Any] = field(default_factory=dict)  # identical_to_base, and what it adds per forward


@dataclass
class BenchResult:
    environment: dict[str, Any]
    shapes: list[str]
    rows: list[Row]
    verdicts: list[str]
    method: str = METHOD
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shape_name(shape: tuple[int, int]) -> str:
    return f"{shape[0]}/{shape[1]}"


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def bootstrap_ratio(times: list[float], base: list[float], seed: int, n: int = 2000) -> tuple[float, float]:
    """95% interval of median(times)/median(base), resampling rounds with replacement (paired)."""
    rng = random.Random(seed)
    k = len(times)
    ratios = []
    for _ in range(n):
        idx = [rng.randrange(k) for _ in range(k)]
        ratios.append(statistics.median(times[i] for i in idx) / statistics.median(base[i] for i in idx))
    return percentile(ratios, 0.025), percentile(ratios, 0.975)


def timer(device: str) -> Callable[[Callable[[], Any]], float]:
    """Milliseconds of one call: CUDA events and a synchronize on GPU, perf_counter on CPU."""
    if device.startswith("cuda"):

        def cuda_time(fn: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return float(start.elapsed_time(end))

        return cuda_time

    def cpu_time(fn: Callable[[], Any]) -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1000

    return cpu_time


def measure(calls: dict[str, Callable[[], Any]], options: BenchOptions, label: str) -> dict[str, list[float]]:
    """Interleaved rounds of every call, within the time budget; warm-up runs discarded."""
    from tqdm import tqdm

    time_one = timer(options.device)
    for fn in calls.values():
        for _ in range(options.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    started = time.perf_counter()
    bar = tqdm(
        total=options.max_rounds,
        desc=label,
        unit="round",
        disable=not options.progress or not sys.stderr.isatty(),
        file=sys.stderr,
        leave=False,
    )
    rounds = 0
    names = list(calls)
    while rounds < options.max_rounds and (
        rounds < options.min_rounds or time.perf_counter() - started < options.budget_s
    ):
        for name in names[rounds % len(names) :] + names[: rounds % len(names)]:  # rotate: no variant always runs first
            times[name].append(time_one(calls[name]))
        rounds += 1
        bar.update(1)
    bar.close()
    return times


def summarize(rows: list[Row], shape: str, times: dict[tuple[str, str], list[float]], seed: int) -> None:
    for row in rows:
        t = times[(row.variant, row.backend)]
        cell = Cell(t, statistics.median(t), percentile(t, 0.1), percentile(t, 0.9))
        base = times.get(("base", row.backend))
        if base:
            cell.ratio = cell.median_ms / statistics.median(base)
            if row.variant != "base":
                cell.ci_low, cell.ci_high = bootstrap_ratio(t, base, seed)
            else:
                cell.ci_low = cell.ci_high = 1.0
        row.cells[shape] = cell


def aa_band(rows: list[Row], backend: str, shape: str) -> float:
    """What this run can resolve: how far the A/A control (base-copy, the same model loaded twice) strays from 1.00
    at its 95% interval; never below VERDICT_BAND. Without a control, VERDICT_BAND."""
    control = next((r.cells.get(shape) for r in rows if r.variant == "base-copy" and r.backend == backend), None)
    if control is None or control.ci_low is None or control.ci_high is None:
        return VERDICT_BAND
    return max(VERDICT_BAND, 1 - control.ci_low, control.ci_high - 1)


def verdicts(rows: list[Row], shapes: list[str]) -> list[str]:
    lines = []
    for row in rows:
        if row.variant == "base":
            continue
        for shape in shapes:
            c = row.cells.get(shape)
            if c is None or c.ratio is None:
                continue
            ci = f"ratio {c.ratio:.3f} (95% CI {c.ci_low:.3f}–{c.ci_high:.3f})"
            if row.variant == "base-copy":
                lines.append(
                    f"{row.backend} {shape}: base-copy (A/A control, identical model) {c.ratio - 1:+.1%}: {ci}; "
                    "differences of this size between other variants are noise"
                )
            elif row.variant == "merged":
                band = aa_band(rows, row.backend, shape)
                same = c.ci_low <= 1.0 <= c.ci_high and 1 - band <= c.ci_low and c.ci_high <= 1 + band
                verdict = (
                    f"indistinguishable from base within the A/A band ±{band:.1%}"
                    if same
                    else f"NOT shown indistinguishable from base (CI misses 1.00 or leaves the A/A band ±{band:.1%})"
                )
                if band > UNRESOLVED_BAND:
                    verdict = f"not resolved by timing here (A/A band ±{band:.1%}; the counted structure decides)"
                identical = row.structure.get("identical_to_base")
                if identical is not None:
                    verdict += "; structure identical to base" if identical else "; structure DIFFERS from base"
                lines.append(f"{row.backend} {shape}: merged {verdict}: {ci}")
            else:
                band = aa_band(rows, row.backend, shape)
                lines.append(
                    f"{row.backend} {shape}: {row.variant} {c.ratio - 1:+.1%} vs base: {ci}; A/A band ±{band:.1%}"
                )
    return lines


def environment(options: BenchOptions) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": options.device,
        "dtype": options.dtype,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": options.threads or torch.get_num_threads(),
    }
    if options.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env
