"""Bad input: one clear error naming the file or tensor and the fix, a non-zero exit, nothing written."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_adapter
from safetensors.torch import load_file, save_file

from lora_export.cli import main
from lora_export.tensors import output_lock


@pytest.fixture(scope="module")
def good(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("good")
    return models_dir / "llama", make_adapter(models_dir / "llama", root / "adapter", target_modules=["q_proj", "v_proj"])


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run_cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def run_merge(base: Path, adapter: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run_cli(["merge", str(base), str(adapter), "-o", str(out), "-q", *extra])


def assert_one_error(code: int, output: str, out: Path, fragments: tuple[str, ...]) -> None:
    """Exit 2, exactly one `Error:` line holding every fragment (the file, the problem, the fix), no traceback,
    and nothing at the output location: no folder, no partial folder, no lock file."""
    assert code == 2, output
    error_lines = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(error_lines) == 1, output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in error_lines[0], output
    assert not out.exists(), "a refused run must write nothing"
    assert not [p.name for p in out.parent.glob(f".{out.name}.*")], "temporary folder or lock left behind"


def assert_refused(base: Path, adapter: Path, out: Path, *fragments: str, extra: tuple[str, ...] = ()) -> None:
    assert_one_error(*run_merge(base, adapter, out, *extra), out, fragments)


def test_adapter_for_another_base(good: tuple[Path, Path], models_dir: Path, tmp_path: Path) -> None:
    other = make_adapter(models_dir / "gpt2", tmp_path / "gpt2-adapter", target_modules=["c_attn"])
    assert_refused(good[0], other, tmp_path / "out", "c_attn", "is this adapter for another base model?")


def test_shape_mismatch_names_module_and_shapes(good: tuple[Path, Path], tmp_path: Path) -> None:
    adapter = copy_adapter(good[1], tmp_path / "a")
    f = adapter / "adapter_model.safetensors"
    t = load_file(f)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    t[key] = torch.randn(48, 4)
    save_file(t, f)
    assert_refused(good[0], adapter, tmp_path / "out", "model.layers.0.self_attn.v_proj", "48×32", "another base model")


def test_target_missing_from_base(good: tuple[Path, Path], tmp_path: Path) -> None:
    adapter = copy_adapter(good[1], tmp_path / "a")
    f = adapter / "adapter_model.safetensors"
    t = load_file(f)
    t["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.randn(4, 32)
    t["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = torch.randn(32, 4)
    save_file(t, f)
    assert_refused(good[0], adapter, tmp_path / "out", "model.layers.9.self_attn.q_proj", "no tensor")


def test_missing_adapter_files(good: tuple[Path, Path], tmp_path: Path) -> None:
    adapter = copy_adapter(good[1], tmp_path / "a")
    (adapter / "adapter_model.safetensors").unlink()
    assert_refused(good[0], adapter, tmp_path / "out", "no adapter_model.safetensors")
    (adapter / "adapter_config.json").unlink()
    assert_refused(good[0], adapter, tmp_path / "out", "adapter_config.json is missing")
    assert_refused(good[0], tmp_path / "nowhere", tmp_path / "out", "does not exist")


def test_corrupt_header(good: tuple[Path, Path], tmp_path: Path) -> None:
    adapter = copy_adapter(good[1], tmp_path / "a")
    f = adapter / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    f.write_bytes(bytes(data))
    assert_refused(good[0], adapter, tmp_path / "out", str(f), "header length")


def test_truncated_base_shard(good: tuple[Path, Path], tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(good[0], base)
    f = base / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert_refused(base, good[1], tmp_path / "out", str(f), "truncated", "download or save the file again")


def test_nan_in_adapter(good: tuple[Path, Path], tmp_path: Path) -> None:
    adapter = copy_adapter(good[1], tmp_path / "a")
    f = adapter / "adapter_model.safetensors"
    t = load_file(f)
    key = next(k for k in t if k.endswith("lora_A.weight"))
    t[key][0, 0] = float("nan")
    save_file(t, f)
    assert_refused(good[0], adapter, tmp_path / "out", key, "NaN/Inf")


def test_merged_result_overflows_fp16(good: tuple[Path, Path], tmp_path: Path) -> None:
    adapter = copy_adapter(good[1], tmp_path / "a")
    f = adapter / "adapter_model.safetensors"
    t = load_file(f)
    key = next(k for k in t if k.endswith("lora_B.weight"))
    t[key] = t[key] * 1e9
    save_file(t, f)
    assert_refused(good[0], adapter, tmp_path / "out", "overflows", "float16", extra=("--dtype", "float16"))


@pytest.mark.parametrize(
    "change,fragments",
    [
        ({"peft_type": "IA3"}, ("peft_type", "IA3")),
        ({"use_new_magic": True}, ("use_new_magic", "unknown")),
        ({"target_parameters": ["experts.gate_up_proj"]}, ("target_parameters",)),
        ({"layer_replication": [[0, 2]]}, ("layer_replication",)),
        ({"init_lora_weights": "pissa"}, ("pissa", "path_initial_model_for_weight_conversion")),
        ({"r": 0}, ("r must be a positive number",)),
        ({"r": "eight"}, ("r must be a positive number",)),
        ({"r": 8}, ("rank 4 in its tensors but 8",)),
        ({"use_dora": "yes"}, ("use_dora must be true or false",)),
        ({"trainable_token_indices": [1, 2]}, ("trainable_token_indices",)),
    ],
)
def test_config_refusals(good: tuple[Path, Path], tmp_path: Path, change: dict, fragments: tuple[str, ...]) -> None:
    adapter = copy_adapter(good[1], tmp_path / "a")
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(change)
    cfg_path.write_text(json.dumps(cfg))
    assert_refused(good[0], adapter, tmp_path / "out", str(cfg_path) if "rank 4" not in fragments[0] else "q_proj", *fragments)


def test_config_not_json(good: tuple[Path, Path], tmp_path: Path) -> None:
    adapter = copy_adapter(good[1], tmp_path / "a")
    (adapter / "adapter_config.json").write_text("{not json")
    assert_refused(good[0], adapter, tmp_path / "out", "adapter_config.json", "not valid JSON")


def test_output_exists_needs_overwrite(good: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, output = run_merge(good[0], good[1], out)
    assert code == 2 and "already exists" in output and "--overwrite" in output
    assert (out / "keep.txt").read_text() == "mine"
    code, output = run_merge(good[0], good[1], out, "--overwrite")
    assert code == 0, output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_output_equal_to_or_inside_base(good: tuple[Path, Path], tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(good[0], base)
    before = sorted(p.name for p in base.iterdir())
    code, output = run_merge(base, good[1], base, "--overwrite")
    assert code == 2 and "overlaps the input" in output
    code, output = run_merge(base, good[1], base / "sub")
    assert code == 2 and "overlaps the input" in output
    assert sorted(p.name for p in base.iterdir()) == before


def test_pickled_weights_need_flag(good: tuple[Path, Path], tmp_path: Path) -> None:
    adapter = copy_adapter(good[1], tmp_path / "a")
    f = adapter / "adapter_model.safetensors"
    torch.save(load_file(f), adapter / "adapter_model.bin")
    f.unlink()
    assert_refused(good[0], adapter, tmp_path / "out", "adapter_model.bin", "--allow-pickle")
    code, output = run_merge(good[0], adapter, tmp_path / "out", "--allow-pickle")
    assert code == 0, output


def test_pickle_that_runs_code_is_refused(good: tuple[Path, Path], tmp_path: Path) -> None:
    adapter = copy_adapter(good[1], tmp_path / "a")
    (adapter / "adapter_model.safetensors").unlink()

    class Evil:
        def __reduce__(self):  # noqa: D105
            return (print, ("pwned",))

    torch.save({"x": Evil()}, adapter / "adapter_model.bin")
    assert_refused(good[0], adapter, tmp_path / "out", "weights_only=True", extra=("--allow-pickle",))


def test_quantized_base_refused(good: tuple[Path, Path], tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(good[0], base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (base / "config.json").write_text(json.dumps(cfg))
    assert_refused(base, good[1], tmp_path / "out", "quantized (gptq)")


def test_index_with_path_escape(good: tuple[Path, Path], tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(good[0], base)
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {"x": "../secret.safetensors"}}))
    assert_refused(base, good[1], tmp_path / "out", "../secret.safetensors", "only plain file names")


def test_index_naming_missing_shard(good: tuple[Path, Path], tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(good[0], base)
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {"x": "model-00002-of-00002.safetensors"}}))
    assert_refused(base, good[1], tmp_path / "out", "model-00002-of-00002.safetensors", "missing")


def test_weight_count_mismatch(good: tuple[Path, Path], tmp_path: Path) -> None:
    assert_refused(good[0], good[1], tmp_path / "out", "2 weights given for 1 adapters", extra=("-w", "1", "-w", "2"))


# ---------------------------------------------------------------------------------------------------------------------
# Broken safetensors files, written byte by byte


def write_raw_safetensors(path: Path, header: dict | bytes, data: bytes) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
ENTRY = {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 512]}


@pytest.mark.parametrize(
    "header,data,fragments",
    [
        (b"{not json at all", b"", ("header is not valid JSON",)),
        (b"[1, 2, 3]       ", b"", ("not a JSON object",)),
        ({A_KEY: ENTRY}, bytes(100), ("ends at byte 512 of the data, but the file holds 100: truncated",)),
        ({A_KEY: ENTRY, B_KEY: {"dtype": "F32", "shape": [32, 4], "data_offsets": [256, 768]}}, bytes(768), ("overlap",)),
        ({A_KEY: {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 256]}}, bytes(256), ("needs 512 bytes but its offsets span 256",)),
        ({A_KEY: {"dtype": "Q4", "shape": [4, 32], "data_offsets": [0, 64]}}, bytes(64), ("dtype 'Q4', which this tool does not read",)),
        ({A_KEY: {"dtype": "F32", "shape": [4, 32], "data_offsets": [16, 528]}}, bytes(528), ("a gap of 16 bytes",)),
        ({A_KEY: ENTRY}, bytes(600), ("88 bytes after the last tensor",)),
        ({A_KEY: {"dtype": "F32", "shape": [4, -32], "data_offsets": [0, 512]}}, bytes(512), ("is not a list of sizes",)),
        ({A_KEY: {"dtype": "F32", "shape": [4, 32], "data_offsets": [512, 0]}}, bytes(512), ("are not [begin, end]",)),
    ],
    ids=["header-not-json", "header-not-object", "offsets-past-end", "overlapping-offsets", "dtype-shape-vs-bytes", "unknown-dtype",
         "gap", "trailing-bytes", "bad-shape", "bad-offsets"],
)
def test_broken_safetensors(good: tuple[Path, Path], tmp_path: Path, header: dict | bytes, data: bytes, fragments: tuple[str, ...]) -> None:
    adapter = copy_adapter(good[1], tmp_path / "a")
    f = adapter / "adapter_model.safetensors"
    write_raw_safetensors(f, header, data)
    assert_refused(good[0], adapter, tmp_path / "out", str(f), *fragments, "download or save the file again")


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03"], ids=["empty", "shorter-than-header-length"])
def test_too_short_safetensors(good: tuple[Path, Path], tmp_path: Path, content: bytes) -> None:
    base = tmp_path / "base"
    shutil.copytree(good[0], base)
    (base / "model.safetensors").write_bytes(content)
    assert_refused(base, good[1], tmp_path / "out", str(base / "model.safetensors"), "too short", "download or save the file again")


def test_tensor_stored_in_two_shards(good: tuple[Path, Path], tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(good[0], base)
    t = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    names = sorted(t)
    save_file({k: t[k] for k in names[: len(names) // 2 + 1]}, base / "model-00001-of-00002.safetensors")
    save_file({k: t[k] for k in names[len(names) // 2:]}, base / "model-00002-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in names[: len(names) // 2 + 1]}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in names[len(names) // 2 + 1:]})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_refused(base, good[1], tmp_path / "out", "stored twice", "download the model again")


# ---------------------------------------------------------------------------------------------------------------------
# adapter_config.json mistakes


@pytest.mark.parametrize(
    "change,fragments",
    [
        ({"lora_alpha": "sixteen"}, ("lora_alpha must be a positive number",)),
        ({"r": -4}, ("r must be a positive number",)),
        ({"peft_type": None}, ("peft_type is None", "only LORA")),
        ({"rank_pattern": {"q_proj": "big"}}, ("rank_pattern must map",)),
        ({"bias": "sometimes"}, ("bias must be",)),
        ({"target_modules": ["gate_proj"]}, ("match none of", "re-save the adapter")),
        ({"target_modules": ["q_proj"]}, ("do not match", "v_proj")),
        ({"target_modules": 5}, ("target_modules must be",)),
        ({"target_modules": "(unclosed"}, ("not a valid regex",)),
    ],
    ids=["alpha-type", "r-negative", "peft-type-missing", "rank-pattern-type", "bias-value", "targets-match-nothing",
         "targets-miss-one", "targets-type", "targets-bad-regex"],
)
def test_more_config_mistakes(good: tuple[Path, Path], tmp_path: Path, change: dict, fragments: tuple[str, ...]) -> None:
    adapter = copy_adapter(good[1], tmp_path / "a")
    cfg_path = adapter / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **change}))
    assert_refused(good[0], adapter, tmp_path / "out", str(cfg_path), *fragments)


def test_config_is_a_list(good: tuple[Path, Path], tmp_path: Path) -> None:
    adapter = copy_adapter(good[1], tmp_path / "a")
    (adapter / "adapter_config.json").write_text("[1, 2]")
    assert_refused(good[0], adapter, tmp_path / "out", "adapter_config.json", "expected a JSON object")


def test_rank_larger_than_the_layer(good: tuple[Path, Path], tmp_path: Path) -> None:
    adapter = copy_adapter(good[1], tmp_path / "a")
    f = adapter / "adapter_model.safetensors"
    t = load_file(f)
    t[A_KEY], t[B_KEY] = torch.randn(40, 32), torch.randn(32, 40)
    save_file(t, f)
    assert_refused(good[0], adapter, tmp_path / "out", str(f), "rank 40, larger than the layer itself (32×32)", "retrain with r below")


# ---------------------------------------------------------------------------------------------------------------------
# Adapter tensors: names, ranks, values


def edit_adapter_tensors(good: tuple[Path, Path], tmp_path: Path, edit) -> tuple[Path, Path]:  # noqa: ANN001
    adapter = copy_adapter(good[1], tmp_path / "a")
    f = adapter / "adapter_model.safetensors"
    t = load_file(f)
    edit(t)
    save_file(t, f)
    return adapter, f


@pytest.mark.parametrize(
    "edit,fragments",
    [
        (lambda t: t.update({"model.layers.0.mlp.up_proj.lora_A.weight": torch.randn(4, 32)}), ("does not start with 'base_model.model.'",)),
        (lambda t: t.update({A_KEY.replace(".weight", ".default.weight"): t.pop(A_KEY)}), ("is not a LoRA tensor this tool understands",)),
        (lambda t: t.update({A_KEY: torch.randn(4, 32, 1)}), ("must be matrices",)),
        (lambda t: t.pop(B_KEY), ("has lora_A but not its pair",)),
        (lambda t: t.update({B_KEY: torch.randn(32, 3)}), ("lora_A has rank 4", "lora_B has 3")),
        (lambda t: t[A_KEY].__setitem__((1, 2), float("inf")), ("NaN/Inf", "diverged training")),
        (lambda t: t.update({A_KEY: torch.ones(4, 32, dtype=torch.int32)}), ("must be floating point",)),
        (lambda t: [t.pop(k) for k in list(t)] and t.update({"base_model.model.x.lora_magic": torch.ones(1)}), ("not a LoRA tensor",)),
    ],
    ids=["no-prefix", "adapter-name-in-key", "wrong-tensor-rank", "missing-pair", "rank-disagreement", "inf", "integer-dtype", "unknown-lora-tensor"],
)
def test_adapter_tensor_mistakes(good: tuple[Path, Path], tmp_path: Path, edit, fragments: tuple[str, ...]) -> None:  # noqa: ANN001
    adapter, f = edit_adapter_tensors(good, tmp_path, edit)
    assert_refused(good[0], adapter, tmp_path / "out", str(f), *fragments)


def test_empty_adapter(good: tuple[Path, Path], tmp_path: Path) -> None:
    adapter = copy_adapter(good[1], tmp_path / "a")
    f = adapter / "adapter_model.safetensors"
    save_file({}, f)
    assert_refused(good[0], adapter, tmp_path / "out", str(f), "no LoRA tensors found")


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


@pytest.mark.parametrize("name", ["/etc/passwd", "sub/model.safetensors", ".."], ids=["absolute", "subfolder", "dotdot"])
def test_index_names_outside_plain_files(good: tuple[Path, Path], tmp_path: Path, name: str) -> None:
    base = sharded_base(good, tmp_path, name)
    assert_refused(base, good[1], tmp_path / "out", "model.safetensors.index.json", "only plain file names")


@pytest.mark.parametrize("text", ["{broken", '{"weight_map": ["a", "b"]}'], ids=["not-json", "weight-map-not-object"])
def test_index_unreadable(good: tuple[Path, Path], tmp_path: Path, text: str) -> None:
    base = tmp_path / "base"
    shutil.copytree(good[0], base)
    (base / "model.safetensors.index.json").write_text(text)
    assert_refused(base, good[1], tmp_path / "out", "model.safetensors.index.json", "not a valid index", "save the model again")


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
    assert_refused(base, good[1], tmp_path / "out", "pytorch_model.bin", "--allow-pickle", "convert the model to safetensors")


def test_non_finite_weight(good: tuple[Path, Path], tmp_path: Path) -> None:
    assert_refused(good[0], good[1], tmp_path / "out", "finite", extra=("-w", "nan"))


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
        code, output = run_cli(["verify", str(good[0]), str(good[1]), str(merged), "--max-new-tokens", "2", "--json", str(disk / "r.json")])
        assert code == 2 and "Traceback" not in output, output
        assert [line for line in output.splitlines() if line.startswith("Error: ")] == [
            f"Error: {disk / 'r.json'}: " + ("Read-only file system" if os.geteuid() == 0 else "Permission denied")
            + ": " + ("the file system is read-only: choose a writable output folder" if os.geteuid() == 0
                      else "permission denied: fix the permissions, or choose a writable output folder")]


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


def test_full_temporary_folder_names_tmpdir(good: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
    assert_refused(good[0], adapter, adapter / "merged", str(adapter), "overlaps the input", "choose an output folder outside")


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
        ("variants:\n  a:\n    adapters:\n      - {path: ADAPTER, weight: high}\n", ("weight must be a finite number",)),
        ("variants:\n  ../evil:\n    adapters: [ADAPTER]\n", ("names become file names",)),
        ("variants:\n  a:\n    adapters: [ADAPTER]\n    rank: 4\n", ("unknown field(s) ['rank']",)),
        ("variants:\n  a:\n    adapters: [ADAPTER]\n    dtype: bfloat16\n", ("dtype must be auto, float32 or float16",)),
        ("variants:\n  a:\n    adapters: [{path: ADAPTER, scale: 2}]\n", ("each adapter is a path or {path: ..., weight: ...}",)),
    ],
    ids=["not-yaml", "no-variants", "no-adapters", "missing-folder", "bad-weight", "bad-name", "unknown-field", "bf16", "unknown-adapter-key"],
)
def test_variants_file_mistakes(good: tuple[Path, Path], tmp_path: Path, text: str, fragments: tuple[str, ...]) -> None:
    f = tmp_path / "variants.yaml"
    f.write_text(text.replace("ADAPTER", str(good[1])))
    out = tmp_path / "pkg"
    code, output = run_cli(["package", str(good[0]), "--variants", str(f), "-o", str(out)])
    assert_one_error(code, output, out, (str(f), *fragments))


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
    assert_refused(good[0], adapter, tmp_path / "out", str(f), "header is not valid JSON", "download or save the file again")


@pytest.mark.parametrize(
    "manifest,fragments",
    [
        ("{broken", ("manifest.json", "not valid JSON", "rebuild the package")),
        (json.dumps({"variants": {}}), ("damaged manifest", "`files` must list", "rebuild the package")),
        (json.dumps({"files": [{"name": "../../etc/passwd", "sha256": "0" * 64, "size": 1}]}), ("points outside the package", "refusing")),
        (json.dumps({"files": [], "shared": {"adapters": {"a": {"file": "a.onnx_adapter"}}}}), ("the checks need shared/model.onnx",)),
    ],
    ids=["not-json", "no-files", "path-escape", "unhashed-graph"],
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
    code, output = run_cli(["swap", str(merged), "--remove", str(good[1]), "--add", str(good[1]), "-o", str(tmp_path / "out")])
    assert_one_error(code, output, tmp_path / "out", ("lora_export.json", "damaged manifest"))


def test_verify_base_config_broken(good: tuple[Path, Path], tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    assert run_merge(good[0], good[1], merged)[0] == 0
    base = tmp_path / "base"
    shutil.copytree(good[0], base)
    (base / "config.json").write_text("{")
    code, output = run_cli(["verify", str(base), str(good[1]), str(merged), "--json", str(tmp_path / "r.json")])
    assert_one_error(code, output, tmp_path / "r.json", ("config.json", "not valid JSON"))


def test_written_shard_that_does_not_read_back(good: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard the disk returns differently (simulated): the merge keeps nothing and says which file and why."""
    merge_module = importlib.import_module("lora_export.merge")  # the package re-exports the function `merge`
    monkeypatch.setattr(merge_module, "reread_shard", lambda path, shard, wf, rehash=False: [f"{wf.name}: 12 bytes on disk, wrote {wf.size}"])
    code, output = run_merge(good[0], good[1], tmp_path / "out")
    assert code == 2 and "Traceback" not in output, output
    assert "do not read back as written" in output and "model.safetensors: 12 bytes on disk" in output and "try another output folder" in output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
