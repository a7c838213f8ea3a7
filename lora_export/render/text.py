"""Text for people: one summary per command, with the tolerances each check used."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..merging.merge import MergeResult
    from ..records import (
        AdapterInspection,
        Check,
        PackageCheck,
        PackageManifest,
        PipelineReport,
        SwapReport,
        VerifyReport,
    )
    from ..records.sections import (  # rendering needs no torch: `--help` and `package --check` import this module
        Diagnosis,
        ExportSection,
        StructureSummary,
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def merge_text(result: MergeResult) -> str:
    m = result.manifest
    merged = {k: v for k, v in m.tensors.items() if v.get("adapters")}
    replaced = [k for k, v in m.tensors.items() if "replaced_by_adapter" in v]
    size = sum(f.size for f in m.files)
    dtype = m.dtype if isinstance(m.dtype, str) else ", ".join(m.dtype)
    lines = [
        f"merged {len(m.adapters)} adapter(s) into {m.base_path}",
        f"  output      {result.output}  ({len(m.files)} shard(s), {human_bytes(size)}, dtype {dtype})",
        f"  tensors     {len(merged)} changed by LoRA deltas, {len(replaced)} replaced (modules_to_save / biases)",
    ]
    casts = [v["cast"] for v in merged.values() if v.get("cast") and v["cast"]["error_norm_rel_to_delta"] is not None]
    if casts:
        worst = max(c["error_norm_rel_to_delta"] for c in casts)
        unchanged = max(c["unchanged_after_cast_fraction"] or 0.0 for c in casts)
        lines.append(
            f"  cast        worst ‖cast error‖/‖ΔW‖ = {worst:.3g}; worst share of elements the cast returned to their base value = {unchanged:.2%}"
        )
    for note in m.notes:
        lines.append(f"  note        {note}")
    lines.append(f"  manifest    {result.output / m.NAME}  ({m.seconds:.1f} s)")
    return "\n".join(lines)


def tolerance_text(key: str, tol: dict[str, float]) -> str:
    """One line per (comparison, dtype) tolerance, naming only the bounds that apply."""
    parts = [f"rel ≤ {tol['max_rel']:g}"]
    if tol.get("min_cosine", -1) > -1:
        parts.append(f"cosine ≥ {tol['min_cosine']:g}")
    if tol.get("max_flip_gap", 1) < 1:
        parts.append(f"top-1 flip gap ≤ {tol['max_flip_gap']:g}")
    if tol.get("max_kl", float("inf")) != float("inf"):
        parts.append(f"KL ≤ {tol['max_kl']:g}")
    if tol.get("weight_ulps"):
        parts[0] = f"{tol['weight_ulps']:g} ulp + {tol['max_rel']:g}·max|W|"
    elif key.startswith(("weights", "swap")):
        parts[0] = f"{tol['max_rel']:g}·max|W|"
    return f"  tolerance {key}: {', '.join(parts)}"


def structure_lines(structure: StructureSummary | None) -> list[str]:
    """One line: the merged model's counted forward, and what unmerged LoRA would add to it."""
    if structure is None:
        return []
    m, added = structure.merged, structure.unmerged_adds
    share = f" (+{added.flops / m.flops:.2%})" if m.flops else ""
    return [
        f"  info  per forward ({structure.case}): merged {m.flops / 1e9:.4g} GFLOPs, {m.op_calls} operator "
        f"calls; LoRA applied unmerged would add {added.flops / 1e9:.4g} GFLOPs{share} and {added.op_calls} calls"
    ]


def diagnosis_line(d: Diagnosis) -> str:
    first = d.first_divergence
    where = (
        f"{first.module} (layer {first.layer}), rel error {first.rel_error:.3g}"
        if first
        else "no module beyond tolerance"
    )
    return f"  diagnosis ({d.compares}, {d.case}): first divergence at {where}"


