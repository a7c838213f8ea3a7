"""`lora-export package --assemble PARTS_DIR`: one package from parts built on many machines (`package --only NAME`,
one CI job per variant). The parts must be parts of one package — the same variants, base, layouts and versions,
and the same shared graph, byte for byte — and hold each variant once. Their files are copied as they are (a merged
variant's common.data is linked to the shared graph's data again), the shared layout's references joined, and the
result is checked as `package --check` checks a package — every file's hash, then every reference re-run where its
layout runs — before it is put in place; a package that fails is not written."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..exporting.genai_reuse import COMMON, link_or_copy
from ..io.errors import InputError
from ..io.hashing import sha256_file
from ..io.outputs import DiscardOutput, atomic_output_dir, check_output_location
from ..records import Check, MergedVariant, PackageManifest, SharedLayout, files_of
from ..records.package import PACKAGE_FIX
from .build import storage_summary
from .check import check_package
from .merged import linked_sharing

SAME = ("base", "mode", "versions", "tolerances")  # what every part of one package agrees on


def assemble(
    parts_dir: Path, out_dir: Path, overwrite: bool = False, log: Callable[[str], None] = lambda s: None
) -> PackageManifest:
    """Join the parts under `parts_dir` (each PARTS_DIR/*/manifest.json) into `out_dir`; returns the manifest,
    passed or not (the checks of the joined package are its own)."""
    started = time.perf_counter()
    parts = read_parts(parts_dir)
    check_output_location(out_dir, [parts_dir], overwrite)
    try:
        with atomic_output_dir(out_dir, overwrite) as tmp:
            manifest = _join(parts, tmp, log)
            manifest.write(tmp)
            log(f"checking the assembled package ({len(manifest.files)} files) …")
            result = check_package(tmp)
            manifest = replace(_with_checks(manifest, result.checks), seconds=time.perf_counter() - started)
            if not result.passed:
                raise DiscardOutput(manifest)
            manifest.write(tmp)
            return manifest
    except DiscardOutput as failed:
        return failed.report


def read_parts(parts_dir: Path) -> dict[str, tuple[Path, PackageManifest]]:
    """The parts under `parts_dir`, by variant, in the package's order; refused unless they make one package."""
    found = sorted(p.parent for p in parts_dir.glob("*/manifest.json"))
    if not found:
        raise InputError(f"{parts_dir}: no part (PARTS_DIR/*/manifest.json, written by package --only NAME)")
    parts: dict[str, tuple[Path, PackageManifest]] = {}
    first: PackageManifest | None = None
    for folder in found:
        m = PackageManifest.load(folder)
        if m.part is None:
            raise InputError(f"{folder}: a whole package, not a part: build parts with package --only NAME")
        first = first or m
        for field in SAME:
            if getattr(m, field) != getattr(first, field):
                raise InputError(f"{folder}: its {field} differs from {found[0]}'s: parts of one package are built "
                                 "from one base, with one lora-export, in one mode")  # fmt: skip
        if m.part.variants != first.part.variants:  # type: ignore[union-attr]
            raise InputError(f"{folder}: a part of variants {list(m.part.variants)}, {found[0]} of "
                             f"{list(first.part.variants)}: build every part from the same variants file")  # type: ignore[union-attr]  # fmt: skip
        if m.part.only in parts:
            raise InputError(f"{folder}: variant {m.part.only!r} again (also in {parts[m.part.only][0]})")
        parts[m.part.only] = (folder, m)
    missing = [n for n in first.part.variants if n not in parts]  # type: ignore[union-attr]
    if missing:
        raise InputError(f"{parts_dir}: no part for {missing}: build it with package --only {missing[0]}")
    _same_shared_graph(parts)
    return {n: parts[n] for n in first.part.variants}  # type: ignore[union-attr]


def _same_shared_graph(parts: dict[str, tuple[Path, PackageManifest]]) -> None:
    """Every part's shared graph (model.onnx and its data), as recorded and as it lies on disk, is the same."""
    hashes: dict[str, str] = {}
    for folder, m in parts.values():
        for f in m.files:
            if f.name.startswith("shared/model.onnx"):
                if sha256_file(folder / f.name) != f.sha256:
                    raise InputError(f"{folder / f.name}: differs from its manifest; {PACKAGE_FIX} --only")
                if hashes.setdefault(f.name, f.sha256) != f.sha256:
                    raise InputError(f"{folder / f.name}: another shared graph than the other parts': parts of one "
                                     "package are built from one base by one lora-export")  # fmt: skip


def _join(parts: dict[str, tuple[Path, PackageManifest]], tmp: Path, log: Callable[[str], None]) -> PackageManifest:
    (first_dir, first), names = next(iter(parts.values())), list(parts)
    shared = None
    if first.shared is not None:
        log("joining the shared layout …")
        shutil.copytree(first_dir / "shared", tmp / "shared", ignore=shutil.ignore_patterns("*.onnx_adapter"))
        for folder, m in parts.values():
            for f in m.shared.adapters.values():  # type: ignore[union-attr]
                shutil.copy2(folder / f, tmp / f)
        _join_references([folder / "shared" / "reference.npz" for folder, _ in parts.values()], tmp / "shared")
        shared = _joined_shared({n: m.shared for n, (_, m) in parts.items()})  # type: ignore[misc]
    merged: dict[str, MergedVariant] = {}
    data = {f.sha256: tmp / f.name for f in first.files if f.name == "shared/model.onnx.data" and first.shared}
    for name, (folder, m) in parts.items():
        if name in m.merged:
            log(f"joining merged/{name} …")
            _copy_merged(folder, m, m.merged[name].folder, tmp, data)
            merged[name] = m.merged[name]
    sharing = linked_sharing(tmp, merged) if merged and all(m.reused_graph for m in merged.values()) else None
    variants = {n: m.variants[n] for n, (_, m) in parts.items()}
    return replace(first, variants=variants, shared=shared, merged=merged, merged_sharing=sharing, part=None,
                   storage=storage_summary(tmp, names, first.mode), files=files_of(tmp))  # fmt: skip


def _copy_merged(part: Path, manifest: PackageManifest, folder: str, package: Path, data: dict[str, Path]) -> None:
    """A part's merged/NAME folder. Its common.data (the base graph's data) is a hard link to a file of the package
    the parts recorded as the same bytes — the shared graph's data, or the first variant's common.data — as in a
    one-run build (`data`: sha256 → that file; the joined package is hashed and checked before it is put in place)."""
    shutil.copytree(part / folder, package / folder, ignore=shutil.ignore_patterns(COMMON))
    digest = next((f.sha256 for f in manifest.files if f.name == f"{folder}/{COMMON}"), None)
    if digest is None:
        return
    link_or_copy(data.get(digest, part / folder / COMMON), package / folder / COMMON)
    data.setdefault(digest, package / folder / COMMON)


def _join_references(paths: list[Path], shared: Path) -> None:
    """The parts' shared reference.npz joined: what two parts both hold (the inputs, the prompt, the base's outputs)
    must be equal, each variant's comes from its part."""
    joined: dict[str, np.ndarray] = {}
    for path in paths:
        with np.load(path) as archive:
            for key in archive.files:
                if key in joined and not np.array_equal(joined[key], archive[key]):
                    raise InputError(f"{path}: its {key} differs from another part's: not parts of one package")
                joined[key] = archive[key]
    np.savez(shared / "reference.npz", **joined)


def _joined_shared(layouts: dict[str, SharedLayout]) -> SharedLayout:
    """One shared layout from the parts': every adapter and its parameters, and each part's checks (the base, and
    its variant) named for the part that ran them."""
    first = next(iter(layouts.values()))
    adapters = {n: f for s in layouts.values() for n, f in s.adapters.items()}
    parameters = {n: p for s in layouts.values() for n, p in s.parameters.items()}
    notes = tuple(dict.fromkeys(n for s in layouts.values() for n in s.notes))
    checks = tuple(replace(c, name=f"part {name}: {c.name}") for name, s in layouts.items() for c in s.checks)
    return replace(first, adapters=adapters, parameters=parameters, notes=notes, checks=checks)


def _with_checks(manifest: PackageManifest, checks: tuple[Check, ...]) -> PackageManifest:
    """The assembled package's own checks (`package --check`: its files, then every layout re-run) recorded beside
    the parts': a merged variant's with it, the rest with the shared layout."""
    merged = dict(manifest.merged)
    extra = []
    for c in checks:
        name = c.name.removeprefix("merged ")
        if c.name.startswith("merged ") and name in merged:
            merged[name] = replace(merged[name], checks=(*merged[name].checks, replace(c, name=f"assembled: {c.name}")))
        else:
            extra.append(replace(c, name=f"assembled: {c.name}"))
    shared = manifest.shared
    if shared is not None:
        shared = replace(shared, checks=(*shared.checks, *extra))
    elif extra:  # merged only: the files check goes with the first variant
        first = next(iter(merged))
        merged[first] = replace(merged[first], checks=(*extra, *merged[first].checks))
    return replace(manifest, shared=shared, merged=merged)
