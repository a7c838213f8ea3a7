"""The support matrix: every family × what lora-export does with it, each cell from a real run on a tiny random model
with realistic proportions (head size 64, grouped-query attention where the family has it), a PEFT adapter with every
trainable tensor perturbed, and the library's own entry points. Writes docs/support.json (the cells, the versions, the
models' settings) and docs/support.md (rendered from it).

    python tools/support_matrix.py                 # every family (about 12 minutes on 2 cores)
    python tools/support_matrix.py llama gpt2      # some families, merged into the existing docs/support.json
    python tools/support_matrix.py --check         # docs/support.md is what docs/support.json renders to

Columns: merge = PEFT's merge_and_unload (every tensor within 1e-6), verify (merged vs unmerged: logits, greedy
tokens), ONNX by the dynamo exporter checked in ONNX Runtime, the GenAI model builder's graph checked in ONNX Runtime
GenAI, the default `merge-and-onnx` (auto: which exporter shipped), two adapters as one shared graph with
`.onnx_adapter` files checked in GenAI (og.Adapters) and in plain ONNX Runtime, TorchScript and torch.export
checked against eager, and Optimum loading the dynamo folder (ORTModel… in the transformers-4 environment of
tools/test_transformers4.sh, its logits against PyTorch's; not run where that environment is absent).
tests/test_support_matrix.py checks the rendering and the settings, and re-runs the merge and verify cells.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
JSON, MARKDOWN = REPO / "docs" / "support.json", REPO / "docs" / "support.md"
OPTIMUM_PYTHON = REPO / ".cache" / "venv-transformers4" / "bin" / "python"
sys.path.insert(0, str(REPO / "tools"))
from support_models import FAMILIES, build_adapter, build_base  # noqa: E402  (tools/ is not a package)

COLUMNS = {
    "merge": "merge = PEFT",
    "verify": "verify",
    "onnx": "dynamo ONNX in ORT",
    "genai": "builder graph in GenAI",
    "auto": "default merge-and-onnx",
    "shared_genai": "shared multi-LoRA in GenAI",
    "shared_ort": "shared multi-LoRA in ORT",
    "torch": "TorchScript / torch.export",
    "optimum": "Optimum load",
}
# ---------------------------------------------------------------------------------------------------------------------
# Cells: each returns (passed, why)


def failed_checks(checks: Any) -> str:
    return "; ".join(f"{c.name}: {c.summary}" for c in checks if not c.passed)[:300]


def cell_merge(w: Work) -> tuple[bool, str]:
    """Our merged folder loaded by transformers against PEFT's merge_and_unload, tensor by tensor (both by the names
    transformers gives them in memory: GPT-NeoX's embed_out is lm_head there)."""
    import transformers

    from lora_export import MergeOptions, merge
    from lora_export.model.config import ModelConfig

    theirs = w.peft_model.merge_and_unload().state_dict()
    result = merge(w.base, [w.adapters[0]], w.root / "merged", MergeOptions(progress=False))
    architecture = ModelConfig.load(result.output).architecture
    ours = getattr(transformers, architecture).from_pretrained(result.output).state_dict()
    if set(ours) != set(theirs):
        return False, f"tensor names differ: {sorted(set(ours) ^ set(theirs))[:4]}"
    worst = max(float((v - theirs[k]).abs().max()) for k, v in ours.items())
    changed = result.manifest.merged_tensors
    return worst <= 1e-6 and changed > 0, f"{changed} tensors folded, max |ours − PEFT| = {worst:.1e}"


def cell_verify(w: Work) -> tuple[bool, str]:
    from lora_export import VerifyOptions, verify

    report = verify(w.base, [w.adapters[0]], w.root / "merged", VerifyOptions(max_new_tokens=8))
    names = ", ".join(c.name.split(" ")[0] for c in report.checks)
    return report.passed, names if report.passed else failed_checks(report.checks)


def _pipeline(w: Work, out: str, exporter: str) -> tuple[bool, str]:
    from lora_export import ExportOptions, MergeOptions, VerifyOptions, merge_and_onnx

    result = merge_and_onnx(
        w.base, [w.adapters[0]], w.root / out, MergeOptions(progress=False), ExportOptions(exporter=exporter),
        VerifyOptions(max_new_tokens=8),
    )  # fmt: skip
    if not result.passed:
        return False, failed_checks(result.checks)
    section = result.report.export
    onnx_checks = [
        c.name for c in result.checks if c.name not in ("weights (float32)", "merge (float32)", "generation (float32)")
    ]
    why = f"{section.exporter}: " + ", ".join(onnx_checks)
    if exporter == "auto" and section.rejected:
        why += f" (builder rejected: {section.rejected[0][:120]})"
    return True, why


def cell_onnx(w: Work) -> tuple[bool, str]:
    return _pipeline(w, "onnx", "dynamo")


def cell_genai(w: Work) -> tuple[bool, str]:
    return _pipeline(w, "genai", "genai")


def cell_auto(w: Work) -> tuple[bool, str]:
    return _pipeline(w, "auto", "auto")


