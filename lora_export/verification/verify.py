"""Merged vs unmerged, checked on outputs: merge error and dtype error apart, greedy generation, per-layer diagnosis.

Three models take part. `unmerged`: the base in float32 with the adapters applied at run time (lora_runtime, no
PEFT) — the truth. `merged32`: the merged model in float32 (MERGED_DIR itself when it is float32, otherwise a fresh
float32 merge of the same inputs). `merged`: MERGED_DIR in its own dtype. The merge error is merged32 vs unmerged; the
dtype error is merged vs merged32; the weights check compares MERGED_DIR's tensors with W0 + ΔW, rounded to its dtype.
"""

from __future__ import annotations

import gc
import math
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.errors import InputError
from ..io.jsonio import read_text
from ..io.tensorfiles import TensorStore
from ..merging.merge import MergeOptions, adapter_weights, merge
from ..model.config import ModelConfig
from ..model.hub import folder_of, sources
from ..model.loading import Placement, load_model, model_kind, placement_summary
from ..records import Check, VerifyReport
from ..records.sections import Counted, Generation, StructureSummary, TokenComparison
from ..records.tolerances import tolerance, tolerances_for
from .compare import DTYPES, Case, greedy, greedy_as, load_tokenizer, make_cases, output_check, outputs_of
from .diagnose import diagnose_failure
from .lora_runtime import iter_effective_state, load_unmerged
from .seq2seq import encoder_inputs, seq2seq_cases, seq2seq_greedy
from .structure import Structure, torch_structure

PROMPTS = (
    "The capital of France is",
    "Write one sentence about the sea.",
    "def fibonacci(n):",
)


@dataclass(frozen=True)
class VerifyOptions:
    weights: tuple[float, ...] = ()
    prompts: tuple[str, ...] = PROMPTS
    max_new_tokens: int = 32
    seed: int = 0
    allow_pickle: bool = False
    device: str = "cpu"
    device_map: str | None = None  # accelerate: auto, balanced, sequential (models larger than one device)
    max_memory: dict[int | str, int | str] | None = None  # per device, with device_map: {0: "20GiB", "cpu": "60GiB"}
    structure: bool = True  # count FLOPs and operator calls (information, not a check): a package counts them once


# ---------------------------------------------------------------------------------------------------------------------
# Weights: the artifact's tensors against W0 + ΔW


def weights_check(merged_dir: Path, expected: Iterable[tuple[str, torch.Tensor]], dtype: str) -> Check:
    """Every stored tensor against W0 + ΔW, `expected` read one tensor at a time (no second copy of the model)."""
    tol = tolerance("weights", dtype)
    eps = torch.finfo(DTYPES[dtype]).eps
    store = TensorStore.open_safetensors(sorted(merged_dir.glob("*.safetensors")))
    rows, failures = [], []
    try:
        stored = set(store.names())
        for name, exp in expected:
            if name not in stored:
                continue  # a buffer, or a tied weight stored once
            stored.discard(name)
            got, exp = store.read(name).float(), exp.float().cpu()
            if tuple(got.shape) != tuple(exp.shape):
                failures.append(f"{name}: shape {tuple(got.shape)}, expected {tuple(exp.shape)}")
                continue
            rel, excess = _excess(got, exp, tol.weight_ulps * eps)
            rows.append((name, rel, excess))
            if not excess <= tol.max_rel:
                failures.append(
                    f"{name}: max |merged − (W0 + ΔW)| = {rel:.3g}·max|W|, beyond {tol.weight_ulps:g} ulp + {tol.max_rel:g}·max|W|"
                )
    finally:
        store.close()
    missing = sorted(stored)  # stored, but not a tensor of the unmerged model
    rows.sort(key=lambda r: -r[2] if math.isfinite(r[2]) else -math.inf)
    worst = [{"tensor": n, "max_rel": r, "excess_over_tolerance": e} for n, r, e in rows[:5]]
    allowed = (
        f"{tol.weight_ulps:g} ulp of {dtype} + {tol.max_rel:g}·max|W|" if tol.weight_ulps else f"{tol.max_rel:g}·max|W|"
    )
    summary = f"{len(rows) - len(failures)}/{len(rows)} tensors within {allowed} of W0 + ΔW" + (
        f"; {len(missing)} not in the model" if missing else ""
    )
    return Check(
        f"weights ({dtype})",
        "MERGED_DIR's tensors vs W0 + ΔW of the unmerged model",
        dtype,
        not failures,
        summary,
        tuple(failures),
        details={"worst_tensors": worst, "unexpected_tensors": missing[:20], "tolerance": f"weights/{dtype}"},
    )


