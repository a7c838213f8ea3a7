"""Bad adapters and configs: one clear error naming the file or tensor and the fix, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import (
    A_KEY,
    B_KEY,
    assert_refused,
    copy_adapter,
    make_adapter,
    run_merge,
)
from safetensors.torch import load_file, save_file


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
        ({"r": 0}, ("r must be a positive finite number",)),
        ({"r": "eight"}, ("r must be a positive finite number",)),
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
    assert_refused(
        good[0], adapter, tmp_path / "out", str(cfg_path) if "rank 4" not in fragments[0] else "q_proj", *fragments
    )


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
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"x": "../secret.safetensors"}})
    )
    assert_refused(base, good[1], tmp_path / "out", "../secret.safetensors", "only plain file names")


def test_index_naming_missing_shard(good: tuple[Path, Path], tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(good[0], base)
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"x": "model-00002-of-00002.safetensors"}})
    )
    assert_refused(base, good[1], tmp_path / "out", "model-00002-of-00002.safetensors", "missing")


def test_weight_count_mismatch(good: tuple[Path, Path], tmp_path: Path) -> None:
    assert_refused(good[0], good[1], tmp_path / "out", "2 weights given for 1 adapters", extra=("-w", "1", "-w", "2"))


# ---------------------------------------------------------------------------------------------------------------------
# adapter_config.json mistakes


@pytest.mark.parametrize(
    "change,fragments",
    [
        ({"lora_alpha": "sixteen"}, ("lora_alpha must be a positive finite number",)),
        ({"r": -4}, ("r must be a positive finite number",)),
        ({"peft_type": None}, ("peft_type is None", "only LORA")),
        ({"rank_pattern": {"q_proj": "big"}}, ("rank_pattern must map",)),
        ({"bias": "sometimes"}, ("bias must be",)),
        ({"target_modules": ["gate_proj"]}, ("match none of", "re-save the adapter")),
        ({"target_modules": ["q_proj"]}, ("do not match", "v_proj")),
        ({"target_modules": 5}, ("target_modules must be",)),
        ({"target_modules": "(unclosed"}, ("not a valid regular expression",)),
    ],
    ids=[
        "alpha-type",
        "r-negative",
        "peft-type-missing",
        "rank-pattern-type",
        "bias-value",
        "targets-match-nothing",
        "targets-miss-one",
        "targets-type",
        "targets-bad-regex",
    ],
)
def test_more_config_mistakes(
    good: tuple[Path, Path], tmp_path: Path, change: dict, fragments: tuple[str, ...]
) -> None:
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
    assert_refused(
        good[0],
        adapter,
        tmp_path / "out",
        str(f),
        "rank 40, larger than the layer itself (32×32)",
        "retrain with r below",
    )


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
        (
            lambda t: t.update({"model.layers.0.mlp.up_proj.lora_A.weight": torch.randn(4, 32)}),
            ("does not start with 'base_model.model.'",),
        ),
        (
            lambda t: t.update({A_KEY.replace(".weight", ".default.weight"): t.pop(A_KEY)}),
            ("is not a LoRA tensor this tool understands",),
        ),
        (lambda t: t.update({A_KEY: torch.randn(4, 32, 1)}), ("must be matrices",)),
        (lambda t: t.pop(B_KEY), ("has lora_A but not its pair",)),
        (lambda t: t.update({B_KEY: torch.randn(32, 3)}), ("lora_A has rank 4", "lora_B has 3")),
        (lambda t: t[A_KEY].__setitem__((1, 2), float("inf")), ("NaN/Inf", "diverged training")),
        (
            lambda t: t.update({A_KEY: torch.ones(4, 32, dtype=torch.int32)}),
            ("must be float16, bfloat16, float32 or float64",),
        ),
        (
            lambda t: [t.pop(k) for k in list(t)] and t.update({"base_model.model.x.lora_magic": torch.ones(1)}),
            ("not a LoRA tensor",),
        ),
    ],
    ids=[
        "no-prefix",
        "adapter-name-in-key",
        "wrong-tensor-rank",
        "missing-pair",
        "rank-disagreement",
        "inf",
        "integer-dtype",
        "unknown-lora-tensor",
    ],
)
def test_adapter_tensor_mistakes(good: tuple[Path, Path], tmp_path: Path, edit, fragments: tuple[str, ...]) -> None:  # noqa: ANN001
    adapter, f = edit_adapter_tensors(good, tmp_path, edit)
    assert_refused(good[0], adapter, tmp_path / "out", str(f), *fragments)


def test_empty_adapter(good: tuple[Path, Path], tmp_path: Path) -> None:
    adapter = copy_adapter(good[1], tmp_path / "a")
    f = adapter / "adapter_model.safetensors"
    save_file({}, f)
    assert_refused(good[0], adapter, tmp_path / "out", str(f), "no LoRA tensors found")
