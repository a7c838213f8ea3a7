"""Issue 24: a property-based fuzz of the whole CLI. Hypothesis draws argv for every subcommand from its own Click
parameters — numbers of every sign and size (and text that is not one), paths of every kind (missing, FIFO, dangling
link, link loop, a name over 255 bytes, a non-UTF-8 name, a file where a folder belongs, /dev/null, the current
folder), names, hostile variants files, option combinations — and checks the promises on every case: exit 0, 1 or 2,
never 3 and never a traceback; an exit 2 is one `Error:` line; nothing half-written is left; the valid inputs are
unchanged; every JSON written (a --json file, or --json on stdout) parses with a strict parser."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import click
import pytest
from conftest import copy_adapter, merged_llama
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_hostile import tree_hash

from lora_export.cli import main

CASES = int(os.environ.get("FUZZ_CASES", 520))  # derandomized: the same cases on every run

NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.integers(-3, 40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "-0", "0x10", "", " ", "1_000", "٣", "3.5", "1e-400", "abc"]),
)
BAD_NUMBERS = st.sampled_from(["-1", "-3", "0", str(2**70), "nan", "inf", "1e400", "", "abc", "3.5x", "0x10", "٣x"])
TEXT = st.text(alphabet="0123456789x,=.-abcdGiBMTKcpuisk /", max_size=14)
NOT_FOLDERS = ["fifo", "loop", "long", "nonutf8", "file", "devnull"]
BAD_PATHS = ["fifo", "dangling", "loop", "long", "nonutf8", "devnull", "out-in-input"]
PATH_KINDS = ["missing", "fifo", "dangling", "loop", "long", "nonutf8", "file", "empty", "devnull", "dot", "base",
              "adapter", "merged", "hub", "bare", "variants", "bad-variants", "out", "out-in-input", "overflow"]  # fmt: skip
# A valid value per parameter, so that a case can be valid but for one value (or valid throughout: cheap commands).
VALID: dict[str, Any] = {
    "out_dir": "out", "json_file": "report", "junit_file": "report", "markdown_file": "report", "plot_file": "report",
    "weights": st.floats(-2, 2).map(repr), "max_shard_size": st.sampled_from(["2KB", "100KB", "5GB"]),
    "prompts_file": "prompts", "max_new_tokens": st.integers(1, 3).map(str), "seed": st.integers(0, 99).map(str),
    "device": st.just("cpu"), "max_memory": st.just("cpu=4GiB"), "opset": st.integers(14, 20).map(str),
    "precision": st.sampled_from(["fp32", "fp16"]), "accuracy_level": st.integers(1, 4).map(str),
    "eval_text": "eval-text", "merged_dir": "merged", "remove": "adapter", "add": "adapter", "base_dir": "base",
    "adapter_dir": st.sampled_from(["adapter", "overflow"]), "target": "base", "variants_file": "variants",
    "shapes": st.just("1x8"), "adapter_params": st.integers(1, 999).map(str), "budget": st.just("0.05"),
    "threads": st.integers(1, 2).map(str), "prompt": st.text(max_size=20), "workdir": "file",
}  # fmt: skip
POSITIONAL = {"merge": ["base", "adapter"], "merge-and-onnx": ["base", "adapter"], "bench": ["base", "adapter"],
              "verify": ["base", "adapter", "merged"]}  # fmt: skip
CHEAP = {"merge", "verify", "swap", "inspect"}  # valid throughout in a second or less on the tiny model
SKIPPED_WHEN_VALID = {"onnx_dir", "package_dir", "device_map", "max_memory", "paper_table1", "check"}


@pytest.fixture(scope="module")
def world(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The path pool: every kind of path, and valid tiny inputs (merged once) whose bytes must never change."""
    root = tmp_path_factory.mktemp("fuzz")
    base, adapter, _ = merged_llama(models_dir, root)
    (root / "file.txt").write_text("not a model\n")
    (root / "empty").mkdir()
    os.mkfifo(root / "fifo")
    (root / "dangling").symlink_to(root / "nowhere")
    (root / "loopA").symlink_to(root / "loopB")
    (root / "loopB").symlink_to(root / "loopA")
    (root / os.fsdecode(b"bad\xffname")).write_text("x")
    (root / "variants.yaml").write_text(f"variants:\n  a:\n    adapters: [{adapter}]\n")
    (root / "outs").mkdir()
    (root / "prompts.txt").write_text("Hello there\nWhat is two plus two?\n")
    (root / "eval.txt").write_text(" ".join(f"w{i % 90}" for i in range(600)))
    overflow = copy_adapter(adapter, root / "overflow")  # ΔW overflows float32: inspect --json must stay JSON
    tensors = load_file(overflow / "adapter_model.safetensors")
    save_file({k: v * 1e30 if "lora_B" in k else v * 1e20 for k, v in tensors.items()},
              str(overflow / "adapter_model.safetensors"))  # fmt: skip
    (root / "bad-variants.yaml").write_text(
        f"variants:\n  {'v' * 300}:\n    adapters: [{adapter}]\n  b:\n    adapters: [loopA]\n  c: 7\n"
    )
    paths = {
        "missing": root / "nope" / "deeper",
        "fifo": root / "fifo",
        "dangling": root / "dangling",
        "loop": root / "loopA",
        "long": root / ("L" * 300),
        "nonutf8": root / os.fsdecode(b"bad\xffname"),
        "file": root / "file.txt",
        "empty": root / "empty",
        "devnull": Path("/dev/null"),
        "dot": Path("."),
        "base": base,
        "adapter": adapter,
        "merged": root / "merged",
        "hub": "nobody-org/no-such-model",  # offline (conftest): the cache, then a one-line refusal
        "bare": "pkg4",
        "variants": root / "variants.yaml",
        "bad-variants": root / "bad-variants.yaml",
        "out-in-input": root / "merged" / "sub",
        "overflow": overflow,
        "prompts": root / "prompts.txt",
        "eval-text": root / "eval.txt",
    }
    hashes = {folder: tree_hash(folder) for folder in (base, adapter, root / "merged", overflow)}
    return {"root": root, "paths": paths, "hashes": hashes, "count": itertools.count()}