def _shared(w: Work, exporter: str) -> tuple[bool, str]:
    from lora_export.package.build import PackageOptions, package

    variants = w.root / f"variants-{exporter}.json"
    variants.write_text(json.dumps({"variants": {"a": {"adapters": [str(w.adapters[0])]},
                                                 "b": {"adapters": [str(w.adapters[1])]}}}))  # fmt: skip
    manifest = package(
        w.base, variants, w.root / f"shared-{exporter}", PackageOptions(mode="shared", exporter=exporter)
    )
    if not manifest.passed:
        return False, failed_checks(manifest.checks)
    shared = manifest.shared
    names = ", ".join(c.name for c in shared.checks) if shared else "no shared layout"
    return shared is not None, f"{shared.exporter if shared else exporter}: {names}"[:300]


def cell_shared_genai(w: Work) -> tuple[bool, str]:
    return _shared(w, "genai")


def cell_shared_ort(w: Work) -> tuple[bool, str]:
    return _shared(w, "dynamo")


def cell_torch(w: Work) -> tuple[bool, str]:
    from lora_export import ExportOptions, export
    from lora_export.io.errors import LoraExportError

    parts, ok = [], True
    for fmt in ("torchscript", "pt2"):
        try:
            result = export(w.root / "merged", w.root / fmt, ExportOptions(format=fmt))
        except LoraExportError as e:
            if fmt == "torchscript":  # refused for the model, not the format: the cell is a refusal
                raise
            ok, _ = False, parts.append(f"{fmt}: {first_line(e)}")
            continue
        ok &= result.passed
        parts.append(f"{fmt} ✓" if result.passed else f"{fmt}: {failed_checks(result.checks)}")
    return ok, "; ".join(parts)


def cell_optimum(w: Work) -> tuple[bool, str]:
    if not OPTIMUM_PYTHON.is_file():
        raise NotRun("no Optimum environment here (tools/test_transformers4.sh makes one)")
    if not (w.root / "onnx" / "model.onnx").is_file():
        raise Refused("lora-export wrote no ONNX folder for it (see the dynamo column)")
    done = subprocess.run(
        [str(OPTIMUM_PYTHON), __file__, "--optimum", str(w.root / "onnx"), FAMILIES[w.family]["task"]],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if done.returncode == 0:
        return True, done.stdout.strip().splitlines()[-1][:300]
    lines = (done.stdout + done.stderr).strip().splitlines() or ["no output"]
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Fail)\w*: ", line)]  # the exception
    return False, (raised[-1] if raised else lines[-1])[:300]


CELLS: dict[str, Callable[[Work], tuple[bool, str]]] = {
    "merge": cell_merge, "verify": cell_verify, "onnx": cell_onnx, "genai": cell_genai, "auto": cell_auto,
    "shared_genai": cell_shared_genai, "shared_ort": cell_shared_ort, "torch": cell_torch, "optimum": cell_optimum,
}  # fmt: skip


class NotRun(Exception):
    """A cell this machine cannot run (recorded as not run, neither ✅ nor ✗)."""


class Refused(Exception):
    """A cell whose input lora-export does not produce for this family (recorded as refused, with the reason)."""


class Work:
    """One family's models: the base, two adapters, the PEFT model of the first, in a scratch folder."""

    def __init__(self, family: str, root: Path) -> None:
        self.family, self.root = family, root
        self.base = build_base(family, root / "base")
        self.adapters = [root / "adapter-a", root / "adapter-b"]
        self.peft_model = build_adapter(family, self.base, self.adapters[0], seed=1)
        build_adapter(family, self.base, self.adapters[1], seed=2)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def run_family(family: str, columns: list[str]) -> dict[str, Any]:
    """Every asked cell of one family: {"status": ok | failed | not run, "why": …, "seconds": …}."""
    import torch

    from lora_export.io.errors import LoraExportError

    torch.set_num_threads(1)
    cells: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix=f"support-{family.split()[0]}-") as tmp:
        work = Work(family, Path(tmp))
        for column in columns:
            started = time.perf_counter()
            try:
                ok, why = CELLS[column](work)
                status = "ok" if ok else "failed"
            except NotRun as e:
                status, why = "not run", str(e)
            except Refused as e:
                status, why = "refused", str(e)
            except LoraExportError as e:  # a refusal: the tool says why it does not do this
                status, why = "refused", first_line(e).split(": ", 1)[1]
            except Exception as e:  # noqa: BLE001  an internal error is a finding of the matrix
                status, why = "failed", "internal error: " + first_line(e)
                traceback.print_exc()
            why = why.replace(f"{tmp}/", "")  # the scratch folder's name would change every run
            cells[column] = {"status": status, "why": why, "seconds": round(time.perf_counter() - started, 1)}
            print(f"{family:26} {column:13} {status:8} {why[:110]}", flush=True)
    return cells


# ---------------------------------------------------------------------------------------------------------------------
# Optimum (run by the transformers-4 environment's python)


