"""swap: W − ΔW_A + ΔW_B equals a fresh merge of B (fp32), refuses what it cannot do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_adapter, read_all

from lora_export import MergeOptions, merge
from lora_export.cli import main
from lora_export.io.errors import InputError, UnsupportedError
from lora_export.merging.swap import swap
from lora_export.records import MergeManifest


def test_swap_equals_fresh_merge(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "llama"
    a = make_adapter(base, tmp_path / "a", seed=1, target_modules=["q_proj", "v_proj"])
    b = make_adapter(base, tmp_path / "b", seed=2, target_modules=["v_proj", "down_proj"], r=8)
    merge(base, [a], tmp_path / "with-a", MergeOptions(weights=(0.5,), progress=False))
    r = CliRunner().invoke(
        main, ["swap", str(tmp_path / "with-a"), "--remove", str(a), "--add", str(b), "-o", str(tmp_path / "with-b")]
    )
    assert r.exit_code == 0, r.output
    assert "PASS  vs fresh merge" in r.output
    fresh = merge(base, [b], tmp_path / "fresh", MergeOptions(progress=False))
    got, want, w0 = read_all(tmp_path / "with-b"), read_all(fresh.output), read_all(base)
    for name, t in want.items():
        assert (got[name] - t).abs().max() <= 1e-6 * t.abs().max(), name
    assert torch.equal(got["model.layers.0.self_attn.k_proj.weight"], w0["model.layers.0.self_attn.k_proj.weight"])


def test_swap_in_bfloat16_is_bounded_and_reported(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "llama"
    a = make_adapter(base, tmp_path / "a", seed=1, target_modules=["q_proj"])
    b = make_adapter(base, tmp_path / "b", seed=2, target_modules=["q_proj"])
    merge(base, [a], tmp_path / "with-a", MergeOptions(dtype="bfloat16", progress=False))
    report = swap(tmp_path / "with-a", a, b, tmp_path / "with-b")
    assert report.dtype == "bfloat16" and report.passed and report.checks[0].name == "vs fresh merge"
    max_rel = report.checks[0].details["max_rel"]
    assert 0 < max_rel < torch.finfo(torch.bfloat16).eps  # two roundings, not more
    recorded = MergeManifest.load(tmp_path / "with-b").swap
    assert recorded is not None and recorded["removed_weight"] == 1.0 and recorded["passed"]


def test_swap_fails_and_writes_nothing_when_the_manifest_lies(models_dir: Path, tmp_path: Path) -> None:
    """A manifest whose recorded weight is not what was merged: the swap leaves a residue of ΔW_A, the comparison
    with a fresh merge catches it, exit 1, nothing written."""
    base = models_dir / "llama"
    a = make_adapter(base, tmp_path / "a", seed=1, target_modules=["q_proj"])
    b = make_adapter(base, tmp_path / "b", seed=2, target_modules=["q_proj"])
    merge(base, [a], tmp_path / "with-a", MergeOptions(weights=(0.5,), progress=False))
    manifest = json.loads((tmp_path / "with-a" / "lora_export.json").read_text())
    manifest["adapters"][0]["weight"] = 1.0
    (tmp_path / "with-a" / "lora_export.json").write_text(json.dumps(manifest))
    report = swap(tmp_path / "with-a", a, b, tmp_path / "with-b")
    assert not report.passed and "differs from a fresh merge" in report.checks[0].failures[0]
    assert not (tmp_path / "with-b").exists()
    reports = ["--json", str(tmp_path / "swap.json"), "--junit", str(tmp_path / "swap.xml")]
    r = CliRunner().invoke(
        main,
        ["swap", str(tmp_path / "with-a"), "--remove", str(a), "--add", str(b), "-o", str(tmp_path / "c"), *reports],
    )
    assert r.exit_code == 1 and "FAIL  vs fresh merge" in r.output and not (tmp_path / "c").exists()
    written = json.loads((tmp_path / "swap.json").read_text())  # the reports are written when the check fails too
    assert written["passed"] is False and written["checks"][0]["name"] == "vs fresh merge"
    assert '<testsuite name="lora-export swap"' in (tmp_path / "swap.xml").read_text()
    assert 'failures="1"' in (tmp_path / "swap.xml").read_text()


def test_swap_refusals(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "llama"
    a = make_adapter(base, tmp_path / "a", seed=1, target_modules=["q_proj"])
    other = make_adapter(base, tmp_path / "other", seed=9, target_modules=["q_proj"])
    dora = make_adapter(base, tmp_path / "dora", seed=3, target_modules=["q_proj"], use_dora=True)
    merge(base, [a], tmp_path / "with-a", MergeOptions(progress=False))
    with pytest.raises(InputError, match="not recorded as merged"):
        swap(tmp_path / "with-a", other, a, tmp_path / "x")
    with pytest.raises(UnsupportedError, match="DoRA"):
        swap(tmp_path / "with-a", a, dora, tmp_path / "x")
    with pytest.raises(InputError, match="lora_export.json"):
        swap(base, a, other, tmp_path / "x")
    assert not (tmp_path / "x").exists()