def _path(world: dict[str, Any], kind: str) -> str:
    if kind in ("out", "report"):
        return str(world["root"] / "outs" / f"{kind}{next(world['count'])}{'.json' if kind == 'report' else ''}")
    return str(world["paths"][kind])


@st.composite
def argvs(draw: st.DrawFn, world: dict[str, Any]) -> list[str]:
    """One subcommand and a draw of its parameters. Modes: `hostile` (each value of any kind), `one-bad` (valid
    values but one, drawn from what cannot be valid), `valid` (cheap commands only: the real work runs)."""
    name = draw(st.sampled_from(sorted(main.commands)))
    command = main.commands[name]
    mode = draw(
        st.sampled_from(["hostile", "one-bad", "one-bad", "valid"] if name in CHEAP else ["hostile", "one-bad"])
    )
    params = [p for p in command.params if p.name != "help"]
    bad = draw(st.sampled_from(params)) if mode == "one-bad" and params else None
    argv = [name]
    for param in params:
        hostile = mode == "hostile" or param is bad
        if isinstance(param, click.Argument):
            if hostile:
                count = draw(st.integers(0, 3)) if param.nargs == -1 else 1
                kinds = PATH_KINDS if mode == "hostile" else BAD_PATHS
                argv += [_path(world, draw(st.sampled_from(kinds))) for _ in range(count)]
            else:
                argv += [_path(world, kind) for kind in POSITIONAL.get(name, [_valid(draw, param.name)])]
            continue
        if not hostile and (param.name in SKIPPED_WHEN_VALID or not draw(st.booleans())):
            continue
        if hostile and mode == "hostile" and not draw(st.booleans()):
            continue
        option = draw(st.sampled_from(param.opts))
        if getattr(param, "is_flag", False):
            argv += [option] if param.name not in SKIPPED_WHEN_VALID or mode == "hostile" else []
        elif isinstance(param.type, click.Choice):
            choices = [*map(str, param.type.choices)]
            argv += [option, draw(st.sampled_from([*choices, "bogus", ""] if hostile else choices))]
        elif not hostile:
            argv += [
                option,
                _path(world, _valid(draw, param.name))
                if isinstance(VALID.get(param.name), str)
                else _valid(draw, param.name),
            ]
        elif param.type.name in ("integer", "float", "integer range", "float range", "size"):
            argv += [option, draw(NUMBERS if mode == "hostile" else BAD_NUMBERS)]
        elif param.type.name in ("text", "BATCHxSEQ,…", "DEV=SIZE,…"):
            pool = st.one_of(TEXT, NUMBERS, st.sampled_from(["int4,int8", "fp32", "1x8", "cpu=1GiB"]))
            argv += [option, draw(pool if mode == "hostile" else st.sampled_from(["bogus", "1x0", "x=1", "int3"]))]
        else:  # files and folders
            kinds = [*PATH_KINDS, "out", "out"] if mode == "hostile" else BAD_PATHS
            argv += [option, _path(world, draw(st.sampled_from(kinds)))]
    if name == "bench":  # keep a drawn valid bench short: the fuzz is about inputs, not timing
        argv += ["--quick"]
    if name == "demo":  # the demo runs the real SmolLM2 (a minute): its folder is always one that cannot be one
        argv += ["--workdir", _path(world, draw(st.sampled_from(NOT_FOLDERS)))]
    return argv


