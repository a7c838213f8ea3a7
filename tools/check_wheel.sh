#!/usr/bin/env bash
# Build the wheel, install it (not editable) into a fresh virtual environment, and use the installed command from
# outside the checkout: every subcommand's --help, then merge-and-onnx on a tiny model. Run by .ci/run.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$repo/.venv/bin/python" -m pip wheel --no-deps --no-build-isolation -q -w "$work/dist" "$repo"
python3 -m venv "$work/venv"
pip=("$work/venv/bin/pip" install -q --disable-pip-version-check)
"${pip[@]}" "torch==2.13.0"  # the CPU build here; the wheel's own range would take a CUDA build
wheel=("$work"/dist/lora_export-*.whl)
"${pip[@]}" "${wheel[0]}[onnx]"
cd "$work"  # away from the checkout: the package must come from site-packages
where="$(venv/bin/python -c 'import lora_export; print(lora_export.__file__)')"
case "$where" in "$work/venv/"*) ;; *) echo "lora_export imported from $where, not the installed wheel" >&2; exit 1 ;; esac
for cmd in "" $(venv/bin/python -c 'from lora_export.cli import main; print(" ".join(main.commands))'); do
  venv/bin/lora-export $cmd --help > /dev/null
done
venv/bin/python "$repo/tools/make_tiny_model.py" tiny --hub-cache hub
# Hub addresses, offline, from a Hugging Face cache on disk: only the adapter named; the same merge as from folders
HF_HUB_OFFLINE=1 HF_HUB_CACHE=hub venv/bin/lora-export merge tiny-org/adapter -o tiny/from-hub -q > /dev/null
venv/bin/lora-export merge tiny/base tiny/adapter -o tiny/from-folders -q > /dev/null
cmp tiny/from-hub/model.safetensors tiny/from-folders/model.safetensors
venv/bin/lora-export merge-and-onnx tiny/base tiny/adapter -o tiny/out --max-new-tokens 4 --json tiny/report.json > tiny/stdout.txt
venv/bin/python - <<'PY'
import json
report = json.load(open("tiny/report.json"))
assert report["passed"] and {c["name"] for c in report["checks"]} >= {"merge (float32)", "onnx vs pytorch"}, report
print(f"wheel check: {len(report['checks'])} checks passed with the installed lora-export {report['versions'].get('lora-export')}")
PY
