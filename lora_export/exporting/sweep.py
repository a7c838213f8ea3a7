"""merge-and-onnx with several precisions (`--precision int4,int8,fp32`): each one built and judged as it would be
alone, side by side in one table (size, quality against the truth, the adapters' effect, verdict), and the smallest
that passes every check shipped into OUT_DIR with the table beside its report (sweep.json, sweep.md). Nothing is
written when none passes."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..io.errors import InputError
from ..io.jsonio import write_json
from ..io.outputs import check_output_location
from ..merging.merge import MergeOptions
from ..verification.verify import VerifyOptions
from .pipeline import ExportOptions, PipelineResult, merge_and_onnx
from .quantized import PRECISIONS

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


def sweep_markdown(rows: Sequence[SweepRow], shipped: str | None) -> str:
    lines = [
        "| precision | verdict | size | KL mean · p99 | same top-1 | perplexity | delta cosine · ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q, e = r.quality, r.adapter_effect
        verdict = ("shipped" if r.precision == shipped else "pass") if r.passed else "fail: " + ", ".join(r.failed)
        quality = f"{q['kl_mean']:.2g} · {q['kl_p99']:.2g} | {q['top1_agreement']:.1%} | ×{q['ppl_ratio']:.3f}" if q else "float checks (runtime tolerance) | – | –"  # fmt: skip
        effect = f"{e['delta_cosine']:.3f} · {e['norm_ratio']:.2f}" if e else "exact (float)"
        size = f"{r.size_bytes / 1e6:.1f} MB" if r.size_bytes else "–"
        lines.append(f"| {r.precision} | {verdict} | {size} | {quality} | {effect} |")
    return "\n".join(lines) + "\n"


def sweep(
    base_dir: Path,
    adapters: Sequence[Path],
    out_dir: Path,
    precisions: Sequence[str],
    merge_options: MergeOptions = MergeOptions(),
    options: ExportOptions = ExportOptions(),
    verify_options: VerifyOptions = VerifyOptions(),
    log: Callable[[str], None] = lambda s: None,
) -> tuple[PipelineResult, list[SweepRow], str | None]:
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
            return results[precisions[-1]], rows, None
        if out_dir.exists():  # --overwrite: the new folder is complete and verified
            shutil.rmtree(out_dir)
        (Path(tmp) / shipped).rename(out_dir)
    write_json(out_dir / "sweep.json", {"shipped": shipped, "rows": [r.to_dict() for r in rows]})
    (out_dir / "sweep.md").write_text(sweep_markdown(rows, shipped), encoding="utf-8")
    return replace(results[shipped], output=out_dir), rows, shipped
