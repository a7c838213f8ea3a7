"""merge-and-onnx with several precisions (`--precision int4,int8,fp32`): each one built and judged as it would be
alone, side by side in one table (size, quality against the truth, the adapters' effect, verdict, and for those that
passed, GenAI's prefill and decode speed measured in interleaved rounds beside an A/A copy), and the smallest that
passes every check shipped into OUT_DIR with the table beside its report (sweep.json, sweep.md). Nothing is written
when none passes."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..exporting.pipeline import ExportOptions, PipelineResult, merge_and_onnx
from ..exporting.quantized import PRECISIONS
from ..io.errors import InputError
from ..io.jsonio import write_json
from ..io.outputs import check_output_location
from ..merging.merge import MergeOptions
from ..verification.verify import VerifyOptions

SMALLEST_FIRST = ("int4", "int8", "fp16", "fp32")


@dataclass(frozen=True)
class SweepRow:
    precision: str
    passed: bool
    failed: tuple[str, ...]
    size_bytes: int
    quality: dict[str, Any] | None
    adapter_effect: dict[str, Any] | None
    seconds: float
    prefill_ms: float | None = None  # GenAI, batch 1, the timing prompt; passing precisions only
    decode_ms_per_token: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "failed": list(self.failed)}


def parse_precisions(text: str) -> tuple[str, ...]:
    """`int4,int8,fp32` → the precisions, smallest first; each known, none twice."""
    given = [p.strip() for p in text.split(",")]
    unknown = [p for p in given if p not in PRECISIONS]
    if unknown or len(set(given)) != len(given):
        raise InputError(f"--precision {text!r}: one or more of {', '.join(PRECISIONS)}, comma-separated, each once")
    return tuple(sorted(given, key=SMALLEST_FIRST.index))


def _row(precision: str, result: PipelineResult) -> SweepRow:
    export = result.report.export
    q = export.quantization if export is not None else None
    if q:
        size = int(q["size_bytes"])
    else:
        files = [result.output / f for f in (export.files or ())] if export is not None and result.passed else []
        size = sum(f.stat().st_size for f in files if f.is_file())
    return SweepRow(
        precision,
        result.passed,
        tuple(c.name for c in result.checks if not c.passed),
        size,
        dict(export.quality) if export is not None and export.quality else None,
        dict(export.adapter_effect) if export is not None and export.adapter_effect else None,
        round(result.report.seconds, 1),
    )


def sweep_markdown(rows: Sequence[SweepRow], shipped: str | None, band: float | None = None) -> str:
    lines = [
        "| precision | verdict | size | KL mean · p99 | same top-1 | perplexity | delta cosine · ratio | prefill ms | decode ms/token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q, e = r.quality, r.adapter_effect
        verdict = ("shipped" if r.precision == shipped else "pass") if r.passed else "fail: " + ", ".join(r.failed)
        quality = f"{q['kl_mean']:.2g} · {q['kl_p99']:.2g} | {q['top1_agreement']:.1%} | ×{q['ppl_ratio']:.3f}" if q else "float checks (runtime tolerance) | – | –"  # fmt: skip
        effect = f"{e['delta_cosine']:.3f} · {e['norm_ratio']:.2f}" if e else "exact (float)"
        size = f"{r.size_bytes / 1e6:.1f} MB" if r.size_bytes else "–"
        speed = f"{r.prefill_ms:.3g} | {r.decode_ms_per_token:.3g}" if r.decode_ms_per_token else "– | –"
        lines.append(f"| {r.precision} | {verdict} | {size} | {quality} | {effect} | {speed} |")
    if band is not None:
        lines.append(f"\nTimings: ONNX Runtime GenAI, batch 1, medians of interleaved rounds; the A/A control (the "
                     f"first passing folder loaded twice) differs by {band:.1%}: smaller differences are noise.")  # fmt: skip
    return "\n".join(lines) + "\n"


def timings(folders: dict[str, Path]) -> tuple[dict[str, tuple[float, float]], float]:
    """GenAI prefill ms and decode ms/token per folder (batch 1, a prompt of up to 128 tokens, 16 new tokens), in
    interleaved rounds with an A/A copy of the first; and the A/A band (the copy's decode vs the original's)."""
    import statistics

    import onnxruntime_genai as og

    from ..exporting.runtime_files import GENAI_CONFIG, genai_model, genai_prompt
    from .bench_genai import NEW_TOKENS, _rounds, _vocab
    from .timing import BenchOptions, Row

    names = list(folders)
    runners = [(Row(n, "genai", 0, str(f)), genai_model(og, f), None) for n, f in folders.items()]
    runners.insert(1, (Row("A/A copy", "genai", 0, "the first folder again"), genai_model(og, folders[names[0]]), None))
    config = folders[names[0]] / GENAI_CONFIG
    vocab, context = _vocab(config)
    prompt = genai_prompt(config, vocab, max(1, min(128, context - NEW_TOKENS - 1)), 0)
    prefill, decode = _rounds(og, runners, prompt, BenchOptions(budget_s=2.0, min_rounds=5, max_rounds=9))
    medians = {n: (statistics.median(prefill[n]), statistics.median(decode[n])) for n in [*names, "A/A copy"]}
    band = abs(medians["A/A copy"][1] / medians[names[0]][1] - 1)
    return {n: medians[n] for n in names}, band


def sweep(
    base_dir: Path,
    adapters: Sequence[Path],
    out_dir: Path,
    precisions: Sequence[str],
    merge_options: MergeOptions = MergeOptions(),
    options: ExportOptions = ExportOptions(),
    verify_options: VerifyOptions = VerifyOptions(),
    log: Callable[[str], None] = lambda s: None,
) -> tuple[PipelineResult, list[SweepRow], str | None, float | None]:
    """Every precision into a scratch folder beside OUT_DIR; the smallest that passed moved into OUT_DIR. Returns the
    shipped result (else the widest precision's, failed), the rows, and the precision shipped (None: nothing)."""
    out_dir = Path(out_dir)
    check_output_location(out_dir, [Path(base_dir), *map(Path, adapters)], merge_options.overwrite)
    rows, results = [], {}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.sweep-", dir=out_dir.parent) as tmp:
        for precision in precisions:
            log(f"precision {precision} …")
            dtype = "float16" if precision == "fp16" else "float32"
            each = replace(merge_options, dtype=dtype, overwrite=False)
            result = merge_and_onnx(
                base_dir, adapters, Path(tmp) / precision, each, replace(options, quant=replace(options.quant, precision=precision)),
                verify_options, log,
            )  # fmt: skip
            rows.append(_row(precision, result))
            results[precision] = result
        shipped = next((r.precision for r in rows if r.passed), None)
        if shipped is None:
            return results[precisions[-1]], rows, None, None
        log("timing the passing precisions in ONNX Runtime GenAI …")
        speeds, band = timings({r.precision: Path(tmp) / r.precision for r in rows if r.passed})
        rows = [replace(r, prefill_ms=speeds[r.precision][0], decode_ms_per_token=speeds[r.precision][1]) if r.precision in speeds else r for r in rows]  # fmt: skip
        if out_dir.exists():  # --overwrite: the new folder is complete and verified
            shutil.rmtree(out_dir)
        (Path(tmp) / shipped).rename(out_dir)
    write_json(out_dir / "sweep.json", {"shipped": shipped, "aa_band": band, "rows": [r.to_dict() for r in rows]})
    (out_dir / "sweep.md").write_text(sweep_markdown(rows, shipped, band), encoding="utf-8")
    return replace(results[shipped], output=out_dir), rows, shipped, band
