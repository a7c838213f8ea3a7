"""merge-and-onnx and export at --precision int8|int4: the builder's MatMulNBits graph of the merged model, the base
built the same way beside it (not shipped: the adapter-effect reference), both run in ONNX Runtime GenAI on the
evaluation text, and two checks — quality against the truth and the adapters' effect — that fail the command when
the deployment lost too much or lost the fine-tune (see quantized.py for the measures)."""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..io.errors import InputError, UnsupportedError
from ..io.paths import probe
from ..model.config import ModelConfig
from ..model.loading import load_model
from ..records import Check
from ..records.merge import MergeManifest
from ..records.sections import ExportSection
from ..records.tolerances import ADAPTER_EFFECT, quality_tolerance
from ..verification.compare import load_tokenizer
from ..verification.lora_runtime import load_unmerged
from .genai_builder import genai_build, unsupported_reason
from .quantized import (
    AdapterEffect,
    Quality,
    QuantOptions,
    adapter_effect,
    eval_windows,
    genai_logprobs,
    quality,
    torch_logprobs,
)


@dataclass(frozen=True)
class Origin:
    """What a merged folder was made of: the truth's inputs (base + adapters applied unmerged, with their weights)."""

    base: Path
    adapters: tuple[Path, ...]
    weights: tuple[float, ...]

    @classmethod
    def of_merged(cls, merged_dir: Path, precision: str) -> Origin:
        """From the merged folder's lora_export.json; refused when its base or adapters are not where it says."""
        if not (merged_dir / MergeManifest.NAME).is_file():
            raise InputError(
                f"{merged_dir} has no {MergeManifest.NAME}: --precision {precision} measures the adapters' effect "
                "against the base they were merged into; export a folder written by lora-export merge, or use "
                "merge-and-onnx"
            )
        manifest = MergeManifest.load(merged_dir)
        where = f"{merged_dir / MergeManifest.NAME}"
        paths = [probe(Path(p), where) for p in (manifest.base_path, *(a.path for a in manifest.adapters))]
        missing = [str(p) for p in paths if not p.is_dir()]
        if missing:
            raise InputError(
                f"{merged_dir / MergeManifest.NAME} names {missing[0]}, which is not here: --precision {precision} "
                "needs the base and adapters the folder was merged from (or use merge-and-onnx)"
            )
        return cls(paths[0], tuple(paths[1:]), tuple(a.weight for a in manifest.adapters))


def refuse_unquantizable(folder: Path, options: Any, dtype: str) -> None:
    """int8/int4 are the builder's ONNX graphs of float32 weights (`options`: the ExportOptions): refused up front for
    what it does not build, and for options that would be silently ignored."""
    quant = options.quant
    if options.format != "onnx":
        raise UnsupportedError(
            f"--precision {quant.precision} is an ONNX graph (MatMulNBits): drop --format {options.format}"
        )
    if options.exporter == "dynamo":
        raise UnsupportedError(
            f"--precision {quant.precision} is the GenAI model builder's MatMulNBits graph: use --exporter auto or genai"
        )
    if options.onnx.optimize or not options.onnx.with_past:
        raise UnsupportedError(
            f"--precision {quant.precision}: --optimize and --no-past apply to the dynamo graph; the builder's graph is "
            "fused and has past key/values"
        )
    if dtype != "float32":
        raise UnsupportedError(
            f"--precision {quant.precision} quantizes float32 weights: leave --dtype at auto/float32 (the merge is "
            "written in float32 and the builder quantizes it)"
        )
    reason = unsupported_reason(folder)
    if reason is not None:
        raise UnsupportedError(
            f"--precision {quant.precision}: the GenAI model builder makes int8/int4 graphs, and {reason}"
        )
    eval_windows(load_tokenizer(folder), quant, ModelConfig.load(folder).context)  # enough text to judge on, up front


def export_quantized(
    merged_dir: Path, out: Path, quant: QuantOptions, origin: Origin, log: Callable[[str], None]
) -> tuple[ExportSection, list[Check]]:
    """Build, run and judge; the caller writes nothing when a check failed."""
    config = ModelConfig.load(merged_dir)
    windows = eval_windows(load_tokenizer(merged_dir), quant, config.context)
    with tempfile.TemporaryDirectory(prefix="lora-export-quantized-") as tmp:
        with genai_build(merged_dir, out, "float32", log, quant) as finish:
            log(f"the truth (PyTorch float32, adapters unmerged) on {sum(map(len, windows))} evaluation tokens …")
            truth, base32 = _pytorch_side(origin, windows)
            section = finish()
        log(f"building the base the same way ({quant.precision}), the adapter effect's reference …")
        with genai_build(origin.base, Path(tmp) / "base", "float32", log, quant) as finish_base:
            finish_base()
        log("running both in ONNX Runtime GenAI on the evaluation text …")
        deployed = genai_logprobs(out, windows)
        deployed_base = genai_logprobs(Path(tmp) / "base", windows)
    measured = quality(truth, deployed, windows)
    band = (ADAPTER_EFFECT.min_ratio, ADAPTER_EFFECT.max_ratio)
    effect = adapter_effect(truth, base32, deployed, deployed_base, ADAPTER_EFFECT.min_cosine, band)
    size = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    fp32 = sum(p.stat().st_size for p in merged_dir.glob("*.safetensors"))
    quantization = {**quant.to_dict(), "size_bytes": size, "fp32_bytes": fp32, "size_ratio": size / max(fp32, 1)}
    section = replace(section, quantization=quantization, quality=measured.to_dict(), adapter_effect=effect.to_dict())
    return section, [quality_check(measured, quant), effect_check(effect, quant)]


