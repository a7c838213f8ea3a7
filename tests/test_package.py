"""package: shared graph with hot-swappable ONNX Runtime adapters, merged per variant, manifest and --check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_adapter

from lora_export.cli import main
from lora_export.io.errors import UnsupportedError
from lora_export.package.build import PackageOptions, package
from lora_export.package.check import check_package
from lora_export.package.variants import read_variants
from lora_export.records import PackageManifest


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


@pytest.fixture(scope="module")
def built(models_dir: Path, project: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The package of both layouts, built once by the CLI for the tests below."""
    out = tmp_path_factory.mktemp("built") / "pkg"
    r = CliRunner().invoke(
        main, ["package", str(models_dir / "llama"), "--variants", str(project / "variants.yaml"), "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    return out, r.output


def test_shared_layout_runs_in_ort_and_genai_with_each_adapter(built: tuple[Path, str]) -> None:
    out, output = built
    assert "identical tensors stored once" in output
    manifest = PackageManifest.load(out)
    assert json.loads((out / "manifest.json").read_text()) == manifest.to_dict()
    shared = manifest.shared
    assert shared is not None and shared.outputs[0] == "logits" and shared.inputs[:2] == ("input_ids", "attention_mask")
    assert manifest.passed and set(manifest.variants) == {"summarize", "support-chat"}
    ort_checks, (genai,) = shared.checks[:3], shared.checks[3:]
    assert all(c.passed and c.metrics[0].max_rel < 1e-5 for c in ort_checks)
    # ONNX Runtime GenAI runs shared/ as written, each .onnx_adapter active in turn: its logits are PyTorch's, and
    # each adapter moves them far beyond the tolerance, so an adapter GenAI did not apply would fail the check
    assert genai.name == "genai adapters" and genai.passed, genai.failures
    assert min(genai.details["adapter_effect"].values()) > 10 * 1e-3
    assert (out / "shared" / "genai_config.json").is_file()
    assert shared.adapters == {
        "summarize": "shared/summarize.onnx_adapter",
        "support-chat": "shared/support-chat.onnx_adapter",
    }
    assert all((out / f).is_file() for f in shared.adapters.values())
    # different ranks per module in one graph: q_proj has r=4 in one variant and 8+2… in the other
    params = shared.parameters["support-chat"]
    assert params["model.layers.0.self_attn.q_proj.lora_A"] == [8, 32]
    assert params["model.layers.0.mlp.down_proj.lora_A"] == [2, 64]
    # support-chat does not touch v_proj: the zero-rank default applies
    assert "model.layers.0.self_attn.v_proj.lora_A" not in params


def test_merged_layout_variants_are_runnable_folders_sharing_tensors(built: tuple[Path, str]) -> None:
    out, _ = built
    manifest = PackageManifest.load(out)
    assert {c.name for v in manifest.merged.values() for c in v.checks} >= {"onnx vs pytorch", "merge (float32)"}
    st = manifest.storage
    assert st["shared"]["adapter_files_bytes"] < st["shared"]["base_graph_bytes"] < st["merged_estimate_bytes"]
    assert {f.name for f in manifest.files} >= {
        "shared/model.onnx",
        "shared/reference.npz",
        "merged/summarize/model.onnx",
        "merged/summarize/common.data",
        "merged/support-chat/common.data",
    }
    sharing = manifest.merged_sharing  # k_proj, gate/up, embeddings, norms: identical in both merged variants
    assert sharing is not None and sharing["common_tensors"] >= 2 * 3 + 2
    assert sharing["common_bytes"] > max(sharing["per_variant_bytes"].values())
    # two variants: each shared tensor would have been written twice (or more)
    assert sharing["saved_bytes"] > 0.9 * sharing["common_bytes"]
    # each variant stays a folder runtimes load as it is; the common tensors are one file on disk, linked twice
    a, b = out / "merged" / "summarize", out / "merged" / "support-chat"
    assert {"model.onnx", "model.onnx.data", "common.data", "genai_config.json", "config.json"} <= {
        p.name for p in a.iterdir()
    }
    assert (a / "common.data").stat().st_ino == (b / "common.data").stat().st_ino
    assert manifest.merged["summarize"].graph == "merged/summarize/model.onnx"
    # and the rewritten folder still runs in GenAI as written, generating what PyTorch generated
    from lora_export.exporting.runtime_files import genai_check

    recorded = next(c for c in manifest.merged["summarize"].checks if c.name == "onnx generation").details
    assert genai_check(a, recorded["prompt_tokens"], recorded["reference"], "float32").passed
    assert st["merged"]["onnx_bytes"] < sum(
        p.stat().st_size for v in (a, b) for p in v.glob("*") if "onnx" in p.name or p.name == "common.data"
    )


def test_package_check_catches_changed_bytes_and_wrong_numbers(built: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = built
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
    assert not result.passed and result.failed == ["shared + summarize.onnx_adapter"]
    assert result.checks[0].passed  # the files are as the (edited) manifest says: the numbers caught it


def test_variants_file_in_json(project: Path, tmp_path: Path) -> None:
    """variants.yaml's mistakes are in test_bad_input; the same structure is read from JSON."""
    (tmp_path / "v.json").write_text(
        json.dumps({"variants": {"a": {"adapters": [str(project / "adapters" / "chat")]}}})
    )
    assert read_variants(tmp_path / "v.json")[0].adapters == [((project / "adapters" / "chat").resolve(), 1.0)]


def test_shared_layout_refuses_dora(models_dir: Path, tmp_path: Path) -> None:
    make_adapter(models_dir / "llama", tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    (tmp_path / "v.yaml").write_text("variants:\n  d:\n    adapters: [dora]\n")
    with pytest.raises(UnsupportedError, match="--mode merged"):
        package(models_dir / "llama", tmp_path / "v.yaml", tmp_path / "out", PackageOptions(mode="shared"))
    assert not (tmp_path / "out").exists()


def test_bench_measures_a_package(built: tuple[Path, str]) -> None:
    """Every layout of the package is run: the shared graph bare and with each adapter, and each merged graph (from
    their folders, after the package rewrote them to share tensors); ratios are medians over the base's median."""
    import statistics

    from lora_export.bench import BenchOptions, bench_package

    out, _ = built
    options = BenchOptions(shapes=((1, 8),), budget_s=0.05, min_rounds=5, max_rounds=10, warmup=1, progress=False)
    result = bench_package(out, options)
    assert [r.variant for r in result.rows] == [
        "base",
        "base-copy",
        "summarize shared+adapter",
        "support-chat shared+adapter",
        "summarize merged",
        "support-chat merged",
    ]
    base = result.rows[0].cells["1/8"]
    assert base.ratio == 1.0
    for row in result.rows:
        cell = row.cells["1/8"]
        assert len(cell.runs_ms) >= 5 and cell.median_ms == statistics.median(cell.runs_ms)
        assert cell.ratio == pytest.approx(cell.median_ms / base.median_ms)
    assert result.rows[2].params == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)  # q and v, two layers
    assert result.rows[4].description == "merged/summarize/model.onnx"
    structure = {r.variant: r.structure for r in result.rows}
    assert structure["base-copy"]["identical_to_base"] and structure["summarize shared+adapter"]["identical_to_base"]
    # a merged graph is the base graph without the LoRA branches: fewer nodes, no LoRA weights
    assert structure["summarize merged"]["graph_adds"]["op_calls"] < 0
    cells = {r.variant: r.cells["1/8"] for r in result.rows}  # nodes per forward, beside the times
    assert cells["base"].op_calls == structure["base"]["graph_nodes"] > cells["summarize merged"].op_calls
    assert any(v.startswith("onnxruntime 1/8: base-copy (A/A control") for v in result.verdicts)
    assert "opened as it was written" in result.method and "memory-mapped" not in result.method