def verify_text(report: VerifyReport) -> str:
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
    gen = report.generation
    if gen is not None and gen.half is not None:
        dtype, g = gen.half
        verdict = "identical" if g.identical else f"differ from token {g.first_difference}"
        lines.append(f"  info  greedy tokens, merged {dtype} vs unmerged float32: {verdict} (of {gen.max_new_tokens})")
    lines += [tolerance_text(key, tol) for key, tol in report.tolerances.items()]
    lines += structure_lines(report.structure)
    d = report.diagnosis
    if d is not None:
        lines.append(diagnosis_line(d))
        weights = report.checks[0]
        if weights.passed:
            lines.append(
                "        every merged tensor is within tolerance of W0 + ΔW: the difference arises in the computation"
            )
        for t in d.worst_tensors[:3] if not weights.passed else []:
            lines.append(
                f"        tensor {t['tensor']}: max |Δ| = {t['max_rel']:.3g}·max|W| (beyond tolerance by {t['excess_over_tolerance']:.3g}·max|W|)"
            )
    lines.append(f"  result: {'PASS' if report.passed else 'FAIL'}")
    return "\n".join(lines)


def check_lines(checks: Sequence[Check], width: int = 22) -> list[str]:
    lines = []
    for c in checks:
        lines.append(f"  {'PASS' if c.passed else 'FAIL'}  {c.name:<{width}} {c.summary}")
        lines.extend(f"        {f}" for f in c.failures[:5])
        if len(c.failures) > 5:
            lines.append(f"        … {len(c.failures) - 5} more in the JSON report")
    return lines


def pipeline_text(report: PipelineReport) -> str:
    """merge-and-onnx / export: what was written, a PASS/FAIL line per check, the generated text when there is one."""
    lines = [f"{report.command}: {'PASS' if report.passed else 'FAIL'}"]
    export = report.export
    if export is not None:
        lines.append(export_line(export))
        lines += [f"  rejected {why}" for why in export.rejected or ()]
    lines += check_lines(report.checks)
    lines += [f"  note     {note}" for note in (export.runtime_files or ()) if export is not None]
    text = export.generation_text if export is not None else None
    if text:
        lines.append(f"  pytorch     {text['pytorch']!r}")
        lines.append(f"  onnxruntime {text['onnxruntime']!r}")
    if report.verify is not None:
        lines += structure_lines(report.verify.structure)
        d = report.verify.diagnosis
        if d is not None and d.first_divergence is not None:
            first = d.first_divergence
            lines.append(f"  diagnosis: first divergence at {first.module} (rel error {first.rel_error:.3g})")
    if report.passed:
        lines.append(f"  report   report.json, report.md  ({report.seconds:.1f} s)")
    else:
        lines.append("  nothing was written to the output folder")
    return "\n".join(lines)


def export_line(export: ExportSection) -> str:
    """The artifact, its exporter and how long it took (and for the builder's graph, why auto chose it)."""
    files, seconds = ", ".join(export.files or ()), export.seconds or 0.0
    if export.format == "onnx" and export.by_builder:
        q = export.quantization
        size = f"; {q['size_bytes'] / 1e6:.1f} MB, {q['size_ratio']:.2f}× float32" if q else ""
        line = f"  onnx     {files}  ({export.exporter}, {export.precision}{size}, {seconds:.1f} s; {export.exporter_choice or ''})"
        if q:
            algo = f"block {q['block_size']}, {q['algorithm']}, {'symmetric' if q['symmetric'] else 'asymmetric'}"
            line += f"\n  weights  MatMulNBits {q['precision']} ({algo}, accuracy level {q['accuracy_level']}); eval: {q['eval_text']}"
        return line
    if export.format == "onnx":
        flags = f"{', optimized' if export.optimized else ''}{', with past' if export.with_past else ''}"
        return f"  onnx     {files}  ({export.exporter}, opset {export.opset}, {seconds:.1f} s{flags})"
    return f"  {export.format:<8} {export.file}  ({export.exporter}, {seconds:.1f} s)"


