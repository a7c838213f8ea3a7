"""The second exporter: ONNX Runtime GenAI's model builder on the merged folder, checked in GenAI against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import make_adapter

from lora_export.cli import main
from lora_export.exporting.genai_builder import genai_logits_check, pytorch_references
from lora_export.model.loading import load_model

pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnx_ir")


def add_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over the tiny model's 96 ids: the builder saves the model's tokenizer beside the graph."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(96)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2", pad_token="w3")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA whose head size (16) GroupQueryAttention accepts, with a tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("builder") / "llama"
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        LlamaForCausalLM(config).save_pretrained(folder)
    add_tokenizer(folder)
    return folder


def test_merge_and_onnx_with_the_genai_builder(base: Path, tmp_path: Path) -> None:
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main,
        ["merge-and-onnx", str(base), str(adapter), "-o", str(out), "--exporter", "genai", "--max-new-tokens", "6"],
    )
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["exporter"] == "onnxruntime_genai.models.builder"
    genai = next(c for c in report["checks"] if c["name"] == "genai vs pytorch")
    assert genai["passed"] and {m["case"].split(" step ")[1] for m in genai["metrics"]} >= {"0", "1", "5"}
    assert json.loads((out / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is True
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert "GroupQueryAttention" in ops  # the fused graph, not the dynamo one


def test_genai_check_fails_against_another_model(base: Path, tmp_path: Path, models_dir: Path) -> None:
    """The builder's graph of the base, checked against a merged model: the logits differ, the check fails."""
    r = CliRunner().invoke(main, ["export", str(base), "-o", str(tmp_path / "b"), "--exporter", "genai"])
    assert r.exit_code == 0, r.output
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    from lora_export.verification.lora_runtime import load_unmerged

    prompts = [[5, 6, 7, 8]]
    other = pytorch_references(load_unmerged(base, [adapter]), prompts, 4)
    check = genai_logits_check(tmp_path / "b", prompts, other, "float32")
    assert not check.passed and any("rel error" in f for f in check.failures)
    same = genai_logits_check(tmp_path / "b", prompts, pytorch_references(load_model(base), prompts, 4), "float32")
    assert same.passed, same.failures


def test_auto_and_refusals(models_dir: Path, tmp_path: Path) -> None:
    """auto falls back to dynamo and says why; --exporter genai on what the builder cannot build is refused."""
    r = CliRunner().invoke(main, ["export", str(models_dir / "gpt2"), "-o", str(tmp_path / "g"), "--exporter", "auto"])
    assert r.exit_code == 0, r.output
    choice = json.loads((tmp_path / "g" / "report.json").read_text())["export"]["exporter_choice"]
    assert choice == "auto: the GenAI model builder does not build GPT2LMHeadModel"
    r = CliRunner().invoke(
        main, ["export", str(models_dir / "llama"), "-o", str(tmp_path / "n"), "--exporter", "genai"]
    )
    assert r.exit_code == 2 and "multiple of 16 (this model: 8)" in r.output and not (tmp_path / "n").exists()


def assert_base_tensors_linked(out: Path, manifest: Any) -> None:
    """Each merged variant's common.data is the shared graph's data file (one inode); a variant's own data holds
    only what its adapters changed."""
    shared_data = (out / "shared" / "model.onnx.data").stat()
    for name in ("one", "two"):
        common = (out / "merged" / name / "common.data").stat()
        assert common.st_ino == shared_data.st_ino and common.st_size == shared_data.st_size
    sharing = manifest.merged_sharing
    assert sharing is not None and sharing["saved_bytes"] > 0
    # "two" adapts k/down and (through "one") q/v/o/gate: more of its own than "one", less than the base
    assert sharing["per_variant_bytes"]["one"] < sharing["per_variant_bytes"]["two"] < sharing["common_bytes"]


