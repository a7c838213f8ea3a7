#!/usr/bin/env bash
# GPU checks in one go, for a lent GPU machine (or DEVICE=cpu for a smoke run here):
#   1. lora-export verify with both models on the GPU (tiny LLaMA, fp32 and a bf16 merge), and with --device-map auto
#      splitting each model between the GPU and the CPU (--max-memory 0=1MB: most layers offloaded);
#   2. lora-export bench --paper-table1 at the paper's full shapes (32x512, 16x256, 1x128), CUDA events;
#   3. the same bench on ONNX Runtime's CUDA provider when onnxruntime-gpu is installed;
#   4. tools/bench_zero_rank.py (ONNX Runtime CPU) on that machine's quieter CPU;
#   5. GenAI on CUDA (prefill, ms/token; base, A/A control, shared graph + adapter, merged) when an onnxruntime-genai
#      with CUDA is installed, else says it skipped;
#   6. the verdicts: merged/base per shape against ±1% (95% CI) and the counted structure (identical to base?).
# The Markdown tables carry the counted structure (FLOPs, operator calls, graph nodes) beside the times.
# Installs only what is missing: it uses the python that already has a CUDA torch if there is one.
# Results land in $OUT (default ./gpu-results): table1-gpu.md/.json/.png, verify-*.json, env.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-./gpu-results}
SHAPES=${SHAPES:-32x512,16x256,1x128}
mkdir -p "$OUT"
PY=${PY:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if '$DEVICE' == 'cpu' or torch.cuda.is_available() else 1)" 2>/dev/null; then
  "$PY" -m venv .gpu-venv && PY=.gpu-venv/bin/python
  "$PY" -m pip install -q torch
fi
"$PY" -c "import lora_export" 2>/dev/null || "$PY" -m pip install -q -e ".[onnx,plot,test]"
"$PY" - <<PYEOF > "$OUT/env.txt"
import torch, platform
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor())
PYEOF
cat "$OUT/env.txt"

# 1. verify on the device: a tiny LLaMA and a PEFT-format adapter written without PEFT
WORK=$(mktemp -d)
"$PY" - "$WORK" <<'PYEOF'
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
w = Path(sys.argv[1]); torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2)).save_pretrained(w / "base")
from tokenizers import Tokenizer, models, pre_tokenizers  # the GenAI builder wants the model's tokenizer
from transformers import PreTrainedTokenizerFast
tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(512)}, unk_token="w0")); tok.pre_tokenizer = pre_tokenizers.Whitespace()
PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2", pad_token="w3").save_pretrained(w / "base")
(w / "adapter").mkdir()
t = {}
for i in range(4):
    for proj, out in (("q_proj", 128), ("v_proj", 64)):
        p = f"base_model.model.model.layers.{i}.self_attn.{proj}"
        t[p + ".lora_A.weight"] = torch.randn(8, 128) * 0.05
        t[p + ".lora_B.weight"] = torch.randn(out, 8) * 0.05
save_file(t, str(w / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
(w / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}))
PYEOF
LE="$PY -m lora_export"
$LE merge "$WORK/base" "$WORK/adapter" -o "$WORK/merged" -q > /dev/null
$LE merge "$WORK/base" "$WORK/adapter" -o "$WORK/merged-bf16" --dtype bfloat16 -q > /dev/null
$LE verify "$WORK/base" "$WORK/adapter" "$WORK/merged" --device "$DEVICE" --json "$OUT/verify-fp32.json"
$LE verify "$WORK/base" "$WORK/adapter" "$WORK/merged-bf16" --device "$DEVICE" --json "$OUT/verify-bf16.json"
if [ "$DEVICE" != cpu ]; then
  $LE verify "$WORK/base" "$WORK/adapter" "$WORK/merged-bf16" --device-map auto --max-memory 0=1MB,cpu=8GiB \
    --json "$OUT/verify-device-map.json" --junit "$OUT/verify-device-map.xml"
fi

# 2. Table 1 at the paper's shapes on the device (PyTorch; CUDA events)
$LE bench --paper-table1 --device "$DEVICE" --shapes "$SHAPES" --budget "${BUDGET:-5}" \
  --markdown "$OUT/table1-$DEVICE.md" --json "$OUT/table1-$DEVICE.json" --plot "$OUT/table1-$DEVICE.png"

# 3. ONNX Runtime's CUDA provider, when installed
if "$PY" -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)"; then
  $LE bench "$WORK/base" "$WORK/adapter" --device "$DEVICE" --backend all --shapes "$SHAPES" --budget "${BUDGET:-5}" \
    --markdown "$OUT/bench-ort-$DEVICE.md" --json "$OUT/bench-ort-$DEVICE.json"
else
  echo "onnxruntime has no CUDAExecutionProvider here (pip install .[gpu] installs onnxruntime-gpu): skipped the ORT GPU bench"
fi

# 5. GenAI on CUDA, when installed with its CUDA provider: a package of the tiny LLaMA (builder graph, shared + merged)
# (GENAI_ON_CPU=1 runs this step on the CPU provider: a smoke test of the step itself where no GPU is)
if [ "${GENAI_ON_CPU:-0}" = 1 ] || "$PY" -c "import onnxruntime_genai, onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)" 2>/dev/null; then
  printf 'variants:\n  task:\n    adapters: [%s]\n' "$WORK/adapter" > "$WORK/variants.yaml"
  $LE package "$WORK/base" --variants "$WORK/variants.yaml" -o "$WORK/pkg" --exporter genai > /dev/null
  $LE bench --package "$WORK/pkg" --backend genai --device "$DEVICE" --shapes 1x128 --budget "${BUDGET:-5}" \
    --markdown "$OUT/bench-genai-$DEVICE.md" --json "$OUT/bench-genai-$DEVICE.json"
else
  echo "onnxruntime-genai with CUDA is not installed here (pip install onnxruntime-genai-cuda): skipped the GenAI CUDA bench"
fi
rm -rf "$WORK"

# 6. merged vs base on the device: within ±1% at 95%? and the structure, counted
"$PY" - "$OUT/table1-$DEVICE.json" <<'PYEOF' | tee "$OUT/verdict.txt"
import json, sys
data = json.load(open(sys.argv[1]))
rows = {(r["variant"], r["backend"]): r for r in data["rows"]}
merged, control = rows[("merged", "torch")], rows[("base-copy", "torch")]
for shape in data["shapes"]:
    m, c = merged["cells"][shape], control["cells"][shape]
    within = 0.99 <= m["ci_low"] and m["ci_high"] <= 1.01
    print(f"{shape}: merged/base {m['ratio']:.4f} (95% CI {m['ci_low']:.4f}-{m['ci_high']:.4f}) "
          f"{'within' if within else 'NOT within'} ±1%; A/A control {c['ratio']:.4f} "
          f"({c['ci_low']:.4f}-{c['ci_high']:.4f}); structure identical to base: {merged['structure']['identical_to_base']}")
PYEOF

# 4. The shared graph's zero-rank LoRA branch on a quieter CPU than the 2-core CI machine (A/A control included)
"$PY" tools/bench_zero_rank.py --threads 4 --rounds 60 | tee "$OUT/zero-rank-cpu.txt"