def _pytorch_side(origin: Origin, windows: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The truth (base + adapters unmerged, float32) and the base in float32, one model in memory at a time."""
    model = load_unmerged(origin.base, list(origin.adapters), origin.weights, torch.float32, False)
    truth = torch_logprobs(model, windows)
    del model
    gc.collect()
    model = load_model(origin.base, torch.float32)
    base32 = torch_logprobs(model, windows)
    del model
    gc.collect()
    return truth, base32


def quality_check(q: Quality, quant: QuantOptions) -> Check:
    tol = quality_tolerance(quant.precision)
    failures = []
    if not q.kl_mean <= tol.max_kl_mean:
        failures.append(f"mean KL {q.kl_mean:.3g} > {tol.max_kl_mean:g}")
    if not q.kl_p99 <= tol.max_kl_p99:
        failures.append(f"p99 KL {q.kl_p99:.3g} > {tol.max_kl_p99:g}")
    if not q.top1_agreement >= tol.min_top1:
        failures.append(f"same top-1 {q.top1_agreement:.1%} < {tol.min_top1:.0%}")
    if not q.ppl_ratio <= tol.max_ppl_ratio:
        failures.append(f"perplexity ×{q.ppl_ratio:.3f} > ×{tol.max_ppl_ratio:g}")
    if failures:
        failures.append(f"{quant.precision} costs this model too much: try int8 (or int4 with --block-size 16)")
    summary = (
        f"KL mean {q.kl_mean:.2g} (≤ {tol.max_kl_mean:g}), p99 {q.kl_p99:.2g}, max {q.kl_max:.2g}; "
        f"same top-1 {q.top1_agreement:.1%}; perplexity ×{q.ppl_ratio:.3f} ({q.tokens} tokens)"
    )
    return Check(
        f"quality ({quant.precision})",
        f"ONNX Runtime GenAI {quant.precision} vs PyTorch float32 with the adapters unmerged, on the evaluation text",
        quant.precision,
        not failures,
        summary,
        tuple(failures),
        details={"quality": q.to_dict(), "tolerance": tol.to_dict()},
    )


def effect_check(e: AdapterEffect, quant: QuantOptions, float_lora: bool = False) -> Check:
    """The verdict on the adapters' effect; `float_lora`: the adapter already runs in float beside the quantized base
    (the shared layout), so only a wider precision or a stronger effect can help."""
    wider = "int8, fp16 or fp32" if quant.precision == "int4" else "fp16 or fp32"
    advice = (
        f"Ship a wider precision ({wider}) — the adapter is already in float here; its effect is within the base's "
        "quantization noise"
        if float_lora
        else f"Ship a wider precision ({wider}), or the shared layout with the adapter in float (lora-export package "
        "--mode shared)"
    )
    summary = (
        f"delta cosine {e.delta_cosine:.3f} (≥ {ADAPTER_EFFECT.min_cosine:g}), norm ratio {e.norm_ratio:.2f}; "
        f"effect KL {e.fp32_kl:.2g} in float32, {e.deployed_kl:.2g} deployed; noise floor {e.noise_floor_kl:.2g}"
    )
    failures = ()
    if not e.preserved:
        failures = (
            f"the adapters' effect did not survive {quant.precision}: the deployed change points elsewhere (cosine "
            f"{e.delta_cosine:.2f}) or has another size (×{e.norm_ratio:.2f}) against a noise floor of KL "
            f"{e.noise_floor_kl:.2g}. {advice}, or judge on your own text (--eval-text)",
        )
    return Check(
        f"adapter effect ({quant.precision})",
        f"the adapters' change to the log-probabilities, {quant.precision} in GenAI (merged − base built the same way) "
        "vs float32 in PyTorch (merged − base)",
        quant.precision,
        e.preserved,
        summary,
        failures,
        details={"adapter_effect": e.to_dict(), "tolerance": ADAPTER_EFFECT.to_dict()},
    )
