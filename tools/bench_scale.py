"""Scale: what a package costs as its variants grow, and what each stage costs as the model grows; side by side in one
run, each command in a fresh process, wall seconds and peak RSS (the largest of the command and the children it
waited for: the GenAI model builder runs in a child of ours).

    python tools/bench_scale.py variants [--counts 1,3,10]   # SmolLM2-135M (real) with random q/v, all-linear … adapters
    python tools/bench_scale.py sizes [--sizes 135m,360m,1b,1.7b]        # random weights beyond 135M: said per row
    python tools/bench_scale.py render                                    # benchmarks/scaling.md (+ .png) from JSON

variants: one `merge-and-onnx` of the first adapter, then `package --mode both` with N = counts variants, then the
merge-and-onnx again (the A/A band); the N-th variant's cost is the difference between consecutive package runs over
the variants added.
sizes: per model, `merge`, `verify`, `merge-and-onnx` (default exporter), the GenAI model builder alone on the merged
folder, and PEFT's load + merge_and_unload + save_pretrained. SmolLM2-135M is the real model; 360M has SmolLM2-360M's
configuration, 1B and 1.7B LLaMA-shaped configurations (SmolLM2-1.7B's), all with random weights. The 1.7B's verify
runs again with the CPU given 40% of its fp32 size (--device-map auto --max-memory cpu=…: the rest offloaded to disk).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export import timed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks"
LORA_EXPORT = [sys.executable, "-m", "lora_export"]
TARGETS = (["q_proj", "v_proj"], ["q_proj", "k_proj", "o_proj", "up_proj"], "all-linear")
SIZES = {  # SmolLM2-360M's and SmolLM2-1.7B's configurations; a 1B in between (LLaMA-shaped, tied like SmolLM2)
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5),
    "1b": dict(hidden_size=1792, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=28,
               num_key_value_heads=7),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32),
}  # fmt: skip
CAPPED = {"1.7b": 0.4}  # verify again with the CPU given this fraction of the fp32 model's size


def smollm2() -> Path:
    from lora_export.model.zoo import smollm2_dir

    return smollm2_dir(REPO / ".cache")


def make_adapters(base: Path, out: Path, n: int) -> list[Path]:
    """n PEFT adapters (r=8, α=16) on base, targets rotating, B random (std 0.02, seed i) so that each moves the model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS[i % 3]))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if p.requires_grad and "lora_B" in name:
                    p.normal_(0, 0.02)
        peft_model.save_pretrained(out / f"a{i}")
        model = peft_model.unload()
        paths.append(out / f"a{i}")
    return paths


def variants(work: Path, counts: list[int]) -> dict[str, Any]:
    base = smollm2()
    adapters = make_adapters(base, work / "adapters", max(counts))
    one = timed([*LORA_EXPORT, "merge-and-onnx", str(base), str(adapters[0]), "-o", str(work / "m")])
    rows = {"merge-and-onnx (1 adapter)": one}
    for n in counts:
        spec = work / f"variants-{n}.yaml"
        spec.write_text("variants:\n" + "".join(f"  a{i}: {{adapters: [{adapters[i]}]}}\n" for i in range(n)))
        rows[f"package --mode both, {n} variants"] = timed(
            [*LORA_EXPORT, "package", str(base), "--variants", str(spec), "-o", str(work / f"p{n}")]
        )
        shutil.rmtree(work / f"p{n}")
        print(f"{n} variants: {rows[f'package --mode both, {n} variants'][0]:.1f} s", flush=True)
    if 3 in counts:  # the same package with its merged variants checked one after another in one process
        rows["package --mode both, 3 variants, --workers 1"] = timed(
            [*LORA_EXPORT, "package", str(base), "--variants", str(work / "variants-3.yaml"), "-o", str(work / "p1w"),
             "--workers", "1"]
        )  # fmt: skip
        shutil.rmtree(work / "p1w")
    shutil.rmtree(work / "m")  # the first command again, last: the A/A band of this run
    rows["merge-and-onnx (1 adapter), again"] = timed(
        [*LORA_EXPORT, "merge-and-onnx", str(base), str(adapters[0]), "-o", str(work / "m")]
    )
    return {"model": "SmolLM2-135M-Instruct (real)", "rows": {k: list(v) for k, v in rows.items()}}


