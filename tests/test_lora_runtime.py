"""LoRA at run time (our module, no PEFT) against PEFT's unmerged model, for every variant the merge supports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import VARIANT_CASES, Variants, logits_of, make_adapter, peft_unmerged, sample_inputs

from lora_export.verification.lora_runtime import LoraLayer, effective_state, load_unmerged


@pytest.mark.parametrize("case", VARIANT_CASES)
def test_runtime_matches_peft_unmerged(variants: Variants, case: str) -> None:
    base, adapter, kwargs = variants.base(case), variants.adapter(case), variants.spec[case][1]
    ours = load_unmerged(base, [adapter])
    wrapped = [m for m in ours.modules() if isinstance(m, LoraLayer)]
    assert wrapped or "modules_to_save" in kwargs
    inputs = sample_inputs(base)
    ref = logits_of(peft_unmerged(base, [adapter]), inputs)
    got = logits_of(ours, inputs)
    plain = logits_of(_base_model(base), inputs)
    assert (got - plain).abs().max() > 1e-3, "the adapter changed nothing"
    assert (got - ref).abs().max() < 1e-5


def _base_model(base: Path) -> Any:
    from lora_export.model.loading import load_model

    return load_model(base)


def test_several_adapters_with_weights(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "llama"
    a = make_adapter(base, tmp_path / "a", seed=1, target_modules=["q_proj", "v_proj"])
    b = make_adapter(base, tmp_path / "b", seed=2, target_modules=["v_proj", "down_proj"], use_rslora=True)
    # DoRA only where no other adapter is: PEFT's unmerged forward rescales the output of the adapters before it
    # (order-dependent); lora-export's definition is W0 + Σ wᵢ·(DoRAᵢ(W0) − W0)
    c = make_adapter(base, tmp_path / "c", seed=3, target_modules=["k_proj"], use_dora=True)
    inputs = sample_inputs(base)
    plain = logits_of(_base_model(base), inputs)
    got = logits_of(load_unmerged(base, [a, b, c]), inputs)
    ref = logits_of(peft_unmerged(base, [a, b, c]), inputs)
    assert (got - ref).abs().max() < 1e-5
    assert (got - plain).abs().max() > 1e-3
    # a weight scales the adapter's ΔW exactly
    name = "model.layers.1.self_attn.v_proj.weight"
    w0 = effective_state(_base_model(base))[name]
    full = effective_state(load_unmerged(base, [a]))[name] - w0
    half = effective_state(load_unmerged(base, [a], [0.5]))[name] - w0
    assert torch.allclose(half, 0.5 * full, atol=1e-7) and full.abs().max() > 1e-3


def test_effective_state_is_peft_merge(models_dir: Path, tmp_path: Path) -> None:
    base = models_dir / "gpt2"
    adapter = make_adapter(
        base, tmp_path / "adapter", target_modules=["c_attn", "c_fc"], use_dora=True, fan_in_fan_out=True
    )
    state = effective_state(load_unmerged(base, [adapter]))
    merged = peft_unmerged(base, [adapter]).merge_and_unload().state_dict()
    for name in (
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_fc.bias",
    ):
        assert torch.allclose(state[name], merged[name], atol=1e-6), name
    assert set(merged) <= set(state)
