"""The CLI: exit codes, output, help text with examples, and the README naming every command."""

from __future__ import annotations

import json
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
def test_readme_documents_every_command(name: str) -> None:
    readme = (REPO / "README.md").read_text()
    assert f"lora-export {name}" in readme, f"README.md does not mention `lora-export {name}`"


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
    result = CliRunner().invoke(main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "j"), "-q", "--json", "--dtype", "bfloat16"])
    assert result.exit_code == 0
    manifest = json.loads(result.output)
    assert manifest["output"]["dtype"] == "bfloat16"


def test_installed_entry_point_runs(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "lora_export", "--version"], capture_output=True, text=True, check=True)
    assert "lora-export" in out.stdout


def test_usage_error_exit_code_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["merge", str(tmp_path)])
    assert result.exit_code == 2
