"""Write docs/cli.md, the command-line reference, from the Click commands themselves (their --help text).

python tools/cli_reference.py           # rewrite docs/cli.md
python tools/cli_reference.py --check   # exit 1 when docs/cli.md is not what the commands say (tests/test_docs.py checks the same)
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lora_export.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "cli.md"
WIDTH = 110


def context(command: click.Command, name: str, parent: click.Context | None = None) -> click.Context:
    """The context a real invocation makes (the group's context_settings: -h/--help, the width), at a fixed width:
    the page must not depend on the terminal, nor on what ran before in the process."""
    settings = {
        **main.context_settings,
        **command.context_settings,
        "terminal_width": WIDTH,
        "max_content_width": WIDTH,
    }
    return click.Context(command, info_name=name, parent=parent, **settings)


def help_text(command: click.Command, name: str, parent: click.Context | None = None) -> str:
    return command.get_help(context(command, name, parent))


def reference() -> str:
    root = context(main, "lora-export")
    parts = [
        "# Command-line reference",
        "",
        "Generated from the commands' own help by `python tools/cli_reference.py`; CI fails when this page and the",
        "commands disagree. Every command exits 0 when it succeeded, 1 when a check failed, 2 on bad input, 3 on an",
        "internal error and 130 when interrupted ([exit codes](exit-codes.md)).",
        "",
        "```text",
        help_text(main, "lora-export"),
        "```",
    ]
    for name in sorted(main.commands):
        parts += ["", f"## lora-export {name}", "", "```text", help_text(main.commands[name], name, root), "```"]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    text = reference()
    if sys.argv[1:] == ["--check"]:
        current = PAGE.read_text(encoding="utf-8") if PAGE.is_file() else ""
        if current != text:
            print(f"{PAGE.relative_to(ROOT)} is stale: run python tools/cli_reference.py", file=sys.stderr)
            sys.exit(1)
        print(f"{PAGE.relative_to(ROOT)} matches the commands")
    else:
        PAGE.write_text(text, encoding="utf-8")
        print(f"wrote {PAGE.relative_to(ROOT)}")
