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
if ! "$VENV/bin/python" -c "import optimum.onnxruntime" 2>/dev/null; then
  "$VENV/bin/pip" install -q --disable-pip-version-check "optimum-onnx" "transformers>=4.57,<4.58"
fi
"$VENV/bin/python" -c "import transformers; print('transformers', transformers.__version__)"
# A GenAI model builder output, made with the main environment (onnxruntime-genai does not live in this one), for
# tests/test_optimum.py: Optimum must load it too.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -x .venv/bin/lora-export ] && .venv/bin/python -c "import onnxruntime_genai, onnx_ir" 2>/dev/null; then
  .venv/bin/python tools/make_tiny_model.py "$work"
  .venv/bin/lora-export merge-and-onnx "$work/base" "$work/adapter" -o "$work/genai" --exporter genai >/dev/null
  export LORA_EXPORT_GENAI_OUTPUT="$work/genai"
fi
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_lora_runtime.py tests/test_verify.py tests/test_export.py \
  tests/test_optimum.py tests/test_hub.py "$@"
