"""Issue 24, by class: each class of input that escaped the third hostile round is handled at the boundary — one
output-location check, one strict JSON writer, typed numeric options, path probes wherever a path is read from a file,
chat templates compiled before use — and each test builds several members of its class, not the one example."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import click
import pytest
from conftest import copy_adapter, merged_llama, run_cli
from safetensors.torch import load_file, save_file

from lora_export.cli import main
from lora_export.io.jsonio import json_text
from lora_export.records.tolerances import tolerance


@pytest.fixture(scope="module")
def world(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hardening3")
    base, adapter, merged = merged_llama(models_dir, root)
    return {"root": root, "base": base, "adapter": adapter, "merged": merged}


def one_error(code: int, output: str, *fragments: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in errors[0], output
    return errors[0]


# ---------------------------------------------------------------------------------------------------------------------
# Output locations that overlap what is read, or the folder the user is in


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("where", ["cwd", "cwd-by-path", "ancestor-of-cwd", "input", "inside-input", "above-input"])
def test_output_overlapping_inputs_or_the_current_folder(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, overwrite: list[str]
) -> None:
    here = tmp_path / "work"
    here.mkdir()
    monkeypatch.chdir(here)
    out = {
        "cwd": ".",
        "cwd-by-path": str(here),
        "ancestor-of-cwd": str(tmp_path),
        "input": str(world["merged"]),
        "inside-input": str(world["merged"] / "sub"),
        "above-input": str(world["root"]),
    }[where]
    for argv in (
        ["merge", str(world["base"]), str(world["adapter"]), "-o", out, "-q"],
        ["export", str(world["merged"]), "-o", out],
        ["swap", str(world["merged"]), "--remove", str(world["adapter"]), "--add", str(world["adapter"]), "-o", out],
    ):
        if where in ("input", "inside-input", "above-input") and argv[0] == "merge":
            argv[2] = str(world["merged"])  # the merged folder as the adapter argument: an input of the command
        code, output = run_cli([*argv, *overwrite])
        assert code == 2, (argv, output)
        assert "Traceback" not in output and output.count("Error:") == 1, output
    assert here.is_dir() and (world["merged"] / "lora_export.json").is_file()


@pytest.mark.parametrize("report", ["inside-input", "is-input-file", "inside-output"])
def test_report_files_inside_what_the_command_reads_or_writes(
    world: dict[str, Path], tmp_path: Path, report: str
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n")
    target = (
        {"inside-input": world["merged"] / "verify.json", "is-input-file": prompts}[report]
        if report != "inside-output"
        else None
    )
    if target is not None:
        args = ["verify", str(world["base"]), str(world["adapter"]), str(world["merged"]), "--prompts", str(prompts),
                "--json", str(target)]  # fmt: skip
    else:
        out = tmp_path / "out"
        out.mkdir()
        args = ["export", str(world["merged"]), "-o", str(out), "--overwrite", "--json", str(out / "r.json")]
    before = prompts.read_text()
    one_error(*run_cli(args), "which this command reads or writes")
    assert prompts.read_text() == before and not (world["merged"] / "verify.json").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Names the file system cannot hold, and link loops wherever a path is read from a file


def test_names_too_long_and_loops_read_from_files(world: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "loopA").symlink_to(tmp_path / "loopB")
    (tmp_path / "loopB").symlink_to(tmp_path / "loopA")
    long = "n" * 300
    cases = {
        "a variant name over 100 characters": (f"  {long}:\n    adapters: [{world['adapter']}]\n", "use at most 100"),
        "a variant adapter path over 255 bytes": (f"  a:\n    adapters: [{long}]\n", "too long for the file system"),
        "a variant adapter that is a link loop": ("  a:\n    adapters: [loopA]\n", "symbolic link loop"),
        "two names equal up to case": (
            f"  Caps:\n    adapters: [{world['adapter']}]\n  caps:\n    adapters: [{world['adapter']}]\n",
            "up to case",
        ),
    }
    for what, (body, fragment) in cases.items():
        variants = tmp_path / "variants.yaml"
        variants.write_text("variants:\n" + body)
        code, output = run_cli(["package", str(world["base"]), "--variants", str(variants), "-o", str(tmp_path / "p")])
        one_error(code, output, fragment, str(variants))
        assert not (tmp_path / "p").exists(), what
    for named in (str(tmp_path / "loopA"), str(tmp_path / long)):  # the base an adapter names (first path: adapter)
        adapter = copy_adapter(world["adapter"], tmp_path / f"named-{len(named)}")
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": named}))
        one_error(*run_cli(["merge", str(adapter), "-o", str(tmp_path / "m"), "-q"]), "give BASE first")
        code, output = run_cli(
            ["merge", str(world["base"]), str(adapter), "-o", str(tmp_path / f"m-{len(named)}"), "-q"]
        )
        assert code == 0, output  # with BASE given, the named base is only compared: "not on this machine"
        assert "not on this machine" in output
    for arg in (str(tmp_path / long), str(tmp_path / "loopA")):  # and on the command line, for every kind of path
        for argv in (["merge", str(world["base"]), arg, "-o", str(tmp_path / "x")], ["inspect", arg],
                     ["verify", str(world["base"]), str(world["adapter"]), str(world["merged"]), "--prompts", arg],
                     ["merge", str(world["base"]), str(world["adapter"]), "-o", arg + "/out"]):  # fmt: skip
            code, output = run_cli(argv)
            assert code == 2 and "Traceback" not in output and output.count("Error:") == 1, (argv, output)


def test_fifo_where_a_file_or_folder_is_written(world: dict[str, Path], tmp_path: Path) -> None:
    """A FIFO as a report file would block the run forever waiting for a reader; as a folder it is not one."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for argv in (
        ["verify", str(world["base"]), str(world["adapter"]), str(world["merged"]), "--json", str(fifo)],
        [
            "swap",
            str(world["merged"]),
            "--remove",
            str(world["adapter"]),
            "--add",
            str(world["adapter"]),
            "-o",
            str(tmp_path / "s"),
            "--junit",
            str(fifo),
        ],  # fmt: skip
        ["demo", "--workdir", str(fifo)],
        ["merge", str(world["base"]), str(world["adapter"]), "-o", str(fifo)],
    ):
        code, output = run_cli(argv)
        assert code == 2 and output.count("Error:") == 1 and "fifo" in output, (argv, output)


