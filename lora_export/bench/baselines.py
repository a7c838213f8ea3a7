"""Adapter-layer baselines of the LoRA paper's Table 1, inserted into a loaded transformers model.

AdapterH (Houlsby et al. 2019): two adapters per block, after the attention output projection and after the MLP
output projection, each before its residual add. AdapterL (Lin et al. 2020): one adapter per block after the MLP,
with an extra LayerNorm. An adapter is y + up(act(down(y))) with two biased linears. Values are random (latency does
not depend on them) but small, and the adapters really run: they change the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..io.errors import UnsupportedError
from ..model.loading import text_config

# Where a block's attention output and MLP output projections live, per model family.
ATTENTION_OUT = ("self_attn.o_proj", "attn.c_proj", "attention.output.dense", "self_attn.dense", "self_attn.out_proj")
MLP_OUT = ("mlp.down_proj", "mlp.c_proj", "output.dense", "mlp.fc2", "fc2", "mlp.dense_4h_to_h")


class BottleneckAdapter(nn.Module):
    """Wraps a projection: returns y + up(gelu(down(norm(y)))) with y the projection's output."""

    def __init__(
        self, inner: nn.Module, dim: int, bottleneck: int, layer_norm: bool, dtype: torch.dtype, device: torch.device
    ):
        super().__init__()
        self.inner = inner
        self.norm = nn.LayerNorm(dim, dtype=dtype, device=device) if layer_norm else None
        self.down = nn.Linear(dim, bottleneck, dtype=dtype, device=device)
        self.up = nn.Linear(bottleneck, dim, dtype=dtype, device=device)
        with torch.no_grad():
            self.up.weight.mul_(0.01)  # small: the model's numbers stay in range
        self.act = nn.GELU()

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        y = self.inner(*args, **kwargs)
        z = self.norm(y) if self.norm is not None else y
        return y + self.up(self.act(self.down(z)))


@dataclass(frozen=True)
class AdapterPlan:
    kind: str  # "H" or "L"
    blocks: int
    dim: int
    bottleneck: int

    @property
    def params(self) -> int:
        per = 2 * self.dim * self.bottleneck + self.bottleneck + self.dim
        if self.kind == "H":
            return self.blocks * 2 * per
        return self.blocks * (per + 2 * self.dim)  # + LayerNorm weight and bias


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the longest ModuleList of identical modules."""
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise UnsupportedError(
            f"{type(model).__name__}: no list of transformer blocks found; adapter baselines cannot be placed"
        )
    return best


def _find(block: nn.Module, candidates: tuple[str, ...], what: str, model: nn.Module) -> str:
    names = dict(block.named_modules())
    for c in candidates:
        if c in names:
            return c
    raise UnsupportedError(
        f"{type(model).__name__}: cannot find the {what} output projection in a block (tried {', '.join(candidates)})"
    )


def hidden_size(model: nn.Module) -> int:
    config = text_config(model.config)
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def plan_adapters(model: nn.Module, kind: str, params: int) -> AdapterPlan:
    """The bottleneck whose parameter count is closest to `params` (at least 1)."""
    blocks, dim = len(blocks_of(model)), hidden_size(model)
    per_block = params / blocks / (2 if kind == "H" else 1)
    extra = dim + (2 * dim if kind == "L" else 0)
    bottleneck = max(1, round((per_block - extra) / (2 * dim + 1)))
    return AdapterPlan(kind, blocks, dim, bottleneck)


def insert_adapters(model: nn.Module, plan: AdapterPlan, seed: int = 0) -> int:
    """Insert adapters into `model` in place; return how many were inserted. Their random initialisation is seeded
    without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _insert(model, plan)


def _insert(model: nn.Module, plan: AdapterPlan) -> int:
    param = next(model.parameters())
    count = 0
    for block in blocks_of(model):
        targets = [_find(block, MLP_OUT, "MLP", model)]
        if plan.kind == "H":
            targets.insert(0, _find(block, ATTENTION_OUT, "attention", model))
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            inner = getattr(parent, child)
            setattr(
                parent,
                child,
                BottleneckAdapter(inner, plan.dim, plan.bottleneck, plan.kind == "L", param.dtype, param.device),
            )
            count += 1
    return count
