"""Hub addresses for bases and adapters (org/name, org/name@revision), resolved through a Hugging Face cache built
on disk in the layout huggingface_hub reads (refs/, snapshots/COMMIT/ with links into blobs/). No network: offline
mode, or an endpoint on a closed local port."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import assert_one_error, make_adapter, run_cli
from hypothesis import given
from hypothesis import strategies as st

from lora_export.io.hashing import sha256_file
from lora_export.model import hub

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import cache_repo  # noqa: E402  (tools/ is not a package)


def name_base(adapter: Path, base: str) -> Path:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


@pytest.fixture
def hf(models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """A cache with org/base (the tiny LLaMA) and org/adapter: main → adapter A, tag v1 → adapter B; both adapters
    name org/base as their base, as PEFT writes it after `from_pretrained("org/base")`."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = models_dir / "llama"
    a = name_base(make_adapter(base, tmp_path / "a", target_modules=["q_proj", "v_proj"]), "org/base")
    b = name_base(make_adapter(base, tmp_path / "b", seed=1, target_modules=["q_proj", "o_proj"]), "org/base")
    commits = {
        "base": cache_repo(cache, "org/base", base),
        "a": cache_repo(cache, "org/adapter", a),
        "b": cache_repo(cache, "org/adapter", b, refs=("v1",), tag="v1"),
    }
    return {"cache": cache, "base": base, "a": a, "b": b, "commits": commits}


def weights_sha(folder: Path) -> str:
    return sha256_file(folder / "model.safetensors")


@given(
    org=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}[A-Za-z0-9]", fullmatch=True),
    name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}[A-Za-z0-9]", fullmatch=True),
    revision=st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9][\w./-]{0,30}", fullmatch=True)),
)
def test_addresses_parse_and_paths_never_do(org: str, name: str, revision: str | None) -> None:
    text = f"{org}/{name}" + (f"@{revision}" if revision else "")
    expected = None if ".." in f"{org}/{name}" or "--" in f"{org}/{name}" else (f"{org}/{name}", revision)
    assert hub.parse_address(text) == expected
    for path in (f"./{org}/{name}", f"/{org}/{name}", f"~/{org}", f"{org}/{name}/x", f"{org}\\{name}"):
        assert hub.parse_address(path) is None


@given(st.text(max_size=60))
def test_any_text_is_an_address_or_not_without_raising(text: str) -> None:
    parsed = hub.parse_address(text)
    assert parsed is None or (parsed[0] in text and "/" not in parsed[0].split("/", 1)[-1])


def test_ids_give_what_folders_give_and_the_manifest_pins_the_commits(hf: dict, tmp_path: Path) -> None:
    code, out = run_cli(["merge", str(hf["base"]), str(hf["a"]), "-o", str(tmp_path / "folders"), "-q"])
    assert code == 0, out
    code, out = run_cli(["merge", "org/base", "org/adapter", "-o", str(tmp_path / "ids"), "-q"])
    assert code == 0, out
    assert weights_sha(tmp_path / "ids") == weights_sha(tmp_path / "folders")
    manifest = json.loads((tmp_path / "ids" / "lora_export.json").read_text())
    assert manifest["base"]["source"] == {
        "given": "org/base",
        "repo": "org/base",
        "revision": None,
        "commit": hf["commits"]["base"],
    }
    assert manifest["adapters"][0]["source"]["commit"] == hf["commits"]["a"]
    assert manifest["adapters"][0]["files"][1]["sha256"] == sha256_file(hf["a"] / "adapter_model.safetensors")
    local = json.loads((tmp_path / "folders" / "lora_export.json").read_text())
    assert "source" not in local["base"] and "source" not in local["adapters"][0]


def test_revisions_tags_commits_and_a_missing_revision(hf: dict, tmp_path: Path) -> None:
    code, out = run_cli(["merge", str(hf["base"]), str(hf["b"]), "-o", str(tmp_path / "mb"), "-q"])
    assert code == 0 and "warning" not in out, out  # the folder is a copy of the cached org/base the adapter names
    for revision in ("v1", hf["commits"]["b"]):
        out_dir = tmp_path / f"rev-{revision[:8]}"
        code, out = run_cli(["merge", "org/base", f"org/adapter@{revision}", "-o", str(out_dir), "-q"])
        assert code == 0, out
        assert weights_sha(out_dir) == weights_sha(tmp_path / "mb")
        source = json.loads((out_dir / "lora_export.json").read_text())["adapters"][0]["source"]
        assert (source["revision"], source["commit"]) == (revision, hf["commits"]["b"])
    code, out = run_cli(["merge", "org/base", "org/adapter@v9", "-o", str(tmp_path / "x"), "-q"])
    assert_one_error(code, out, tmp_path / "x", ("org/adapter@v9", "revision v9", str(hf["cache"]), "HF_HUB_OFFLINE"))
    code, out = run_cli(["merge", "org/base", "nobody/nothing", "-o", str(tmp_path / "x"), "-q"])
    assert_one_error(code, out, tmp_path / "x", ("nobody/nothing", "not in the Hugging Face cache", "give a folder"))


