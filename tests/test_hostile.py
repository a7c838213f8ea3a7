"""Hostile inputs by class (issue 14): each class of input a user may hand the tool fails cleanly — exit 2, one
`Error:` line naming the file or option, nothing written, inputs untouched — or works. Written from the classes,
plus a property test that mutates valid files (types, values, truncation, encodings) and asserts the same contract.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_one_error, assert_refused, copy_adapter, run_cli, run_merge

from lora_export.verification.compare import Case, compare


def copy_base(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Config files: fields of the wrong type or range


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"quantization_config": "gptq"}, "`quantization_config` must be dict"),
        ({"text_config": "llama"}, "`text_config` must be dict"),
        ({"rope_scaling": [1, 2]}, "`rope_scaling` must be dict"),
        ({"vocab_size": 0}, "`vocab_size` must be a positive integer"),
        ({"hidden_size": "64"}, "`hidden_size` must be int"),
        ({"eos_token_id": ["2"]}, "`eos_token_id` must be an integer or a list of integers"),
        ({"architectures": "LlamaForCausalLM"}, "`architectures` must be list"),
        ({"tie_word_embeddings": "yes"}, "`tie_word_embeddings` must be bool"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_model_config_fields(good: tuple[Path, Path], tmp_path: Path, change: dict, fragment: str) -> None:
    base = copy_base(good[0], tmp_path / "base")
    edit_json(base / "config.json", **change)
    assert_refused(base, good[1], tmp_path / "out", "config.json", fragment)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"lora_alpha": float("nan")}, "lora_alpha must be a positive finite number, found nan"),
        ({"lora_alpha": float("inf")}, "lora_alpha must be a positive finite number, found inf"),
        ({"rank_pattern": {"[": 4}}, "rank_pattern pattern '[' is not a valid regular expression"),
        ({"alpha_pattern": {"q_proj": float("nan")}}, "alpha_pattern must map module patterns to positive finite"),
        ({"target_modules": 5}, "target_modules must be a regex or a list"),
    ],
    ids=["alpha-nan", "alpha-inf", "pattern-regex", "pattern-nan", "targets-type"],
)
def test_adapter_config_values(good: tuple[Path, Path], tmp_path: Path, change: dict, fragment: str) -> None:
    adapter = copy_adapter(good[1], tmp_path / "a")
    edit_json(adapter / "adapter_config.json", **change)
    assert_refused(good[0], adapter, tmp_path / "out", "adapter_config.json", fragment)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8, torch.bool], ids=str)
def test_adapter_tensor_dtypes(good: tuple[Path, Path], tmp_path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file, save_file

    adapter = copy_adapter(good[1], tmp_path / "a")
    path = adapter / "adapter_model.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(path).items()}, str(path), metadata={"format": "pt"})
    assert_refused(good[0], adapter, tmp_path / "out", "adapter_model.safetensors", str(dtype))


# ---------------------------------------------------------------------------------------------------------------------
# Completeness: the index and the shards agree both ways


def shard(base: Path, index_map: object = None, stray: bool = False) -> None:
    """Split the base's weights over two shards; the index says what `index_map(names, halves)` returns."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(base / "model.safetensors")
    names = sorted(tensors)
    halves = {n: "model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors"
              for i, n in enumerate(names)}  # fmt: skip
    for file in sorted(set(halves.values())):
        save_file({n: tensors[n] for n in names if halves[n] == file}, str(base / file), metadata={"format": "pt"})
    (base / "model.safetensors").unlink()
    weight_map = index_map(names, halves) if callable(index_map) else halves
    if stray:
        save_file({"extra.weight": torch.ones(2)}, str(base / "model-00003-of-00002.safetensors"))
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize(
    ("index_map", "stray", "fragment"),
    [
        (lambda names, halves: {n: "model-00001-of-00002.safetensors" for n in names}, False, "is not in the shard"),
        (lambda names, halves: {n: f for n, f in list(halves.items())[1:]}, False, "is not in the index"),
        (None, True, "holds weights the index does not name"),
    ],
    ids=["all-in-shard-1", "one-missing-from-index", "stray-shard"],
)
def test_index_and_shards_disagree(
    good: tuple[Path, Path], tmp_path: Path, index_map: object, stray: bool, fragment: str
) -> None:
    base = copy_base(good[0], tmp_path / "base")
    shard(base, index_map, stray)
    assert_refused(base, good[1], tmp_path / "out", "model.safetensors.index.json", "disagree", fragment)


def test_sharded_base_that_agrees_merges(good: tuple[Path, Path], tmp_path: Path) -> None:
    base = copy_base(good[0], tmp_path / "base")
    shard(base)
    code, output = run_merge(base, good[1], tmp_path / "out")
    assert code == 0, output


# ---------------------------------------------------------------------------------------------------------------------
# Files that are not what they look like: links out, loops, FIFOs, damaged side files, encodings