def optimum_check(folder: Path, task: str) -> int:
    """Load the ONNX folder with Optimum's ORTModel class for the task and compare its logits with PyTorch's."""
    import numpy as np
    import torch
    import transformers
    from optimum import onnxruntime as ortm

    classes = {"causal-lm": ("ORTModelForCausalLM", "AutoModelForCausalLM"),
               "sequence-classification": ("ORTModelForSequenceClassification", "AutoModelForSequenceClassification")}  # fmt: skip
    ort_name, torch_name = classes[task]
    kwargs = {"use_cache": True, "use_io_binding": False} if task == "causal-lm" else {}
    reference = getattr(transformers, torch_name).from_pretrained(folder / "merged").eval()
    ids = torch.tensor([[5, 17, 33, 8, 61, 40]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).logits.numpy()
    try:
        got = getattr(ortm, ort_name).from_pretrained(folder, **kwargs)(input_ids=ids, attention_mask=mask).logits
    except Exception as e:  # what Optimum says is the cell's reason, on one line
        said = " ".join(str(e).split())
        got = re.search(r"past_key_values\.\d+\.key .*index: 1 Got: (\d+) Expected: (\d+)", said)
        if got:  # the first step's empty past: Optimum sized it by another head count than the graph's KV heads
            said = (f"Optimum builds the empty past with {got[1]} heads for {reference.config.model_type}, the graph "
                    f"takes num_key_value_heads = {got[2]} (Optimum's GQA handling of this model type): {said[:160]}")  # fmt: skip
        print(f"Failed: {ort_name} on {reference.config.model_type}: {said[:330]}")
        return 1
    got = got.numpy() if hasattr(got, "numpy") else np.asarray(got)
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"{ort_name}: logits rel {rel:.1e} against PyTorch (transformers {transformers.__version__})")
    return 0 if rel <= 1e-4 else 1


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


MARK = {"ok": "✅", "failed": "✗", "refused": "✗", "not run": "–"}


def render(data: dict[str, Any]) -> str:
    """docs/support.md from docs/support.json: the table, then each ✗ and – with its reason."""
    columns = list(data["columns"])
    head = ["family", "task", *(data["columns"][c] for c in columns)]
    lines = [
        "# Support matrix",
        "",
        "Generated by `python tools/support_matrix.py` from real runs (its cells: docs/support.json); CI checks that this",
        "page is what the JSON renders to, that the models' settings are the tool's, and re-runs the merge and verify",
        "cells. Each row is a tiny random model of the family with realistic proportions (head size 64, 4 attention",
        "heads, 2 KV heads where the family groups them, 2 layers, 384 ids) and PEFT adapters on the attention's",
        "projections with every trainable tensor perturbed; one row keeps the small proportions tests use.",
        "Random weights, not pretrained ones: see docs/export.md for what real models add.",
        "",
        f"Run {data['generated']} with {', '.join(f'{k} {v}' for k, v in data['versions'].items())}.",
        "✅ passed its checks · ✗ failed or refused (reason below) · – not run on that machine.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    notes = []
    for family, row in data["rows"].items():
        marks = []
        for column in columns:
            cell = row["cells"].get(column, {"status": "not run", "why": "not run yet"})
            mark = MARK[cell["status"]]
            if cell["status"] != "ok":
                notes.append(f"- **{family}, {data['columns'][column]}** ({cell['status']}): {cell['why']}")
            marks.append(mark)
        lines.append(f"| {family} | {row['task']} | " + " | ".join(marks) + " |")
    lines += ["", "## Why each ✗ and –", "", *notes, ""]
    lines += ["## What shipped by default", ""]
    lines += [f"- {family}: {row['cells']['auto']['why']}" for family, row in data["rows"].items()
              if row["cells"].get("auto", {}).get("status") == "ok"]  # fmt: skip
    return "\n".join(lines) + "\n"


def versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("torch", "transformers", "peft", "onnxruntime", "onnxruntime-genai")
    return {n: version(n) for n in names}


def settings_of(family: str) -> dict[str, Any]:
    """What a row was run with: compared by the CI test, so a changed model is a stale row."""
    return json.loads(json.dumps(FAMILIES[family]))  # as the JSON holds it (tuples become lists)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--optimum"]:
        return optimum_check(Path(argv[1]), argv[2])
    if argv[:1] == ["--check"]:
        current = render(json.loads(JSON.read_text()))
        if MARKDOWN.read_text() != current:
            print(f"{MARKDOWN} is not what {JSON} renders to: run python tools/support_matrix.py --render")
            return 1
        return 0
    if argv[:1] == ["--render"]:
        MARKDOWN.write_text(render(json.loads(JSON.read_text())))
        return 0
    families = argv or list(FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        print(f"unknown families {unknown}: choose from {list(FAMILIES)}")
        return 2
    data = json.loads(JSON.read_text()) if JSON.is_file() and argv else {"rows": {}}
    data.update(generated=time.strftime("%Y-%m-%d"), versions=versions(), columns=COLUMNS)
    for family in families:
        cells = run_family(family, list(COLUMNS))
        data["rows"][family] = {"task": FAMILIES[family]["task"], "settings": settings_of(family), "cells": cells}
        data["rows"] = {f: data["rows"][f] for f in FAMILIES if f in data["rows"]}
        JSON.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        MARKDOWN.write_text(render(data))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))
