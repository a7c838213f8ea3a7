"""`lora-export package --check`: re-verify a package from its manifest — every file's sha256 and size, then the
stored references re-run where each layout runs (ONNX Runtime for the dynamo graphs, GenAI for the builder's)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .compare import Case, compare, metrics_check
from .errors import InputError
from .exporters.onnx_check import session
from .package_genai import rerun_references
from .records import Check, MergedVariant, PackageCheck, PackageManifest
from .records.package import PACKAGE_FIX
from .shared_graph import run_with_adapter
from .workers import sha256_file


def compare_logits(name: str, ref: np.ndarray, got: np.ndarray, mask: np.ndarray, dtype: str = "float32") -> Check:
    case = Case(name, {"attention_mask": torch.from_numpy(mask)})
    m = compare(case, "logits", torch.from_numpy(ref).float(), torch.from_numpy(np.asarray(got)).float())
    return metrics_check(name, "ONNX Runtime vs the stored reference logits (PyTorch)", "runtime", dtype, [m])


def check_package(out_dir: Path | str) -> PackageCheck:
    """Re-verify a package from its manifest: every file's sha256 and size, then the numbers in ONNX Runtime."""
    out_dir = Path(out_dir)
    manifest = PackageManifest.load(out_dir)
    problems = []
    for f in manifest.files:
        p = out_dir / f.name
        if p.is_symlink() or not p.is_file() or not p.resolve().is_relative_to(out_dir.resolve()):
            problems.append(f"{f.name}: missing, or not a regular file inside the package")
        elif p.stat().st_size != f.size or sha256_file(p) != f.sha256:
            problems.append(f"{f.name}: sha256/size differ from the manifest")
    listed = {f.name for f in manifest.files}
    extra = sorted(
        p.relative_to(out_dir).as_posix()
        for p in out_dir.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.name != PackageManifest.NAME
    )
    problems += [f"{name}: not in the manifest" for name in extra if name not in listed]
    n = len(manifest.files)
    files = Check(
        f"files (sha256, size of {n})",
        "every file against the manifest",
        "",
        not problems,
        f"{len(problems)} problem(s)" if problems else "every file as in the manifest",
        tuple(problems),
    )
    if problems:  # numbers only when the bytes are what was verified
        return PackageCheck(str(out_dir), n, (files,))
    return PackageCheck(str(out_dir), n, (files, *_rerun_references(out_dir, manifest)))


def _rerun_references(out_dir: Path, manifest: PackageManifest) -> list[Check]:
    checks = []
    if manifest.shared is not None and manifest.shared.exporter == "genai":
        adapters = {n: out_dir / f for n, f in manifest.shared.adapters.items()}
        check = rerun_references(out_dir / "shared", out_dir / "shared" / "reference.npz", adapters)
        checks.append(replace(check, name="shared + every adapter, in GenAI"))
    elif manifest.shared is not None:
        ref, feeds = _read_reference(out_dir / "shared" / "reference.npz")
        sess = _packaged_session(out_dir / manifest.shared.graph)
        got = run_with_adapter(sess, feeds, None, ["logits"])[0]
        checks.append(compare_logits("shared, no adapter", ref["logits:__base__"], got, feeds["attention_mask"]))
        for name, file in manifest.shared.adapters.items():
            got = _run_packaged_adapter(sess, feeds, out_dir / file)
            checks.append(
                compare_logits(f"shared + {Path(file).name}", ref[f"logits:{name}"], got, feeds["attention_mask"])
            )
    for name, info in manifest.merged.items():
        checks.append(replace(rerun_merged(out_dir, name, info), name=f"merged {name}"))
    return checks


def rerun_merged(out_dir: Path, name: str, info: MergedVariant) -> Check:
    """A merged variant's stored reference, re-run where its graph runs (ONNX Runtime, or GenAI for the builder's)."""
    path = out_dir / info.folder / "reference.npz"
    if info.exporter == "genai":
        return rerun_references(out_dir / info.folder, path, {}, info.dtype)
    ref, feeds = _read_reference(path)
    got = _packaged_session(out_dir / info.graph).run(["logits"], feeds)[0]
    return compare_logits(name, ref[f"logits:{name}"], got, feeds["attention_mask"], info.dtype)


def _run_packaged_adapter(sess: Any, feeds: dict[str, np.ndarray], path: Path) -> np.ndarray:
    """The shared graph with a package's .onnx_adapter; one ONNX Runtime cannot read is bad input naming it."""
    import onnxruntime as ort

    try:
        ort.LoraAdapter().Load(str(path))
    except Exception as e:  # ONNX Runtime's RuntimeError from its adapter parser
        first = str(e).splitlines()[0].rsplit(") ", 1)[-1][:160] if str(e) else type(e).__name__
        raise InputError(f"{path}: ONNX Runtime cannot read this adapter ({first}); {PACKAGE_FIX}") from None
    return run_with_adapter(sess, feeds, path, ["logits"])[0]


def _packaged_session(path: Path) -> Any:
    """A package's graph in ONNX Runtime; one that does not load (damaged under a manifest that hashes it) is bad
    input naming the file, not a crash."""
    try:
        return session(path)
    except Exception as e:  # ONNX Runtime raises its own exception types for an unreadable model
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise InputError(f"{path}: ONNX Runtime cannot load it ({first}); {PACKAGE_FIX}") from None


def _read_reference(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A dynamo layout's reference.npz: every array, and the inputs among them."""
    try:
        with np.load(path) as archive:
            ref = {k: archive[k] for k in archive.files}
    except Exception as e:  # a damaged archive under a manifest that hashes it: the package was built so
        raise InputError(f"{path}: cannot read the reference outputs ({e}); {PACKAGE_FIX}") from None
    missing = [k for k in ("input:attention_mask",) if k not in ref]
    if missing:
        raise InputError(f"{path}: the reference outputs lack {missing[0]}; {PACKAGE_FIX}")
    return ref, {k.split(":", 1)[1]: v for k, v in ref.items() if k.startswith("input:")}
