"""Unusable outputs (disks, files in the way, another run) and variants.yaml mistakes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    assert_one_error,
    assert_refused,
    copy_adapter,
    run_cli,
    run_merge,
)

from lora_export.io.outputs import output_lock

# ---------------------------------------------------------------------------------------------------------------------
# The output location: unusable disks, files in the way, another run


@contextlib.contextmanager
def small_disk(where: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A real file system of `size` (tmpfs) at `where`: the full or read-only disk the output lands on."""
    where.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        if read_only and os.geteuid() != 0:  # without mount rights a folder without write permission will do
            where.chmod(0o555)
            yield where
            where.chmod(0o755)
            return
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the disk-full/read-only cases need root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "--lazy", str(where)], check=True)


def test_read_only_output_disk(good: tuple[Path, Path], tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    assert run_merge(good[0], good[1], merged)[0] == 0
    with small_disk(tmp_path / "ro", "1m", read_only=True) as disk:
        code, output = run_merge(good[0], good[1], disk / "out")
        assert_one_error(code, output, disk / "out", (str(disk / "out"), "choose a writable output folder"))
        code, output = run_cli(
            ["verify", str(good[0]), str(good[1]), str(merged), "--max-new-tokens", "2", "--json", str(disk / "r.json")]
        )
        assert code == 2 and "Traceback" not in output, output
        errors = [line for line in output.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and str(disk / "r.json") in errors[0], output  # refused before any work
        assert "read-only file system" in errors[0] or "not writable" in errors[0], output


def test_full_output_disk_found_before_writing(good: tuple[Path, Path], tmp_path: Path) -> None:
    with small_disk(tmp_path / "small", "64k") as disk:
        code, output = run_merge(good[0], good[1], disk / "out")
        assert_one_error(code, output, disk / "out", (str(disk), "GB free", "needs", "free space on that disk"))
        assert list(disk.iterdir()) == []


def test_no_room_for_the_onnx_model(good: tuple[Path, Path], tmp_path: Path) -> None:
    """The merged weights fit, the ONNX model would not: merge-and-onnx says so before verifying and exporting."""
    merged_bytes = sum(f.stat().st_size for f in good[0].glob("*.safetensors"))
    with small_disk(tmp_path / "small", str(merged_bytes + 64 * 1024)) as disk:
        out = disk / "onnx"
        code, output = run_cli(["merge-and-onnx", str(good[0]), str(good[1]), "-o", str(out), "--max-new-tokens", "2"])
        assert_one_error(code, output, out, (f"the ONNX model in {out}", "GB free", "free space on that disk"))
        assert "verifying" not in output
        assert list(disk.iterdir()) == []


def test_disk_filling_up_while_exporting(good: tuple[Path, Path], tmp_path: Path) -> None:
    """ENOSPC in the middle of writing the ONNX model: one line, nothing left, no fallback to the other exporter."""
    merged = tmp_path / "merged"
    assert run_merge(good[0], good[1], merged)[0] == 0
    with small_disk(tmp_path / "small", "64k") as disk:
        out = disk / "onnx"
        code, output = run_cli(["export", str(merged), "-o", str(out), "--max-new-tokens", "2"])
        assert_one_error(code, output, out, (str(out), "No space left on device", "free space on that disk"))
        assert "falling back" not in output
        assert list(disk.iterdir()) == []


def test_full_temporary_folder_names_tmpdir(
    good: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify of a bfloat16 folder merges a float32 copy into a temporary folder: when that disk is full, say TMPDIR."""
    merged = tmp_path / "merged-bf16"
    assert run_merge(good[0], good[1], merged, "--dtype", "bfloat16")[0] == 0
    with small_disk(tmp_path / "small-tmp", "64k") as disk:
        monkeypatch.setattr(tempfile, "tempdir", str(disk))
        code, output = run_cli(["verify", str(good[0]), str(good[1]), str(merged), "--max-new-tokens", "2"])
        errors = [line for line in output.splitlines() if line.startswith("Error: ")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in output, output
        assert "merged32" in errors[0] and f"temporary files go to {disk}: set TMPDIR" in errors[0]


def test_output_is_a_file(good: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("mine")
    code, output = run_merge(good[0], good[1], out, "--overwrite")
    assert code == 2 and "is a file" in output and "Traceback" not in output
    assert out.read_text() == "mine"


def test_output_inside_an_adapter(good: tuple[Path, Path], tmp_path: Path) -> None:
    adapter = copy_adapter(good[1], tmp_path / "a")
    assert_refused(
        good[0], adapter, adapter / "merged", str(adapter), "overlaps the input", "choose an output folder outside"
    )


def test_another_run_holds_the_output(good: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    with output_lock(out):
        code, output = run_merge(good[0], good[1], out)
        assert code == 2 and f"pid {os.getpid()}" in output and "is writing" in output and "wait for it" in output
        assert not out.exists()
    code, output = run_merge(good[0], good[1], out)
    assert code == 0, output
    assert not (tmp_path / ".out.lock").exists()


# ---------------------------------------------------------------------------------------------------------------------
# variants.yaml


@pytest.mark.parametrize(
    "text,fragments",
    [
        ("variants: [", ("not valid YAML",)),
        ("tasks: {}", ("expected a top-level `variants:` mapping",)),
        ("variants:\n  a: {}\n", ("needs `adapters:`",)),
        ("variants:\n  a:\n    adapters: [nope]\n", ("adapter folder nope not found", "relative to")),
        (
            "variants:\n  a:\n    adapters:\n      - {path: ADAPTER, weight: high}\n",
            ("weight must be a finite number",),
        ),
        ("variants:\n  ../evil:\n    adapters: [ADAPTER]\n", ("names become file names",)),
        ("variants:\n  a:\n    adapters: [ADAPTER]\n    rank: 4\n", ("unknown field(s) ['rank']",)),
        (
            "variants:\n  a:\n    adapters: [ADAPTER]\n    dtype: bfloat16\n",
            ("dtype must be auto, float32 or float16",),
        ),
        (
            "variants:\n  a:\n    adapters: [{path: ADAPTER, scale: 2}]\n",
            ("each adapter is a path or {path: ..., weight: ...}",),
        ),
    ],
    ids=[
        "not-yaml",
        "no-variants",
        "no-adapters",
        "missing-folder",
        "bad-weight",
        "bad-name",
        "unknown-field",
        "bf16",
        "unknown-adapter-key",
    ],
)
def test_variants_file_mistakes(good: tuple[Path, Path], tmp_path: Path, text: str, fragments: tuple[str, ...]) -> None:
    f = tmp_path / "variants.yaml"
    f.write_text(text.replace("ADAPTER", str(good[1])))
    out = tmp_path / "pkg"
    code, output = run_cli(["package", str(good[0]), "--variants", str(f), "-o", str(out)])
    assert_one_error(code, output, out, (str(f), *fragments))
