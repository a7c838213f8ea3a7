"""Properties of the merge arithmetic, on generated layers, through the whole streaming merge (files in, files out).

- merging an adapter and then merging it again with the opposite weight (what `swap` does) gives the base back;
- merging two adapters with weights at once equals merging one, then the other into the result;
- weight 0 is the identity, bit for bit, for every variant (DoRA included).

Layers: any shape, stored out×in or transposed (Conv1D-style, fan_in_fan_out), any rank up to the layer's size, α,
rsLoRA; values across orders of magnitude. Tolerances are fp32 rounding: a few ulps of the largest magnitude involved.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from conftest import read_all
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lora_export import MergeOptions, merge

EPS = torch.finfo(torch.float32).eps
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Layer:
    out_f: int
    in_f: int
    transposed: bool  # stored in×out, as GPT-2's Conv1D
    w_scale: float
    seed: int


@dataclass(frozen=True)
class Lora:
    r: int
    alpha: float
    rslora: bool
    dora: bool
    scale: float
    seed: int


layers = st.builds(
    Layer,
    st.integers(1, 40),
    st.integers(1, 40),
    st.booleans(),
    st.sampled_from([1e-3, 0.02, 1.0, 50.0]),
    st.integers(0, 2**16),
)


def loras(dora: bool = False) -> st.SearchStrategy[Lora]:
    return st.builds(
        Lora,
        st.integers(1, 12),
        st.sampled_from([1.0, 8.0, 16.0, 0.5]),
        st.booleans(),
        st.just(False) | st.just(dora),
        st.sampled_from([1e-3, 0.1, 3.0]),
        st.integers(0, 2**16),
    )


weights = st.sampled_from([1.0, 0.5, -0.7, 2.0, 1e-3])


def write_base(folder: Path, layer: Layer) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(layer.seed)
    w = torch.randn(layer.out_f, layer.in_f, generator=g) * layer.w_scale
    tensors = {
        "layers.0.proj.weight": (w.T if layer.transposed else w).contiguous(),
        "norm.weight": torch.ones(layer.out_f),
    }
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "generated", "tie_word_embeddings": False}))
    return tensors


def write_adapter(folder: Path, layer: Layer, lora: Lora) -> Path:
    r = min(lora.r, max(layer.out_f, layer.in_f))
    g = torch.Generator().manual_seed(lora.seed)
    tensors = {
        "base_model.model.layers.0.proj.lora_A.weight": torch.randn(r, layer.in_f, generator=g) * lora.scale,
        "base_model.model.layers.0.proj.lora_B.weight": torch.randn(layer.out_f, r, generator=g) * lora.scale,
    }
    if lora.dora:
        tensors["base_model.model.layers.0.proj.lora_magnitude_vector"] = torch.rand(layer.out_f, generator=g) + 0.5
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": lora.alpha,
        "use_rslora": lora.rslora,
        "use_dora": lora.dora,
        "target_modules": ["proj"],
        "fan_in_fan_out": layer.transposed,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def delta_bound(*tensors: torch.Tensor) -> float:
    """A few fp32 ulps of the largest magnitude any term of the sums reaches."""
    return 8 * EPS * sum(float(t.abs().max()) for t in tensors)


def run(base: Path, adapters: list[Path], ws: tuple[float, ...], out: Path) -> dict[str, torch.Tensor]:
    merge(base, adapters, out, MergeOptions(weights=ws, progress=False))
    return read_all(out)


@SETTINGS
@given(layer=layers, lora=loras(), w=weights)
def test_merge_then_remove_gives_the_base_back(layer: Layer, lora: Lora, w: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        w0 = write_base(root / "base", layer)
        adapter = write_adapter(root / "a", layer, lora)
        merged = run(root / "base", [adapter], (w,), root / "merged")
        back = run(root / "merged", [adapter], (-w,), root / "back")
        name = "layers.0.proj.weight"
        delta = merged[name] - w0[name]
        assert (back[name] - w0[name]).abs().max() <= delta_bound(w0[name], delta)
        assert torch.equal(back["norm.weight"], w0["norm.weight"])


@SETTINGS
@given(layer=layers, a=loras(), b=loras(), wa=weights, wb=weights)
def test_weighted_sum_equals_one_after_the_other(layer: Layer, a: Lora, b: Lora, wa: float, wb: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        w0 = write_base(root / "base", layer)
        pa, pb = write_adapter(root / "a", layer, a), write_adapter(root / "b", layer, b)
        together = run(root / "base", [pa, pb], (wa, wb), root / "together")
        run(root / "base", [pa], (wa,), root / "first")
        in_turn = run(root / "first", [pb], (wb,), root / "second")
        name = "layers.0.proj.weight"
        bound = delta_bound(w0[name], together[name] - w0[name], in_turn[name] - w0[name])
        assert (together[name] - in_turn[name]).abs().max() <= bound


@SETTINGS
@given(layer=layers, lora=loras(dora=True))
def test_weight_zero_is_the_identity(layer: Layer, lora: Lora) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        w0 = write_base(root / "base", layer)
        adapter = write_adapter(root / "a", layer, lora)
        merged = run(root / "base", [adapter], (0.0,), root / "merged")
        assert merged.keys() == w0.keys()
        for name, t in w0.items():
            assert torch.equal(merged[name], t), name
