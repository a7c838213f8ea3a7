"""`lora-export swap`: task switching on a merged checkpoint, W − w_A·ΔW_A + ΔW_B (the paper's task switch).

It is the streaming merge with weights (−w_A, +1): ΔW in fp32, added in fp32, cast once. It refuses unless the merged
folder's manifest records ADAPTER_A (by the sha256 of its weights) as merged, and refuses variants whose delta
depends on the weight it is applied to (DoRA) or that replace weights (modules_to_save, trained biases): those
cannot be subtracted. The result is compared with a fresh merge of ADAPTER_B into the original base when the
manifest's base is still there (exact in fp32 up to rounding; bounded by the cast in half precision).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from .adapters import load_adapter
from .errors import InputError, UnsupportedError
from .merge import MergeOptions, merge
from .tensors import TensorStore, read_json_object


def _swappable(path: Path, role: str) -> Any:
    adapter = load_adapter(path)
    for name, m in adapter.modules.items():
        if m.magnitude is not None:
            raise UnsupportedError(f"{path}: {name} is DoRA; its delta depends on the weight it is applied to, so it cannot be {role} by addition")
    if adapter.replacements:
        raise UnsupportedError(f"{path}: replaces {next(iter(adapter.replacements))} (modules_to_save or trained bias); a replacement cannot be {role} by addition")
    return adapter


def _max_diff(a_dir: Path, b_dir: Path) -> dict[str, Any]:
    a = TensorStore.open_safetensors(sorted(a_dir.glob("*.safetensors")))
    b = TensorStore.open_safetensors(sorted(b_dir.glob("*.safetensors")))
    worst, worst_name, worst_rel = 0.0, None, 0.0
    try:
        for name in a.names():
            x, y = a.read(name).float(), b.read(name).float()
            d = float((x - y).abs().max()) if x.numel() else 0.0
            if d > worst:
                worst, worst_name, worst_rel = d, name, d / max(float(y.abs().max()), 1e-30)
    finally:
        a.close()
        b.close()
    return {"max_abs": worst, "tensor": worst_name, "max_rel": worst_rel}


def swap(merged_dir: Path | str, remove: Path | str, add: Path | str, out_dir: Path | str, dtype: str = "auto", overwrite: bool = False) -> dict[str, Any]:
    merged_dir, remove, add, out_dir = Path(merged_dir), Path(remove), Path(add), Path(out_dir)
    manifest_path = merged_dir / "lora_export.json"
    if not manifest_path.is_file():
        raise InputError(f"{merged_dir} has no lora_export.json: only folders merged by lora-export record what was merged into them")
    manifest = read_json_object(manifest_path, "", fix=f": {merged_dir} was not written by lora-export merge, or its manifest was edited")
    if not isinstance(manifest.get("adapters"), list) or not all(isinstance(x, dict) and isinstance(x.get("files"), list) for x in manifest["adapters"]) \
            or not isinstance(manifest.get("base"), dict):
        raise InputError(f"{manifest_path}: damaged manifest (no `adapters` list or `base`): swap needs the manifest lora-export merge wrote")
    a = _swappable(remove, "removed")
    _swappable(add, "added")
    recorded = [x for x in manifest["adapters"] if any(f["sha256"] == a.sha256 for f in x["files"])]
    if not recorded:
        raise InputError(f"{remove} ({a.weights_file.name} sha256 {a.sha256[:12]}…) is not recorded as merged into {merged_dir}: "
                         "swapping it out would subtract a delta that was never added")
    if len(manifest["adapters"]) > 1:
        raise UnsupportedError(f"{merged_dir} holds {len(manifest['adapters'])} adapters; swap handles a folder with exactly one")
    weight_a = float(recorded[0]["weight"])
    result = merge(merged_dir, [remove, add], out_dir, MergeOptions(dtype=dtype, weights=(-weight_a, 1.0), overwrite=overwrite, progress=False))
    dtypes = result.manifest["output"]["dtype"]
    out_dtype = dtypes[0] if isinstance(dtypes, list) and len(dtypes) == 1 else dtypes if isinstance(dtypes, str) else "auto"
    report: dict[str, Any] = {"removed": {"path": str(remove), "weight": weight_a}, "added": {"path": str(add), "weight": 1.0},
                              "output": str(out_dir), "dtype": out_dtype}
    base = Path(manifest["base"]["path"])
    if (base / "config.json").is_file():
        with tempfile.TemporaryDirectory(prefix="lora-export-swap-") as tmp:
            fresh = merge(base, [add], Path(tmp) / "fresh", MergeOptions(dtype=out_dtype, progress=False))
            report["vs_fresh_merge"] = {"base": str(base), **_max_diff(out_dir, fresh.output)}
    else:
        report["vs_fresh_merge"] = None
    result.manifest["swap"] = report
    (out_dir / "lora_export.json").write_text(json.dumps(result.manifest, indent=2, default=str) + "\n")
    return report


__all__ = ["swap"]
