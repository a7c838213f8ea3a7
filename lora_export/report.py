"""The one place that turns results into text for people (and JSON for machines)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .merge import MergeResult


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def merge_text(result: MergeResult) -> str:
    m = result.manifest
    merged = {k: v for k, v in m["tensors"].items() if v.get("adapters")}
    replaced = [k for k, v in m["tensors"].items() if "replaced_by_adapter" in v]
    size = sum(f["size"] for f in m["output"]["files"])
    lines = [
        f"merged {len(m['adapters'])} adapter(s) into {m['base']['path']}",
        f"  output      {result.output}  ({len(m['output']['files'])} shard(s), {human_bytes(size)}, dtype {m['output']['dtype']})",
        f"  tensors     {len(merged)} changed by LoRA deltas, {len(replaced)} replaced (modules_to_save / biases)",
    ]
    casts = [v["cast"] for v in merged.values() if v.get("cast") and v["cast"]["error_norm_rel_to_delta"] is not None]
    if casts:
        worst = max(c["error_norm_rel_to_delta"] for c in casts)
        unchanged = max(c["unchanged_after_cast_fraction"] or 0.0 for c in casts)
        lines.append(
            f"  cast        worst ‖cast error‖/‖ΔW‖ = {worst:.3g}; worst share of elements the cast returned to their base value = {unchanged:.2%}"
        )
    for note in m["notes"]:
        lines.append(f"  note        {note}")
    lines.append(f"  manifest    {result.output / 'lora_export.json'}  ({m['seconds']:.1f} s)")
    return "\n".join(lines)


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)


def verify_text(report: Any) -> str:
    """Short and readable: what was compared, a PASS/FAIL line per check, the tolerances, where it diverged."""
    lines = [
        f"verify {report.merged} ({report.model_class}, {report.merged_dtype})",
        f"  against {report.base} + {', '.join(report.adapters)} applied at run time, float32"
        + (f", weights {report.weights}" if any(w != 1.0 for w in report.weights) else ""),
        f"  inputs  {'; '.join(c['name'] for c in report.cases)}",
    ]
    for model, counts in (report.placement or {}).items():
        lines.append(f"  device map, {model}: " + ", ".join(f"{n} modules on {where}" for where, n in counts.items()))
    for check in report.checks:
        lines.append(f"  {'PASS' if check.passed else 'FAIL'}  {check.name:<22} {check.summary}")
        lines.extend(f"        {f}" for f in check.failures[:5])
        if len(check.failures) > 5:
            lines.append(f"        … {len(check.failures) - 5} more in the JSON report")
    gen = report.generation or {}
    if report.merged_dtype != "float32" and report.merged_dtype in gen:
        g = gen[report.merged_dtype]
        verdict = "identical" if g["identical"] else f"differ from token {g['first_difference']}"
        lines.append(f"  info  greedy tokens, merged {report.merged_dtype} vs unmerged float32: {verdict} (of {gen['max_new_tokens']})")
    for dtype, tol in report.tolerances.items():
        lines.append(f"  tolerance {dtype}: rel ≤ {tol['max_rel']:g}, cosine ≥ {tol['min_cosine']:g}, top-1 flip gap ≤ {tol['max_flip_gap']:g}, "
                     f"KL ≤ {tol['max_kl']:g}, weights within {tol['weight_ulps']:g} ulp + 1e-6·max|W|")
    d = report.diagnosis
    if d:
        first = d["first_divergence"]
        where = f"{first['module']} (layer {first['layer']}), rel error {first['rel_error']:.3g}" if first else "no module beyond tolerance"
        lines.append(f"  diagnosis ({d['compares']}, {d['case']}): first divergence at {where}")
        weights = report.checks[0]
        if weights.passed:
            lines.append("        every merged tensor is within tolerance of W0 + ΔW: the difference arises in the computation")
        for t in d["worst_tensors"][:3] if not weights.passed else []:
            lines.append(f"        tensor {t['tensor']}: max |Δ| = {t['max_rel']:.3g}·max|W| (beyond tolerance by {t['excess_over_tolerance']:.3g}·max|W|)")
    lines.append(f"  result: {'PASS' if report.passed else 'FAIL'}")
    return "\n".join(lines)


def _check_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [("PASS" if c["passed"] else "FAIL", c["name"], c["summary"]) for c in report["checks"]]


def pipeline_text(report: dict[str, Any]) -> str:
    """merge-and-onnx / export: what was written, a PASS/FAIL line per check, the generated text when there is one."""
    export = report.get("export", {})
    lines = [f"{report['command']}: {'PASS' if report['passed'] else 'FAIL'}"]
    if export.get("format") == "onnx":
        lines.append(f"  onnx     {', '.join(export.get('files', []))}  ({export['exporter']}, opset {export['opset']}, {export['seconds']:.1f} s"
                     f"{', optimized' if export.get('optimized') else ''}{', with past' if export.get('with_past') else ''})")
    elif export:
        lines.append(f"  {export['format']:<8} {export['file']}  ({export['exporter']}, {export['seconds']:.1f} s)")
    for status, name, summary in _check_rows(report):
        lines.append(f"  {status}  {name:<22} {summary}")
    for c in report["checks"]:
        lines.extend(f"        {f}" for f in c["failures"][:5])
    text = export.get("generation_text")
    if text:
        lines.append(f"  pytorch     {text['pytorch']!r}")
        lines.append(f"  onnxruntime {text['onnxruntime']!r}")
    diagnosis = (report.get("verify") or {}).get("diagnosis")
    if diagnosis and diagnosis.get("first_divergence"):
        d = diagnosis["first_divergence"]
        lines.append(f"  diagnosis: first divergence at {d['module']} (rel error {d['rel_error']:.3g})")
    if report["passed"]:
        lines.append(f"  report   report.json, report.md  ({report['seconds']:.1f} s)")
    else:
        lines.append("  nothing was written to the output folder")
    return "\n".join(lines)


def pipeline_markdown(report: dict[str, Any]) -> str:
    export = report.get("export", {})
    lines = [f"# lora-export {report['command']}: {'PASS' if report['passed'] else 'FAIL'}", ""]
    if "inputs" in report:
        for k, v in report["inputs"].items():
            lines.append(f"- {k}: `{v}`")
    if export:
        lines.append(f"- artifact: {', '.join(export.get('files', [export.get('file', '')]))} ({export.get('exporter')}, dtype {export.get('dtype')})")
    lines += ["", "| check | result | compares | summary |", "|---|---|---|---|"]
    for c in report["checks"]:
        lines.append(f"| {c['name']} | {'PASS' if c['passed'] else 'FAIL'} | {c['compares']} | {c['summary']} |")
    tolerances = (report.get("verify") or {}).get("tolerances") or {}
    if tolerances:
        lines += ["", "Tolerances:", ""]
        for dtype, tol in tolerances.items():
            lines.append(f"- {dtype}: " + ", ".join(f"{k} {v:g}" for k, v in tol.items()))
    text = export.get("generation_text")
    if text:
        lines += ["", "Greedy generation:", "", f"- PyTorch: `{text['pytorch']}`", f"- ONNX Runtime: `{text['onnxruntime']}`"]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def bench_markdown(result: Any) -> str:
    """Table 1's layout: rows are variants, columns batch/seq, cells `median ms ± half the p10–p90 spread (+x%)`."""
    lines = [f"Latency, {result.environment.get('model', '')} on {result.environment.get('gpu') or result.environment['cpu']} "
             f"({result.environment['device']}, {result.environment['dtype']}, {result.environment['threads']} threads), ms per forward pass", ""]
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
    paper = result.extra.get("paper")
    if paper:
        lines += ["", "The paper's Table 1 (GPT-2 medium, NVIDIA Quadro RTX8000, ms):", "",
                  "| variant | " + " | ".join(paper["shapes"]) + " |", "|" + "---|" * (1 + len(paper["shapes"]))]
        for variant, cells in paper["rows"].items():
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", "Verdicts (ratio of medians to base, bootstrap 95% CI over rounds):", ""]
    lines += [f"- {v}" for v in result.verdicts]
    runs = sorted({len(c.runs_ms) for r in result.rows for c in r.cells.values()})
    lines += ["", f"Rounds per cell: {runs[0]}–{runs[-1]}. " + " ".join(result.method.split())]
    return "\n".join(lines) + "\n"