def _excess(got: torch.Tensor, exp: torch.Tensor, ulps: float) -> tuple[float, float]:
    """max |got − exp| and max (|got − exp| − ulps·|exp|), both over max |exp|; `got` (a fresh copy) is overwritten.
    Few passes over the tensor: at 1B parameters this check reads the model twice, and each extra pass is seconds."""
    if not exp.numel():
        return 0.0, 0.0
    scale = max(float(torch.linalg.vector_norm(exp, math.inf)), 1e-30)
    diff = got.sub_(exp).abs_()  # NaN stays NaN: max() propagates it, and NaN <= max_rel fails
    rel = float(diff.max()) / scale
    if not ulps:
        return rel, rel
    return rel, float(diff.sub_(exp.abs().mul_(ulps)).max()) / scale


# ---------------------------------------------------------------------------------------------------------------------
# The verb


def read_prompts(path: Path) -> tuple[str, ...]:
    """--prompts: UTF-8 text, one prompt per line, at least one."""
    prompts = tuple(line.strip() for line in read_text(path, "give one prompt per line, in UTF-8").splitlines())
    prompts = tuple(p for p in prompts if p)
    if not prompts:
        raise InputError(f"{path}: no prompt in it; give one prompt per line")
    return prompts


def stored_dtype(folder: Path) -> str:
    """The floating dtype holding most of the folder's weight bytes."""
    store = TensorStore.open_safetensors(sorted(folder.glob("*.safetensors")))
    try:
        counts: Counter[torch.dtype] = Counter()
        for info in store.infos.values():
            if info.dtype.is_floating_point:
                counts[info.dtype] += info.end - info.start
    finally:
        store.close()
    if not counts:
        raise InputError(f"{folder} holds no floating-point safetensors weights")
    dtype = counts.most_common(1)[0][0]
    name = {v: k for k, v in DTYPES.items()}.get(dtype)
    if name is None:
        raise InputError(f"{folder}: weights are {dtype}; verify handles float32, bfloat16 and float16")
    return name


def verify(
    base_dir: Path | str,
    adapter_dirs: Sequence[Path | str],
    merged_dir: Path | str,
    options: VerifyOptions = VerifyOptions(),
) -> VerifyReport:
    """Check MERGED_DIR against the base with the adapters applied at run time. Never raises for a failed check:
    the report says what failed (`report.passed`)."""
    base_dir, merged_dir = folder_of(base_dir, "base"), Path(merged_dir)
    adapter_paths = [folder_of(a, "adapter") for a in adapter_dirs]
    for folder in (base_dir, merged_dir, *adapter_paths):
        if not folder.is_dir():
            raise InputError(f"{folder} does not exist or is not a folder")
    config = ModelConfig.load(merged_dir)
    weights = adapter_weights(options.weights, len(adapter_paths))
    dtype = stored_dtype(merged_dir)
    with tempfile.TemporaryDirectory(prefix="lora-export-verify-") as tmp:  # lives as long as the models: offloaded
        place = Placement(
            options.device, options.device_map, options.max_memory, Path(tmp) / "offload"
        )  # weights are read from it
        with torch.random.fork_rng(devices=[]):  # seeded, and the caller's global RNG left as it was
            torch.manual_seed(options.seed)
            return _verify(base_dir, adapter_paths, merged_dir, config, weights, dtype, options, place, Path(tmp))