# ---------------------------------------------------------------------------------------------------------------------
# Chat templates that must compile


@pytest.mark.parametrize(
    ("where", "template", "fragment"),
    [
        ("chat_template.jinja", "{% for m in messages %}{{ m.content }", "TemplateSyntaxError"),
        ("chat_template.jinja", "{% if %}x{% endif %}", "TemplateSyntaxError"),
        ("tokenizer_config.json", "{{ raise_exception('no user turns here') }}", "no user turns here"),
        ("tokenizer_config.json", "{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}", "nosuchfilter"),
    ],
)
def test_chat_templates_that_do_not_render(tmp_path: Path, where: str, template: str, fragment: str) -> None:
    import subprocess
    import sys

    from conftest import REPO

    subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_model.py"), str(tmp_path)], check=True)
    base = tmp_path / "base"
    if where == "chat_template.jinja":
        (base / where).write_text(template)
    else:
        config = json.loads((base / where).read_text())
        (base / where).write_text(json.dumps({**config, "chat_template": template}))
    code, output = run_cli(["merge", str(base), str(tmp_path / "adapter"), "-o", str(tmp_path / "m"), "-q"])
    assert code == 0, output  # merging copies the files; what runs the template refuses it, naming it
    for argv in (
        ["verify", str(base), str(tmp_path / "adapter"), str(tmp_path / "m")],
        ["merge-and-onnx", str(base), str(tmp_path / "adapter"), "-o", str(tmp_path / "o")],
    ):
        error = one_error(*run_cli(argv), "chat template", fragment)
        assert where in error or "tokenizer" in error, error
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Strict JSON, and degenerate values reported as what they are


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_the_json_writer_is_strict(value: float) -> None:
    data = {"a": value, "b": [1.0, value, {"c": (value, 2)}], 3: "x"}
    parsed = json.loads(json_text(data), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert parsed == {"a": None, "b": [1.0, None, {"c": [None, 2]}], "3": "x"}
    assert "Infinity" not in json.dumps(tolerance("weights", "float32").to_dict(), allow_nan=False)


@pytest.mark.parametrize("kind", ["zero", "huge", "inf", "nan"])
def test_inspect_degenerate_deltas(world: dict[str, Path], tmp_path: Path, kind: str) -> None:
    """ΔW = 0: rank 0, effective rank 0, no amplification (was rank 1 and amplification Infinity, not JSON); huge but
    finite factors: their spectrum in float64, strict JSON; non-finite factors: refused naming the tensor."""
    adapter = copy_adapter(world["adapter"], tmp_path / kind)
    tensors = load_file(adapter / "adapter_model.safetensors")
    scale = {"zero": 0.0, "huge": 1e37, "inf": math.inf, "nan": math.nan}[kind]
    save_file(
        {k: v * scale if "lora_B" in k else v for k, v in tensors.items()}, str(adapter / "adapter_model.safetensors")
    )
    code, output = run_cli(["inspect", str(adapter), "--base", str(world["base"]), "--json"])
    if kind in ("inf", "nan"):
        one_error(code, output, "NaN/Inf values", "lora_B")
        return
    assert code == 0, output
    report = json.loads(output[output.index("{") :], parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    for module in report["modules"]:
        spectrum = module["spectrum"]
        if kind == "zero":
            assert spectrum["rank"] == 0 and spectrum["effective_rank"] == 0.0 and spectrum["amplification"] is None
        else:
            assert spectrum["finite"] and spectrum["delta_norm"] > 1e30 and spectrum["effective_rank"] >= 1
    code, output = run_cli(["inspect", str(adapter)])
    assert code == 0, output


# ---------------------------------------------------------------------------------------------------------------------
# Numeric options: every one gets its range at parse time


def numeric_options() -> list[tuple[str, str]]:
    found = []
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and param.type.name in ("integer range", "float", "size", "DEV=SIZE,…"):
                found.append((name, param.opts[-1]))
            elif isinstance(param, click.Option) and param.type.name == "integer":
                pytest.fail(f"{name} {param.opts[-1]} is an integer without a range")
    return found


@pytest.mark.parametrize(("command", "option"), numeric_options())
@pytest.mark.parametrize("value", ["-3", "0", str(2**70), "nan", "-inf", "1e400", "abc"])
def test_numeric_options_outside_their_meaning(command: str, option: str, value: str) -> None:
    param = next(p for p in main.commands[command].params if option in p.opts)
    text = f"cpu={value}" if option == "--max-memory" else value
    try:
        param.type.convert(text, param, None)
    except click.BadParameter:
        pass
    else:
        pytest.skip(f"{option} {value} is in range")  # e.g. --seed 0, a --weight of -3 (W0 − 3·ΔW)
    argv = [command, "--device-map", "auto", option, text] if option == "--max-memory" else [command, option, text]
    error = one_error(*run_cli(argv))
    assert f"'{option}'" in error or f"'{param.opts[0]}'" in error, (argv, error)
