"""The merge against PEFT, tensor by tensor, for every variant; and merged logits against PEFT's unmerged model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    VARIANT_CASES,
    Variants,
    load_model,
    logits_of,
    make_adapter,
    peft_unmerged,
    read_all,
    sample_inputs,
    ulp,
)

from lora_export import MergeOptions, MergeResult, delta_weight, load_adapter, merge
from lora_export.records import MergeManifest

# (case id, base model, LoraConfig kwargs)


def peft_merged_state(base: Path, adapters: list[Path]) -> dict[str, torch.Tensor]:
    model = peft_unmerged(base, adapters).merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


def assert_close_to(
    ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], skip: set[str] = frozenset()
) -> None:
    bad = []
    for name, ref in reference.items():
        if name in skip or name not in ours:
            continue
        tol = 1e-6 * max(float(ref.abs().max()), 1e-12)
        diff = float((ours[name].float() - ref.float()).abs().max())
        if diff > tol:
            bad.append(f"{name}: {diff:.3g} > {tol:.3g}")
    assert not bad, bad


@pytest.mark.parametrize("case", VARIANT_CASES)
def test_variant_matches_peft(variants: Variants, case: str) -> None:
    base, adapter, merged = variants.base(case), variants.adapter(case), variants.merged(case)
    result = MergeResult(merged, MergeManifest.load(merged))
    ours = read_all(merged)
    reference = peft_merged_state(base, [adapter])
    changed = [n for n, v in result.manifest.tensors.items() if v.get("adapters") or "replaced_by_adapter" in v]
    assert changed, "the merge changed nothing"
    base_sd = read_all(base)
    for n in changed:  # the merge visibly changed the weights it says it changed
        if n in base_sd:
            assert not torch.equal(ours[n], base_sd[n]), n
    # PEFT merges the shared tensor of tied weights; there the truth is its unmerged model (checked below)
    assert_close_to(ours, reference, skip=set(result.untied))
    merged_model = load_model(merged)
    inputs = sample_inputs(base)
    ref_logits = logits_of(peft_unmerged(base, [adapter]), inputs)
    got = logits_of(merged_model, inputs)
    assert (got - ref_logits).abs().max() < 1e-4


def test_tied_lm_head_untied_on_merge(models_dir: Path, tmp_path: Path) -> None:
    """PEFT's merge_and_unload adds ΔW to the shared tensor; we must match PEFT's unmerged model instead."""
    base = models_dir / "llama-tied"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "lm_head"])
    result = merge(base, [adapter], tmp_path / "merged", MergeOptions(progress=False))
    assert result.untied == ["lm_head.weight"]
    assert any("tie_word_embeddings=false" in n for n in result.manifest.notes)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    merged_model = load_model(tmp_path / "merged")
    base_model = load_model(base)
    a = load_adapter(adapter)
    w0 = base_model.model.embed_tokens.weight.detach()
    assert torch.equal(merged_model.model.embed_tokens.weight, w0)  # input embedding unchanged after reload
    expected_head = w0 + delta_weight(a.modules["lm_head"], w0, transposed=False)
    assert torch.allclose(merged_model.lm_head.weight, expected_head, atol=1e-6)
    inputs = sample_inputs(base)
    unmerged = logits_of(peft_unmerged(base, [adapter]), inputs)
    assert (logits_of(merged_model, inputs) - unmerged).abs().max() < 1e-4
    peft_wrong = logits_of(peft_unmerged(base, [adapter]).merge_and_unload(), inputs)
    assert (peft_wrong - unmerged).abs().max() > 1e-2  # the bug this test guards against is real


def test_tied_embedding_lora_keeps_lm_head(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "llama-tied"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["embed_tokens"])
    result = merge(base, [adapter], tmp_path / "merged", MergeOptions(progress=False))
    assert result.untied == ["lm_head.weight"]
    merged_model, base_model = load_model(tmp_path / "merged"), load_model(base)
    assert torch.equal(merged_model.lm_head.weight, base_model.lm_head.weight)
    assert not torch.equal(merged_model.model.embed_tokens.weight, base_model.model.embed_tokens.weight)
    inputs = sample_inputs(base)
    assert (logits_of(merged_model, inputs) - logits_of(peft_unmerged(base, [adapter]), inputs)).abs().max() < 1e-4


def test_untouched_tied_model_stays_tied(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "llama-tied"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    result = merge(base, [adapter], tmp_path / "merged", MergeOptions(progress=False))
    assert result.untied == []
    assert "lm_head.weight" not in read_all(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True


def test_multi_adapter_is_weighted_sum_of_deltas(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "llama"
    a = make_adapter(base, tmp_path / "a", seed=1, target_modules=["q_proj", "v_proj"])
    b = make_adapter(base, tmp_path / "b", seed=2, target_modules=["v_proj", "up_proj"], use_rslora=True)
    merge(base, [a, b], tmp_path / "ab", MergeOptions(weights=(0.7, -0.3), progress=False))
    merge(base, [a], tmp_path / "a-only", MergeOptions(progress=False))
    merge(base, [b], tmp_path / "b-only", MergeOptions(progress=False))
    w0, ab, ma, mb = (read_all(p) for p in (base, tmp_path / "ab", tmp_path / "a-only", tmp_path / "b-only"))
    for name in w0:
        expected = w0[name] + 0.7 * (ma[name] - w0[name]) - 0.3 * (mb[name] - w0[name])
        assert torch.allclose(ab[name], expected, atol=1e-6 * max(1.0, float(w0[name].abs().max()))), name
    # and with weights 1, 1 the merged model is PEFT's model with both adapters active
    merge(base, [a, b], tmp_path / "ab1", MergeOptions(progress=False))
    inputs = sample_inputs(base)
    ref = logits_of(peft_unmerged(base, [a, b]), inputs)
    assert (logits_of(load_model(tmp_path / "ab1"), inputs) - ref).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_within_one_ulp_of_peft(models_dir: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    base = models_dir / "llama-bf16"
    if dtype == torch.float16:
        load_model(models_dir / "llama", torch.float16).save_pretrained(tmp_path / "base16")
        base = tmp_path / "base16"
    adapter = make_adapter(models_dir / "llama", tmp_path / "adapter", target_modules="all-linear")
    result = merge(base, [adapter], tmp_path / "merged", MergeOptions(progress=False))
    ours = read_all(tmp_path / "merged")
    from peft import PeftModel

    ref = PeftModel.from_pretrained(load_model(base, dtype), adapter).merge_and_unload().state_dict()
    for name, t in ours.items():
        assert t.dtype == dtype, name
        diff = (t.float() - ref[name].float()).abs()
        assert bool((diff <= ulp(ref[name], dtype)).all()), f"{name}: {float(diff.max())}"
    cast = [v["cast"] for v in result.manifest.tensors.values() if v.get("adapters")]
    assert cast and all(c["error_norm_rel_to_delta"] is not None and c["max_abs_error"] > 0 for c in cast)


def test_dtype_option_casts_once_and_updates_config(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "llama"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    merge(base, [adapter], tmp_path / "fp32", MergeOptions(progress=False))
    merge(base, [adapter], tmp_path / "bf16", MergeOptions(dtype="bfloat16", progress=False))
    a, b = read_all(tmp_path / "fp32"), read_all(tmp_path / "bf16")
    for name in a:
        assert b[name].dtype == torch.bfloat16
        assert torch.equal(b[name], a[name].to(torch.bfloat16)), name  # one cast of the fp32 merge, no double rounding
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_output_and_input(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "llama"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "down_proj"])
    merge(base, [adapter], tmp_path / "one", MergeOptions(progress=False))
    result = merge(base, [adapter], tmp_path / "sharded", MergeOptions(max_shard_size=20_000, progress=False))
    files = result.manifest.files
    assert len(files) > 3 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    one, sharded = read_all(tmp_path / "one"), read_all(tmp_path / "sharded")
    assert one.keys() == sharded.keys() and all(torch.equal(one[k], sharded[k]) for k in one)
    # the sharded folder is itself a valid base: merging into it reads the index
    again = merge(tmp_path / "sharded", [adapter], tmp_path / "twice", MergeOptions(progress=False))
    assert len(again.manifest.base_weights) == len(files)
    inputs = sample_inputs(base)
    assert (
        logits_of(load_model(tmp_path / "sharded"), inputs) - logits_of(load_model(tmp_path / "one"), inputs)
    ).abs().max() == 0


def test_manifest_records_inputs_and_hashes(models_dir: Path, tmp_path: Path) -> None:
    import hashlib

    base = models_dir / "llama"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    result = merge(base, [adapter], tmp_path / "merged", MergeOptions(progress=False))
    m = json.loads((tmp_path / "merged" / "lora_export.json").read_text())
    assert m == json.loads(json.dumps(result.manifest.to_dict()))
    assert MergeManifest.load(tmp_path / "merged") == result.manifest  # the reader gives back what was written
    base_file = base / "model.safetensors"
    assert m["base"]["weights"][0]["sha256"] == hashlib.sha256(base_file.read_bytes()).hexdigest()
    out_file = tmp_path / "merged" / "model.safetensors"
    assert m["output"]["files"][0]["sha256"] == hashlib.sha256(out_file.read_bytes()).hexdigest()
    assert m["adapters"][0]["config"]["target_modules"] == ["q_proj"]
    entry = m["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert entry["adapters"][0]["scaling"] == 2.0 and entry["delta_norm"] > 0
    assert {"torch", "safetensors", "transformers", "python"} <= set(m["versions"])
    assert (tmp_path / "merged" / "generation_config.json").is_file()


def test_delta_norm_matches_formed_delta(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "gpt2"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["c_attn"], fan_in_fan_out=True)
    result = merge(base, [adapter], tmp_path / "merged", MergeOptions(progress=False))
    a = load_adapter(adapter)
    w0 = read_all(base)
    for name, entry in result.manifest.tensors.items():
        if entry.get("adapters"):
            module = a.modules[name.removesuffix(".weight")]
            formed = delta_weight(module, w0[name], transposed=True)
            assert entry["delta_norm"] == pytest.approx(float(torch.linalg.vector_norm(formed)), rel=1e-5)


def test_reread_finds_a_shard_changed_on_disk(models_dir: Path, tmp_path: Path) -> None:
    from lora_export.io.tensorfiles import SafetensorsStreamWriter, TensorSpec, reread_shard

    spec = TensorSpec("w", torch.float32, (4, 4))
    writer = SafetensorsStreamWriter(tmp_path / "s.safetensors", [spec])
    writer.write(torch.arange(16, dtype=torch.float32).reshape(4, 4))
    written = writer.close()
    assert reread_shard(writer.path, [spec], written, rehash=True) == []
    data = bytearray(writer.path.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte flipped: only the re-hash sees it
    writer.path.write_bytes(bytes(data))
    assert reread_shard(writer.path, [spec], written, rehash=False) == []
    problems = reread_shard(writer.path, [spec], written, rehash=True)
    assert len(problems) == 1 and "sha256 on disk" in problems[0]
    writer.path.write_bytes(bytes(data[:-4]))
    problems = reread_shard(writer.path, [spec], written, rehash=False)
    assert len(problems) == 1 and "does not parse on re-read" in problems[0] and problems[0].endswith("truncated")


def test_a_written_file_is_hashed_once_and_again_once_changed(tmp_path: Path) -> None:
    """The writer's sha256 (of the bytes as written) is what a report lists for the file; the same path changed on
    disk, or renamed into place, is read again or kept by what it is."""
    import os

    from lora_export.io.hashing import sha256_file, sha256_written
    from lora_export.io.tensorfiles import SafetensorsStreamWriter, TensorSpec

    spec = TensorSpec("w", torch.float32, (4, 4))
    writer = SafetensorsStreamWriter(tmp_path / "s.safetensors", [spec])
    writer.write(torch.arange(16, dtype=torch.float32).reshape(4, 4))
    written = writer.close()
    assert written.sha256 == sha256_file(writer.path) == sha256_written(writer.path)
    moved = tmp_path / "moved.safetensors"
    os.replace(writer.path, moved)
    assert sha256_written(moved) == written.sha256
    data = bytearray(moved.read_bytes())
    data[-1] ^= 0xFF
    moved.write_bytes(bytes(data))
    os.utime(moved, ns=(1, 1))  # even at another modification time only: the memo is keyed by it
    assert sha256_written(moved) == sha256_file(moved) != written.sha256


def test_config_keeps_rope_theta_for_transformers_4(models_dir: Path, tmp_path: Path) -> None:
    """A config written by transformers 5 (rope_parameters only) gets rope_theta too, so 4.x reads the same θ."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(models_dir / "llama", base)
    cfg = json.loads((base / "config.json").read_text())
    cfg.pop("rope_theta", None)
    cfg["rope_parameters"] = {"rope_theta": 50000.0, "rope_type": "default"}
    (base / "config.json").write_text(json.dumps(cfg))
    adapter = make_adapter(models_dir / "llama", tmp_path / "adapter", target_modules=["q_proj"])
    merge(base, [adapter], tmp_path / "merged", MergeOptions(progress=False))
    out = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert out["rope_theta"] == 50000.0 and out["rope_parameters"]["rope_theta"] == 50000.0
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "merged").rope_parameters["rope_theta"] == 50000.0
