"""The package's layouts at --precision int8/int4, on the GenAI model builder's MatMulNBits graphs.

Shared: one quantized base; each adapted projection gets its LoRA A/B as float32 inputs beside the MatMulNBits
(genai_lora), so every variant's adapter is exact on top of the quantized base and hot-swappable (og.Adapters). It is
judged like merge-and-onnx --precision (exporting/quantized.py): the base's quality against PyTorch float32 and, per
variant, its quality against its truth (the base with its adapters unmerged, float32) and whether its effect survived
(deployed variant − deployed base vs the same difference in float32), all on the evaluation text in GenAI.

`package --check` cannot re-derive PyTorch's float32 numbers within a quantized graph's error, so it re-runs the
layout in GenAI against the outputs GenAI gave when the package was built (logits after a prompt, greedy tokens, per
variant): the package still computes what was judged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..exporting.genai_builder import genai_build, save_references
from ..exporting.quantized import (
    QuantOptions,
    adapter_effect,
    eval_windows,
    iter_genai_logprobs,
    quality,
    torch_logprobs,
)
from ..exporting.quantized_build import effect_check, quality_check
from ..exporting.runtime_files import (
    GENAI_CONFIG,
    copy_side_files,
    genai_model,
    genai_prompt,
    new_generator,
    next_tokens,
)
from ..model.adapters import LoraAdapter
from ..model.config import ModelConfig
from ..model.loading import load_model
from ..records import SharedLayout
from ..records.tolerances import ADAPTER_EFFECT
from ..verification.compare import load_tokenizer
from .genai import NEW_TOKENS, References, builder_shared_layout, dtype_notes
from .genai_lora import add_lora_inputs
from .shared_graph import variant_adapters
from .variants import Variant


def genai_self_references(
    folder: Path, adapters: dict[str, Path], prompt: list[int], n: int, base: str | None = "__base__"
) -> References:
    """GenAI's own greedy tokens and logits after `prompt`: the folder as built, for `package --check` to re-run
    (without an adapter under `base`, then with each of `adapters` active)."""
    import onnxruntime_genai as og

    model = genai_model(og, folder)
    loaded = og.Adapters(model) if adapters else None
    for name, path in adapters.items():
        assert loaded is not None
        loaded.load(str(path), name)
    out: References = {}
    for name in ([base] if base else []) + list(adapters):
        generator = new_generator(og, model, prompt, n, folder)
        if name in adapters:
            generator.set_active_adapter(loaded, name)
        generator.append_tokens(prompt)
        logits = np.asarray(generator.get_logits(), dtype=np.float64).reshape(-1)
        out[name] = (next_tokens(generator, n), logits)
        del generator
    return out


def shared_genai_quantized(
    base_dir: Path,
    variants: list[Variant],
    out: Path,
    modules: dict[str, tuple[int, int]],
    loaded: dict[str, list[tuple[LoraAdapter, float]]],
    log: Callable[[str], None],
    quant: QuantOptions,
) -> SharedLayout:
    """The shared layout on the builder's quantized graph, in out/shared (which exists and is empty)."""

    shared, config, p = out / "shared", ModelConfig.load(base_dir), quant.precision
    windows = eval_windows(load_tokenizer(base_dir), quant, config.context)
    with genai_build(base_dir, shared, "float32", log, quant) as finish:
        base32 = torch_logprobs(load_model(base_dir), windows)
        finish()
    copy_side_files(base_dir, shared)
    log(f"shared layout: float LoRA inputs beside the {p} MatMulNBits …")
    lora = add_lora_inputs(shared / "model.onnx", modules, config)
    files, parameters, truths = {}, {}, {}
    for v, path, shapes, unmerged in variant_adapters(base_dir, variants, loaded, shared):
        files[v.name], parameters[v.name] = f"shared/{path.name}", shapes
        truths[v.name] = torch_logprobs(unmerged, windows)
    log(f"shared layout: the base and every adapter in ONNX Runtime GenAI on {sum(map(len, windows))} tokens …")
    adapters = {name: out / file for name, file in files.items()}
    runs = iter_genai_logprobs(shared, windows, adapters)
    _, deployed_base = next(runs)
    checks = [replace(quality_check(quality(base32, deployed_base, windows), quant), name=f"quality ({p}), base")]
    band = (ADAPTER_EFFECT.min_ratio, ADAPTER_EFFECT.max_ratio)
    for name, deployed in runs:
        assert name is not None
        truth = truths[name]
        checks.append(replace(quality_check(quality(truth, deployed, windows), quant), name=f"quality ({p}), {name}"))
        effect = adapter_effect(truth, base32, deployed, deployed_base, ADAPTER_EFFECT.min_cosine, band)
        checks.append(replace(effect_check(effect, quant, float_lora=True), name=f"adapter effect ({p}), {name}"))
    prompt = genai_prompt(shared / GENAI_CONFIG, config.vocab_size, 6, 3)
    save_references(shared / "reference.npz", prompt, genai_self_references(shared, adapters, prompt, NEW_TOKENS))
    notes = [
        *dtype_notes(variants),
        f"graph: the GenAI model builder's {p} MatMulNBits ({', '.join(quant.builder_options()[1:])}) with float32 LoRA "
        "inputs beside each adapted projection; runs in GenAI (og.Adapters)",
        "package --check re-runs it against GenAI's own outputs when it was built (quality and adapter effect were "
        "judged then against PyTorch float32)",
    ]
    return builder_shared_layout(shared, lora, files, parameters, checks, notes)


def merged_self_references(folder: Path, name: str) -> None:
    """reference.npz of a quantized merged variant: GenAI's own outputs (what package --check re-runs)."""
    config = ModelConfig.load(folder)
    prompt = genai_prompt(folder / GENAI_CONFIG, config.vocab_size, 6, 3)
    references = genai_self_references(folder, {}, prompt, NEW_TOKENS, base=name)
    save_references(folder / "reference.npz", prompt, references)
