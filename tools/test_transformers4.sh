#!/usr/bin/env bash
# Run the runtime, verify and export tests against the last transformers 4.x (4.57), in their own virtual
# environment (.cache/venv-transformers4). CI runs the suite with the transformers the README installs (5.x).
#   tools/test_transformers4.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.cache/venv-transformers4
if [ ! -x "$VENV/bin/pytest" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.13.0"
  "$VENV/bin/pip" install -q --disable-pip-version-check "transformers>=4.57,<4.58" "peft>=0.17" safetensors click numpy tqdm \
    onnx onnxscript onnxruntime pytest hypothesis pyyaml accelerate
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e .
fi
"$VENV/bin/python" -c "import transformers; print('transformers', transformers.__version__)"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_lora_runtime.py tests/test_verify.py tests/test_export.py "$@"
