"""verify: passes on correct merges of every variant, and FAILS, naming the right layer, on broken ones."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from conftest import VARIANT_CASES, Variants, make_adapter
from safetensors.torch import load_file, save_file

from lora_export import MergeOptions, merge
from lora_export.cli import main
from lora_export.model.loading import load_model
from lora_export.records.tolerances import tolerance
from lora_export.verification.verify import VerifyOptions, verify

FAST = VerifyOptions(max_new_tokens=8)


def checks_by_name(report: Any) -> dict[str, Any]:
    return {c.name: c for c in report.checks}


@pytest.mark.parametrize("case", VARIANT_CASES)
def test_verify_passes_on_correct_merge(variants: Variants, case: str) -> None:
    model = variants.spec[case][0]
    report = verify(variants.base(case), [variants.adapter(case)], variants.merged(case), FAST)
    assert report.passed, [c.failures for c in report.checks]
    names = set(checks_by_name(report))
    assert {"weights (float32)", "merge (float32)"} <= names
    assert ("generation (float32)" in names) == (model != "bert")
    merge_check = checks_by_name(report)["merge (float32)"]
    assert merge_check.metrics and all(m.max_rel < 1e-5 for m in merge_check.metrics)
    assert report.diagnosis is None


def test_verify_passes_on_weighted_multi_adapter(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "llama"
    a = make_adapter(base, tmp_path / "a", seed=1, target_modules=["q_proj", "v_proj"])
    b = make_adapter(base, tmp_path / "b", seed=2, target_modules=["v_proj", "up_proj"], use_dora=True)
    merge(base, [a, b], tmp_path / "merged", MergeOptions(weights=(0.7, 0.3), progress=False))
    assert verify(base, [a, b], tmp_path / "merged", VerifyOptions(weights=(0.7, 0.3), max_new_tokens=8)).passed
    # the same merge checked against other weights is wrong
    report = verify(base, [a, b], tmp_path / "merged", VerifyOptions(weights=(0.3, 0.7), max_new_tokens=8))
    assert not report.passed


# ---------------------------------------------------------------------------------------------------------------------
# Broken merges: the verifier must fail and point at the right place


def edit_merged(folder: Path, edit: Any) -> None:
    f = folder / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def assert_fails_at(report: Any, module: str, layer: str) -> None:
    assert not report.passed
    first = report.diagnosis.first_divergence
    assert first is not None, report.diagnosis
    assert first.module == module, first
    assert first.layer == layer


def test_fails_on_wrong_scaling(models_dir: Path, tmp_path: Path) -> None:
    """Merged with α/√r (rsLoRA) while the adapter says α/r."""
    base = models_dir / "llama"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    wrong = tmp_path / "wrong-adapter"
    shutil.copytree(adapter, wrong)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    merge(base, [wrong], tmp_path / "merged", MergeOptions(progress=False))
    report = verify(base, [adapter], tmp_path / "merged", FAST)
    assert_fails_at(report, "model.layers.0.self_attn.q_proj", "model.layers.0")
    checks = checks_by_name(report)
    assert not checks["weights (float32)"].passed and not checks["merge (float32)"].passed
    worst = report.diagnosis.worst_tensors[0]["tensor"]
    assert worst.endswith(("q_proj.weight", "v_proj.weight"))


def test_fails_on_missing_fan_in_fan_out_transpose(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "gpt2"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["attn.c_proj"], fan_in_fan_out=True)
    merge(base, [adapter], tmp_path / "merged", MergeOptions(progress=False))
    w0 = load_file(base / "model.safetensors")
    ad = load_file(adapter / "adapter_model.safetensors")

    def untransposed(t: dict[str, torch.Tensor]) -> None:
        for i in range(2):
            p = f"transformer.h.{i}.attn.c_proj"
            a, b = ad[f"base_model.model.{p}.lora_A.weight"], ad[f"base_model.model.{p}.lora_B.weight"]
            t[f"{p}.weight"] = w0[f"{p}.weight"] + 2.0 * (b @ a)  # s = 8/4; ΔW not transposed to Conv1D's (in, out)

    edit_merged(tmp_path / "merged", untransposed)
    report = verify(base, [adapter], tmp_path / "merged", FAST)
    assert_fails_at(report, "transformer.h.0.attn.c_proj", "transformer.h.0")


def test_fails_on_one_layer_left_unmerged(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "llama"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules="all-linear")
    merge(base, [adapter], tmp_path / "merged", MergeOptions(progress=False))
    w0 = load_file(base / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    edit_merged(tmp_path / "merged", lambda t: t.update({name: w0[name]}))
    report = verify(base, [adapter], tmp_path / "merged", FAST)
    assert_fails_at(report, "model.layers.1.mlp.up_proj", "model.layers.1")
    weights = checks_by_name(report)["weights (float32)"]
    assert len(weights.failures) == 1 and weights.failures[0].startswith(name)
    assert report.diagnosis.worst_tensors[0]["tensor"] == name


def test_fails_on_adapter_merged_into_another_base(models_dir: Path, tmp_path: Path) -> None:
    from conftest import tiny_llama

    torch.manual_seed(999)
    tiny_llama(tied=False).save_pretrained(tmp_path / "other-base")
    base = models_dir / "llama"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    merge(tmp_path / "other-base", [adapter], tmp_path / "merged", MergeOptions(progress=False))
    report = verify(base, [adapter], tmp_path / "merged", FAST)
    assert_fails_at(report, "model.embed_tokens", "model.embed_tokens")
    assert len(checks_by_name(report)["weights (float32)"].failures) > 10


def test_fails_on_broken_bf16_artifact_and_names_the_tensor(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "llama"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    merge(base, [adapter], tmp_path / "merged", MergeOptions(dtype="bfloat16", progress=False))
    w0 = load_file(base / "model.safetensors")
    name = "model.layers.0.self_attn.v_proj.weight"
    edit_merged(tmp_path / "merged", lambda t: t.update({name: w0[name].to(torch.bfloat16)}))
    report = verify(base, [adapter], tmp_path / "merged", FAST)
    checks = checks_by_name(report)
    assert not checks["weights (bfloat16)"].passed and checks["merge (float32)"].passed
    assert report.diagnosis.worst_tensors[0]["tensor"] == name


# ---------------------------------------------------------------------------------------------------------------------
# Half precision: the difference is attributed to the cast


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_difference_is_the_cast(models_dir: Path, tmp_path: Path, dtype: str) -> None:
    base = models_dir / "llama"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules="all-linear")
    merge(base, [adapter], tmp_path / "merged", MergeOptions(dtype=dtype, progress=False))
    report = verify(base, [adapter], tmp_path / "merged", FAST)
    checks = checks_by_name(report)
    assert report.passed, [c.failures for c in report.checks]
    merge_err = max(m.max_rel for m in checks["merge (float32)"].metrics)
    cast_err = max(m.max_rel for m in checks[f"cast ({dtype})"].metrics)
    assert merge_err < 1e-5 < cast_err < tolerance("cast", dtype).max_rel  # the cast is where the difference comes from
    # the reported greedy tokens are what the merged model in that dtype generates, and the verdict is theirs
    assert report.generation.half is not None and report.generation.half[0] == dtype
    gen = report.generation.half[1]
    model = load_model(tmp_path / "merged", getattr(torch, dtype))
    prompt = torch.tensor([report.generation.prompt_tokens])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert list(gen.tokens) == out[0, prompt.shape[1] :].tolist()
    differs = [i for i, (a, b) in enumerate(zip(gen.reference, gen.tokens, strict=True)) if a != b]
    assert gen.first_difference == (differs[0] if differs else None)
    assert report.merged_dtype == dtype and set(report.tolerances) == {
        "weights/" + dtype,
        "merge/float32",
        "cast/" + dtype,
    }


# ---------------------------------------------------------------------------------------------------------------------
# CLI: exit codes, JSON, text


def test_cli_exit_codes_and_json(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "llama"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    merge(base, [adapter], tmp_path / "good", MergeOptions(progress=False))
    runner = CliRunner()
    ok = runner.invoke(
        main,
        [
            "verify",
            str(base),
            str(adapter),
            str(tmp_path / "good"),
            "--json",
            str(tmp_path / "r.json"),
            "--max-new-tokens",
            "4",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "PASS  merge (float32)" in ok.output and "result: PASS" in ok.output
    assert "tolerance merge/float32: rel ≤ 0.001, cosine ≥ 0.999999" in ok.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert (
        data["passed"] is True
        and data["tolerances"]["merge/float32"]["max_rel"] == tolerance("merge", "float32").max_rel
    )
    assert {c["name"] for c in data["checks"]} >= {"weights (float32)", "merge (float32)", "generation (float32)"}
    missing = runner.invoke(main, ["verify", str(base), str(adapter), str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "Error:" in missing.output and "nope" in missing.output
    too_few = runner.invoke(main, ["verify", str(base), str(tmp_path / "good")])
    assert too_few.exit_code == 2


def test_cli_failed_check_exit_1_json_and_junit(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "llama"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    merge(base, [adapter], tmp_path / "good", MergeOptions(progress=False))
    runner = CliRunner()
    w0 = load_file(base / "model.safetensors")
    shutil.copytree(tmp_path / "good", tmp_path / "bad")
    edit_merged(
        tmp_path / "bad",
        lambda t: t.update({"model.layers.1.self_attn.q_proj.weight": w0["model.layers.1.self_attn.q_proj.weight"]}),
    )
    bad = runner.invoke(
        main,
        [
            "verify",
            str(base),
            str(adapter),
            str(tmp_path / "bad"),
            "--json",
            str(tmp_path / "b.json"),
            "--max-new-tokens",
            "4",
            "--junit",
            str(tmp_path / "b.xml"),
        ],
    )
    assert bad.exit_code == 1, bad.output
    assert "FAIL  merge (float32)" in bad.output and "first divergence at model.layers.1.self_attn.q_proj" in bad.output
    assert json.loads((tmp_path / "b.json").read_text())["passed"] is False
    suite = ET.parse(tmp_path / "b.xml").getroot().find("testsuite")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {c["name"] for c in json.loads((tmp_path / "b.json").read_text())["checks"]}
    failed = {name for name, c in cases.items() if c.find("failure") is not None}
    assert "weights (float32)" in failed and "merge (float32)" in failed and suite.get("failures") == str(len(failed))
    assert "model.layers.1.self_attn.q_proj.weight" in cases["weights (float32)"].find("failure").text


def test_broken_merges_are_far_beyond_the_float32_tolerance(models_dir: Path, tmp_path: Path) -> None:
    """The float32 tolerance leaves room for fp32 noise of deep models; a missing delta is still 10× beyond it."""
    base = models_dir / "llama"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["o_proj"])
    merge(base, [adapter], tmp_path / "merged", MergeOptions(progress=False))
    w0 = load_file(base / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"
    edit_merged(tmp_path / "merged", lambda t: t.update({name: w0[name]}))
    report = verify(base, [adapter], tmp_path / "merged", FAST)
    worst = max(m.max_rel for m in checks_by_name(report)["merge (float32)"].metrics)
    assert worst > 10 * tolerance("merge", "float32").max_rel


def test_device_map_auto_offloads_and_agrees(models_dir: Path, tmp_path: Path) -> None:
    """--device-map auto through accelerate, with so little memory allowed that most layers are offloaded to disk:
    the same checks pass with the same numbers as on one device (DoRA, whose scale needs the offloaded W0, included)."""
    base = models_dir / "llama"
    adapter = make_adapter(base, tmp_path / "dora", target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    merge(base, [adapter], tmp_path / "merged", MergeOptions(progress=False))
    plain = verify(base, [adapter], tmp_path / "merged", FAST)
    args = [
        "verify",
        str(base),
        str(adapter),
        str(tmp_path / "merged"),
        "--max-new-tokens",
        "8",
        "--device-map",
        "auto",
        "--max-memory",
        "cpu=60KB",
        "--json",
        str(tmp_path / "r.json"),
        "--junit",
        str(tmp_path / "r.xml"),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "device map, unmerged:" in r.output and "on disk" in r.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["placement"]["unmerged"].get("disk", 0) >= 1 and data["placement"]["unmerged"].get("cpu", 0) >= 1
    # the same checks on the same cases with the same numbers: offloading moves weights, not arithmetic
    assert [c["name"] for c in data["checks"]] == [c.name for c in plain.checks] and data["passed"]
    for check, mapped in zip(plain.checks, data["checks"], strict=True):
        assert [(m["case"], m["output"]) for m in mapped["metrics"]] == [(m.case, m.output) for m in check.metrics]
        for m, mm in zip(check.metrics, mapped["metrics"], strict=True):
            assert mm["max_abs"] == pytest.approx(m.max_abs, rel=1e-3, abs=1e-9)
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert suite.get("tests") == str(len(plain.checks)) and suite.get("failures") == "0"
    usage = CliRunner().invoke(
        main, ["verify", str(base), str(adapter), str(tmp_path / "merged"), "--max-memory", "cpu=1GB"]
    )
    assert usage.exit_code == 2 and "--max-memory applies with --device-map" in usage.output
    bad = CliRunner().invoke(
        main,
        [
            "verify",
            str(base),
            str(adapter),
            str(tmp_path / "merged"),
            "--device-map",
            "auto",
            "--max-memory",
            "gpu0:1GB",
        ],
    )
    assert bad.exit_code == 2 and "DEVICE=SIZE" in bad.output


def test_an_unknown_tolerance_key_is_an_internal_error(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check asking for a tolerance the table lacks is a bug in lora-export, not bad input: exit 3 and the
    report-a-bug line (it was exit 2, as if the user's files were at fault)."""
    from lora_export.records import tolerances

    base = models_dir / "llama"
    adapter = make_adapter(base, tmp_path / "a", target_modules=["q_proj"])
    merge(base, [adapter], tmp_path / "m", MergeOptions(progress=False))
    monkeypatch.delitem(tolerances.TOLERANCES, ("weights", "float32"))
    r = CliRunner().invoke(main, ["verify", str(base), str(adapter), str(tmp_path / "m"), "--max-new-tokens", "2"])
    assert r.exit_code == 3, r.output
    assert "internal error (LookupError: no tolerance for comparing weights in float32" in r.output
    assert "this is a bug in lora-export" in r.output