def random_model(name: str, out: Path) -> Path:
    """SmolLM2-135M's configuration with the size's dimensions, random weights (seed 0), the real tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(smollm2())
    for k, v in SIZES[name].items():
        setattr(config, k, v)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.save_pretrained(out)
    for f in smollm2().iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copy2(f, out / f.name)
    return out


PEFT = """import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
"""


def one_size(name: str, work: Path) -> dict[str, Any]:
    from lora_export.io.tensorfiles import parameter_count

    base = smollm2() if name == "135m" else random_model(name, work / f"base-{name}")
    (adapter,) = make_adapters(base, work / f"adapter-{name}", 1)
    stages = {
        "merge": [*LORA_EXPORT, "merge", str(base), str(adapter), "-o", str(work / "merged")],
        "verify": [*LORA_EXPORT, "verify", str(base), str(adapter), str(work / "merged")],
        "merge-and-onnx": [*LORA_EXPORT, "merge-and-onnx", str(base), str(adapter), "-o", str(work / "mo")],
        "GenAI builder alone": [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(work / "merged"),
                                "-o", str(work / "builder"), "-p", "fp32", "-e", "cpu", "-c", str(work / "cache")],
        "PEFT load + merge + save": [sys.executable, "-c", PEFT, str(base), str(adapter), str(work / "peft")],
    }  # fmt: skip
    if name in CAPPED:  # larger than the memory it is given: accelerate's device map, the rest offloaded to disk
        cap = f"{int(CAPPED[name] * 4 * parameter_count(base) / 2**20)}MiB"
        stages[f"verify, --max-memory cpu={cap}"] = [*stages["verify"], "--device-map", "auto", "--max-memory",
                                                     f"cpu={cap}"]  # fmt: skip
    rows = {}
    for stage, cmd in stages.items():  # the base is on disk: the first run reads it from the page cache like the rest
        rows[stage] = list(timed(cmd))
        print(f"{name} {stage}: {rows[stage][0]:.1f} s, {rows[stage][1] / 2**30:.2f} GiB", flush=True)
        if stage not in ("merge", "verify"):
            for folder in ("mo", "builder", "cache", "peft"):
                shutil.rmtree(work / folder, ignore_errors=True)
    shutil.rmtree(work / "merged")
    return {"weights": "real" if name == "135m" else "random", "parameters": parameter_count(base), "rows": rows}


def render() -> None:
    """benchmarks/scaling.md and scaling.png from the JSON the runs wrote; the prose around the tables is the page's."""
    lines = tables()
    z = json.loads((OUT / "scaling-sizes.json").read_text()) if (OUT / "scaling-sizes.json").is_file() else None
    if z:
        _plot(z)
    page = OUT / "scaling.md"
    text = page.read_text() if page.is_file() else "# Scaling\n\n<!-- tables -->\n<!-- /tables -->\n"
    head, rest = text.split("<!-- tables -->", 1)
    page.write_text(
        head + "<!-- tables -->\n" + "\n".join(lines) + "\n<!-- /tables -->" + rest.split("<!-- /tables -->", 1)[1]
    )
    print(f"wrote {page}")


