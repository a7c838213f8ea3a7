"""`lora-export package --check`: re-verify a package from its manifest — every file's sha256 and size, then the
stored references re-run where each layout runs (ONNX Runtime for the dynamo graphs, GenAI for the builder's)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..io.hashing import sha256_file
from ..records import Check, PackageCheck, PackageManifest
from .genai import rerun_genai_references
from .references import compare_logits, packaged_session, read_reference, rerun_merged, run_packaged_adapter
from .shared_graph import run_with_adapter


def check_package(out_dir: Path | str) -> PackageCheck:
    """Re-verify a package from its manifest: every file's sha256 and size, then the numbers in ONNX Runtime."""
    out_dir = Path(out_dir)
    manifest = PackageManifest.load(out_dir)
    problems = []
    for f in manifest.files:
        p = out_dir / f.name
        problem = _not_inside(out_dir, f.name)
        if problem is not None:
            problems.append(f"{f.name}: {problem}")
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
    return PackageCheck(str(out_dir), n, (files, *_rerun_layouts(out_dir, manifest)))


def _not_inside(out_dir: Path, name: str) -> str | None:
    """Why the manifest's file `name` is not a regular file of the package as written, naming the link at fault (a
    package is checked as it lies: a link, even one that stays inside, is not what was hashed and shipped)."""
    path = out_dir
    for part in Path(name).parts:
        path = path / part
        if path.is_symlink():
            where = "the file" if path == out_dir / name else f"its folder {path.relative_to(out_dir)}"
            try:
                target = path.resolve(strict=True)
            except (RuntimeError, OSError):
                return f"{where} is a symbolic link loop or leads nowhere; a package holds its files, not links"
            leads = "elsewhere in" if target.is_relative_to(out_dir.resolve()) else "out of"
            return f"{where} is a symbolic link {leads} the package (to {target}); a package holds its files, not links"
    if not path.is_file():
        return "missing, or not a regular file (the manifest lists it)"
    return None


def _rerun_layouts(out_dir: Path, manifest: PackageManifest) -> list[Check]:
    """Each layout's stored references re-run where it runs: the shared graph with and without each adapter, and
    every merged variant."""
    checks = []
    if manifest.shared is not None and manifest.shared.exporter == "genai":
        adapters = {n: out_dir / f for n, f in manifest.shared.adapters.items()}
        check = rerun_genai_references(out_dir / "shared", out_dir / "shared" / "reference.npz", adapters)
        checks.append(replace(check, name="shared + every adapter, in GenAI"))
    elif manifest.shared is not None:
        ref, feeds = read_reference(out_dir / "shared" / "reference.npz")
        sess = packaged_session(out_dir / manifest.shared.graph)
        got = run_with_adapter(sess, feeds, None, ["logits"])[0]
        checks.append(compare_logits("shared, no adapter", ref["logits:__base__"], got, feeds["attention_mask"]))
        for name, file in manifest.shared.adapters.items():
            got = run_packaged_adapter(sess, feeds, out_dir / file)
            checks.append(
                compare_logits(f"shared + {Path(file).name}", ref[f"logits:{name}"], got, feeds["attention_mask"])
            )
    for name, info in manifest.merged.items():
        checks.append(replace(rerun_merged(out_dir, name, info), name=f"merged {name}"))
    return checks
