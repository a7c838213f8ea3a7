"""The headline verbs: `export` (a merged folder → a verified artifact) and `merge_and_onnx` (base + adapters →
merge → verify → ONNX → verify), each writing a report and nothing that looks finished when a check fails."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..io.errors import ExportError, InputError, UnsupportedError
from ..io.outputs import DiscardOutput, atomic_output_dir, check_free_space, check_output_location
from ..merging.merge import MergeOptions, merge
from ..model.config import ModelConfig
from ..model.hub import folder_of
from ..model.loading import kind_of_class, load_model
from ..records import Check, PipelineReport, files_of, versions
from ..records.sections import ExportSection, MergeSection, VerifySection
from ..verification.compare import DTYPES
from ..verification.verify import VerifyOptions, stored_dtype, verify
from .genai_builder import (
    BUILDER,
    genai_build,
    genai_logits_check,
    genai_references,
    save_references,
    unsupported_reason,
)
from .genai_reuse import reuse_graph
from .graphs import cache_shape, refuse_encoder_decoder
from .onnx import OnnxOptions, export_onnx, onnx_files
from .onnx_check import verify_onnx
from .quantized import QuantOptions
from .quantized_build import Origin, export_quantized, refuse_unquantizable
from .runtime_files import (
    GENAI_CONFIG,
    GENAI_MISSING,
    copy_side_files,
    genai_check,
    genai_installed,
    prompt_tokens,
    write_runtime_files,
)

FORMATS = ("onnx", "torchscript", "pt2")


@dataclass(frozen=True)
class ExportOptions:
    format: str = "onnx"
    onnx: OnnxOptions = OnnxOptions()
    seed: int = 0
    overwrite: bool = False
    exporter: str = "auto"  # onnx: dynamo (torch.onnx), genai (GenAI's model builder), auto (genai where it can)
    reuse: Any = None  # a GraphTemplate: the builder graph of another merged folder of the same base, to reuse
    quant: QuantOptions = QuantOptions()  # int8/int4: the builder's MatMulNBits graph, judged on an evaluation text
    origin: Origin | None = None  # int8/int4: the merged folder's base and adapters (else its lora_export.json's)
    references_as: str | None = None  # package: the GenAI check's last prompt and references kept in reference.npz


@dataclass(frozen=True)
class PipelineResult:
    """What export and merge_and_onnx return, passed or not. When a check failed, `output` was not written."""

    output: Path
    report: PipelineReport

    @property
    def passed(self) -> bool:
        return self.report.passed

    @property
    def checks(self) -> tuple[Check, ...]:
        return self.report.checks


def export_artifact(
    merged_dir: Path, out: Path, options: ExportOptions, log: Callable[[str], None]
) -> tuple[ExportSection, list[Check]]:
    """Export the merged folder into `out` (which exists) in options.format and prove it against PyTorch."""
    dtype = stored_dtype(merged_dir)
    if options.format == "onnx" and dtype == "bfloat16":
        raise UnsupportedError(
            f"{merged_dir} is bfloat16: ONNX Runtime's CPU provider has no bfloat16 kernels (seen: Mul, MatMul), so "
            "the ONNX model could not run or be verified. Use --dtype float16 or float32 for ONNX"
        )
    if options.format == "onnx" and options.quant.quantized:
        refuse_unquantizable(merged_dir, options, dtype)
        origin = options.origin or Origin.of_merged(merged_dir, options.quant.precision)
        section, checks = export_quantized(merged_dir, out, options.quant, origin, log)
        copy_side_files(merged_dir, out)
        return replace(
            section, exporter_choice=f"--precision {options.quant.precision}: the builder's MatMulNBits"
        ), checks
    config = ModelConfig.load(merged_dir)
    exporter, why = choose_exporter(
        options, merged_dir, kind_of_class(config.architecture, config.encoder_decoder), dtype
    )
    rejected = None
    if options.format == "onnx" and exporter == "genai":
        built = _try_genai(merged_dir, out, options, dtype, log)
        if not isinstance(built, str):
            return replace(built[0], exporter_choice=why), built[1]
        rejected = built
        why = "auto: the GenAI model builder's graph failed here (see rejected); the dynamo graph was exported instead"
        log(f"{rejected}; exporting with the dynamo exporter instead …")
    model = load_model(merged_dir, DTYPES[dtype])
    if options.format == "onnx":
        section, checks = _export_onnx(model, merged_dir, out, options, dtype, log)
        return replace(section, exporter_choice=why, rejected=(rejected,) if rejected else None), checks
    from .torchscript import export_torch

    log(f"exporting {options.format} …")
    section, checks = export_torch(model, out, options.format, dtype, options.seed)
    copy_side_files(merged_dir, out)
    return section, checks


EXPORTERS = ("dynamo", "genai", "auto")


def choose_exporter(options: ExportOptions, merged_dir: Path, kind: str, dtype: str = "float32") -> tuple[str, str]:
    """(exporter, why): auto takes the GenAI model builder where it can build and check the model, dynamo
    otherwise."""
    if options.exporter not in EXPORTERS:
        raise InputError(f"unknown exporter {options.exporter!r}: choose one of {', '.join(EXPORTERS)}")
    if options.format != "onnx" or options.exporter == "dynamo":
        return "dynamo", "asked for" if options.exporter == "dynamo" else f"{options.format} is not ONNX"
    reason = unsupported_reason(merged_dir) if kind == "causal-lm" else "the GenAI model builder builds decoders only"
    if reason is None and not options.onnx.with_past:
        reason = "--no-past: the GenAI graph always has past key/values"
    if reason is None and options.onnx.optimize:
        reason = "--optimize applies to the dynamo graph (the builder's graph is already fused)"
    if reason is None and dtype != "float32" and options.exporter == "auto":
        reason = (
            f"the builder's {dtype} graph targets CUDA (its CPU one does not run in ONNX Runtime's CPU provider): "
            "a CPU folder as written needs the dynamo graph; --exporter genai builds the CUDA one and checks it here"
        )
    if options.exporter == "genai":
        if reason:
            raise UnsupportedError(f"--exporter genai: {reason}; use --exporter dynamo")
        return "genai", "asked for"
    return ("dynamo", f"auto: {reason}") if reason else ("genai", "auto: the GenAI model builder builds this model")


def _export_genai(
    merged_dir: Path, out: Path, options: ExportOptions, dtype: str, log: Callable[[str], None]
) -> tuple[ExportSection, list[Check]]:
    """The GenAI model builder's graph, checked where it runs: in ONNX Runtime GenAI against PyTorch. While the
    builder runs (a child process), PyTorch computes its references; its model is freed before GenAI loads the
    graph, so that GenAI never runs beside a PyTorch copy of the weights."""
    if options.reuse is not None:
        log("reusing the base's builder graph with this model's weights …")
        prompts, references = genai_references(merged_dir, dtype, options.seed, options.onnx.max_new_tokens)
        section = reuse_graph(options.reuse, merged_dir, out)
    else:
        with genai_build(merged_dir, out, dtype, log) as finish:
            prompts, references = genai_references(merged_dir, dtype, options.seed, options.onnx.max_new_tokens)
            section = finish()
    if options.references_as is not None:  # what `package --check` re-runs in GenAI: no second PyTorch run for it
        tokens, steps = references[-1]
        save_references(out / "reference.npz", prompts[-1], {options.references_as: (tokens, steps[0].reshape(-1))})
    copy_side_files(merged_dir, out)
    log("checking in ONNX Runtime GenAI …")
    return section, [genai_logits_check(out, prompts, references, dtype)]


def _try_genai(
    merged_dir: Path, out: Path, options: ExportOptions, dtype: str, log: Callable[[str], None]
) -> tuple[ExportSection, list[Check]] | str:
    """The builder's graph and its checks; with auto, a builder that fails or a graph that fails its check in GenAI
    is not the end: what it wrote is removed and the reason comes back instead, for the dynamo exporter to take over."""
    before = set(out.iterdir())
    try:
        section, checks = _export_genai(merged_dir, out, options, dtype, log)
    except ExportError as e:
        if options.exporter != "auto":
            raise
        problem = str(e)
    else:
        failed = [c for c in checks if not c.passed]
        if not failed or options.exporter != "auto":
            return section, checks
        problem = "; ".join(f"{c.name}: {c.summary}" + (f" ({c.failures[0]})" if c.failures else "") for c in failed)
    for path in set(out.iterdir()) - before:  # the builder's files: the dynamo export starts from the same folder
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return f"{BUILDER}: {problem}"


def _export_onnx(
    model: Any, merged_dir: Path, out: Path, options: ExportOptions, dtype: str, log: Callable[[str], None]
) -> tuple[ExportSection, list[Check]]:
    """The ONNX graph, checked in ONNX Runtime; the files runtimes need beside it; for decoders with past, the
    folder loaded and run by ONNX Runtime GenAI as written."""
    prompt, eos, tokenizer = prompt_tokens(merged_dir)
    log(f"exporting ONNX (opset {options.onnx.opset}{', past key/values' if options.onnx.with_past else ''}) …")
    exported = export_onnx(model, out / "model.onnx", options.onnx, log)
    log(f"exported in {exported.seconds:.1f} s; checking in ONNX Runtime …")
    checks, generation = verify_onnx(model, exported, options.onnx, options.seed, prompt, eos)
    text = None
    if generation and tokenizer is not None:
        text = {
            "pytorch": tokenizer.decode(generation["reference"]),
            "onnxruntime": tokenizer.decode(generation["tokens"]),
        }
    copy_side_files(merged_dir, out)
    decoder = exported.kind == "causal-lm" and exported.with_past
    shape = cache_shape(model.config) if decoder else None
    runtime_files = write_runtime_files(out, merged_dir, shape, exported.input_names, exported.output_names)
    if decoder and generation and (out / GENAI_CONFIG).is_file():
        if genai_installed():
            log("checking in ONNX Runtime GenAI …")
            checks.append(genai_check(out, generation["prompt_tokens"], generation["reference"], dtype))
        else:  # said in the report, not skipped silently
            runtime_files.append(GENAI_MISSING)
    section = ExportSection(
        format="onnx",
        dtype=dtype,
        exporter=exported.exporter,
        seconds=exported.seconds,
        path=str(exported.path),
        files=tuple(p.name for p in onnx_files(exported.path)),
        kind=exported.kind,
        with_past=exported.with_past,
        input_names=tuple(exported.input_names),
        output_names=tuple(exported.output_names),
        opset=exported.opset,
        optimized=exported.optimized,
        external_data=exported.external_data,
        notes=tuple(exported.notes),
        runtime_files=tuple(runtime_files),
        generation_text=text,
    )
    return section, checks


def _report(
    kind: str,
    inputs: dict[str, Any],
    stages: tuple[MergeSection | None, VerifySection | None, ExportSection],
    checks: list[Check],
    started: float,
) -> PipelineReport:
    """The report; inputs that came from the Hub cache get their source (repository, revision, commit) recorded."""
    from ..model.hub import sources

    paths = [v for v in inputs.values() if isinstance(v, str)]
    paths += [a for v in inputs.values() if isinstance(v, list) for a in v if isinstance(a, str)]
    found = sources(paths)
    if found:
        inputs = {**inputs, "sources": found}
    return PipelineReport(kind, inputs, *stages, tuple(checks), time.perf_counter() - started, versions())


def _finish(out: Path, report: PipelineReport) -> PipelineReport:
    """Write report.json and report.md into the finished folder, or discard the folder when a check failed."""
    from ..render.markdown import pipeline_markdown

    if not report.passed:
        raise DiscardOutput(report)
    report = replace(report, output_files=files_of(out))
    report.write(out)
    (out / "report.md").write_text(pipeline_markdown(report), encoding="utf-8")
    return report


def export(
    merged_dir: Path | str,
    out_dir: Path | str,
    options: ExportOptions = ExportOptions(),
    log: Callable[[str], None] = lambda s: None,
) -> PipelineResult:
    """Export an already merged folder to ONNX, TorchScript or torch.export, verified against PyTorch eager."""
    started = time.perf_counter()
    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    if options.format not in FORMATS:
        raise InputError(f"unknown format {options.format!r}: choose one of {', '.join(FORMATS)}")
    if not (merged_dir / "config.json").is_file():
        raise InputError(f"{merged_dir} is not a model folder (no config.json)")
    refuse_encoder_decoder(merged_dir, f"export to {options.format}")
    if options.quant.quantized:  # before anything is built: what it needs is here, and the builder builds it
        refuse_unquantizable(merged_dir, options, stored_dtype(merged_dir))
        Origin.of_merged(merged_dir, options.quant.precision)
    check_output_location(out_dir, [merged_dir], options.overwrite)
    try:
        with atomic_output_dir(out_dir, options.overwrite) as tmp:
            section, checks = export_artifact(merged_dir, tmp, options, log)
            report = _finish(
                tmp, _report("export", {"merged": str(merged_dir)}, (None, None, section), checks, started)
            )
    except DiscardOutput as failed:
        return PipelineResult(out_dir, failed.report)
    return PipelineResult(out_dir, report)


def merge_and_onnx(
    base_dir: Path | str,
    adapter_dirs: Sequence[Path | str],
    out_dir: Path | str,
    merge_options: MergeOptions = MergeOptions(),
    options: ExportOptions = ExportOptions(),
    verify_options: VerifyOptions = VerifyOptions(),
    log: Callable[[str], None] = lambda s: None,
) -> PipelineResult:
    """Merge → verify (merged vs unmerged) → export ONNX → verify (ONNX Runtime vs PyTorch), into OUT_DIR:
    model.onnx (+ model.onnx.data), tokenizer files, merged/ (with its lora_export.json), report.json, report.md."""
    started = time.perf_counter()
    base_dir, out_dir = folder_of(base_dir, "base"), Path(out_dir)
    adapters = [folder_of(a, "adapter") for a in adapter_dirs]
    if merge_options.dtype == "bfloat16":
        raise UnsupportedError(
            "--dtype bfloat16: ONNX Runtime's CPU provider has no bfloat16 kernels, so the ONNX model could not be verified; "
            "use float16 or float32 (lora-export merge writes bfloat16 folders)"
        )
    refuse_encoder_decoder(base_dir, "merge-and-onnx")
    if options.quant.quantized:  # the merge is written in float32 for the builder to quantize
        if merge_options.dtype not in ("auto", "float32"):
            raise InputError(
                f"--precision {options.quant.precision} quantizes the float32 merge: leave --dtype at auto"
            )
        merge_options = replace(merge_options, dtype="float32")
        refuse_unquantizable(base_dir, options, "float32")
        options = replace(
            options, origin=Origin(base_dir, tuple(adapters), merge_options.weights or (1.0,) * len(adapters))
        )
    check_output_location(out_dir, [base_dir, *adapters], merge_options.overwrite)
    try:
        report = _merge_and_onnx(base_dir, adapters, out_dir, merge_options, options, verify_options, log, started)
    except DiscardOutput as failed:
        return PipelineResult(out_dir, failed.report)
    return PipelineResult(out_dir, report)


def _merge_and_onnx(
    base_dir: Path,
    adapters: list[Path],
    out_dir: Path,
    merge_options: MergeOptions,
    options: ExportOptions,
    verify_options: VerifyOptions,
    log: Callable[[str], None],
    started: float,
) -> PipelineReport:
    with atomic_output_dir(out_dir, merge_options.overwrite) as tmp:
        log("merging …")
        merged = merge(
            base_dir, adapters, tmp / "merged", MergeOptions(**{**asdict(merge_options), "overwrite": False})
        )
        if stored_dtype(tmp / "merged") == "bfloat16":
            raise UnsupportedError(
                f"{base_dir} is stored in bfloat16 and ONNX Runtime's CPU provider has no bfloat16 kernels: pass --dtype float16 or float32"
            )
        weights_bytes = sum(f.size for f in merged.manifest.files)  # the ONNX model holds as many again
        check_free_space(
            tmp / "model.onnx", weights_bytes, f"the ONNX model in {out_dir} (about as large as the merged weights)"
        )
        log("verifying merged vs unmerged …")
        vreport = verify(
            base_dir,
            adapters,
            tmp / "merged",
            VerifyOptions(**{**asdict(verify_options), "weights": merge_options.weights}),
        )
        section, export_checks = export_artifact(tmp / "merged", tmp, options, log)
        checks = [*vreport.checks, *export_checks]
        manifest = merged.manifest
        merge_section = MergeSection(
            "merged",
            manifest.dtype,
            manifest.merged_tensors,
            manifest.untied,
            manifest.notes,
            "merged/lora_export.json",
        )
        verified = VerifySection(
            vreport.model_class,
            vreport.merged_dtype,
            vreport.tolerances,
            tuple(vreport.cases),
            vreport.generation,
            vreport.diagnosis,
            vreport.structure,
        )
        inputs = {
            "base": str(base_dir),
            "adapters": [str(a) for a in adapters],
            "weights": list(merge_options.weights) or [1.0] * len(adapters),
        }
        return _finish(tmp, _report("merge-and-onnx", inputs, (merge_section, verified, section), checks, started))