def tables() -> list[str]:
    """The page's tables (markdown lines) from the JSON the runs wrote."""
    lines = []
    v = json.loads((OUT / "scaling-variants.json").read_text()) if (OUT / "scaling-variants.json").is_file() else None
    if v:
        rows = v["rows"]
        one = rows["merge-and-onnx (1 adapter)"][0]
        lines += [f"### Variants ({v['model']}; {v['machine']}, {v['date']})", "",
                  "| command | wall s | × one merge-and-onnx | peak RSS GiB |", "|---|---:|---:|---:|"]  # fmt: skip
        lines += [f"| {k} | {s:.1f} | {s / one:.2f} | {r / 2**30:.2f} |" for k, (s, r) in rows.items()]
        counts = sorted(
            int(k.split(", ")[1].split()[0]) for k in rows if k.startswith("package") and k.endswith(" variants")
        )
        lines += ["", "| variants added | s per added variant | × one merge-and-onnx |", "|---|---:|---:|"]
        for a, b in zip(counts, counts[1:]):
            per = (rows[f"package --mode both, {b} variants"][0] - rows[f"package --mode both, {a} variants"][0]) / (
                b - a
            )
            lines.append(f"| {a + 1}–{b} | {per:.1f} | {per / one:.2f} |")
        lines.append("")
    z = json.loads((OUT / "scaling-sizes.json").read_text()) if (OUT / "scaling-sizes.json").is_file() else None
    if z:
        stages = list(dict.fromkeys(s for d in z["sizes"].values() for s in d["rows"]))
        lines += [f"### Model size ({z['machine']}, {z['date']}): wall s / peak RSS GiB", "",
                  "| model | parameters | fp32 GiB | " + " | ".join(stages) + " | merge-and-onnx ÷ builder |",
                  "|---|---:|---:|" + "---:|" * (len(stages) + 1)]  # fmt: skip
        for name, d in z["sizes"].items():
            cells = [
                f"{d['rows'][s][0]:.1f} / {d['rows'][s][1] / 2**30:.2f}" if s in d["rows"] else "—" for s in stages
            ]
            ratio = d["rows"]["merge-and-onnx"][0] / d["rows"]["GenAI builder alone"][0]
            size = 4 * d["parameters"] / 2**30
            lines.append(f"| {name} ({d['weights']}) | {d['parameters'] / 1e6:.0f}M | {size:.2f} | "
                         + " | ".join(cells) + f" | {ratio:.2f} |")  # fmt: skip
    return lines


def _plot(z: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = z["sizes"]
    x = [d["parameters"] / 1e9 for d in sizes.values()]
    fig, (wall, rss) = plt.subplots(1, 2, figsize=(11, 4))
    for stage in dict.fromkeys(s for d in sizes.values() for s in d["rows"]):
        xs = [d["parameters"] / 1e9 for d in sizes.values() if stage in d["rows"]]
        wall.plot(xs, [d["rows"][stage][0] for d in sizes.values() if stage in d["rows"]], marker="o", label=stage)
        rss.plot(
            xs, [d["rows"][stage][1] / 2**30 for d in sizes.values() if stage in d["rows"]], marker="o", label=stage
        )
    rss.plot(x, [4 * d["parameters"] / 2**30 for d in sizes.values()], "k--", label="fp32 model size")
    for ax, label in ((wall, "wall seconds"), (rss, "peak RSS GiB")):
        ax.set_xlabel("parameters (billions; beyond 135M random weights)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    wall.legend(fontsize=7)
    fig.suptitle(f"lora-export stages by model size ({z['machine']})")
    fig.tight_layout()
    fig.savefig(OUT / "scaling.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["variants", "sizes", "render"])
    parser.add_argument("--counts", default="1,3,10")
    parser.add_argument("--sizes", default="135m,360m,1b,1.7b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-scale"))
    args = parser.parse_args()
    if args.what == "render":
        return render()
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = OUT / f"scaling-{args.what}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    data["date"] = time.strftime("%Y-%m-%d")
    if args.what == "variants":
        data.update(variants(args.workdir, [int(c) for c in args.counts.split(",")]))
    else:
        for name in args.sizes.split(","):  # written after each size: a long run stopped keeps what it measured
            data.setdefault("sizes", {})[name] = one_size(name, args.workdir / name)
            shutil.rmtree(args.workdir / name, ignore_errors=True)
            path.write_text(json.dumps(data, indent=2) + "\n")
    if args.what == "variants":
        path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
