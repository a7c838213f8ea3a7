"""Merge benchmark: lora-export merge vs PEFT merge_and_unload vs a plain streaming copy, side by side in one run.

A generated LLaMA-shaped model (Llama-3.2-1B's shape: 1.5B parameters, bf16, 2 GB shards) and a rank-16 adapter on
all seven projection types. Each variant runs in its own process, interleaved in rounds (a b c, a b c, …); wall time
and the process's peak RSS (wait4's ru_maxrss) are recorded, medians printed with the ratios the merge issue targets.

    python tools/bench_merge.py --rounds 3 [--workdir /tmp/bench-merge] [--layers 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PY = sys.executable

PEFT_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""

PLAIN_COPY = """
import sys, json, os
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
base, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir()
for f in sorted(base.glob("*.safetensors")):
    with safe_open(str(f), "pt") as src:
        save_file({k: src.get_tensor(k) for k in src.keys()}, str(out / f.name), metadata={"format": "pt"})
"""


def llama_shapes(
    layers: int, hidden: int, inter: int, vocab: int, kv_heads: int, heads: int
) -> dict[str, tuple[int, ...]]:
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)  # untied, as in Llama-3-style 1.5B models
    return shapes


def write_shards(folder: Path, shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> None:
    """Random bf16 weights (norms: ones), sharded like save_pretrained, with the index."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        matrix = len(shape) == 2
        tensor = torch.empty(shape, dtype=torch.bfloat16)
        shards[-1][name] = tensor.normal_(0, 0.02, generator=g) if matrix else tensor.fill_(1.0)
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        shard.clear()
    total = sum(2 * int(torch.Size(s).numel()) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def make_model(
    folder: Path, layers: int, hidden: int, inter: int, vocab: int, kv_heads: int, heads: int, shard_bytes: int
) -> None:
    folder.mkdir(parents=True)
    write_shards(folder, llama_shapes(layers, hidden, inter, vocab, kv_heads, heads), shard_bytes)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "hidden_act": "silu",
        "rope_theta": 500000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def make_adapter(folder: Path, base: Path, r: int) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, fname in index.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in targets:
            with safe_open(str(base / fname), "pt") as f:
                out_f, in_f = f.get_slice(name).get_shape()
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.01
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": 2 * r,
                "target_modules": list(targets),
                "task_type": "CAUSAL_LM",
                "lora_dropout": 0.0,
                "bias": "none",
                "fan_in_fan_out": False,
                "use_rslora": False,
                "use_dora": False,
            },
            indent=2,
        )
    )


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}… failed:\n{err[-3000:]}")
    return elapsed, usage.ru_maxrss / 1024**2


def ensure_inputs(args: argparse.Namespace, base: Path, adapter: Path) -> None:
    if args.generate_only:
        make_model(base, args.layers, 2048, 8192, 128256, kv_heads=8, heads=32, shard_bytes=2 * 1024**3)
        make_adapter(adapter, base, args.rank)
    elif not adapter.exists():
        # in a child process: a child forked from a large parent inherits its peak RSS in ru_maxrss
        print("generating the base model and adapter…", flush=True)
        shutil.rmtree(args.workdir, ignore_errors=True)
        options = ["--workdir", str(args.workdir), "--layers", str(args.layers), "--rank", str(args.rank)]
        subprocess.run([PY, __file__, "--generate-only", *options], check=True)


LORA_EXPORT, PEFT, COPY = (
    "(a) lora-export merge",
    "(b) PEFT merge_and_unload + save_pretrained",
    "(c) plain streaming copy (safetensors)",
)


def commands(base: Path, adapter: Path, skip_peft: bool) -> dict[str, Any]:
    variants = {
        LORA_EXPORT: lambda out: [PY, "-m", "lora_export", "merge", str(base), str(adapter), "-o", str(out), "-q"],
        PEFT: lambda out: [PY, "-c", PEFT_MERGE, str(base), str(adapter), str(out)],
        COPY: lambda out: [PY, "-c", PLAIN_COPY, str(base), str(out)],
    }
    if skip_peft:
        del variants[PEFT]
    return variants


def print_table(results: dict[str, list[tuple[float, float]]], params: int, rank: int, rounds: int) -> None:
    med = {k: (statistics.median(t for t, _ in v), statistics.median(m for _, m in v)) for k, v in results.items()}
    print(
        f"\n{params / 1e9:.2f}B parameters, bf16, rank {rank} on 7 projection types; {os.cpu_count()} cores; "
        f"python {platform.python_version()}; median of {rounds}, each in its own process\n"
    )
    print("| variant | wall s (median) | all runs | peak RSS GiB |\n|---|---|---|---|")
    for k, (t, m) in med.items():
        print(f"| {k} | {t:.1f} | {', '.join(f'{x:.1f}' for x, _ in results[k])} | {m:.2f} |")
    a, c = med[LORA_EXPORT], med[COPY]
    print(f"\n(a)/(c) time: {a[0] / c[0]:.2f}× (target ≤ 1.3×); (a) peak RSS {a[1]:.2f} GiB (target < 1 GiB)")
    if PEFT in med:
        print(f"(b)/(a) time: {med[PEFT][0] / a[0]:.2f}× (target ≥ 2×)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-merge"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--skip-peft", action="store_true", help="Leave out (b), the slowest.")
    ap.add_argument("--json", type=Path, help="Write the measurements here too.")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    base, adapter = args.workdir / "base", args.workdir / "adapter"
    ensure_inputs(args, base, adapter)
    if args.generate_only:
        return
    params = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2
    variants = commands(base, adapter, args.skip_peft)
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for rnd in range(args.rounds):
        for name, cmd in variants.items():
            out = args.workdir / "out"
            shutil.rmtree(out, ignore_errors=True)
            results[name].append(run(cmd(out)))
            print(f"round {rnd + 1}: {name}: {results[name][-1][0]:.1f} s, {results[name][-1][1]:.2f} GiB", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    print_table(results, params, args.rank, args.rounds)
    if args.json:
        args.json.write_text(json.dumps({"params": params, "rounds": results}, indent=2))


if __name__ == "__main__":
    main()