def bench_plot(result: Any, path: Any) -> None:
    """Overhead vs base per shape, one bar per variant, with the bootstrap 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r.variant != "base"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(result.shapes) * max(1, len(rows)) / 3), 4))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        xs, ys, lo, hi = [], [], [], []
        for j, s in enumerate(result.shapes):
            c = row.cells.get(s)
            if c is None or c.ratio is None:
                continue
            xs.append(j + i * width)
            ys.append(100 * (c.ratio - 1))
            lo.append(100 * (c.ratio - c.ci_low))
            hi.append(100 * (c.ci_high - c.ratio))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=f"{row.variant} ({row.backend})")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(result.shapes))], [f"batch/seq {s}" for s in result.shapes])
    ax.set_ylabel("latency overhead vs base (%)")
    ax.set_title(f"{result.environment.get('model', '')} — {result.environment['device']}, {result.environment['dtype']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_junit(path: Path, suite: str, checks: list[tuple[str, bool, str, list[str]]]) -> None:
    """JUnit XML, one test case per check, so CI systems list each check and show a failed one's reasons."""
    failed = sum(1 for _, ok, _, _ in checks if not ok)
    root = ET.Element("testsuites", name=suite, tests=str(len(checks)), failures=str(failed))
    node = ET.SubElement(root, "testsuite", name=suite, tests=str(len(checks)), failures=str(failed), errors="0", skipped="0")
    for name, ok, summary, failures in checks:
        case = ET.SubElement(node, "testcase", classname=suite, name=name)
        if not ok:
            ET.SubElement(case, "failure", message=summary, type="CheckFailed").text = "\n".join(failures) or summary
        ET.SubElement(case, "system-out").text = summary
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
