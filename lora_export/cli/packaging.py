"""`lora-export package`: build a package of task variants, a part of one (--only), join parts (--assemble), or
check one (--check)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from . import options
from .main import _echo_err, conclude, handle_errors, main


@main.command()
@click.argument("target", type=options.EXISTING_DIR, metavar="BASE | PACKAGE_DIR | PARTS_DIR")  # BASE: or a Hub address
@click.option(
    "--variants", "variants_file", type=options.INPUT_FILE, help="variants.yaml (or .json) naming each task variant."
)
@click.option(
    "-o", "--output", "out_dir", type=options.EXISTING_DIR, help="Folder to write (must not exist, unless --overwrite)."
)
@click.option(
    "--mode",
    type=click.Choice(["merged", "shared", "both"]),
    default="both",
    show_default=True,
    help="merged: one merged ONNX model per variant; shared: one base graph + one .onnx_adapter per variant.",
)
@click.option(
    "--check",
    "check",
    is_flag=True,
    help="Re-verify the package at PACKAGE_DIR from its manifest (hashes, then numbers).",
)
@click.option(
    "--only",
    "only",
    metavar="NAME",
    help="Build one variant's part of the package (one CI job per variant); join the parts with --assemble.",
)
@click.option(
    "--assemble",
    "assemble",
    is_flag=True,
    help="Join the parts in PARTS_DIR/*/ (package --only NAME, one per variant) into one package at -o, checked.",
)
@click.option(
    "--workers",
    "workers",
    type=click.IntRange(min=1),
    metavar="N",
    help="Merged variants checked at once, each in its own process (default: as many as the cores and the memory "
    "allow, for models of 50M parameters and up; 1: one after another in this process).",
)
@options.overwrite
@options.exporter
@options.strict_base
@click.option("--junit", "junit_file", type=options.REPORT_FILE, help="With --check: write the checks as JUnit XML.")
@options.quantization
@handle_errors
def package(
    target: Path,
    variants_file: Path | None,
    out_dir: Path | None,
    mode: str,
    check: bool,
    only: str | None,
    assemble: bool,
    workers: int | None,
    overwrite: bool,
    exporter: str,
    strict_base: bool,
    junit_file: Path | None,
    **quantization: Any,
) -> None:
    """Package task variants (one base, many adapters) for ONNX Runtime, or check a package before rollout.

    variants.yaml:

    \b
      variants:
        summarize:
          adapters: [my-org/smollm2-summarize@v3]       # a Hub address, or a folder
        support-chat:
          adapters:
            - {path: adapters/chat, weight: 0.7}
            - {path: adapters/tone, weight: 0.3}
          dtype: float16

    --mode merged writes merged/NAME/ (merge-and-onnx per variant, several at once with --workers); --mode shared
    writes shared/model.onnx, whose LoRA A/B are overridable inputs with zero-rank defaults, and
    shared/NAME.onnx_adapter per variant: a client picks a task per request (og.Adapters, or ONNX Runtime's
    RunOptions.add_active_adapter); without one the graph is the base. Every variant is checked against PyTorch;
    manifest.json lists every file with its sha256 and the storage each layout takes. --check re-hashes every file,
    then re-runs the stored reference inputs in ONNX Runtime; exit 1 on any mismatch.

    A fleet: --only NAME builds that variant's part (the shared graph still carries every variant's LoRA inputs);
    --assemble PARTS_DIR -o OUT joins the parts (same variants file, base and lora-export) into one package, whose
    graphs and adapter files are those of a one-run build, byte for byte, and checks it as --check does.

    \b
    Examples:
      lora-export package HuggingFaceTB/SmolLM2-135M-Instruct --variants variants.yaml -o ./tasks
      lora-export package ./smollm2 --variants variants.yaml -o ./tasks --mode shared
      lora-export package --check ./smollm2-tasks --junit package-check.xml
      lora-export package ./smollm2 --variants variants.yaml -o ./caps-part --only caps
      lora-export package --assemble parts -o ./tasks
    """
    from ..package.build import PackageOptions

    _refuse_mixed(check, assemble, bool(only or assemble or workers), workers, junit_file is not None)
    if check:
        return _package_check(target, junit_file)
    if assemble:
        return _package_assemble(target, out_dir, overwrite, only, variants_file)
    if variants_file is None or out_dir is None:
        raise click.UsageError("give --variants FILE and -o OUT_DIR (or --check PACKAGE_DIR)")
    quant = options.quant_options(**quantization)
    settings = PackageOptions(mode, exporter, overwrite, strict_base, quant, only, workers)
    _package_build(target, variants_file, out_dir, settings)


def _refuse_mixed(check: bool, assemble: bool, builds: bool, workers: int | None, junit: bool) -> None:
    if assemble and workers:
        raise click.UsageError("--assemble joins built parts: --workers applies when a package is built")
    if junit and not check:
        raise click.UsageError("--junit applies with --check")
    if check and builds:
        raise click.UsageError("--check verifies a package: leave out --only, --assemble and --workers")


def _package_build(target: Path, variants_file: Path, out_dir: Path, settings: Any) -> None:
    if settings.quant.precision == "fp16":
        raise click.UsageError("package --precision fp16: give each variant `dtype: float16` in variants.yaml")
    from ..model.hub import resolve
    from ..package.build import package as run
    from ..render.text import package_text

    manifest = run(resolve(str(target), "base", log=_echo_err), variants_file, out_dir, settings, log=_echo_err)
    conclude(manifest, package_text(manifest, out_dir), "lora-export package")


def _package_assemble(
    parts_dir: Path, out_dir: Path | None, overwrite: bool, only: str | None, variants_file: Path | None
) -> None:
    from ..io.errors import InputError
    from ..package.assemble import assemble
    from ..render.text import package_text

    if only or variants_file:
        raise click.UsageError("--assemble joins built parts: leave out --only and --variants")
    if out_dir is None:
        raise click.UsageError("--assemble PARTS_DIR needs -o OUT_DIR, the package to write")
    if not parts_dir.is_dir():
        raise InputError(f"{parts_dir}: no such folder of parts (--assemble reads PARTS_DIR/*/manifest.json)")
    manifest = assemble(parts_dir, out_dir, overwrite, log=_echo_err)
    conclude(manifest, package_text(manifest, out_dir), "lora-export package --assemble")


def _package_check(target: Path, junit_file: Path | None) -> None:
    from ..io.errors import InputError
    from ..package.check import check_package
    from ..render.text import package_check_text

    if not target.is_dir():
        raise InputError(f"{target}: no such package folder (--check reads PACKAGE_DIR/manifest.json)")
    result = check_package(target)
    conclude(result, package_check_text(result), "lora-export package --check", None, junit_file)