def test_links_out_of_the_folder_are_refused_at_any_depth(good: tuple[Path, Path], tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    base = copy_base(good[0], tmp_path / "base")
    (base / "sub").mkdir()
    (base / "sub" / "notes.txt").symlink_to(secret)
    assert_refused(base, good[1], tmp_path / "out", "sub/notes.txt", "symbolic link out of")
    base2 = copy_base(good[0], tmp_path / "base2")
    shutil.move(base2 / "model.safetensors", tmp_path / "weights.safetensors")
    (base2 / "model.safetensors").symlink_to(tmp_path / "weights.safetensors")
    assert_refused(base2, good[1], tmp_path / "out2", "model.safetensors", "symbolic link out of")
    adapter = copy_adapter(good[1], tmp_path / "a")
    shutil.move(adapter / "adapter_model.safetensors", tmp_path / "a.safetensors")
    (adapter / "adapter_model.safetensors").symlink_to(tmp_path / "a.safetensors")
    assert_refused(good[0], adapter, tmp_path / "out3", "adapter_model.safetensors", "symbolic link out of")


def test_links_inside_the_folder_are_followed(good: tuple[Path, Path], tmp_path: Path) -> None:
    base = copy_base(good[0], tmp_path / "base")
    (base / "sub").mkdir()
    (base / "sub" / "a.txt").write_text("inside")
    (base / "b.txt").symlink_to(base / "sub" / "a.txt")
    code, output = run_merge(base, good[1], tmp_path / "out")
    assert code == 0, output
    assert (tmp_path / "out" / "b.txt").read_text() == "inside" and not (tmp_path / "out" / "b.txt").is_symlink()


def test_fifo_and_loops(good: tuple[Path, Path], tmp_path: Path) -> None:
    base = copy_base(good[0], tmp_path / "base")
    os.mkfifo(base / "pipe")
    assert_refused(base, good[1], tmp_path / "out", "pipe", "not a regular file")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    code, output = run_merge(tmp_path / "loop1", good[1], tmp_path / "out2")
    assert code == 2 and "symlink loop" in output and "Traceback" not in output, output


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"])
def test_damaged_side_json_is_refused_before_work(good: tuple[Path, Path], tmp_path: Path, name: str) -> None:
    base = copy_base(good[0], tmp_path / "base")
    (base / name).write_text('{"broken": ')
    assert_refused(base, good[1], tmp_path / "out", f"base/{name}", "not valid JSON", "it would be shipped")


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe not utf-8\n", b"variants:\n  a:\n    adapters: [x]\n  a:\n    adapters: [y]\n",
     b"x: &a [1]\nvariants: *a\n", b'{"variants": {"a": {"adapters": ["x"]}, "a": {"adapters": ["y"]}}}'],
    ids=["not-utf8", "name-twice-yaml", "alias", "name-twice-json"],
)  # fmt: skip
def test_variants_files(good: tuple[Path, Path], tmp_path: Path, content: bytes) -> None:
    path = tmp_path / ("variants.json" if content.startswith(b"{") else "variants.yaml")
    path.write_bytes(content)
    code, output = run_cli(["package", str(good[0]), "--variants", str(path), "-o", str(tmp_path / "out")])
    assert_one_error(code, output, tmp_path / "out", (path.name,))


def test_prompts_not_utf8(good: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_bytes(b"\xff\xfe hello\n")
    code, output = run_cli(["verify", str(good[0]), str(good[1]), str(good[0]), "--prompts", str(tmp_path / "p.txt")])
    assert code == 2 and "p.txt: not UTF-8" in output and "Traceback" not in output, output


# ---------------------------------------------------------------------------------------------------------------------
# Options: checked when parsed, before any work


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--max-shard-size", "nanGB"], "--max-shard-size"),
        (["--max-shard-size", "1e400GB"], "--max-shard-size"),
        (["--max-shard-size", "0"], "--max-shard-size"),
        (["-w", "nan"], "--weight"),
        (["-w", "inf"], "--weight"),
    ],
    ids=["size-nan", "size-overflow", "size-zero", "weight-nan", "weight-inf"],
)
def test_merge_options(good: tuple[Path, Path], tmp_path: Path, args: list[str], fragment: str) -> None:
    code, output = run_merge(good[0], good[1], tmp_path / "out", *args)
    assert code == 2 and fragment in output and "Traceback" not in output, output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args",
    [["--device", "foo"], ["--device", "cuda:99"], ["--json", "/nonexistent/dir/r.json"], ["--junit", "."]],
    ids=["device-bogus", "device-absent", "json-no-folder", "junit-is-folder"],
)
def test_verify_options(good: tuple[Path, Path], args: list[str]) -> None:
    code, output = run_cli(["verify", str(good[0]), str(good[1]), str(good[0]), *args])
    assert code == 2 and f"Invalid value for '{args[0]}'" in output and "Traceback" not in output, output


