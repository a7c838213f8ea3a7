"""Exporters: ONNX (with past) on six model families, TorchScript and torch.export, merge-and-onnx end to end, and
checks that fail when the artifact is not the model."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import make_adapter

from lora_export import MergeOptions, merge
from lora_export.cli import main
from lora_export.exporting import onnx as onnx_exporter
from lora_export.exporting.onnx import OnnxOptions, export_onnx
from lora_export.exporting.onnx_check import verify_onnx
from lora_export.exporting.pipeline import ExportOptions, export, merge_and_onnx
from lora_export.exporting.runtime_files import genai_installed
from lora_export.exporting.torchscript import check_torch_artifact
from lora_export.io.errors import ExportError, UnsupportedError
from lora_export.model.loading import load_model
from lora_export.records import PipelineReport

GENAI_INSTALLED = genai_installed()

FAMILIES = {  # model → LoRA targets
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "qwen2": ["q_proj", "o_proj"],
    "mistral": ["k_proj", "down_proj"],
    "phi": ["q_proj", "dense"],
    "opt": ["q_proj", "fc1"],
}


@pytest.fixture(scope="module")
def merged_models(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merged")
    out = {}
    for name, targets in FAMILIES.items():
        adapter = make_adapter(models_dir / name, root / f"{name}-adapter", target_modules=targets)
        merge(models_dir / name, [adapter], root / name, MergeOptions(progress=False))
        out[name] = root / name
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_export_verified_per_family(merged_models: dict[str, Path], tmp_path: Path, family: str) -> None:
    result = export(merged_models[family], tmp_path / "out", ExportOptions(onnx=OnnxOptions(max_new_tokens=6)))
    assert result.passed
    names = {c.name for c in result.checks}
    decoder = family != "bert"
    genai = (tmp_path / "out" / "genai_config.json").is_file()
    expected = {"onnx vs pytorch"} | ({"onnx generation"} if decoder else set())
    expected |= {"genai generation"} if genai and GENAI_INSTALLED else set()  # else the report says it was not run
    assert names == expected
    # every decoder runs in GenAI as written, or the report says why not (tiny GPT-2's eos id lies outside its vocab)
    notes = list(result.report.export.runtime_files or ())
    assert genai == (decoder and family != "gpt2"), notes
    assert genai or not decoder or any("genai_config.json not written: eos_token_id 50256" in n for n in notes)
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    inputs = [i.name for i in graph.graph.input]
    outputs = [o.name for o in graph.graph.output]
    if decoder:
        assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"] and inputs[3] == "past_key_values.0.key"
        assert outputs[0] == "logits" and outputs[1:3] == ["present.0.key", "present.0.value"]
        cases = {m.case for m in result.checks[0].metrics}
        assert {"prefill 1×6", "prefill 4×32 padded", "decode 4×1 past 32"} <= cases
        batch_axis = graph.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch_axis.dim_param, "batch axis must be dynamic"
    else:
        assert inputs[:2] == ["input_ids", "attention_mask"] and outputs == ["logits"]
    report = PipelineReport.load(tmp_path / "out")
    assert report.passed and {f.name for f in report.output_files} >= {"model.onnx", "config.json"}
    assert report == result.report  # what was written reads back the same
    assert (tmp_path / "out" / "report.md").read_text().startswith("# lora-export export: PASS")


def test_verify_onnx_fails_for_another_model(merged_models: dict[str, Path], models_dir: Path, tmp_path: Path) -> None:
    """The ONNX check is not a formality: the graph of one model against the weights of another fails."""
    exported = export_onnx(load_model(merged_models["llama"]), tmp_path / "m.onnx", OnnxOptions(max_new_tokens=4))
    checks, _ = verify_onnx(load_model(models_dir / "llama"), exported, OnnxOptions(max_new_tokens=4))
    assert not checks[0].passed and checks[0].failures


def test_no_past_and_optimize(merged_models: dict[str, Path], tmp_path: Path) -> None:
    plain = export(merged_models["llama"], tmp_path / "plain", ExportOptions(onnx=OnnxOptions(with_past=False)))
    graph = onnx.load(str(tmp_path / "plain" / "model.onnx"))
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask", "position_ids"] and plain.passed
    opt = export(
        merged_models["gpt2"], tmp_path / "opt", ExportOptions(onnx=OnnxOptions(optimize=True, max_new_tokens=4))
    )
    assert opt.passed and opt.report.export.optimized
    assert not (tmp_path / "opt" / "model.optimized.onnx").exists()


def test_external_data_over_the_limit(
    merged_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_exporter, "TWO_GB", 1000)  # a tiny model takes the >2 GB path
    result = export(
        merged_models["qwen2"], tmp_path / "out", ExportOptions(onnx=OnnxOptions(optimize=True, max_new_tokens=4))
    )
    assert result.passed and result.report.export.external_data
    assert (tmp_path / "out" / "model.onnx.data").stat().st_size > (tmp_path / "out" / "model.onnx").stat().st_size
    assert result.report.export.files == ("model.onnx", "model.onnx.data")


def test_float16_export(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "llama"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    result = merge_and_onnx(
        base,
        [adapter],
        tmp_path / "out",
        MergeOptions(dtype="float16", progress=False),
        ExportOptions(onnx=OnnxOptions(max_new_tokens=4)),
    )
    assert result.passed and result.report.export.dtype == "float16"
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_torch_formats(merged_models: dict[str, Path], models_dir: Path, tmp_path: Path, fmt: str, family: str) -> None:
    import transformers

    if family != "bert" and int(transformers.__version__.split(".")[0]) < 5:
        with pytest.raises(UnsupportedError, match="torch.vmap"):  # refused, not exported broken
            export(merged_models[family], tmp_path / "out", ExportOptions(format=fmt))
        assert not (tmp_path / "out").exists()
        return
    result = export(merged_models[family], tmp_path / "out", ExportOptions(format=fmt))
    assert result.passed, result.checks[0].failures
    artifact = tmp_path / "out" / ("model.pt" if fmt == "torchscript" else "model.pt2")
    assert artifact.is_file()
    assert not check_torch_artifact(
        load_model(models_dir / family), fmt, artifact
    ).passed  # another model's weights fail


# ---------------------------------------------------------------------------------------------------------------------
# merge-and-onnx


def test_merge_and_onnx_cli(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "llama"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], use_dora=True)
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main,
        [
            "merge-and-onnx",
            str(base),
            str(adapter),
            "-o",
            str(out),
            "--max-new-tokens",
            "6",
            "--json",
            str(tmp_path / "r.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert (
        "merge-and-onnx: PASS" in r.output
        and "PASS  onnx generation" in r.output
        and "PASS  merge (float32)" in r.output
    )
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "merged", "report.json", "report.md", "config.json"}
    assert (out / "merged" / "lora_export.json").is_file() and (out / "merged" / "model.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report == json.loads((tmp_path / "r.json").read_text())
    assert [c["name"] for c in report["checks"]] == [
        "weights (float32)",
        "merge (float32)",
        "generation (float32)",
        "onnx vs pytorch",
        "onnx generation",
        *(["genai generation"] if GENAI_INSTALLED else []),
    ]
    assert report["verify"]["tolerances"]["merge/float32"]["max_rel"] == 1e-3
    again = CliRunner().invoke(main, ["merge-and-onnx", str(base), str(adapter), "-o", str(out)])
    assert again.exit_code == 2 and "exists" in again.output


def test_merge_and_onnx_failure_writes_nothing(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong artifact (here: the graph of the unmerged base) fails the command; nothing appears at OUT_DIR."""
    base = models_dir / "llama"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    real_export = onnx_exporter.export_onnx

    def export_the_base(model: torch.nn.Module, path: Path, options: OnnxOptions, log: object = None) -> object:
        return real_export(load_model(base), path, options)

    monkeypatch.setattr("lora_export.exporting.pipeline.export_onnx", export_the_base)
    failed = merge_and_onnx(
        base,
        [adapter],
        tmp_path / "out",
        MergeOptions(progress=False),
        ExportOptions(onnx=OnnxOptions(max_new_tokens=4)),
    )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    assert not failed.passed and "onnx vs pytorch" in failed.report.failed
    r = CliRunner().invoke(
        main,
        [
            "merge-and-onnx",
            str(base),
            str(adapter),
            "-o",
            str(tmp_path / "out2"),
            "--json",
            str(tmp_path / "fail.json"),
        ],
    )
    assert r.exit_code == 1 and "FAIL  onnx vs pytorch" in r.output and "nothing was written" in r.output
    assert json.loads((tmp_path / "fail.json").read_text())["passed"] is False and not (tmp_path / "out2").exists()


