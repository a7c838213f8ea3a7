"""Broken files: safetensors byte by byte, base folders and indexes, hostile JSON and damaged manifests."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    A_KEY,
    B_KEY,
    assert_one_error,
    assert_refused,
    copy_adapter,
    run_cli,
    run_merge,
    write_raw_safetensors,
)
from safetensors.torch import load_file, save_file

# ---------------------------------------------------------------------------------------------------------------------
# Broken safetensors files, written byte by byte

ENTRY = {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 512]}


@pytest.mark.parametrize(
    "header,data,fragments",
    [
        (b"{not json at all", b"", ("header is not valid JSON",)),
        (b"[1, 2, 3]       ", b"", ("not a JSON object",)),
        ({A_KEY: ENTRY}, bytes(100), ("ends at byte 512 of the data, but the file holds 100: truncated",)),
        (
            {A_KEY: ENTRY, B_KEY: {"dtype": "F32", "shape": [32, 4], "data_offsets": [256, 768]}},
            bytes(768),
            ("overlap",),
        ),
        (
            {A_KEY: {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 256]}},
            bytes(256),
            ("needs 512 bytes but its offsets span 256",),
        ),
        (
            {A_KEY: {"dtype": "Q4", "shape": [4, 32], "data_offsets": [0, 64]}},
            bytes(64),
            ("dtype 'Q4', which this tool does not read",),
        ),
        ({A_KEY: {"dtype": "F32", "shape": [4, 32], "data_offsets": [16, 528]}}, bytes(528), ("a gap of 16 bytes",)),
        ({A_KEY: ENTRY}, bytes(600), ("88 bytes after the last tensor",)),
        (
            {A_KEY: {"dtype": "F32", "shape": [4, -32], "data_offsets": [0, 512]}},
            bytes(512),
            ("is not a list of sizes",),
        ),
        ({A_KEY: {"dtype": "F32", "shape": [4, 32], "data_offsets": [512, 0]}}, bytes(512), ("are not [begin, end]",)),
    ],
    ids=[
        "header-not-json",
        "header-not-object",
        "offsets-past-end",
        "overlapping-offsets",
        "dtype-shape-vs-bytes",
        "unknown-dtype",
        "gap",
        "trailing-bytes",
        "bad-shape",
        "bad-offsets",
    ],
)
def test_broken_safetensors(
    good: tuple[Path, Path], tmp_path: Path, header: dict | bytes, data: bytes, fragments: tuple[str, ...]
) -> None:
    adapter = copy_adapter(good[1], tmp_path / "a")
    f = adapter / "adapter_model.safetensors"
    write_raw_safetensors(f, header, data)
    assert_refused(good[0], adapter, tmp_path / "out", str(f), *fragments, "download or save the file again")


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03"], ids=["empty", "shorter-than-header-length"])
def test_too_short_safetensors(good: tuple[Path, Path], tmp_path: Path, content: bytes) -> None:
    base = tmp_path / "base"
    shutil.copytree(good[0], base)
    (base / "model.safetensors").write_bytes(content)
    assert_refused(
        base, good[1], tmp_path / "out", str(base / "model.safetensors"), "too short", "download or save the file again"
    )


def test_tensor_stored_in_two_shards(good: tuple[Path, Path], tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(good[0], base)
    t = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    names = sorted(t)
    save_file({k: t[k] for k in names[: len(names) // 2 + 1]}, base / "model-00001-of-00002.safetensors")
    save_file({k: t[k] for k in names[len(names) // 2 :]}, base / "model-00002-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in names[: len(names) // 2 + 1]}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in names[len(names) // 2 + 1 :]})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_refused(base, good[1], tmp_path / "out", "stored twice", "download the model again")


# ---------------------------------------------------------------------------------------------------------------------
# Base folders and their indexes


def sharded_base(good: tuple[Path, Path], tmp_path: Path, shard_name: str) -> Path:
    base = tmp_path / "base"
    shutil.copytree(good[0], base)
    weight_map = {k: shard_name for k in load_file(base / "model.safetensors")}
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return base


def test_index_symlink_out_of_the_folder(good: tuple[Path, Path], tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(good[0] / "model.safetensors", outside / "weights.safetensors")
    base = sharded_base(good, tmp_path, "model-00001-of-00001.safetensors")
    (base / "model-00001-of-00001.safetensors").symlink_to(outside / "weights.safetensors")
    assert_refused(base, good[1], tmp_path / "out", "symbolic link out of", "copy the file into the folder")


def test_hugging_face_cache_symlinks_are_followed(good: tuple[Path, Path], tmp_path: Path) -> None:
    """A hub cache snapshot links its files to ../../blobs/<hash>: that is not an escape."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    shutil.copytree(good[0], snap)
    shard = "model-00001-of-00001.safetensors"
    shutil.move(snap / "model.safetensors", repo / "blobs" / "0123abcd")
    (snap / shard).symlink_to(Path("../../blobs/0123abcd"))
    weight_map = {k: shard for k in load_file(repo / "blobs" / "0123abcd")}
    (snap / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    code, output = run_merge(snap, good[1], tmp_path / "out")
    assert code == 0, output


@pytest.mark.parametrize(
    "name", ["/etc/passwd", "sub/model.safetensors", ".."], ids=["absolute", "subfolder", "dotdot"]
)
def test_index_names_outside_plain_files(good: tuple[Path, Path], tmp_path: Path, name: str) -> None:
    base = sharded_base(good, tmp_path, name)
    assert_refused(base, good[1], tmp_path / "out", "model.safetensors.index.json", "only plain file names")


@pytest.mark.parametrize("text", ["{broken", '{"weight_map": ["a", "b"]}'], ids=["not-json", "weight-map-not-object"])
def test_index_unreadable(good: tuple[Path, Path], tmp_path: Path, text: str) -> None:
    base = tmp_path / "base"
    shutil.copytree(good[0], base)
    (base / "model.safetensors.index.json").write_text(text)
    assert_refused(
        base, good[1], tmp_path / "out", "model.safetensors.index.json", "not a valid index", "save the model again"
    )


def test_base_without_weights_or_config(good: tuple[Path, Path], tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(good[0], base)
    (base / "model.safetensors").unlink()
    assert_refused(base, good[1], tmp_path / "out", str(base), "has no model.safetensors")
    (base / "config.json").write_text("{")
    assert_refused(base, good[1], tmp_path / "out", "config.json", "not valid JSON")


def test_pickled_base_needs_flag(good: tuple[Path, Path], tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(good[0], base)
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    assert_refused(
        base, good[1], tmp_path / "out", "pytorch_model.bin", "--allow-pickle", "convert the model to safetensors"
    )


def test_non_finite_weight(good: tuple[Path, Path], tmp_path: Path) -> None:
    assert_refused(good[0], good[1], tmp_path / "out", "finite", extra=("-w", "nan"))


# ---------------------------------------------------------------------------------------------------------------------
# Hostile JSON and damaged manifests


def test_deeply_nested_json(good: tuple[Path, Path], tmp_path: Path) -> None:
    """JSON nested deeper than Python's recursion limit: an error line, not a RecursionError traceback."""
    adapter = copy_adapter(good[1], tmp_path / "a")
    (adapter / "adapter_config.json").write_text("[" * 100_000)
    assert_refused(good[0], adapter, tmp_path / "out", "adapter_config.json", "not valid JSON", "re-save the adapter")
    adapter = copy_adapter(good[1], tmp_path / "b")
    f = adapter / "adapter_model.safetensors"
    write_raw_safetensors(f, b"[" * 100_000, b"")
    assert_refused(
        good[0], adapter, tmp_path / "out", str(f), "header is not valid JSON", "download or save the file again"
    )


@pytest.mark.parametrize(
    "manifest,fragments",
    [
        ("{broken", ("manifest.json", "not valid JSON", "rebuild the package")),
        (json.dumps({"variants": {}}), ("damaged manifest", "field `files` is missing", "rebuild the package")),
        (json.dumps({"files": []}), ("damaged manifest", "field `files` lists no file", "rebuild the package")),
        (
            json.dumps({"files": [{"name": "x", "sha256": "0" * 64, "size": -1}]}),
            ("damaged manifest", "field `files[0].size` must be ≥ 0"),
        ),
        (
            json.dumps({"files": [{"name": "../../etc/passwd", "sha256": "0" * 64, "size": 1}]}),
            ("points outside its folder", "refusing"),
        ),
        (
            json.dumps(
                {
                    "files": [{"name": "shared/reference.npz", "sha256": "0" * 64, "size": 1}],
                    "shared": {
                        "graph": "shared/model.onnx",
                        "dtype": "float32",
                        "inputs": [],
                        "outputs": [],
                        "adapters": {"a": {"file": "a.onnx_adapter"}},
                        "checks": [],
                    },
                }
            ),
            ("does not list shared/model.onnx, which the checks need",),
        ),
    ],
    ids=["not-json", "no-files", "empty-files", "negative-size", "path-escape", "unhashed-graph"],
)
def test_package_check_damaged_manifest(tmp_path: Path, manifest: str, fragments: tuple[str, ...]) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "manifest.json").write_text(manifest)
    code, output = run_cli(["package", "--check", str(pkg), "--junit", str(tmp_path / "j.xml")])
    assert_one_error(code, output, tmp_path / "nothing-written", fragments)
    assert not (tmp_path / "j.xml").exists()


def test_swap_damaged_manifest(good: tuple[Path, Path], tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    assert run_merge(good[0], good[1], merged)[0] == 0
    (merged / "lora_export.json").write_text(json.dumps({"tool": "lora-export"}))
    code, output = run_cli(
        ["swap", str(merged), "--remove", str(good[1]), "--add", str(good[1]), "-o", str(tmp_path / "out")]
    )
    assert_one_error(code, output, tmp_path / "out", ("lora_export.json", "damaged manifest"))


def test_verify_base_config_broken(good: tuple[Path, Path], tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    assert run_merge(good[0], good[1], merged)[0] == 0
    base = tmp_path / "base"
    shutil.copytree(good[0], base)
    (base / "config.json").write_text("{")
    code, output = run_cli(["verify", str(base), str(good[1]), str(merged), "--json", str(tmp_path / "r.json")])
    assert_one_error(code, output, tmp_path / "r.json", ("config.json", "not valid JSON"))


def test_written_shard_that_does_not_read_back(
    good: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard the disk returns differently (simulated): the merge keeps nothing and says which file and why."""
    merge_module = importlib.import_module("lora_export.merging.stream")  # where the merge re-reads what it wrote
    monkeypatch.setattr(
        merge_module,
        "reread_shard",
        lambda path, shard, wf, rehash=False: [f"{wf.name}: 12 bytes on disk, wrote {wf.size}"],
    )
    code, output = run_merge(good[0], good[1], tmp_path / "out")
    assert code == 2 and "Traceback" not in output, output
    assert (
        "do not read back as written" in output
        and "model.safetensors: 12 bytes on disk" in output
        and "try another output folder" in output
    )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
