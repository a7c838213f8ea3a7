"""Markdown: merge-and-onnx's report.md and bench's tables (laid out like the paper's Table 1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rendering needs no torch: `--help` and `package --check` import this module
    from ..records import (
        PipelineReport,
    )


def pipeline_markdown(report: PipelineReport) -> str:
    export = report.export
    lines = [f"# lora-export {report.command}: {'PASS' if report.passed else 'FAIL'}", ""]
    for k, v in report.inputs.items():
        lines.append(f"- {k}: `{v}`")
    if export is not None:
        artifact = ", ".join(export.files or (export.file or "",))
        lines.append(f"- artifact: {artifact} ({export.exporter}, dtype {export.dtype})")
        if export.quantization:
            q = export.quantization
            lines.append(
                f"- quantized: {q['precision']}, {q['size_bytes'] / 1e6:.1f} MB ({q['size_ratio']:.2f}× float32), "
                f"block {q['block_size']}, {q['algorithm']}, eval on {q['eval_text']}"
            )
            lines += [f"- {name.replace('_', ' ')}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in values.items()) for name, values in (("quality", export.quality), ("adapter_effect", export.adapter_effect)) if values]  # fmt: skip
    lines += ["", "| check | result | compares | summary |", "|---|---|---|---|"]
    for c in report.checks:
        lines.append(f"| {c.name} | {'PASS' if c.passed else 'FAIL'} | {c.compares} | {c.summary} |")
    tolerances = report.verify.tolerances if report.verify is not None else {}
    if tolerances:
        lines += ["", "Tolerances:", ""]
        for key, tol in tolerances.items():
            lines.append(f"- {key}: " + ", ".join(f"{k} {v:g}" for k, v in tol.items()))
    text = export.generation_text if export is not None else None
    if text:
        lines += [
            "",
            "Greedy generation:",
            "",
            f"- PyTorch: `{text['pytorch']}`",
            f"- ONNX Runtime: `{text['onnxruntime']}`",
        ]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()), ""]
    return "\n".join(lines)


def structure_markdown(result: Any) -> list[str]:
    """Counted per forward (exact, unlike the times): GFLOPs and ATen operator calls of each PyTorch row, the nodes of
    each ONNX graph, and whether each is the base's computation (for ONNX: the base graph up to initializer values)."""
    rows = [r for r in result.rows if any(c.op_calls is not None for c in r.cells.values())]
    if not rows:
        return []
    lines = ["", "Structure per forward pass, counted: GFLOPs / operator calls (PyTorch) or graph nodes (ONNX)", ""]
    weights = any("weights" in r.structure for r in rows)
    lines += ["| variant | backend | same computation as base | " + " | ".join(result.shapes) + " |"]
    lines[-1] += " weights |" if weights else ""
    lines += ["|" + "---|" * (3 + len(result.shapes) + weights)]
    for row in rows:
        cells = []
        for s in result.shapes:
            c = row.cells.get(s)
            if c is None or c.op_calls is None:
                cells.append("–")
            elif c.flops is None:
                cells.append(f"{c.op_calls} nodes")
            else:
                cells.append(f"{c.flops / 1e9:.3f} / {c.op_calls}")
        same = "yes" if row.structure.get("identical_to_base") else "no"
        if weights:
            stored = row.structure.get("weight_bytes")
            size = f"{stored / 1e6:.1f} MB " if stored is not None else ""
            cells.append(f"{size}{row.structure.get('weights', '')}".strip() or "–")
        lines.append(f"| {row.variant} | {row.backend} | {same} | " + " | ".join(cells) + " |")
    return lines


def bench_markdown(result: Any) -> str:
    """Table 1's layout: rows are variants, columns batch/seq, cells `median ms ± half the p10–p90 spread (+x%)`."""
    lines = [
        f"Latency, {result.environment.get('model', '')} on {result.environment.get('gpu') or result.environment['cpu']} "
        f"({result.environment['device']}, {result.environment['dtype']}, {result.environment['threads']} threads), ms per forward pass",
        "",
    ]
    header = "| variant | backend | added params | " + " | ".join(f"{s}" for s in result.shapes) + " |"
    lines += [header, "|" + "---|" * (3 + len(result.shapes))]
    for row in result.rows:
        cells = []
        for s in result.shapes:
            c = row.cells.get(s)
            if c is None:
                cells.append("–")
                continue
            spread = (c.p90_ms - c.p10_ms) / 2
            pct = "" if row.variant == "base" or c.ratio is None else f" ({c.ratio - 1:+.1%})"
            cells.append(f"{c.median_ms:.2f} ± {spread:.2f}{pct}")
        lines.append(f"| {row.variant} | {row.backend} | {row.params / 1e6:.2f}M | " + " | ".join(cells) + " |")
    lines += structure_markdown(result)
    paper = result.extra.get("paper")
    if paper:
        lines += [
            "",
            "The paper's Table 1 (GPT-2 medium, NVIDIA Quadro RTX8000, ms):",
            "",
            "| variant | " + " | ".join(paper["shapes"]) + " |",
            "|" + "---|" * (1 + len(paper["shapes"])),
        ]
        for variant, cells in paper["rows"].items():
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", "Verdicts (ratio of medians to base, bootstrap 95% CI over rounds):", ""]
    lines += [f"- {v}" for v in result.verdicts]
    runs = sorted({len(c.runs_ms) for r in result.rows for c in r.cells.values()})
    lines += ["", f"Rounds per cell: {runs[0]}–{runs[-1]}. " + " ".join(result.method.split())]
    return "\n".join(lines) + "\n"