def generation_prompt(
    case: Case, tokenizer: Any, config: ModelConfig, kind: str = "causal-lm"
) -> tuple[dict[str, torch.Tensor], int]:
    """The first case's first row without its padding, and the pad id greedy decoding uses (an encoder-decoder's
    decoder start token)."""
    if kind == "seq2seq-lm":
        return {k: v[:1] for k, v in encoder_inputs(case.inputs).items()}, config.decoder_start
    keep = case.inputs["attention_mask"][0].bool()
    prompt = {k: v[:1, keep] for k, v in case.inputs.items()}
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    eos = config.data.get("eos_token_id")
    pad = pad if pad is not None else (eos if isinstance(eos, int) else 0)
    return prompt, pad


def greedy_tokens(
    model: nn.Module, prompt: dict[str, torch.Tensor], n: int, pad: int, reference: list[int] | None = None
) -> list[int]:
    """n greedy tokens: `generate` for decoders (with a `reference`, checked against it in one forward
    pass where it can be: `greedy_as`); the decoder's own argmax loop for encoder-decoders (`pad` is then the
    decoder's start token)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return seq2seq_greedy(model, prompt, n, pad)
    if reference is not None:
        return greedy_as(model, prompt, reference, n, pad)
    return greedy(model, prompt, n, pad)


def generation_check(
    ref_tokens: list[int],
    merged32: nn.Module,
    merged: nn.Module | None,
    dtype: str,
    prompt: dict[str, torch.Tensor],
    pad: int,
    tokenizer: Any,
    n: int,
) -> tuple[Check, Generation]:
    """Greedy tokens of merged float32 vs unmerged float32's (a check); of merged in its dtype, reported."""
    g32 = TokenComparison.of(ref_tokens, greedy_tokens(merged32, prompt, n, pad, ref_tokens))
    check = Check(
        "generation (float32)",
        f"{n} greedy tokens, merged float32 vs unmerged float32",
        "float32",
        g32.identical,
        "identical" if g32.identical else f"first difference at token {g32.first_difference}",
        () if g32.identical else (f"greedy tokens differ from token {g32.first_difference}",),
        details=g32.to_dict(),
    )
    ids = prompt["input_ids"][0] if "input_ids" in prompt else torch.zeros(0, dtype=torch.long)  # Whisper: features
    text = (tokenizer.decode(ids), tokenizer.decode(ref_tokens)) if tokenizer is not None else (None, None)
    # reported, not a check: a half dtype may legitimately pick another token after a while
    half = (
        (dtype, TokenComparison.of(ref_tokens, greedy_tokens(merged, prompt, n, pad, ref_tokens)))
        if merged is not None
        else None
    )
    return check, Generation(tuple(ids.tolist()), n, g32, *text, half)


def structure_summary(case: Case, unmerged: Structure, merged: Structure) -> StructureSummary:
    """Counted per forward on one case: the merged model's FLOPs, operator calls and bytes, and what unmerged LoRA
    adds to them (the merged model runs the base's computation: tests/test_structure.py, bench's structure table)."""
    counted = merged.to_dict()
    adds = unmerged.added_over(merged)
    return StructureSummary(
        case.name,
        Counted(counted["flops"], counted["op_calls"], counted["param_bytes"]),
        Counted(adds["flops"], adds["op_calls"], adds["param_bytes"], adds["ops"]),
    )


def cases_for(kind: str, config: ModelConfig, tokenizer: Any, options: VerifyOptions, source: Path) -> list[Case]:
    """The input cases for the model's kind; a decoder's leave room for the tokens generated after the prompt."""
    if kind == "seq2seq-lm":
        return seq2seq_cases(config, tokenizer, options.prompts, options.seed, source=source)
    room = options.max_new_tokens if kind == "causal-lm" else 0
    return make_cases(config, tokenizer, options.prompts, options.seed, kind == "causal-lm", room, source=source)


