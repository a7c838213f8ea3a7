"""The documentation runs as written: every fenced bash and python block of README.md and docs/*.md, and every example
in the commands' --help (docs/cli.md is generated from it, and must be current), on a tiny model standing in for
SmolLM2 under the same names — a Hugging Face cache holding HuggingFaceTB/SmolLM2-135M-Instruct, my-org/smollm2-caps
(main and v2) and my-org/smollm2-chat, offline — and the local folders the examples name.

Not run, by name: ./run-demo and ./run-tests (the two setup commands: CI runs ./run-tests itself, and the demo's path
is tests/test_demo.py and tests/test_real_models.py) and `lora-export demo` (the same demo).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_adapter

from lora_export.cli import main

sys.path.insert(0, str(REPO / "tools"))
from cli_reference import reference  # noqa: E402  (tools/ is not a package)
from make_tiny_model import cache_repo, tiny_decoder  # noqa: E402

PAGES = [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "cli.md")]
NOT_RUN = ("./run-demo", "./run-tests", "lora-export demo")
BASE_ID, CAPS_ID, CHAT_ID = "HuggingFaceTB/SmolLM2-135M-Instruct", "my-org/smollm2-caps", "my-org/smollm2-chat"
VARIANTS = """variants:
  caps:
    adapters: [my-org/smollm2-caps]       # a Hub address, or a folder relative to this file
  chat:
    adapters:
      - {path: adapters/chat, weight: 0.7}
      - {path: adapters/caps, weight: 0.3}
"""  # the one docs/package.md shows
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.M | re.S)


def blocks(page: Path) -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in BLOCK.findall(page.read_text(encoding="utf-8"))]


def help_examples() -> list[tuple[str, str]]:
    """(command, line) for every example line in every command's --help."""
    found = []
    for name, command in [("lora-export", main), *sorted(main.commands.items())]:
        for line in (command.help or "").splitlines():
            if line.strip().startswith("lora-export "):
                found.append((name, line.strip()))
    return found


def _tiny_smollm2(folder: Path) -> Path:
    """A random LLaMA with SmolLM2's head size (64) and a tokenizer: small, and a model the GenAI builder builds."""
    shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4)
    return tiny_decoder(folder, max_position_embeddings=128, **shape)


def _name_base(adapter: Path, base: str) -> Path:
    import json

    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


def _env(world: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LORA_EXPORT"))}
    bin_dir = str(Path(sys.executable).parent)
    return {**env, "PATH": f"{bin_dir}:{env.get('PATH', '')}", "HF_HUB_CACHE": str(world / "hf"), "HF_HUB_OFFLINE": "1"}


def _run(kind: str, code: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    argv = ["bash", "-eo", "pipefail", "-c", code] if kind == "bash" else [sys.executable, "-c", code]
    return subprocess.run(argv, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder every example starts from: the cache, ./smollm2, ./adapters/{caps,chat}, variants.yaml, and what
    examples read without making it first — ./smollm2-caps (merged), ./smollm2-tasks (a package) and ./parts (its
    parts, one per variant)."""
    root = tmp_path_factory.mktemp("docs-world")
    base = _tiny_smollm2(root / "smollm2")
    caps = _name_base(
        make_adapter(base, root / "adapters" / "caps", seed=1, target_modules=["q_proj", "v_proj"]), BASE_ID
    )
    chat = _name_base(make_adapter(base, root / "adapters" / "chat", seed=2, target_modules="all-linear"), BASE_ID)
    caps_v2 = _name_base(make_adapter(base, root / "caps-v2-src", seed=3, target_modules=["q_proj", "o_proj"]), BASE_ID)
    cache = root / "hf"
    cache_repo(cache, BASE_ID, base)
    cache_repo(cache, CAPS_ID, caps)
    cache_repo(cache, CAPS_ID, caps_v2, refs=("v2",), tag="v2")
    cache_repo(cache, CHAT_ID, chat)
    shutil.rmtree(root / "caps-v2-src")
    (root / "variants.yaml").write_text(VARIANTS)
    for command in (
        "lora-export merge ./smollm2 ./adapters/caps -o ./smollm2-caps -q",
        "lora-export package ./smollm2 --variants variants.yaml -o ./smollm2-tasks --mode both",
        "lora-export package ./smollm2 --variants variants.yaml -o parts/caps --only caps",
        "lora-export package ./smollm2 --variants variants.yaml -o parts/chat --only chat",
    ):
        done = _run("bash", command, root)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return root


def _fresh(world: Path, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(world, work, symlinks=True)
    return work


def test_cli_reference_is_current() -> None:
    """docs/cli.md is what the commands' --help says (regenerate: python tools/cli_reference.py)."""
    assert (REPO / "docs" / "cli.md").read_text(encoding="utf-8") == reference()


def test_every_page_has_examples_and_every_command_help_has_one() -> None:
    assert len(PAGES) >= 6, PAGES  # README and at least five pages of reference
    assert VARIANTS in (REPO / "docs" / "package.md").read_text(encoding="utf-8")  # the file the examples use
    commands = {name for name, _ in help_examples()}
    assert commands == {"lora-export", *main.commands}, f"without an example in --help: {set(main.commands) - commands}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_examples_run_as_written(page: Path, world: Path, tmp_path: Path) -> None:
    """A page's bash and python blocks, in order, in one working folder (a block may use what an earlier one made)."""
    work = _fresh(world, tmp_path)
    for kind, code in blocks(page):
        if kind == "bash":
            code = "\n".join(line for line in code.splitlines() if not line.strip().startswith(NOT_RUN))
        done = _run(kind, code, work)
        assert done.returncode == 0, (
            f"{page.name}: this {kind} block failed:\n{code}\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
        )


@pytest.mark.parametrize(
    ("command", "line"), help_examples(), ids=[f"{c}:{i}" for i, (c, _) in enumerate(help_examples())]
)
def test_help_examples_run_as_written(command: str, line: str, world: Path, tmp_path: Path) -> None:
    if line.startswith(NOT_RUN):
        pytest.skip(f"{line}: the demo (see this module's docstring)")
    work = _fresh(world, tmp_path)
    done = _run("bash", line.split("  #")[0], work)
    assert done.returncode == 0, f"{line}\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
