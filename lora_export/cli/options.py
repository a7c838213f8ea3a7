"""The options and argument types several commands share, defined once: a command reads `@options.output`,
`type=options.MODEL_DIR`."""

from __future__ import annotations

import click

from .types import DEVICE, FINITE_FLOAT, FOLDER, INPUT_FILE, MODEL, REPORT, SIZE, THREADS

__all__ = ["DEVICE", "FINITE_FLOAT", "INPUT_FILE", "SIZE", "THREADS"]  # re-exported beside the names defined here

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