def test_bfloat16_onnx_is_refused(models_dir: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["export", str(models_dir / "llama-bf16"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "bfloat16" in r.output and "float16 or float32" in r.output
    assert not (tmp_path / "out").exists()


def test_fallback_exporter_is_named_with_its_reason(
    merged_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = torch.onnx.export

    def dynamo_broken(*args: object, **kwargs: object) -> object:
        if kwargs.get("dynamo"):
            raise RuntimeError("simulated dynamo failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_broken)
    logged: list[str] = []
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:  # the TorchScript-based exporter cannot trace 4.x's vmap masks
        with pytest.raises(ExportError, match="both exporters"):
            export(
                merged_models["gpt2"],
                tmp_path / "out",
                ExportOptions(onnx=OnnxOptions(max_new_tokens=4)),
                log=logged.append,
            )
        assert any("simulated dynamo failure" in line for line in logged) and not (tmp_path / "out").exists()
        return
    result = export(
        merged_models["gpt2"],
        tmp_path / "out",
        ExportOptions(onnx=OnnxOptions(opset=18, max_new_tokens=4)),
        log=logged.append,
    )
    assert result.passed
    assert result.report.export.exporter == "torch.onnx.export(dynamo=False) fallback"
    assert any("simulated dynamo failure" in line for line in logged)
    assert "simulated dynamo failure" in result.report.export.notes[0]
    assert onnx.load(str(tmp_path / "out" / "model.onnx")).opset_import[0].version == 18