def test_package_on_the_builder_graph_with_swappable_adapters(base: Path, tmp_path: Path) -> None:
    """package's default exporter (auto) on a model the builder builds: the shared layout is the builder's graph
    with LoRA inputs, every variant checked in GenAI (og.Adapters) against PyTorch (the merged variants' references,
    verified against the unmerged model); merged variants are builder graphs too; package --check re-runs all of it in GenAI; swapped references fail."""
    import numpy as np

    from lora_export.exporting.runtime_files import genai_adapters_check
    from lora_export.records import PackageManifest

    one = make_adapter(base, tmp_path / "one", target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"])
    two = make_adapter(base, tmp_path / "two", seed=1, target_modules=["k_proj", "down_proj"])
    (tmp_path / "variants.yaml").write_text(
        f"variants:\n  one:\n    adapters: [{one}]\n  two:\n    adapters:\n"
        f"      - {{path: {two}, weight: 0.5}}\n      - {{path: {one}, weight: 0.5}}\n"
    )
    out = tmp_path / "pkg"
    r = CliRunner().invoke(main, ["package", str(base), "--variants", str(tmp_path / "variants.yaml"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    manifest = PackageManifest.load(out)
    assert manifest.shared is not None and manifest.shared.exporter == "genai"
    assert {v.exporter for v in manifest.merged.values()} == {"genai"}
    # exported once: every merged variant is the shared layout's graph of the base with its own weights, the
    # tensors its adapters did not change stored once (common.data: a hard link to the shared graph's data), and
    # still checked in GenAI
    assert all(m.reused_graph.startswith("the base's builder graph") for m in manifest.merged.values())
    assert all(any(c.name == "genai vs pytorch" and c.passed for c in m.checks) for m in manifest.merged.values())
    assert_base_tensors_linked(out, manifest)
    adapters_check = next(c for c in manifest.shared.checks if c.name == "genai adapters")
    assert adapters_check.passed and min(adapters_check.details["adapter_effect"].values()) > 0.01
    # q, k and v of the packed MatMul all have inputs; the base's own inputs are GenAI's contract
    assert "model.layers.0.self_attn.k_proj" in manifest.shared.lora_inputs
    assert "position_ids" not in manifest.shared.inputs
    r = CliRunner().invoke(main, ["package", "--check", str(out)])
    assert r.exit_code == 0, r.output
    ref = np.load(out / "shared" / "reference.npz")
    prompt = ref["genai:prompt"].tolist()
    swapped = {
        "one": (ref["tokens:two"].tolist(), ref["logits:two"]),
        "two": (ref["tokens:one"].tolist(), ref["logits:one"]),
    }
    files = {n: out / "shared" / f"{n}.onnx_adapter" for n in ("one", "two")}
    check = genai_adapters_check(out / "shared", files, prompt, swapped)
    assert not check.passed and any("one: logits" in f for f in check.failures)
    # what users feel, in GenAI: prefill and ms per token for base, shared + adapter and merged, rotating
    js = tmp_path / "bench.json"
    args = ["bench", "--package", str(out), "--backend", "genai", "--shapes", "1x8", "--quick", "--json", str(js)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    bench = json.loads(js.read_text())
    assert bench["shapes"] == ["prefill 1/8", "decode ms/token 1/8+16"]
    variants = [row["variant"] for row in bench["rows"]]
    assert variants == ["base", "base-copy", "one shared+adapter", "two shared+adapter", "one merged", "two merged"]
    assert any(v.startswith("genai decode") and "base-copy (A/A control" in v for v in bench["verdicts"])
    rows = {row["variant"]: row["structure"] for row in bench["rows"]}
    assert rows["one shared+adapter"]["identical_to_base"] and rows["base-copy"]["identical_to_base"]
    # the merged graph is the base's without the LoRA branches: fewer nodes, and both merged share one graph
    assert not rows["one merged"]["identical_to_base"] and rows["one merged"]["graph_adds"]["op_calls"] < 0
    assert rows["one merged"] == rows["two merged"]
    assert all(len(row["cells"][s]["runs_ms"]) >= 5 for row in bench["rows"] for s in bench["shapes"])


def test_lora_inputs_refuse_what_the_graph_does_not_hold(base: Path, tmp_path: Path) -> None:
    import onnx

    from lora_export.io.errors import UnsupportedError
    from lora_export.model.config import ModelConfig
    from lora_export.package.genai_lora import node_path, plan_branches

    assert node_path("model.layers.12.self_attn.q_proj") == "/model/layers.12/attn/q_proj"
    assert node_path("model.layers.3.mlp.down_proj") == "/model/layers.3/mlp/down_proj"
    r = CliRunner().invoke(main, ["export", str(base), "-o", str(tmp_path / "b"), "--exporter", "genai"])
    assert r.exit_code == 0, r.output
    graph = onnx.load(str(tmp_path / "b" / "model.onnx"), load_external_data=False).graph
    config = ModelConfig.load(base)
    plan = plan_branches(graph, {"model.layers.1.self_attn.v_proj": (32, 64)}, config)
    assert [m for m, _, _ in plan["/model/layers.1/attn/qkv_proj/MatMul"]] == [
        f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")
    ]
    with pytest.raises(UnsupportedError, match="no MatMul"):
        plan_branches(graph, {"model.layers.1.mlp.fc9": (64, 64)}, config)
    with pytest.raises(UnsupportedError, match="weight shape"):
        plan_branches(graph, {"model.layers.1.self_attn.o_proj": (64, 32)}, config)


def test_leaving_early_kills_the_builder(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (or any error) while the builder's child process runs beside our own work: the child is killed, not
    left writing into a folder that is being removed."""
    import subprocess

    from lora_export.exporting import genai_builder

    children = []
    real = subprocess.Popen

    def recording(*args: object, **kwargs: object) -> subprocess.Popen:
        children.append(real(*args, **kwargs))  # type: ignore[call-overload]
        return children[-1]

    monkeypatch.setattr(genai_builder.subprocess, "Popen", recording)
    with pytest.raises(KeyboardInterrupt), genai_builder.genai_build(base, tmp_path / "o", "float32", print):
        raise KeyboardInterrupt
    assert len(children) == 1 and children[0].returncode is not None and children[0].returncode < 0


def test_a_graph_is_reused_only_when_its_recipes_rebuild_it(base: Path, tmp_path: Path) -> None:
    """recipes() rebuilds every initializer of the builder's graph from the folder it read, bit for bit; a merged
    folder that is not the one the graph was built from (one tensor changed) is refused with the tensor's name."""
    from safetensors.torch import load_file, save_file

    from lora_export.exporting.genai_reuse import template_of

    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "o_proj"])
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["merge-and-onnx", str(base), str(adapter), "-o", str(out), "--exporter", "genai"])
    assert r.exit_code == 0, r.output
    found = template_of(out, out / "merged")
    assert not isinstance(found, str) and found.data == "model.onnx.data"
    assert found.recipes["model.layers.0.attn.qkv_proj.MatMul.weight"] == (
        "cat-T",
        [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"],
    )
    (weights,) = (out / "merged").glob("*.safetensors")
    tensors = load_file(str(weights))
    tensors["model.layers.1.self_attn.k_proj.weight"][0, 0] += 1.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert (
        template_of(out, out / "merged")
        == "model.layers.1.attn.qkv_proj.MatMul.weight is not cat-T of "
        + str([f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"])
        + " in the builder's graph"
    )


def test_float16_is_built_for_cuda_and_checked_on_the_cpu_provider(base: Path, tmp_path: Path) -> None:
    """The builder's float16 graph for CUDA (its CPU float16 graph does not run in ONNX Runtime's CPU provider),
    checked here in GenAI with the providers cleared; the folder keeps its CUDA genai_config.json; the report says
    both. auto does not pick it: a float16 CPU folder as written is the dynamo graph."""
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    out = tmp_path / "out"
    args = ["merge-and-onnx", str(base), str(adapter), "-o", str(out), "--exporter", "genai", "--dtype", "float16"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["target"] == "cuda" and "CPU provider" in report["export"]["checked_on"]
    check = next(c for c in report["checks"] if c["name"] == "genai vs pytorch")
    assert check["passed"] and check["dtype"] == "float16"
    providers = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert "cuda" in json.dumps(providers["provider_options"])
    r = CliRunner().invoke(main, ["export", str(out / "merged"), "-o", str(tmp_path / "auto")])
    assert r.exit_code == 0, r.output
    choice = json.loads((tmp_path / "auto" / "report.json").read_text())["export"]["exporter_choice"]
    assert choice.startswith("auto: the builder's float16 graph targets CUDA")


def test_the_builder_graph_of_a_merged_model_is_the_base_graph(base: Path, tmp_path: Path) -> None:
    """Structure, exactly: the builder's graph of the merged model equals the base's up to initializer values."""
    from lora_export.verification.structure import onnx_structure

    adapter = make_adapter(base, tmp_path / "adapter", target_modules="all-linear")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["merge-and-onnx", str(base), str(adapter), "-o", str(out), "--exporter", "genai"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["export", str(base), "-o", str(tmp_path / "b"), "--exporter", "genai"])
    assert r.exit_code == 0, r.output
    merged, original = onnx_structure(out / "model.onnx"), onnx_structure(tmp_path / "b" / "model.onnx")
    assert merged.same_as(original) and merged.ops.get("com.microsoft.GroupQueryAttention") == 2


def test_shared_adapters_checked_on_the_merged_variants_references(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With both layouts, a float32 variant's PyTorch pass is made once: its merged GenAI check's references (same
    prompt) are what the shared layout's adapter is checked against and stores; a float16 variant's merged model is
    not the float32 truth, so its shared-layout references come from its unmerged model."""
    import numpy as np

    from lora_export.package import genai
    from lora_export.records import PackageManifest

    one = make_adapter(base, tmp_path / "one", target_modules=["q_proj", "v_proj"])
    half = make_adapter(base, tmp_path / "half", seed=1, target_modules=["k_proj", "down_proj"])
    (tmp_path / "variants.yaml").write_text(
        f"variants:\n  one: {{adapters: [{one}]}}\n  half: {{adapters: [{half}], dtype: float16}}\n"
    )
    unmerged: list[object] = []
    real = genai.load_unmerged
    monkeypatch.setattr(genai, "load_unmerged", lambda *a, **k: unmerged.append(a) or real(*a, **k))
    out = tmp_path / "pkg"
    r = CliRunner().invoke(main, ["package", str(base), "--variants", str(tmp_path / "variants.yaml"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    manifest = PackageManifest.load(out)
    assert manifest.passed and manifest.merged["half"].dtype == "float16"
    assert [Path(a[1][0]).name for a in unmerged] == ["half"]  # "one" had its merged references: no second pass
    shared, merged = np.load(out / "shared" / "reference.npz"), np.load(out / "merged" / "one" / "reference.npz")
    assert shared["genai:prompt"].tolist() == merged["genai:prompt"].tolist()
    assert shared["tokens:one"].tolist() == merged["tokens:one"].tolist()
    assert np.array_equal(shared["logits:one"], merged["logits:one"])
    r = CliRunner().invoke(main, ["package", "--check", str(out)])
    assert r.exit_code == 0, r.output
