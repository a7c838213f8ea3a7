"""package: shared graph with hot-swappable ONNX Runtime adapters, merged per variant, manifest and --check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_adapter

from lora_export.cli import main
from lora_export.errors import UnsupportedError
from lora_export.package import check_package, package, read_variants


@pytest.fixture(scope="module")
def project(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("project")
    base = models_dir / "llama"
    make_adapter(base, root / "adapters" / "summarize", seed=1, target_modules=["q_proj", "v_proj"])
    make_adapter(base, root / "adapters" / "chat", seed=2, target_modules=["q_proj", "o_proj"], r=8)
    make_adapter(base, root / "adapters" / "tone", seed=3, target_modules=["down_proj"], r=2, use_rslora=True)
    (root / "variants.yaml").write_text("""variants:
  summarize:
    adapters: [adapters/summarize]
  support-chat:
    adapters:
      - {path: adapters/chat, weight: 0.7}
      - {path: adapters/tone, weight: 0.3}
""")
    return root


def test_shared_and_merged_layouts_and_check(models_dir: Path, project: Path, tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    r = CliRunner().invoke(main, ["package", str(models_dir / "llama"), "--variants", str(project / "variants.yaml"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "identical tensors stored once" in r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shared"]["outputs"][0] == "logits" and manifest["shared"]["inputs"][:2] == ["input_ids", "attention_mask"]
    assert manifest["passed"] and set(manifest["variants"]) == {"summarize", "support-chat"}
    checks = manifest["shared"]["checks"]
    assert len(checks) == 3 and all(c["passed"] and c["max_rel"] < 1e-5 for c in checks)
    assert (out / "shared" / "summarize.onnx_adapter").is_file() and (out / "shared" / "support-chat.onnx_adapter").is_file()
    # different ranks per module in one graph: q_proj has r=4 in one variant and 8+2… in the other
    params = manifest["shared"]["adapters"]["support-chat"]["parameters"]
    assert params["model.layers.0.self_attn.q_proj.lora_A"] == [8, 32] and params["model.layers.0.mlp.down_proj.lora_A"] == [2, 64]
    assert "model.layers.0.self_attn.v_proj.lora_A" not in params  # support-chat does not touch v_proj: the zero-rank default applies
    assert {c["check"] for v in manifest["merged"].values() for c in v["checks"]} >= {"onnx vs pytorch", "merge (float32)"}
    st = manifest["storage"]
    assert st["shared"]["adapter_files_bytes"] < st["shared"]["base_graph_bytes"] < st["merged_estimate_bytes"]
    assert {f["name"] for f in manifest["files"]} >= {"shared/model.onnx", "shared/reference.npz", "merged-onnx/common.data", "merged-onnx/summarize.onnx"}
    sharing = manifest["merged_sharing"]  # k_proj, gate/up, embeddings, norms: identical in both merged variants
    assert sharing["common_tensors"] >= 2 * 3 + 2 and sharing["common_bytes"] > max(sharing["per_variant_bytes"].values())
    assert sharing["saved_bytes"] > 0.9 * sharing["common_bytes"]  # two variants: each shared tensor would have been written twice (or more)
    assert not (out / "merged" / "summarize" / "model.onnx").exists() and (out / "merged-onnx" / "summarize.onnx").is_file()
    assert manifest["merged"]["summarize"]["graph"] == "merged-onnx/summarize.onnx"
    ok = CliRunner().invoke(main, ["package", "--check", str(out)])
    assert ok.exit_code == 0 and "package check: PASS" in ok.output

    # a changed byte: caught by the hashes
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    f = bad / "shared" / "summarize.onnx_adapter"
    data = bytearray(f.read_bytes())
    data[-8] ^= 0x40
    f.write_bytes(bytes(data))
    r = CliRunner().invoke(main, ["package", "--check", str(bad)])
    assert r.exit_code == 1 and "summarize.onnx_adapter: sha256/size differ" in r.output

    # the wrong adapter under a consistent manifest: caught by the numbers
    wrong = tmp_path / "wrong"
    shutil.copytree(out, wrong)
    shutil.copy2(wrong / "shared" / "support-chat.onnx_adapter", wrong / "shared" / "summarize.onnx_adapter")
    m = json.loads((wrong / "manifest.json").read_text())
    src = next(x for x in m["files"] if x["name"] == "shared/support-chat.onnx_adapter")
    for x in m["files"]:
        if x["name"] == "shared/summarize.onnx_adapter":
            x["sha256"], x["size"] = src["sha256"], src["size"]
    (wrong / "manifest.json").write_text(json.dumps(m))
    result = check_package(wrong)
    assert not result["passed"] and any("summarize" in p for p in result["problems"])


def test_variants_file_in_json(project: Path, tmp_path: Path) -> None:
    """variants.yaml's mistakes are in test_bad_input; the same structure is read from JSON."""
    (tmp_path / "v.json").write_text(json.dumps({"variants": {"a": {"adapters": [str(project / "adapters" / "chat")]}}}))
    assert read_variants(tmp_path / "v.json")[0].adapters == [((project / "adapters" / "chat").resolve(), 1.0)]


def test_shared_layout_refuses_dora(models_dir: Path, tmp_path: Path) -> None:
    make_adapter(models_dir / "llama", tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    (tmp_path / "v.yaml").write_text("variants:\n  d:\n    adapters: [dora]\n")
    with pytest.raises(UnsupportedError, match="--mode merged"):
        package(models_dir / "llama", tmp_path / "v.yaml", tmp_path / "out", mode="shared")
    assert not (tmp_path / "out").exists()


def test_bench_measures_a_package(models_dir: Path, project: Path, tmp_path: Path) -> None:
    from lora_export.bench import BenchOptions, bench_package

    package(models_dir / "llama", project / "variants.yaml", tmp_path / "pkg", mode="shared")
    result = bench_package(tmp_path / "pkg", BenchOptions(shapes=((1, 8),), budget_s=0.05, min_rounds=5, max_rounds=10, warmup=1, progress=False))
    assert [r.variant for r in result.rows] == ["base", "summarize shared+adapter", "support-chat shared+adapter"]
    assert all(r.cells["1/8"].ratio > 0 and len(r.cells["1/8"].runs_ms) >= 5 for r in result.rows)
    assert result.rows[1].params == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)  # q and v, two layers