def test_report_path_checked_before_the_output_is_written(good: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["merge-and-onnx", str(good[0]), str(good[1]), "-o", str(out), "--json", str(tmp_path / "no" / "r.json")]
    code, output = run_cli(args)
    assert_one_error(code, output, out, ("--json", "does not exist"))


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_bench_threads(good: tuple[Path, Path], threads: str) -> None:
    code, output = run_cli(["bench", str(good[0]), str(good[1]), "--threads", threads])
    assert code == 2 and "--threads" in output, output


# ---------------------------------------------------------------------------------------------------------------------
# Comparisons stay meaningful on zero and constant outputs


def test_zero_and_constant_rows_compare_as_equal() -> None:
    case = Case("c", {"attention_mask": torch.ones(1, 3, dtype=torch.long)})
    zeros = torch.zeros(1, 3, 8)
    m = compare(case, "logits", zeros, zeros.clone())
    assert m.min_cosine == 1.0 and m.max_rel == 0.0
    constant = torch.full((1, 3, 8), 2.5)
    assert compare(case, "logits", constant, constant.clone()).min_cosine == pytest.approx(1.0)
    one_zero = zeros.clone()
    one_zero[0, 1] = 1.0
    assert compare(case, "logits", one_zero, zeros).min_cosine == 0.0  # a real difference still shows


# ---------------------------------------------------------------------------------------------------------------------
# Signals: SIGTERM and Ctrl-C leave nothing a rerun would have to remove


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_run_leaves_nothing(good: tuple[Path, Path], tmp_path: Path, sig: signal.Signals) -> None:
    """The signal arrives while the merge writes (a patched write step sends it to the process itself)."""
    out = tmp_path / "out"
    code = f"""
import os, signal, sys
import lora_export.merging.stream as s
real = s.MergeStream.run
def run(self, *a, **k):
    os.kill(os.getpid(), signal.{sig.name})
    return real(self, *a, **k)
s.MergeStream.run = run
from lora_export.cli import main
sys.argv = ["lora-export", "merge", {str(good[0])!r}, {str(good[1])!r}, "-o", {str(out)!r}, "-q"]
main()
"""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.strip().startswith("Error: ")
    assert not out.exists() and not list(tmp_path.glob(".out.*")), list(tmp_path.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("lora-export-")]


def test_overwrite_through_a_symlink_is_refused(good: tuple[Path, Path], tmp_path: Path) -> None:
    real = tmp_path / "real"
    assert run_merge(good[0], good[1], real)[0] == 0
    (tmp_path / "link").symlink_to(real)
    code, output = run_merge(good[0], good[1], tmp_path / "link", "--overwrite")
    assert code == 2 and "is a symbolic link" in output, output
    assert (tmp_path / "link").is_symlink() and (real / "lora_export.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_a_late_failure_removes_the_parents_it_created(
    good: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lora_export.merging.stream as stream
    from lora_export.io.errors import InputError

    def fail(*args: object, **kwargs: object) -> None:
        raise InputError("a failure in the middle of the run")

    monkeypatch.setattr(stream.MergeStream, "run", fail)
    code, output = run_merge(good[0], good[1], tmp_path / "a" / "b" / "out")
    assert code == 2 and "in the middle" in output, output
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def shared_package(good: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pkg")
    (root / "v.yaml").write_text(f"variants:\n  a:\n    adapters: [{good[1]}]\n")
    out = root / "pkg"
    code, output = run_cli(
        ["package", str(good[0]), "--variants", str(root / "v.yaml"), "-o", str(out), "--mode", "shared"]
    )
    assert code == 0, output
    return out


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("shared/model.onnx", "ONNX Runtime cannot load it"), ("shared/reference.npz", "cannot read the reference"),
     ("shared/a.onnx_adapter", "cannot read this adapter")],
    ids=["graph", "reference", "adapter"],
)  # fmt: skip
def test_package_check_damaged_file_under_a_consistent_manifest(
    shared_package: Path, tmp_path: Path, name: str, fragment: str
) -> None:
    """Damaged after hashing (or packaged damaged): the hashes agree, the file does not load: exit 2 naming it."""
    pkg = tmp_path / "pkg"
    shutil.copytree(shared_package, pkg)
    (pkg / name).write_bytes(b"\x00garbage" * 16)
    manifest = json.loads((pkg / "manifest.json").read_text())
    for f in manifest["files"]:
        if f["name"] == name:
            f["sha256"], f["size"] = hashlib.sha256((pkg / name).read_bytes()).hexdigest(), (pkg / name).stat().st_size
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    code, output = run_cli(["package", "--check", str(pkg)])
    assert code == 2 and name in output and fragment in output and "Traceback" not in output, output
