"""Commands that make and check a merged model: merge, verify, merge-and-onnx, export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from . import options
from .main import _echo_err, conclude, handle_errors, main, split_base


@main.command()
@click.argument("paths", nargs=-1, required=True, type=options.MODEL_DIR, metavar="[BASE] ADAPTER...")
@options.output
@options.weights
@options.strict_base
@options.output_dtype
@click.option(
    "--max-shard-size",
    type=options.SIZE,
    default="5GB",
    show_default=True,
    help="Largest output shard, e.g. 2GB or 500MB.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists (only once the new one is complete).")
@options.allow_pickle
@click.option(
    "--json", "as_json", is_flag=True, help="Print the manifest (lora_export.json) on stdout instead of a summary."
)
@click.option(
    "--rehash-output",
    is_flag=True,
    help="Hash every written shard again from disk (each shard is always re-parsed and size-checked).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def merge(
    paths: tuple[Path, ...],
    out_dir: Path,
    weights: tuple[float, ...],
    strict_base: bool,
    dtype: str,
    max_shard_size: int,
    overwrite: bool,
    allow_pickle: bool,
    as_json: bool,
    rehash_output: bool,
    quiet: bool,
) -> None:
    """Fold LoRA adapters into BASE: W = W0 + Σ wᵢ·ΔWᵢ, computed in float32 and cast once.

    BASE and each ADAPTER are folders or Hugging Face Hub addresses (org/name, org/name@revision), read from the
    local cache first. Without BASE, the base is the one the first adapter names (adapter_config.json); an adapter
    that names another base than BASE is a warning (--strict-base: a refusal).

    Streams tensor by tensor (memory stays at a few tensors, whatever the model's size), writes a folder that
    transformers loads as it is, and a manifest lora_export.json with hashes, scalings, ΔW norms and what the cast
    to the output dtype lost. Every PEFT LoRA variant is merged exactly or refused with the reason.

    \b
    Examples:
      lora-export merge HuggingFaceTB/SmolLM2-135M-Instruct my-org/smollm2-caps -o ./caps-merged
      lora-export merge my-org/smollm2-caps@v2 -o ./caps-v2      # the base its adapter_config.json names
      lora-export merge ./smollm2 ./adapters/caps -o ./caps-local --dtype bfloat16
      lora-export merge ./smollm2 ./adapters/caps ./adapters/chat -w 0.7 -w 0.3 -o ./mixed
    """
    from ..merging.merge import MergeOptions
    from ..merging.merge import merge as merge_fn
    from ..render.machine import to_json
    from ..render.text import merge_text

    options = MergeOptions(
        dtype=dtype,
        weights=weights,
        max_shard_size=max_shard_size,
        allow_pickle=allow_pickle,
        overwrite=overwrite,
        progress=not quiet,
        rehash_output=rehash_output,
    )
    base_dir, adapter_dirs = split_base(paths, strict_base)
    result = merge_fn(base_dir, adapter_dirs, out_dir, options)
    click.echo(to_json(result.manifest.to_dict()) if as_json else merge_text(result))


@main.command()
@click.argument("paths", nargs=-1, required=True, type=options.MODEL_DIR, metavar="[BASE] ADAPTER... MERGED_DIR")
@options.strict_base
@options.weights
@click.option(
    "--prompts",
    "prompts_file",
    type=options.INPUT_FILE,
    help="Text file, one prompt per line (default: built-in prompts).",
)
@click.option(
    "--max-new-tokens",
    type=options.NEW_TOKENS,
    default=32,
    show_default=True,
    help="Greedy tokens to generate and compare (causal LMs).",
)
@click.option("--seed", type=options.SEED, default=0, show_default=True, help="Seed of the random token batches.")
@options.allow_pickle
@click.option(
    "--device",
    type=options.DEVICE,
    default="cpu",
    show_default=True,
    help="Where both models run: cpu, cuda, cuda:1, …",
)
@click.option(
    "--device-map",
    type=click.Choice(["auto", "balanced", "sequential"]),
    default=None,
    help="Spread each model over the GPUs, then CPU memory, then disk (accelerate), for models larger than one device.",
)
@click.option(
    "--max-memory",
    type=options.MAX_MEMORY,
    default=None,
    metavar="DEV=SIZE,...",
    help="With --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB.",
)
@options.json_report
@options.junit
@handle_errors
def verify(
    paths: tuple[Path, ...],
    strict_base: bool,
    weights: tuple[float, ...],
    prompts_file: Path | None,
    max_new_tokens: int,
    seed: int,
    allow_pickle: bool,
    device: str,
    device_map: str | None,
    max_memory: dict[int | str, int] | None,
    json_file: Path | None,
    junit_file: Path | None,
) -> None:
    """Prove that MERGED_DIR computes what BASE_DIR with the adapters applied at run time computes.

    Runs the unmerged model (float32, LoRA applied at run time, no PEFT) and the merged one on the tokenizer's
    encoding of a few prompts and on seeded random batches (one padded), and checks: the merged tensors against
    W0 + ΔW; the merge error (merged in float32 vs unmerged in float32: max error relative to the logits' scale,
    cosine, top-1 agreement, KL of the next-token distributions); for a float16/bfloat16 MERGED_DIR the cast error
    apart (merged in that dtype vs merged in float32); for causal LMs, greedy generation. Tolerances come from one
    table keyed by dtype and are printed. On failure it names the first module whose output diverges.

    Exit code: 0 all checks pass, 1 a numerical check failed, 2 bad input.

    \b
    Example:
      lora-export verify ./smollm2 ./adapters/caps ./smollm2-caps --json verify.json
    """
    from ..render.text import verify_text
    from ..verification.verify import PROMPTS, VerifyOptions, read_prompts
    from ..verification.verify import verify as verify_fn

    if len(paths) < 2:
        raise click.UsageError("give BASE (or let the first adapter name it), at least one ADAPTER, and MERGED_DIR")
    base_dir, adapter_dirs = split_base(paths[:-1], strict_base)
    prompts = read_prompts(prompts_file) if prompts_file else PROMPTS
    if max_memory and not device_map:
        raise click.UsageError("--max-memory applies with --device-map")
    options = VerifyOptions(
        weights=weights,
        prompts=prompts,
        max_new_tokens=max_new_tokens,
        seed=seed,
        allow_pickle=allow_pickle,
        device=device,
        device_map=device_map,
        max_memory=max_memory,
    )
    report = verify_fn(base_dir, adapter_dirs, paths[-1], options)
    conclude(report, verify_text(report), "lora-export verify", json_file, junit_file)


def precision_dtype(precision: str | None, dtype: str) -> str:
    """--dtype from --precision: fp32/fp16 are float32/float16 graphs; int8/int4 quantize the float32 merge."""
    wanted = {"fp32": "float32", "fp16": "float16", "int8": "float32", "int4": "float32"}.get(precision or "")
    if wanted is None or dtype == wanted:
        return dtype
    if dtype != "auto":
        raise click.UsageError(f"--precision {precision} writes a {wanted} merge: drop --dtype {dtype}")
    return wanted


@main.command("merge-and-onnx")
@click.argument("paths", nargs=-1, required=True, type=options.MODEL_DIR, metavar="[BASE] ADAPTER...")
@options.output
@options.weights
@options.strict_base
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "float16"]),
    default="auto",
    show_default=True,
    help="Dtype of the merged model and the ONNX graph (bfloat16 is refused: ONNX Runtime's CPU provider lacks its kernels).",
)
@options.exporter
@click.option("--opset", type=options.OPSET, default=20, show_default=True, help="ONNX opset (dynamo exporter).")
@click.option(
    "--optimize",
    is_flag=True,
    help="Save ONNX Runtime's extended graph optimisations in the model (verified like the plain one).",
)
@click.option("--no-past", is_flag=True, help="Decoders: export without past key/values inputs and present outputs.")
@click.option(
    "--max-new-tokens",
    type=options.NEW_TOKENS,
    default=16,
    show_default=True,
    help="Greedy tokens compared: merged vs unmerged, and ONNX Runtime vs PyTorch.",
)
@options.quantization
@options.overwrite
@options.allow_pickle
@options.json_report
@options.junit
@handle_errors
def merge_and_onnx(
    paths: tuple[Path, ...],
    out_dir: Path,
    weights: tuple[float, ...],
    strict_base: bool,
    dtype: str,
    exporter: str,
    opset: int,
    optimize: bool,
    no_past: bool,
    max_new_tokens: int,
    overwrite: bool,
    allow_pickle: bool,
    json_file: Path | None,
    junit_file: Path | None,
    **quantization: Any,
) -> None:
    """Base + adapters → merged → verified → ONNX → verified, in one command.

    Merges (float32 math, one cast), checks the merged model against the unmerged one (lora-export verify's checks),
    then exports ONNX with the exporter --exporter names. The default, auto, takes ONNX Runtime GenAI's model builder
    for float32 decoders it builds (when onnxruntime-genai is installed): a fused graph with genai_config.json,
    checked in GenAI against PyTorch (logits at every step, greedy tokens). Otherwise, or with --exporter dynamo,
    torch.onnx.export(dynamo=True): decoders with past_key_values.N.key/value inputs and present.N.key/value
    outputs, dynamic batch and sequence, checked in ONNX Runtime against PyTorch at batch 1 and 4, short and long,
    padded, one decode step, and greedy generation with the KV cache. The report says which exporter shipped and
    why. OUT_DIR gets model.onnx (+ its external data), tokenizer files, merged/ with the merge's manifest,
    report.json and report.md; nothing when a check fails (exit 1). BASE and ADAPTER are folders or Hub addresses
    (org/name[@revision]); without BASE, the first adapter's adapter_config.json names it.

    \b
    Examples:
      lora-export merge-and-onnx HuggingFaceTB/SmolLM2-135M-Instruct my-org/smollm2-caps -o ./smollm2-caps-onnx
      lora-export merge-and-onnx my-org/smollm2-caps -o ./smollm2-caps-onnx
      lora-export merge-and-onnx ./smollm2 ./adapters/caps -o ./smollm2-caps-onnx --optimize
    """
    from ..exporting.onnx import OnnxOptions
    from ..exporting.pipeline import ExportOptions
    from ..exporting.pipeline import merge_and_onnx as run
    from ..merging.merge import MergeOptions
    from ..render.text import pipeline_text
    from ..verification.verify import VerifyOptions

    quant, several, dtype = _precision(quantization, dtype)
    merge_options = MergeOptions(dtype=dtype, weights=weights, allow_pickle=allow_pickle, overwrite=overwrite)
    onnx = OnnxOptions(opset=opset, optimize=optimize, with_past=not no_past, max_new_tokens=max_new_tokens)
    verify_options = VerifyOptions(max_new_tokens=max_new_tokens, allow_pickle=allow_pickle)
    export_options = ExportOptions(onnx=onnx, exporter=exporter, quant=quant)
    base_dir, adapter_dirs = split_base(paths, strict_base)
    if len(several) > 1:
        settings = (merge_options, export_options, verify_options)
        return _sweep(base_dir, adapter_dirs, out_dir, several, dtype, settings, (json_file, junit_file))
    result = run(base_dir, adapter_dirs, out_dir, merge_options, export_options, verify_options, log=_echo_err)
    conclude(result.report, pipeline_text(result.report), "lora-export merge-and-onnx", json_file, junit_file)


def _precision(quantization: dict[str, Any], dtype: str) -> tuple[Any, tuple[str, ...], str]:
    """The QuantOptions, the precisions asked for (several: a sweep), and --dtype as one --precision sets it."""
    from ..bench.sweep import parse_precisions

    several = parse_precisions(quantization["precision"]) if quantization["precision"] else ()
    quant = options.quant_options(**quantization, several=True)
    return quant, several, precision_dtype(quant.precision if len(several) == 1 else None, dtype)


def _sweep(
    base_dir: Path | None,
    adapter_dirs: list[Path],
    out_dir: Path,
    several: tuple[str, ...],
    dtype: str,
    settings: tuple[Any, Any, Any],
    reports: tuple[Path | None, Path | None],
) -> None:
    """merge-and-onnx --precision A,B,…: each judged, one table, the smallest passing one shipped."""
    from ..bench.sweep import sweep, sweep_markdown
    from ..render.text import pipeline_text

    if dtype != "auto":
        raise click.UsageError("several --precision values set each one's dtype: drop --dtype")
    result, rows, shipped, band = sweep(base_dir, adapter_dirs, out_dir, several, *settings, log=_echo_err)
    table = sweep_markdown(rows, shipped, band) + (f"shipped: {shipped} → {out_dir}" if shipped else "none passed")
    conclude(
        result.report,
        pipeline_text(result.report) + "\n\n" + table,
        "lora-export merge-and-onnx",
        *reports,
    )


@main.command()
@click.argument("merged_dir", type=options.MODEL_DIR)
@options.output
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "torchscript", "pt2"]),
    default="onnx",
    show_default=True,
    help="onnx: torch.onnx.export(dynamo=True); torchscript: torch.jit.trace (deprecated in torch 2.13; torch.jit.script "
    "cannot compile transformers models); pt2: torch.export.export. Decoders in torchscript/pt2 need transformers 5 "
    "(4.x builds masks with torch.vmap, which neither can record).",
)
@options.exporter
@click.option("--opset", type=options.OPSET, default=20, show_default=True, help="ONNX opset (dynamo exporter).")
@click.option("--optimize", is_flag=True, help="ONNX: save ONNX Runtime's extended graph optimisations in the model.")
@click.option("--no-past", is_flag=True, help="ONNX decoders: no past key/values.")
@click.option(
    "--max-new-tokens",
    type=options.NEW_TOKENS,
    default=16,
    show_default=True,
    help="ONNX decoders: greedy tokens compared with PyTorch.",
)
@options.quantization
@options.overwrite
@options.json_report
@options.junit
@handle_errors
def export(
    merged_dir: Path,
    out_dir: Path,
    fmt: str,
    exporter: str,
    opset: int,
    optimize: bool,
    no_past: bool,
    max_new_tokens: int,
    overwrite: bool,
    json_file: Path | None,
    junit_file: Path | None,
    **quantization: Any,
) -> None:
    """Export an already merged model folder and prove the artifact matches PyTorch.

    ONNX is checked in ONNX Runtime (as in merge-and-onnx); TorchScript (.pt) and torch.export (.pt2) artifacts are
    reloaded in a fresh Python process and compared with PyTorch eager at shapes other than the export's. Both
    torch formats are exported without past key/values. Exit code 1 and nothing written when a check fails.

    \b
    Examples:
      lora-export export ./smollm2-caps -o ./smollm2-caps-onnx
      lora-export export ./smollm2-caps -o ./smollm2-caps-pt2 --format pt2
    """
    from ..exporting.onnx import OnnxOptions
    from ..exporting.pipeline import ExportOptions
    from ..exporting.pipeline import export as run
    from ..render.text import pipeline_text

    onnx = OnnxOptions(opset=opset, optimize=optimize, with_past=not no_past, max_new_tokens=max_new_tokens)
    quant = options.quant_options(**quantization)
    if quantization["precision"] in ("fp32", "fp16"):  # export keeps the folder's dtype: say so rather than ignore it
        from ..verification.verify import stored_dtype

        want, have = {"fp32": "float32", "fp16": "float16"}[quant.precision], stored_dtype(merged_dir)
        if want != have:
            raise click.UsageError(f"--precision {quant.precision}: {merged_dir} is {have}; merge with --dtype {want}")
    export_options = ExportOptions(format=fmt, onnx=onnx, overwrite=overwrite, exporter=exporter, quant=quant)
    result = run(merged_dir, out_dir, export_options, log=_echo_err)
    conclude(result.report, pipeline_text(result.report), "lora-export export", json_file, junit_file)
