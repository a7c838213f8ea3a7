"""The CLI: exit codes, output, help text with examples, and the README naming every command."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import REPO, make_adapter

from lora_export.cli import main


def all_commands() -> dict[str, click.Command]:
    return dict(main.commands)


@pytest.mark.parametrize("name", sorted(all_commands()))
def test_every_command_has_help_with_example(name: str) -> None:
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output, f"`lora-export {name} --help` has no example"


@pytest.mark.parametrize("name", sorted(all_commands()))
def test_every_command_is_documented_and_reached_from_the_readme(name: str) -> None:
    """Each command is shown (`lora-export NAME`, not a longer name) in the README or a docs page the README links
    to; docs/cli.md, generated from --help, does not count."""
    shown = re.compile(rf"lora-export {re.escape(name)}(?![\w-])")
    readme = (REPO / "README.md").read_text()
    linked = {REPO / m for m in re.findall(r"\]\((docs/[\w-]+\.md)\)", readme)} - {REPO / "docs" / "cli.md"}
    pages = [p for p in [REPO / "README.md", *sorted(linked)] if shown.search(p.read_text())]
    assert pages, f"`lora-export {name}` is shown neither in README.md nor in a docs page it links to"


def test_readme_starts_with_the_two_setup_commands() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = readme.split("```")
    first_code = blocks[1]
    assert "./run-demo" in first_code and "./run-tests" in first_code
    ci = (REPO / ".ci" / "run").read_text()
    assert "./run-tests" in ci, ".ci/run must call the README's test command"


def test_merge_cli_success_and_json(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "llama"
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    result = CliRunner().invoke(main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "m"), "-q"])
    assert result.exit_code == 0, result.output
    assert "2 changed by LoRA deltas" in result.output and "lora_export.json" in result.output
    result = CliRunner().invoke(
        main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "j"), "-q", "--json", "--dtype", "bfloat16"]
    )
    assert result.exit_code == 0
    manifest = json.loads(result.output)
    assert manifest["output"]["dtype"] == "bfloat16"


def test_installed_console_script_runs(tmp_path: Path) -> None:
    """The `lora-export` script that pip wrote from [project.scripts] (not `python -m`): deleting the entry point, or
    pointing it at a missing function, fails here."""
    script = shutil.which("lora-export", path=str(Path(sys.executable).parent))
    assert script is not None, f"no lora-export console script beside {sys.executable}: is [project.scripts] gone?"
    out = subprocess.run([script, "--version"], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.startswith("lora-export, version "), out.stdout
    done = subprocess.run([script, "merge", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and "Usage: lora-export merge" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["merge", "{tmp}"], "Error: Missing option '-o' / '--output'."),
        (["merge"], "Error: Missing argument '[BASE] ADAPTER...'."),
        (["no-such-command"], "Error: No such command 'no-such-command'."),
        (["merge", "{tmp}", "{tmp}", "-o", "{tmp}/o", "--dtype", "int3"], "Invalid value for '--dtype'"),
        (["bench", "--shapes", "12", "{tmp}"], "bad shape '12': write BATCHxSEQ"),
        (["package", "--junit", "{tmp}-j.xml", "{tmp}"], "--junit applies with --check"),
    ],
    ids=["missing-output", "missing-argument", "unknown-command", "bad-choice", "bad-shape", "junit-without-check"],
)
def test_usage_errors_exit_2_with_their_message(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2 and message in result.output, result.output


HEAVY = ("torch", "transformers", "onnx", "onnxruntime", "safetensors", "numpy")


@pytest.mark.parametrize(
    "args", [[], *([name] for name in sorted(all_commands()))], ids=lambda a: " ".join(a) or "main"
)
def test_help_imports_no_heavy_library(args: list[str]) -> None:
    """`lora-export [COMMAND] --help` in a fresh interpreter loads none of the libraries that take seconds to import
    (the time itself is not asserted: README and the session notes report it)."""
    code = (
        "import sys\nfrom lora_export.cli import main\n"
        f"try:\n    main({[*args, '--help']!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-500:]


def test_public_api_is_lazy_and_no_submodule_shadows_a_name() -> None:
    """`import lora_export` is light; every public name (merge, verify, export, …) stays what it is after every
    submodule was imported, in either order: importing a submodule sets it as an attribute of its package, so a stage
    named like a public function would replace the function (seen: `from lora_export import export` gave the
    export/ package once merge_and_onnx had been imported)."""
    code = (
        "import sys, importlib, pkgutil, types, lora_export\nassert 'torch' not in sys.modules\n"
        "from lora_export import merge, verify\n"
        "for m in pkgutil.walk_packages(lora_export.__path__, 'lora_export.'):\n"
        "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
        "assert lora_export.merge is merge and lora_export.verify is verify\n"
        "shadowed = [n for n in lora_export.__all__ if isinstance(getattr(lora_export, n), types.ModuleType)]\n"
        "assert not shadowed, shadowed\n"
        "from lora_export import export\nassert callable(export) and not isinstance(export, types.ModuleType)\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_wheel_holds_every_module_and_data_file(tmp_path: Path) -> None:
    """The wheel built from this checkout holds every file of the package (subpackages, py.typed, the demo adapter):
    what `pip install .` without -e installs."""
    import zipfile

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("lora_export-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = REPO / "lora_export"
    expected = {
        p.relative_to(REPO).as_posix()
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    assert expected - names == set(), f"missing from the wheel: {sorted(expected - names)}"
    assert {"lora_export/bench/timing.py", "lora_export/exporting/onnx.py", "lora_export/py.typed"} <= names
    import lora_export

    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    version = next(
        line for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines() if line.startswith("Version:")
    )
    assert version == f"Version: {lora_export.__version__}"  # one source for the version


def test_exit_codes_for_internal_errors_and_interrupts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A bug is exit 3 with one line (the traceback only with --debug); Ctrl-C is exit 130."""
    import lora_export.merging.inspect as inspect_module

    def boom(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(inspect_module, "inspect_adapter", boom)
    r = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert r.exit_code == 3 and "Error: internal error (ZeroDivisionError: simulated bug)" in r.output
    assert "Traceback" not in r.output and "--debug" in r.output
    r = CliRunner().invoke(main, ["--debug", "inspect", str(tmp_path)])
    assert isinstance(r.exception, ZeroDivisionError)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_module, "inspect_adapter", interrupted)
    r = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert r.exit_code == 130 and "interrupted" in r.output