def _valid(draw: st.DrawFn, name: str) -> str:
    value = VALID.get(name, "out")
    return value if isinstance(value, str) else draw(value)


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_cli_fuzz(world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    monkeypatch.chdir(tmp_path)  # "." is a scratch folder, never the repository
    exits: dict[int, int] = {}
    seconds: list[tuple[float, list[str]]] = []

    @settings(
        max_examples=CASES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: cases share the world, so report the case that failed
    )
    @given(argvs(world))
    def case(argv: list[str]) -> None:
        started = time.perf_counter()
        result = CliRunner().invoke(main, argv)
        seconds.append((time.perf_counter() - started, argv))
        code, output = result.exit_code, result.output
        exits[code] = exits.get(code, 0) + 1
        assert result.exception is None or isinstance(result.exception, SystemExit), (argv, result.exception)
        assert code in (0, 1, 2), (argv, output)
        assert "Traceback" not in output, (argv, output)
        if code == 2:
            assert sum(line.startswith("Error:") for line in output.splitlines()) == 1, (argv, output)
        stray = world["paths"]["out-in-input"]  # asked for inside `merged`, by a command that does not read it
        if stray.exists() and str(world["paths"]["merged"]) not in argv:
            shutil.rmtree(stray) if stray.is_dir() else stray.unlink()
        for folder, digest in world["hashes"].items():
            assert tree_hash(folder) == digest, (argv, f"changed the input {folder}")
        left = [p for folder in (world["root"], tmp_path) for p in folder.rglob(".*") if ".partial-" in p.name or p.name.endswith(".lock")]  # fmt: skip
        assert not left, (argv, left)
        if "--json" in argv and code in (0, 1):
            flag = next(p for p in main.commands[argv[0]].params if "--json" in p.opts).is_flag
            if flag:  # merge, inspect: the JSON is on stdout, between a line "{" and the last line "}"
                lines = output.splitlines()
                start = lines.index("{")
                end = len(lines) - lines[::-1].index("}")
                _strict_json("\n".join(lines[start:end]))
            elif Path(target := argv[argv.index("--json") + 1]).is_file() and target != "/dev/null":
                _strict_json(Path(target).read_text())

    case()
    slowest = sorted(seconds, key=lambda t: -t[0])[:5]
    print(f"{len(seconds)} cases in {sum(t for t, _ in seconds):.0f} s; exits {exits}; slowest:", *slowest, sep="\n  ")
    assert sum(exits.values()) >= 500 and exits.get(2, 0) > 0, exits
