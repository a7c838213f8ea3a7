"""The options and argument types several commands share, defined once: a command reads `@options.output`,
`type=options.MODEL_DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .types import (
    DEVICE,
    FINITE_FLOAT,
    FOLDER,
    INPUT_FILE,
    MAX_MEMORY,
    MODEL,
    NEW_TOKENS,
    OPSET,
    PARAM_COUNT,
    REPORT,
    SECONDS,
    SEED,
    SIZE,
    THREADS,
)

__all__ = [  # re-exported beside the names defined here
    "DEVICE",
    "FINITE_FLOAT",
    "INPUT_FILE",
    "MAX_MEMORY",
    "NEW_TOKENS",
    "OPSET",
    "PARAM_COUNT",
    "SECONDS",
    "SEED",
    "SIZE",
    "THREADS",
]

EXISTING_DIR = FOLDER  # named for history: input folders are checked by the command, output folders may not exist
REPORT_FILE = REPORT
MODEL_DIR = MODEL  # a BASE or ADAPTER: a folder, or a Hub address org/name[@revision]

output = click.option(
    "-o",
    "--output",
    "out_dir",
    required=True,
    type=EXISTING_DIR,
    help="Folder to write (must not exist, unless --overwrite).",
)
weights = click.option(
    "-w",
    "--weight",
    "weights",
    multiple=True,
    type=FINITE_FLOAT,
    help="Weight of each adapter, in order (default 1.0 each).",
)
allow_pickle = click.option(
    "--allow-pickle", is_flag=True, help="Read pickled .bin weights, with torch.load(weights_only=True)."
)
overwrite = click.option(
    "--overwrite", is_flag=True, help="Replace OUT_DIR if it exists (only once the new one is complete and verified)."
)
junit = click.option(
    "--junit",
    "junit_file",
    type=REPORT_FILE,
    help="Also write the checks as JUnit XML (written even when a check fails).",
)
strict_base = click.option(
    "--strict-base",
    is_flag=True,
    help="Refuse an adapter whose adapter_config.json names another base than the one given (default: a warning).",
)
exporter = click.option(
    "--exporter",
    type=click.Choice(["dynamo", "genai", "auto"]),
    default="auto",
    show_default=True,
    help="ONNX exporter: dynamo (torch.onnx, any model; also runs in Optimum), genai (ONNX Runtime GenAI's model "
    "builder: fused attention, checked in GenAI), auto (genai for float32 decoders the builder builds when "
    "onnxruntime-genai is installed; when the builder fails or its graph fails its check here, dynamo with the same "
    "checks; the report says which shipped and why).",
)
json_report = click.option(
    "--json",
    "json_file",
    type=REPORT_FILE,
    help="Also write the report here as JSON (written even when a check fails).",
)
output_dtype = click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
    default="auto",
    show_default=True,
    help="Output dtype of floating tensors; auto keeps the input's (the base's, or the merged folder's for swap).",
)

_QUANTIZATION = (
    click.option(
        "--precision",
        default=None,
        metavar="fp32|fp16|int8|int4",
        help="Deployed precision. fp32/fp16: the merged dtype's graph (as --dtype float32/float16). int8/int4: weight-only "
        "MatMulNBits by ONNX Runtime GenAI's model builder, judged in GenAI on an evaluation text against PyTorch float32 "
        "with the adapters unmerged (quality: KL, same top-1, perplexity) and on whether the adapters' effect survived; "
        "exit 1 and nothing written when either fails. merge-and-onnx takes several (int4,int8,fp32): each is built and "
        "judged, one table compares them (sweep.md), and the smallest that passes is shipped.",
    ),
    click.option(
        "--block-size",
        type=click.Choice(["16", "32", "64", "128", "256"]),
        default="32",
        show_default=True,
        help="int8/int4: weights per quantization block.",
    ),
    click.option(
        "--quant-algorithm",
        type=click.Choice(["default", "rtn", "k_quant"]),
        default="default",
        show_default=True,
        help="int8/int4: the builder's algo_config (default and rtn: round to nearest; k_quant).",
    ),
    click.option(
        "--asymmetric", is_flag=True, help="int8/int4: unsigned weights with zero points (default symmetric)."
    ),
    click.option(
        "--accuracy-level",
        type=click.IntRange(1, 4),
        default=None,
        help="int8/int4: MatMulNBits' activation precision, 1 fp32 … 4 int8 (default: the builder's, 4 on CPU).",
    ),
    click.option(
        "--eval-text",
        type=INPUT_FILE,
        default=None,
        help="int8/int4: UTF-8 text that quality and the adapters' effect are measured on (default: a built-in held-out "
        "text of about 2,000 tokens); your in-domain text judges your fine-tune best.",
    ),
)


def quantization(command: Any) -> Any:
    """--precision and the int8/int4 options, for merge-and-onnx, export and package."""
    for option in reversed(_QUANTIZATION):
        command = option(command)
    return command


def quant_options(
    precision: str | None,
    block_size: str,
    quant_algorithm: str,
    asymmetric: bool,
    accuracy_level: int | None,
    eval_text: Any,
    several: bool = False,
) -> Any:
    """The QuantOptions of the command line (fp32 when --precision is not given); several precisions only where the
    command sweeps them (merge-and-onnx)."""
    from ..bench.sweep import parse_precisions
    from ..exporting.quantized import QuantOptions

    precisions = parse_precisions(precision) if precision is not None else ("fp32",)
    if len(precisions) > 1 and not several:
        raise click.UsageError(
            f"--precision {precision}: this command ships one precision (merge-and-onnx sweeps several)"
        )
    given = {"--block-size": block_size != "32", "--quant-algorithm": quant_algorithm != "default",
             "--asymmetric": asymmetric, "--accuracy-level": accuracy_level is not None, "--eval-text": eval_text}  # fmt: skip
    unused = [name for name, set_ in given.items() if set_]
    if unused and not {"int8", "int4"} & set(precisions):
        raise click.UsageError(f"{unused[0]} applies with --precision int8 or int4 (it would be ignored here)")
    return QuantOptions(
        precision=precisions[0],  # a sweep sets each in turn; the other options are shared
        block_size=int(block_size),
        algorithm=quant_algorithm,
        symmetric=not asymmetric,
        accuracy_level=accuracy_level,
        eval_text=eval_text,
    )


CHART_FORMATS = (".png", ".svg", ".pdf")  # what a chart is written as (matplotlib, by the name's suffix)


def chart_file(path: Path | None) -> Path | None:
    """A --plot file whose name says a format the chart is written in; another is refused at parse time."""
    if path is not None and path.suffix.lower() not in CHART_FORMATS:
        raise click.BadParameter(f"{path}: a chart is written as {', '.join(CHART_FORMATS)}: name it so")
    return path