def package_text(manifest: PackageManifest, out_dir: Path) -> str:
    lines = check_lines(manifest.shared.checks, 40) if manifest.shared else []
    for name, v in manifest.merged.items():
        lines.append(
            f"  {'PASS' if all(c.passed for c in v.checks) else 'FAIL'}  merged {name}: "
            + ", ".join(f"{c.name}{'' if c.passed else ' FAILED'}" for c in v.checks)
        )
    lines += [f"  note: {note}" for note in (manifest.shared.notes if manifest.shared else ())]
    lines += [f"  note: merged {name}: {v.reused_graph}" for name, v in manifest.merged.items() if v.reused_graph]
    st = manifest.storage
    if "shared" in st:
        lines.append(
            f"  storage: shared base graph + {st['variants']} adapter files = {human_bytes(st['shared']['total_bytes'])} "
            f"(adapters {human_bytes(st['shared']['adapter_files_bytes'])}); {st['variants']} merged graphs "
            f"≈ {human_bytes(st['merged_estimate_bytes'])}"
        )
    if "merged" in st:
        lines.append(f"  storage: merged ONNX models {human_bytes(st['merged']['onnx_bytes'])}")
    sharing = manifest.merged_sharing
    if sharing:
        lines.append(
            f"  merged graphs share {sharing['common_tensors']} identical tensors stored once (common.data, {sharing.get('common_file', '')}) "
            f"({human_bytes(sharing['common_bytes'])}; {human_bytes(sharing['saved_bytes'])} not written twice)"
        )
    verdict = f"PASS → {out_dir}/{manifest.NAME}" if manifest.passed else "FAIL: nothing was written"
    lines.append(f"package: {verdict}")
    return "\n".join(lines)


def package_check_text(result: PackageCheck) -> str:
    lines = check_lines(result.checks, 40)
    lines.append(f"package check: {'PASS' if result.passed else 'FAIL'} ({result.files_hashed} files hashed)")
    return "\n".join(lines)


def swap_text(report: SwapReport) -> str:
    lines = [
        f"swapped {report.removed} (weight {report.removed_weight}) for {report.added} → {report.output} ({report.dtype})"
    ]
    if report.base is None:
        lines.append("  the original base is not where the manifest says: no comparison with a fresh merge")
    lines += check_lines(report.checks)
    if not report.passed and report.checks:
        lines.append("  nothing was written to the output folder")
    return "\n".join(lines)


def inspect_text(info: AdapterInspection) -> str:
    flags = ", ".join(k for k in ("use_rslora", "use_dora") if getattr(info, k)) or "plain"
    lines = [
        f"{info.adapter}: {info.peft_type} r={info.r} α={info.lora_alpha:g} ({flags}); {len(info.modules)} modules, "
        f"{info.params:,} parameters, {info.weights_file} {human_bytes(info.weights_bytes)}"
    ]
    if info.compatible is not None:
        lines.append(
            f"  base {info.base}: {'compatible' if info.compatible else 'NOT compatible: ' + str(info.incompatibility)}"
        )
    lines.append(
        f"  {'module':<44} {'r':>3} {'scaling':>8} {'rank':>4} {'eff.rank':>8} {'top-1 energy':>12} {'‖ΔW‖':>9} {'amplif.':>8}"
    )
    for m in info.modules:
        sp = m.spectrum
        if sp.get("finite") is False:
            lines.append(
                f"  {m.module:<44} {m.r:>3} {m.scaling:>8.3g}  ΔW is not finite (overflow or NaN in A, B or α/r)"
            )
            continue
        amp = f"{sp['amplification']:.1f}" if sp.get("amplification") is not None else "–"
        lines.append(
            f"  {m.module:<44} {m.r:>3} {m.scaling:>8.3g} {sp['rank']:>4} {sp['effective_rank']:>8.2f} "
            f"{sp['energy_top1']:>12.1%} {sp['delta_norm']:>9.3g} {amp:>8}"
        )
    if info.replaced_tensors:
        lines.append(f"  replaces {len(info.replaced_tensors)} base tensor(s): {', '.join(info.replaced_tensors[:5])}")
    return "\n".join(lines)
