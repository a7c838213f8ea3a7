"""Where two models first diverge: every module's output on one input, in execution order, compared."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..records import Check
from ..records.sections import Diagnosis, Divergence
from ..records.tolerances import metric_failures, tolerance
from .compare import Case, outputs_of


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    if hasattr(value, "values"):  # transformers ModelOutput
        return next((v for v in value.values() if isinstance(v, torch.Tensor)), None)
    return None


@torch.no_grad()
def module_outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every module's output on `inputs`, by name, in the order the modules finished."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, _args: Any, out: Any, name: str = name) -> None:
            t = _first_tensor(out)
            if t is not None and t.is_floating_point() and name not in seen:
                seen[name] = t.detach().float().cpu()

        handles.append(module.register_forward_hook(hook))
    try:
        outputs_of(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def layer_of(module: str) -> str:
    m = re.match(r"^(.*?\.\d+)(\.|$)", module)
    return m.group(1) if m else module


def diagnose(ref: nn.Module, other: nn.Module, case: Case, tol: float, compares: str) -> Diagnosis:
    a, b = module_outputs(ref, case.inputs), module_outputs(other, case.inputs)
    rows = []
    for name, ra in a.items():
        rb = b.get(name)
        if rb is None or rb.shape != ra.shape:
            continue
        rel = float((rb - ra).abs().max()) / max(float(ra.abs().max()), 1e-30)
        rows.append((name, rel))
    first = next(((n, r) for n, r in rows if not r <= tol), None)
    worst = sorted(rows, key=lambda r: -r[1] if math.isfinite(r[1]) else -math.inf)[:5]
    divergence = None if first is None else Divergence(first[0], layer_of(first[0]), first[1])
    return Diagnosis(case.name, tol, divergence, tuple(worst), compares)


def diagnose_failure(
    checks: list[Check],
    cases: list[Case],
    unmerged: nn.Module,
    merged32: nn.Module,
    merged: nn.Module | None,
    dtype: str,
) -> Diagnosis | None:
    """When a check failed: the first module whose output diverges, on the first case that failed."""
    failed = [c for c in checks if not c.passed]
    if not failed:
        return None
    outputs_failed = next((c for c in failed if c.metrics), None)
    at_dtype = merged is not None and (outputs_failed is None or outputs_failed.name.startswith("cast"))
    pair = (merged32, merged) if at_dtype else (unmerged, merged32)
    tol = tolerance("cast", dtype) if at_dtype else tolerance("merge", "float32")
    failing = {m.case for m in outputs_failed.metrics if metric_failures(m, tol)} if outputs_failed else set()
    case = next((c for c in cases if c.name in failing), cases[0])
    compares = f"merged in {dtype} vs merged in float32" if at_dtype else "merged in float32 vs unmerged in float32"
    diagnosis = diagnose(*pair, case, tol.max_rel, compares)
    return replace(diagnosis, worst_tensors=tuple(checks[0].details["worst_tensors"]))
