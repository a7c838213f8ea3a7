"""The math of every LoRA variant: ΔW = s·B·A in the base tensor's layout, DoRA's scale, the factors the streaming
merge folds in chunk by chunk. Pure functions, float32; each fits on a screen beside its formula."""

from __future__ import annotations

import math

import torch

from ..model.adapters import LoraModule


def delta_weight(module: LoraModule, base_weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """ΔW of one module in the base tensor's stored layout, fp32. DoRA's ΔW is its merged weight minus W0.

    Linear: ΔW = s·B@A (out×in). Conv1D (fan_in_fan_out) and embeddings store (in×out) / (vocab×dim): ΔW = (s·B@A)ᵀ.
    DoRA: V = W0 + ΔW; n = ‖V‖ per output feature; W = (m / n)·V. For embeddings the norm runs over the vocabulary.
    """
    w0 = base_weight.float()
    delta = module.scaling * (module.lora_B.float() @ module.lora_A.float())
    if transposed:
        delta = delta.T
    if module.magnitude is None:
        return delta
    scale = dora_scale(module, w0, transposed, delta)
    return (w0 + delta) * (scale if transposed else scale.unsqueeze(1)) - w0


def dora_scale(
    module: LoraModule, w0: torch.Tensor, transposed: bool, delta: torch.Tensor | None = None
) -> torch.Tensor:
    """DoRA's m / ‖W0 + ΔW‖, one per output feature, fp32. Transposed layouts ((in, out), (vocab, dim)) take the
    norm over their rows."""
    if delta is None:
        delta = module.scaling * (module.lora_B.float() @ module.lora_A.float())
        delta = delta.T if transposed else delta
    return module.magnitude.float() / torch.linalg.vector_norm(w0.float() + delta, dim=0 if transposed else 1)


def lora_factors(module: LoraModule, weight: float, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) in fp32 with L @ R = weight·ΔW in the stored layout; rows of L follow rows of the base tensor.

    Concatenating the L's and R's of several adapters along r gives their exact weighted sum in one matmul.
    """
    a, b = module.lora_A.float(), module.lora_B.float() * (weight * module.scaling)
    return (a.T.contiguous(), b.T.contiguous()) if transposed else (b, a)


def factors_norm(left: torch.Tensor, right: torch.Tensor) -> float:
    """‖L@R‖_F without forming L@R: trace((LᵀL)(RRᵀ)), in float64."""
    ll, rr = left.double().T @ left.double(), right.double() @ right.double().T
    return math.sqrt(max(float((ll * rr).sum()), 0.0))