def _verify(
    base_dir: Path,
    adapter_paths: list[Path],
    merged_dir: Path,
    config: ModelConfig,
    weights: tuple[float, ...],
    dtype: str,
    options: VerifyOptions,
    place: Placement,
    tmp: Path,
) -> VerifyReport:
    """The unmerged model's side first (weights, outputs, greedy tokens), then it is freed and the merged model is
    loaded: one model in memory at a time. A failure loads the unmerged model again for the per-layer diagnosis."""
    unmerged = load_unmerged(base_dir, adapter_paths, weights, torch.float32, options.allow_pickle, place)
    kind, model_class, placement = model_kind(unmerged), type(unmerged).__name__, placement_summary(unmerged)
    tokenizer = load_tokenizer(merged_dir) or load_tokenizer(base_dir)
    cases = cases_for(kind, config, tokenizer, options, base_dir)
    checks = [weights_check(merged_dir, iter_effective_state(unmerged), dtype)]
    ref_out = [outputs_of(unmerged, c.inputs) for c in cases]
    generate = kind in ("causal-lm", "seq2seq-lm") and options.max_new_tokens > 0
    prompt, pad = generation_prompt(cases[0], tokenizer, config, kind)
    ref_tokens = greedy_tokens(unmerged, prompt, options.max_new_tokens, pad) if generate else []
    unmerged_structure = torch_structure(unmerged, cases[0].inputs) if options.structure else None
    del unmerged
    gc.collect()

    merged32, merged, output_checks = _output_checks(
        base_dir, adapter_paths, merged_dir, weights, dtype, options, place, tmp, ref_out, cases
    )
    checks += output_checks
    structure = None
    if unmerged_structure is not None:
        structure = structure_summary(cases[0], unmerged_structure, torch_structure(merged32, cases[0].inputs))
    generation = None
    if generate:
        n = options.max_new_tokens
        check, generation = generation_check(ref_tokens, merged32, merged, dtype, prompt, pad, tokenizer, n)
        checks.append(check)
    diagnosis = None
    if not all(c.passed for c in checks):
        unmerged = load_unmerged(base_dir, adapter_paths, weights, torch.float32, options.allow_pickle, place)
        diagnosis = diagnose_failure(checks, cases, unmerged, merged32, merged, dtype)
    models = (("merged float32", merged32), (f"merged {dtype}", merged))
    placements = {name: p for name, m in models if m is not None and (p := placement_summary(m))}
    return VerifyReport(
        base=str(base_dir),
        adapters=[str(a) for a in adapter_paths],
        weights=list(weights),
        merged=str(merged_dir),
        model_class=model_class,
        merged_dtype=dtype,
        tolerances=tolerances_for(("weights", dtype), ("merge", "float32"), *([("cast", dtype)] if merged else [])),
        cases=[c.describe() for c in cases],
        checks=tuple(checks),
        generation=generation,
        diagnosis=diagnosis,
        placement=({"unmerged": placement} if placement else {}) | placements or None,
        structure=structure,
        sources=sources([base_dir, *adapter_paths, merged_dir]) or None,
    )


def _output_checks(
    base_dir: Path,
    adapter_paths: list[Path],
    merged_dir: Path,
    weights: tuple[float, ...],
    dtype: str,
    options: VerifyOptions,
    place: Placement,
    tmp: Path,
    ref_out: list[dict[str, torch.Tensor]],
    cases: list[Case],
) -> tuple[nn.Module, nn.Module | None, list[Check]]:
    """merge (float32): merged in float32 vs unmerged; cast: merged in its half dtype vs merged in float32."""
    if dtype == "float32":
        merged32_dir = merged_dir
    else:  # the same inputs merged in float32: what MERGED_DIR would be without the cast
        merged32_dir = tmp / "merged32"
        options32 = MergeOptions(dtype="float32", weights=weights, allow_pickle=options.allow_pickle, progress=False)
        merge(base_dir, adapter_paths, merged32_dir, options32)
    merged32 = load_model(merged32_dir, torch.float32, place)
    m32_out = [outputs_of(merged32, c.inputs) for c in cases]
    name, compares = "merge (float32)", "merged in float32 vs unmerged in float32"
    checks = [output_check(name, compares, "merge", "float32", cases, ref_out, m32_out)]
    if dtype == "float32":
        return merged32, None, checks
    merged = load_model(merged_dir, DTYPES[dtype], place)
    dep_out = [outputs_of(merged, c.inputs) for c in cases]
    compares = f"merged in {dtype} vs merged in float32"
    checks.append(output_check(f"cast ({dtype})", compares, "cast", dtype, cases, m32_out, dep_out))
    return merged32, merged, checks
