"""variants.yaml (or .json): the task variants of a package, each one or more adapters with weights, read and checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.errors import InputError
from ..io.jsonio import read_json_strict, read_yaml
from ..io.paths import shorten

NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
MAX_NAME = 100  # a variant's name is a folder and file name (NAME.onnx_adapter, .NAME.partial-…): well under 255 bytes


@dataclass(frozen=True)
class Variant:
    name: str
    adapters: list[tuple[Path, float]]
    dtype: str


def read_variants(path: Path) -> list[Variant]:
    """variants.yaml (or .json): {variants: {name: {adapters: [path | {path, weight}], dtype?}}}; paths relative to the file."""
    if not path.is_file():
        raise InputError(f"{path} does not exist: give a variants.yaml listing the task variants")
    fix = "see `lora-export package --help` for the format"
    if path.suffix in (".yaml", ".yml"):
        data = read_yaml(path, fix)
    else:
        data = read_json_strict(path, fix)
    if not isinstance(data, dict) or not isinstance(data.get("variants"), dict) or not data["variants"]:
        raise InputError(f"{path}: expected a top-level `variants:` mapping of names to {{adapters: [...]}}")
    out = []
    for name, spec in data["variants"].items():
        where = f"{path}: variant {name!r}"
        if not isinstance(name, str) or not name or set(name) - NAME_OK or name.startswith("."):
            raise InputError(f"{where}: names become file names: use letters, digits, '-', '_' and '.'")
        if len(name) > MAX_NAME:
            raise InputError(f"{path}: variant {shorten(name, 40)!r}: names become file names: use at most {MAX_NAME} "
                             "characters")  # fmt: skip
        twin = next((n for n, _ in ((v.name, v) for v in out) if n.lower() == name.lower()), None)
        if twin is not None:
            raise InputError(f"{where}: the same name as {twin!r} up to case, which is one folder on macOS and "
                             "Windows: rename one")  # fmt: skip
        if not isinstance(spec, dict) or not isinstance(spec.get("adapters"), list) or not spec["adapters"]:
            raise InputError(f"{where}: needs `adapters:`, a list of paths or {{path, weight}}")
        unknown = set(spec) - {"adapters", "dtype"}
        if unknown:
            raise InputError(f"{where}: unknown field(s) {sorted(unknown)}: only `adapters` and `dtype`")
        adapters = []
        for item in spec["adapters"]:
            if isinstance(item, str):
                item = {"path": item}
            if not isinstance(item, dict) or not isinstance(item.get("path"), str) or set(item) - {"path", "weight"}:
                raise InputError(f"{where}: each adapter is a path or {{path: ..., weight: ...}}, found {item!r}")
            weight = item.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight):
                raise InputError(f"{where}: weight must be a finite number, found {weight!r}")
            adapters.append((_adapter_folder(path, where, item["path"]), float(weight)))
        dtype = spec.get("dtype", "auto")
        if dtype not in ("auto", "float32", "float16"):
            raise InputError(
                f"{where}: dtype must be auto, float32 or float16 (bfloat16 cannot run in ONNX Runtime's CPU provider), found {dtype!r}"
            )
        out.append(Variant(name, adapters, dtype))
    return out


def _adapter_folder(path: Path, where: str, given: str) -> Path:
    """A variant's adapter: a folder relative to the variants file, or — when no such folder exists — a Hub address
    (org/name[@revision]) resolved through the cache (lora_export.model.hub)."""
    from ..io.paths import probe
    from ..model import hub

    p = probe((path.parent / given).expanduser(), f"{where}: adapter").resolve()
    if p.is_dir():
        return p
    if hub.parse_address(given) is None:
        raise InputError(f"{where}: adapter folder {given} not found (paths are relative to {path.parent})")
    try:
        return hub.resolve_address(given, "adapter")  # a folder is relative to the file, not the working folder
    except InputError as e:
        raise InputError(
            f"{where}: adapter folder {given} not found (paths are relative to {path.parent}); as a Hub address: {e}"
        ) from None
