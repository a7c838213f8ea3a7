"""A fleet build: `package --only NAME` per variant in separate processes (one CI job each), `package --assemble`
joining the parts — the same graphs and adapter files, byte for byte, as one run, and a package `--check` passes;
parts that are not parts of one package are refused, naming the part."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_adapter
from test_genai_builder import base  # noqa: F401  (the fixture: a tiny LLaMA the builder builds)

from lora_export.cli import main
from lora_export.records import PackageManifest

pytestmark = pytest.mark.slow
SHIPPED = (".onnx", ".onnx.data", ".onnx_adapter", "common.data")  # the graphs and adapters a runtime loads


def shipped(package: Path) -> dict[str, str]:
    return {
        p.relative_to(package).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in package.rglob("*")
        if p.is_file() and p.name.endswith(SHIPPED)
    }


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """lora-export in a process of its own, as a CI job runs it."""
    return subprocess.run([sys.executable, "-m", "lora_export", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def fleet(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:  # noqa: F811
    """Three variants of the tiny LLaMA: the one-run package, and its three parts built in three processes."""
    root = tmp_path_factory.mktemp("fleet")
    one = make_adapter(base, root / "one", target_modules=["q_proj", "v_proj"])
    two = make_adapter(base, root / "two", seed=1, target_modules=["k_proj", "down_proj"])
    three = make_adapter(base, root / "three", seed=2, target_modules=["o_proj", "gate_proj", "up_proj"])
    variants = root / "variants.yaml"
    variants.write_text(
        f"variants:\n  one: {{adapters: [{one}]}}\n  two: {{adapters: [{two}]}}\n"
        f"  three: {{adapters: [{{path: {three}, weight: 0.5}}, {{path: {one}, weight: 0.5}}]}}\n"
    )
    whole = root / "whole"
    done = cli("package", str(base), "--variants", str(variants), "-o", str(whole))
    assert done.returncode == 0, done.stderr
    for name in ("one", "two", "three"):
        done = cli("package", str(base), "--variants", str(variants), "-o", str(root / "parts" / name), "--only", name)
        assert done.returncode == 0, done.stderr
    return whole, root / "parts", variants


def test_assembled_package_is_the_one_run_build(fleet: tuple[Path, Path, Path], tmp_path: Path) -> None:
    whole, parts, _ = fleet
    part = PackageManifest.load(parts / "two")
    assert part.part is not None and part.part.only == "two" and list(part.variants) == ["two"]
    assert set(part.shared.adapters) == {"two"} and set(part.merged) == {"two"}  # type: ignore[union-attr]
    out = tmp_path / "pkg"
    r = CliRunner().invoke(main, ["package", "--assemble", str(parts), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert shipped(out) == shipped(whole) and len(shipped(out)) == 2 + 3 + 3 * 3
    manifest = PackageManifest.load(out)
    assert manifest.part is None and list(manifest.variants) == ["one", "two", "three"]
    assert set(manifest.shared.adapters) == {"one", "two", "three"}  # type: ignore[union-attr]
    names = [c.name for c in manifest.checks]
    assert "assembled: shared + every adapter, in GenAI" in names and "assembled: merged three" in " ".join(names)
    assert all(c.passed for c in manifest.checks)
    # one file on disk for the base's tensors, as in a one-run build
    inode = (out / "shared" / "model.onnx.data").stat().st_ino
    assert {(out / "merged" / n / "common.data").stat().st_ino for n in ("one", "two", "three")} == {inode}
    assert json.loads((out / "manifest.json").read_text())["merged_sharing"]["saved_bytes"] > 0
    r = CliRunner().invoke(main, ["package", "--check", str(out)])
    assert r.exit_code == 0, r.output


def test_parts_that_are_not_one_package_are_refused(fleet: tuple[Path, Path, Path], tmp_path: Path) -> None:
    whole, parts, _ = fleet

    def refused(folder: Path, *fragments: str) -> None:
        r = CliRunner().invoke(main, ["package", "--assemble", str(folder), "-o", str(tmp_path / "out")])
        errors = [line for line in r.output.splitlines() if line.startswith("Error: ")]
        assert r.exit_code == 2 and len(errors) == 1, r.output
        assert all(f in errors[0] for f in fragments), errors[0]
        assert not (tmp_path / "out").exists()

    missing = tmp_path / "missing"
    shutil.copytree(parts, missing, ignore=shutil.ignore_patterns("three"))
    refused(missing, "no part for ['three']", "--only three")
    twice = tmp_path / "twice"
    shutil.copytree(parts, twice)
    shutil.copytree(parts / "two", twice / "two-again")
    refused(twice, "'two' again")
    whole_in = tmp_path / "whole-in"
    shutil.copytree(parts, whole_in)
    shutil.copytree(whole, whole_in / "zz-whole")
    refused(whole_in, "a whole package, not a part")
    other = tmp_path / "other"
    shutil.copytree(parts, other)
    manifest = json.loads((other / "one" / "manifest.json").read_text())
    manifest["part"]["variants"] = ["one", "two"]
    (other / "one" / "manifest.json").write_text(json.dumps(manifest))
    refused(other, "build every part from the same variants file")
    changed = tmp_path / "changed"
    shutil.copytree(parts, changed)
    graph = changed / "three" / "shared" / "model.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    refused(changed, "differs from its manifest")
    (tmp_path / "no-parts").mkdir()
    refused(tmp_path / "no-parts", "no part (PARTS_DIR/*/manifest.json")


def test_only_names_a_variant(fleet: tuple[Path, Path, Path], base: Path, tmp_path: Path) -> None:  # noqa: F811
    _, _, variants = fleet
    r = CliRunner().invoke(
        main, ["package", str(base), "--variants", str(variants), "-o", str(tmp_path / "p"), "--only", "four"]
    )
    assert r.exit_code == 2 and "no variant 'four' (--only)" in r.output and not (tmp_path / "p").exists()
    r = CliRunner().invoke(main, ["package", "--check", str(tmp_path), "--only", "one"])
    assert r.exit_code == 2 and "leave out --only" in r.output


def test_variants_checked_in_worker_processes_build_the_same_package(
    fleet: tuple[Path, Path, Path],
    base: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """--workers 2: the merged variants merged, verified and checked two at a time, each in its own process — the
    same graphs and adapter files as one process's build, every check passed, and --check passes."""
    whole, _, variants = fleet
    out = tmp_path / "workers"
    done = cli("package", str(base), "--variants", str(variants), "-o", str(out), "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert "3 variants, checked in 2 worker processes" in done.stderr
    assert {line.split("]")[0] for line in done.stderr.splitlines() if line.startswith("[")} == {
        "[one",
        "[two",
        "[three",
    }
    assert shipped(out) == shipped(whole)
    manifest = PackageManifest.load(out)
    assert list(manifest.merged) == ["one", "two", "three"] and manifest.passed
    assert len({(out / "merged" / n / "common.data").stat().st_ino for n in manifest.merged}) == 1
    checked = cli("package", "--check", str(out))
    assert checked.returncode == 0, checked.stdout + checked.stderr