def test_online_but_unreachable_is_one_line(hf: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The network allowed but the Hub unreachable (a closed local port): tried the cache, then the download."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    code, out = run_cli(["merge", "org/base", "org/adapter", "-o", str(tmp_path / "ok"), "-q"])
    assert code == 0, out  # in the cache: nothing is fetched
    code, out = run_cli(["merge", "org/base", "org/missing", "-o", str(tmp_path / "x"), "-q"])
    assert_one_error(code, out, tmp_path / "x", ("org/missing", "downloading it failed", "give a folder"))


def test_a_folder_shadows_an_address(hf: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(hf["b"], tmp_path / "org" / "adapter")
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(["merge", "org/base", "org/adapter", "-o", str(tmp_path / "shadow"), "-q"])
    assert code == 0, out
    code, out = run_cli(["merge", str(hf["base"]), str(hf["b"]), "-o", str(tmp_path / "mb"), "-q"])
    assert weights_sha(tmp_path / "shadow") == weights_sha(tmp_path / "mb")
    assert "source" not in json.loads((tmp_path / "shadow" / "lora_export.json").read_text())["adapters"][0]


def test_the_adapter_names_its_base(hf: dict, tmp_path: Path) -> None:
    code, out = run_cli(["merge", "org/adapter@v1", "-o", str(tmp_path / "named"), "-q"])
    assert code == 0, out
    assert "base: org/base (named by" in out
    code, out = run_cli(["merge", str(hf["base"]), str(hf["b"]), "-o", str(tmp_path / "mb"), "-q"])
    assert weights_sha(tmp_path / "named") == weights_sha(tmp_path / "mb")
    nameless = name_base(shutil.copytree(hf["a"], tmp_path / "nameless"), "")
    code, out = run_cli(["merge", str(nameless), "-o", str(tmp_path / "x"), "-q"])
    assert_one_error(code, out, tmp_path / "x", ("adapter_config.json names no base", "give BASE"))
    gone = name_base(shutil.copytree(hf["a"], tmp_path / "gone"), "/nowhere/llama")
    code, out = run_cli(["merge", str(gone), "-o", str(tmp_path / "x"), "-q"])
    assert_one_error(code, out, tmp_path / "x", ("names its base /nowhere/llama", "give BASE first"))


def test_an_adapter_naming_another_base(hf: dict, models_dir: Path, tmp_path: Path) -> None:
    other = name_base(shutil.copytree(hf["a"], tmp_path / "other"), "org/other-base")
    code, out = run_cli(["merge", "org/base", str(other), "-o", str(tmp_path / "warned"), "-q"])
    assert code == 0, out
    assert "warning:" in out and "org/other-base" in out and "org/base@" in out
    code, out = run_cli(["inspect", str(other), "--base", "org/base"])  # inspect and swap say it too
    assert code == 0 and "trained on org/other-base" in out, out
    assert run_cli(["merge", "org/base", "org/adapter", "-o", str(tmp_path / "m0"), "-q"])[0] == 0
    code, out = run_cli(
        ["swap", str(tmp_path / "m0"), "--remove", str(hf["a"]), "--add", str(other), "-o", str(tmp_path / "s")]
    )
    assert code == 0 and "trained on org/other-base" in out, out
    code, out = run_cli(["merge", "org/base", str(other), "-o", str(tmp_path / "x"), "-q", "--strict-base"])
    assert_one_error(code, out, tmp_path / "x", ("trained on org/other-base", "--strict-base"))
    # a base named by a path that is not on this machine: said, not refused, even with --strict-base
    moved = name_base(shutil.copytree(hf["a"], tmp_path / "moved"), "/home/someone/llama")
    code, out = run_cli(["merge", "org/base", str(moved), "-o", str(tmp_path / "m"), "-q", "--strict-base"])
    assert code == 0 and "not on this machine" in out, out
    # a local folder that is a copy of the named base (the same config.json) is that base
    shutil.copytree(models_dir / "llama", tmp_path / "copy")
    code, out = run_cli(["merge", str(tmp_path / "copy"), "org/adapter", "-o", str(tmp_path / "c"), "--strict-base"])
    assert code == 0, out


def test_every_command_takes_ids(hf: dict, tmp_path: Path) -> None:
    """verify, merge-and-onnx, export, bench, package (variants file), swap and inspect, through addresses."""
    merged = tmp_path / "merged"
    assert run_cli(["merge", "org/base", "org/adapter", "-o", str(merged), "-q"])[0] == 0
    code, out = run_cli(["verify", "org/base", "org/adapter", str(merged), "--json", str(tmp_path / "v.json")])
    assert code == 0, out
    by_id = json.loads((tmp_path / "v.json").read_text())
    assert by_id["sources"][str(hub.from_cache("org/base", None, "base"))]["commit"] == hf["commits"]["base"]
    code, out = run_cli(["verify", str(hf["base"]), str(hf["a"]), str(merged), "--json", str(tmp_path / "f.json")])
    by_folder = json.loads((tmp_path / "f.json").read_text())
    assert by_id["checks"] == by_folder["checks"] and by_folder["sources"] is None  # the same numbers, to the bit
    code, out = run_cli(["verify", "org/adapter", str(merged)])  # the base the adapter names
    assert code == 0, out
    code, out = run_cli(["merge-and-onnx", "org/adapter", "-o", str(tmp_path / "onnx"), "--exporter", "dynamo"])
    assert code == 0, out
    report = json.loads((tmp_path / "onnx" / "report.json").read_text())
    assert {s["repo"] for s in report["inputs"]["sources"].values()} == {"org/base", "org/adapter"}
    assert weights_sha(tmp_path / "onnx" / "merged") == weights_sha(merged)  # the base the adapter names, merged
    code, out = run_cli(["export", "org/base", "-o", str(tmp_path / "base-onnx"), "--exporter", "dynamo"])
    assert code == 0, out
    code, out = run_cli(["bench", "org/adapter@v1", "--quick", "--budget", "0.05", "--shapes", "1x8"])
    assert code == 0 and "| merged |" in out, out
    (tmp_path / "variants.yaml").write_text(
        "variants:\n  a:\n    adapters: [org/adapter]\n  b:\n    adapters: [org/adapter@v1]\n"
    )
    code, out = run_cli(
        ["package", "org/base", "--variants", str(tmp_path / "variants.yaml"), "-o", str(tmp_path / "pkg"),
         "--mode", "shared", "--exporter", "dynamo"]
    )  # fmt: skip
    assert code == 0, out
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert manifest["base_source"]["commit"] == hf["commits"]["base"]
    assert manifest["variants"]["b"]["adapters"][0]["source"]["revision"] == "v1"
    assert run_cli(["package", "--check", str(tmp_path / "pkg")])[0] == 0
    code, out = run_cli(
        ["swap", str(merged), "--remove", "org/adapter", "--add", "org/adapter@v1", "-o", str(tmp_path / "s")]
    )
    assert code == 0, out
    code, out = run_cli(["inspect", "org/adapter@v1", "--base", "org/base"])
    assert code == 0 and "compatible" in out, out


def test_swap_finds_a_hub_base_in_a_moved_cache(hf: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest pins the base's repository and commit: when the cache has moved (the recorded snapshot path is
    gone), swap finds the same commit in the cache as it is now and still compares with a fresh merge."""
    merged = tmp_path / "merged"
    assert run_cli(["merge", "org/base", "org/adapter", "-o", str(merged), "-q"])[0] == 0
    moved = tmp_path / "moved-cache"
    shutil.move(hf["cache"], moved)
    monkeypatch.setenv("HF_HUB_CACHE", str(moved))
    code, out = run_cli(
        ["swap", str(merged), "--remove", str(hf["a"]), "--add", str(hf["b"]), "-o", str(tmp_path / "s")]
    )
    assert code == 0 and "not where the manifest says" not in out, out
    shutil.rmtree(moved)
    code, out = run_cli(
        ["swap", str(merged), "--remove", str(hf["a"]), "--add", str(hf["b"]), "-o", str(tmp_path / "t")]
    )
    assert code == 0 and "not where the manifest says" in out, out


def test_the_cache_follows_the_environment_at_run_time(
    hf: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_HUB_CACHE, else HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub — read when the command runs."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the fixture's cache is HF_HOME/hub
    assert hub.cache_dir() == hf["cache"]
    code, out = run_cli(["merge", "org/adapter@v1", "-o", str(tmp_path / "m"), "-q"])
    assert code == 0, out
    for value, offline in (("1", True), ("true", True), ("0", False), ("", False), ("off", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub.offline() is offline


def test_a_damaged_recorded_source_is_refused(hf: dict, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    assert run_cli(["merge", "org/base", "org/adapter", "-o", str(merged), "-q"])[0] == 0
    manifest = json.loads((merged / "lora_export.json").read_text())
    manifest["base"]["source"]["commit"] = "main"
    (merged / "lora_export.json").write_text(json.dumps(manifest))
    code, out = run_cli(
        ["swap", str(merged), "--remove", str(hf["a"]), "--add", str(hf["b"]), "-o", str(tmp_path / "s")]
    )
    assert_one_error(code, out, tmp_path / "s", ("lora_export.json", "source", "40-hex commit"))


def test_a_download_fetches_only_what_a_model_needs(hf: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not in the cache, network allowed: one snapshot_download with patterns for weights, config and tokenizer
    (not ONNX, GGUF, TF, Flax or pickled model copies), at the revision asked, into the cache in use, with a log
    line; the folder it returns is what the command reads."""
    import fnmatch

    import huggingface_hub

    calls = []

    def fake(repo: str, **kwargs: object) -> str:
        if kwargs.get("local_files_only"):  # the cache is asked first: it has nothing
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        calls.append((repo, kwargs))
        return str(hf["base"])

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    logged: list[str] = []
    assert hub.resolve("org/fresh@v3", "base", log=logged.append) == hf["base"]
    ((repo, kwargs),) = calls
    assert repo == "org/fresh" and kwargs["revision"] == "v3" and kwargs["cache_dir"] == hf["cache"]
    wanted = ["config.json", "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer.model", "merges.txt", "chat_template.jinja", "adapter_model.safetensors"]  # fmt: skip
    unwanted = ["model.onnx", "model.gguf", "tf_model.h5", "flax_model.msgpack", "pytorch_model.bin", "onnx/model.onnx"]
    patterns = kwargs["allow_patterns"]
    assert all(any(fnmatch.fnmatch(f, p) for p in patterns) for f in wanted)
    assert not any(any(fnmatch.fnmatch(f, p) for p in patterns) for f in unwanted)
    assert logged and "org/fresh at revision v3" in logged[0]


def test_a_cached_config_without_weights_is_not_a_model(hf: dict, tmp_path: Path) -> None:
    """A snapshot holding only config.json (what AutoConfig.from_pretrained leaves in the cache): offline, one line
    saying the weights are missing from the cache, not a merge that fails later."""
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copyfile(hf["base"] / "config.json", only_config / "config.json")
    cache_repo(hf["cache"], "org/config-only", only_config)
    code, out = run_cli(["merge", "org/config-only", str(hf["a"]), "-o", str(tmp_path / "x"), "-q"])
    assert_one_error(
        code, out, tmp_path / "x", ("org/config-only", "without its weights", "hf download org/config-only")
    )


def test_a_resolved_address_carries_its_source_and_nothing_is_remembered(hf: dict) -> None:
    """Resolving returns the source with the folder; no module-level state is written, so the same folder reached as a
    plain path later is recorded as that path (revision unknown), whatever was resolved earlier in the process."""
    state = {
        k: copy.deepcopy(v) for k, v in vars(hub).items() if isinstance(v, dict | list | set) and not k.startswith("__")
    }
    folder = hub.resolve_address("org/adapter@v1", "adapter")
    source = hub.source_of(folder)
    assert source is not None
    assert (source.given, source.repo, source.revision, source.commit) == (
        "org/adapter@v1",
        "org/adapter",
        "v1",
        hf["commits"]["b"],
    )
    plain = hub.source_of(Path(str(folder)))
    assert plain is not None and (plain.given, plain.revision, plain.commit) == (str(folder), None, hf["commits"]["b"])
    assert {k: v for k, v in vars(hub).items() if isinstance(v, dict | list | set) and not k.startswith("__")} == state
