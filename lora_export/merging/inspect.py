"""`lora-export inspect`: what an adapter targets, its sizes, its fit to a base, and the spectrum of each ΔW.

The spectrum comes from the factors, never from a formed ΔW: with B = Q_B·R_B and Aᵀ = Q_A·R_A (thin QR),
s·B·A = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ, so ΔW's singular values are those of the r×r core and its singular vectors are Q_B·U and
Q_A·V. The paper's amplification factor (section 7.3) is ‖ΔW‖_F / ‖Uᵀ·W0·V‖_F with U, V the top-r singular directions
of ΔW: how much ΔW amplifies directions W0 barely uses.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ..io.errors import LoraExportError
from ..model.adapters import LoraModule, load_adapter
from ..model.base import BaseModel
from ..records import AdapterInspection, ModuleInspection
from .plan import module_layout, plan_merge


def factor_svd(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U out×r, σ r, V in×r) of s·B·A in float64, from thin QRs of the factors."""
    b, a = module.lora_B.double(), module.lora_A.double()
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(module.scaling * rb @ ra.T)
    return qb @ u, s, qa @ vh.T


def spectrum(module: LoraModule, w0: torch.Tensor | None) -> dict[str, Any]:
    """ΔW's singular values and what they say. A ΔW that is exactly zero (a freshly initialised lora_B) has rank 0 and
    effective rank 0, and no amplification (None: there is no direction); one whose factors or product are not finite
    (an overflow) is reported as such, with no spectrum, rather than as numbers computed from NaN."""
    factors = (module.lora_A, module.lora_B, torch.tensor(float(module.scaling)))
    s = None
    if all(bool(torch.isfinite(t).all()) for t in factors):
        u, s, v = factor_svd(module)
    if s is None or not bool(torch.isfinite(s).all()):
        return {"finite": False, "singular_values": None, "rank": None, "effective_rank": None, "energy_top1": None,
                "energy_top_half": None, "delta_norm": None, "of": "s·B·A: not finite (overflow or NaN in the factors)"}  # fmt: skip
    total = float(s.sum())
    p = s / total if total > 0 else torch.zeros_like(s)
    entropy = -float((p[p > 0] * p[p > 0].log()).sum())
    energy = (s**2) / max(float((s**2).sum()), 1e-300)
    out: dict[str, Any] = {
        "finite": True,
        "singular_values": [float(x) for x in s],
        "rank": int((s > 1e-6 * float(s[0])).sum()) if len(s) and float(s[0]) > 0 else 0,
        # Roy & Vetterli: exp of the entropy of the normalised spectrum; 0 for ΔW = 0 (no spectrum to normalise)
        "effective_rank": math.exp(entropy) if total > 0 else 0.0,
        "energy_top1": float(energy[:1].sum()),
        "energy_top_half": float(energy[: max(1, len(s) // 2)].sum()),
        "delta_norm": float(torch.linalg.vector_norm(s)),
        "of": "s·B·A" + (" (DoRA's magnitude rescaling not included)" if module.magnitude is not None else ""),
    }
    if w0 is not None:
        projected = float(torch.linalg.matrix_norm(u.T @ w0.double() @ v))
        amplification = out["delta_norm"] / projected if projected > 0 else math.inf
        out["amplification"] = amplification if total > 0 else None
        out["w0_norm"] = float(torch.linalg.matrix_norm(w0.double()))
    return out


def inspect_adapter(
    adapter_dir: Path | str, base_dir: Path | str | None = None, allow_pickle: bool = False
) -> AdapterInspection:
    adapter = load_adapter(Path(adapter_dir), allow_pickle)
    base = BaseModel.open(Path(base_dir), allow_pickle) if base_dir else None
    compatible, reason = None, None
    if base is not None:
        try:
            plan_merge(base, [adapter], [1.0], "auto")
            compatible = True
        except LoraExportError as e:
            compatible, reason = False, str(e)
    modules = []
    for path, m in sorted(
        adapter.modules.items(), key=lambda kv: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", kv[0])]
    ):
        w0, base_shape = None, None
        if base is not None and compatible and f"{path}.weight" in base.store:
            stored = base.store.read(f"{path}.weight").float()
            transposed = module_layout(base, m, tuple(stored.shape), adapter)
            w0 = stored.T if transposed else stored  # (out, in), as B·A
            base_shape = tuple(stored.shape)
        modules.append(
            ModuleInspection(
                path,
                m.kind,
                m.variant,
                m.r,
                m.lora_alpha,
                m.scaling,
                m.lora_A.numel() + m.lora_B.numel(),
                (m.lora_B.shape[0], m.lora_A.shape[1]),
                spectrum(m, w0),
                base_shape,
            )
        )
    config = adapter.config
    return AdapterInspection(
        adapter=str(adapter.path),
        peft_type=str(config.get("peft_type")),
        r=int(config.get("r") or 0),
        lora_alpha=float(config.get("lora_alpha") or 0),
        use_rslora=bool(config.get("use_rslora")),
        use_dora=bool(config.get("use_dora")),
        modules=tuple(modules),
        replaced_tensors=tuple(sorted(adapter.replacements)),
        params=sum(e.params for e in modules) + sum(t.numel() for t in adapter.replacements.values()),
        weights_file=adapter.weights_file.name,
        weights_bytes=adapter.weights_file.stat().st_size,
        sha256=adapter.sha256,
        base=str(base_dir) if base_dir else None,
        compatible=compatible,
        incompatibility=reason,
    )
