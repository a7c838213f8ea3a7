"""`lora-export swap`: task switching on a merged checkpoint, W − w_A·ΔW_A + ΔW_B (the paper's task switch).

It is the streaming merge with weights (−w_A, +1): ΔW in fp32, added in fp32, cast once. It refuses unless the merged
folder's manifest records ADAPTER_A (by the sha256 of its weights) as merged, and refuses variants whose delta
depends on the weight it is applied to (DoRA) or that replace weights (modules_to_save, trained biases): those
cannot be subtracted. The result is compared with a fresh merge of ADAPTER_B into the original base when the
manifest's base is still there (exact in fp32 up to rounding; bounded by the cast in half precision).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..io.errors import InputError, UnsupportedError
from ..io.outputs import DiscardOutput, atomic_output_dir, check_output_location
from ..io.paths import probe
from ..io.tensorfiles import TensorStore
from ..model.adapters import load_adapter
from ..model.hub import folder_of
from ..records import Check, MergeManifest, SwapReport
from ..records.tolerances import tolerance
from .merge import MergeOptions, merge


def _swappable(path: Path, role: str) -> Any:
    adapter = load_adapter(path)
    for name, m in adapter.modules.items():
        if m.magnitude is not None:
            raise UnsupportedError(
                f"{path}: {name} is DoRA; its delta depends on the weight it is applied to, so it cannot be {role} by addition"
            )
    if adapter.replacements:
        raise UnsupportedError(
            f"{path}: replaces {next(iter(adapter.replacements))} (modules_to_save or trained bias); a replacement cannot be {role} by addition"
        )
    return adapter


def _max_diff(a_dir: Path, b_dir: Path) -> tuple[float, float, str | None]:
    """The largest |a − b| over all tensors, relative to the max |b| of its tensor: (max_abs, max_rel, tensor)."""
    a = TensorStore.open_safetensors(sorted(a_dir.glob("*.safetensors")))
    b = TensorStore.open_safetensors(sorted(b_dir.glob("*.safetensors")))
    worst_abs, worst_rel, worst_name = 0.0, 0.0, None
    try:
        if set(a.names()) != set(b.names()):
            return math.inf, math.inf, next(iter(set(a.names()) ^ set(b.names())))
        for name in a.names():
            x, y = a.read(name).float(), b.read(name).float()
            d = float((x - y).abs().max()) if x.numel() else 0.0
            rel = d / max(float(y.abs().max()), 1e-30) if x.numel() else 0.0
            if not rel <= worst_rel:  # NaN is the worst
                worst_abs, worst_rel, worst_name = d, rel, name
    finally:
        a.close()
        b.close()
    return worst_abs, worst_rel, worst_name


@dataclass(frozen=True)
class SwapOptions:
    """The output dtype (`auto`: the merged folder's) and whether to replace OUT_DIR."""

    dtype: str = "auto"
    overwrite: bool = False


def swap(
    merged_dir: Path | str,
    remove: Path | str,
    add: Path | str,
    out_dir: Path | str,
    options: SwapOptions = SwapOptions(),
) -> SwapReport:
    """W − w_A·ΔW_A + ΔW_B into OUT_DIR, compared with a fresh merge of B into the original base when it is still
    where the manifest says. When that comparison misses its tolerance, nothing is written and the report fails."""
    merged_dir, remove, add, out_dir = (
        Path(merged_dir),
        folder_of(remove, "adapter"),
        folder_of(add, "adapter"),
        Path(out_dir),
    )
    dtype, overwrite = options.dtype, options.overwrite
    manifest = MergeManifest.load(merged_dir)
    a = _swappable(remove, "removed")
    _swappable(add, "added")
    recorded = [x for x in manifest.adapters if a.sha256 in x.sha256s]
    if not recorded:
        raise InputError(
            f"{remove} ({a.weights_file.name} sha256 {a.sha256[:12]}…) is not recorded as merged into "
            f"{merged_dir}: swapping it out would subtract a delta that was never added"
        )
    if len(manifest.adapters) > 1:
        raise UnsupportedError(
            f"{merged_dir} holds {len(manifest.adapters)} adapters; swap handles a folder with exactly one"
        )
    weight_a = recorded[0].weight
    base = probe(Path(manifest.base_path), f"{merged_dir / MergeManifest.NAME} (its base)")
    if not (base / "config.json").is_file() and manifest.base_source:  # moved cache: the same commit, from the cache
        base = _cached_base(manifest.base_source, base)
    has_base = (base / "config.json").is_file()
    check_output_location(out_dir, [merged_dir, remove, add], overwrite)
    try:
        with atomic_output_dir(out_dir, overwrite) as tmp:
            staged = tmp / "swapped"
            result = merge(
                merged_dir, [remove, add], staged, MergeOptions(dtype=dtype, weights=(-weight_a, 1.0), progress=False)
            )
            out_dtype = result.manifest.single_dtype
            checks = (_vs_fresh_merge(base, add, staged, out_dtype),) if has_base else ()
            report = SwapReport(
                str(remove), weight_a, str(add), str(out_dir), out_dtype, str(base) if has_base else None, checks
            )
            if checks and not report.passed:
                raise DiscardOutput(report)
            for item in staged.iterdir():
                item.rename(tmp / item.name)
            staged.rmdir()
            replace(result.manifest, swap=report.to_dict()).write(tmp)
    except DiscardOutput as failed:
        return failed.report
    return report


def _vs_fresh_merge(base: Path, add: Path, swapped: Path, dtype: str) -> Check:
    with tempfile.TemporaryDirectory(prefix="lora-export-swap-") as tmp:
        fresh = merge(base, [add], Path(tmp) / "fresh", MergeOptions(dtype=dtype, progress=False))
        max_abs, max_rel, tensor = _max_diff(swapped, fresh.output)
    check_dtype = dtype if dtype in ("float32", "float16", "bfloat16") else "float32"
    tol = tolerance("swap", check_dtype)
    ok = max_rel <= tol.max_rel
    summary = f"max |Δ| {max_abs:.3g} ({max_rel:.3g} of max|W|, worst {tensor}; ≤ {tol.max_rel:.3g})"
    failures = () if ok else (f"{tensor}: differs from a fresh merge by {max_rel:.3g} of max|W| > {tol.max_rel:.3g}",)
    return Check(
        "vs fresh merge",
        f"swapped vs a fresh merge of {add} into {base}",
        check_dtype,
        ok,
        summary,
        failures,
        details={"max_abs": max_abs, "max_rel": max_rel, "tensor": tensor, "tolerance": f"swap/{check_dtype}"},
    )


__all__ = ["SwapOptions", "swap"]


def _cached_base(source: Any, recorded: Path) -> Path:
    """The recorded Hub base at its recorded commit, from the cache as it is now (offline: nothing downloaded)."""
    from ..model.hub import from_cache

    return from_cache(source.repo, source.commit, "base") or recorded
