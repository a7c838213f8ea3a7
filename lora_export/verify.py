"""Merged vs unmerged, checked on outputs: merge error and dtype error apart, greedy generation, per-layer diagnosis.

Three models take part. `unmerged`: the base in float32 with the adapters applied at run time (lora_runtime, no
PEFT) — the truth. `merged32`: the merged model in float32 (MERGED_DIR itself when it is float32, otherwise a fresh
float32 merge of the same inputs). `merged`: MERGED_DIR in its own dtype. The merge error is merged32 vs unmerged; the
dtype error is merged vs merged32; the weights check compares MERGED_DIR's tensors with W0 + ΔW, rounded to its dtype.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .lora_runtime import Placement, effective_state, input_device, load_model, load_unmerged, model_kind, placement_summary
from .merge import MergeOptions, merge
from .tensors import TensorStore, read_json_object

PROMPTS = (
    "The capital of France is",
    "Write one sentence about the sea.",
    "def fibonacci(n):",
)


@dataclass(frozen=True)
class Tolerance:
    """What a comparison at one dtype may show. Relative errors are max |a − b| / max |reference| over valid tokens."""

    max_rel: float
    min_cosine: float  # the worst token's cosine similarity
    max_flip_gap: float  # where the argmax differs: p_ref(ref's top-1) − p_ref(other's top-1), worst token (logits)
    max_kl: float  # the worst token's KL(reference ‖ other) of the next-token distribution, nats (logits only)
    weight_ulps: float  # weights check: |got − (W0 + ΔW)| ≤ ulps·eps·|W0 + ΔW| + 1e-6·max|W0 + ΔW|


# One table keyed by dtype. float32 holds the merge error (merged vs unmerged, both float32). PEFT's own test accepts
# 1e-4 absolute on tiny models; on SmolLM2 (30 layers, activations in the thousands) fp32 rounding alone moves the
# logits by up to 6.5e-3 (1.8e-4 of their scale): measured as run-to-run differences of the *same* unmerged model
# between processes (the first forward call's kernels differ). 1e-3 relative keeps 5× above that noise and far below
# what a wrong merge does (≥ 1e-2 in every broken case of the tests). The half dtypes hold the cast error (merged in
# that dtype vs merged in float32), calibrated on SmolLM2 (bf16: rel 0.071, KL 0.043; fp16: rel 0.009, KL 3.5e-4).
TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(max_rel=1e-3, min_cosine=1 - 1e-6, max_flip_gap=1e-3, max_kl=1e-5, weight_ulps=0.0),
    "bfloat16": Tolerance(max_rel=0.15, min_cosine=0.98, max_flip_gap=0.1, max_kl=0.1, weight_ulps=1.5),
    "float16": Tolerance(max_rel=0.03, min_cosine=0.998, max_flip_gap=0.03, max_kl=0.02, weight_ulps=1.5),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class VerifyOptions:
    weights: tuple[float, ...] = ()
    prompts: tuple[str, ...] = PROMPTS
    max_new_tokens: int = 32
    seed: int = 0
    allow_pickle: bool = False
    device: str = "cpu"
    device_map: str | None = None  # accelerate: auto, balanced, sequential (models larger than one device)
    max_memory: dict[int | str, str] | None = None  # per device, with device_map: {0: "20GiB", "cpu": "60GiB"}


@dataclass
class Metrics:
    case: str
    output: str
    max_abs: float
    max_rel: float
    min_cosine: float
    top1: float | None  # share of tokens whose argmax agrees (reported; near-ties may flip legitimately)
    flip_gap: float | None
    max_kl: float | None

    def failures(self, tol: Tolerance) -> list[str]:
        bad = []
        if not self.max_rel <= tol.max_rel:  # `not <=` so that NaN fails
            bad.append(f"rel error {self.max_rel:.3g} > {tol.max_rel:g}")
        if not self.min_cosine >= tol.min_cosine:
            bad.append(f"cosine {self.min_cosine:.7f} < {tol.min_cosine:g}")
        if self.flip_gap is not None and not self.flip_gap <= tol.max_flip_gap:
            bad.append(f"a top-1 token changed where the reference preferred it by {self.flip_gap:.3g} in probability > {tol.max_flip_gap:g}")
        if self.max_kl is not None and not self.max_kl <= tol.max_kl:
            bad.append(f"KL {self.max_kl:.3g} > {tol.max_kl:g}")
        return [f"{self.case}/{self.output}: {b}" for b in bad]


@dataclass
class Check:
    name: str
    compares: str
    dtype: str
    passed: bool
    summary: str
    failures: list[str] = field(default_factory=list)
    metrics: list[Metrics] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class VerifyReport:
    base: str
    adapters: list[str]
    weights: list[float]
    merged: str
    model_class: str
    merged_dtype: str
    tolerances: dict[str, dict[str, float]]
    cases: list[dict[str, Any]]
    checks: list[Check]
    generation: dict[str, Any] | None
    diagnosis: dict[str, Any] | None
    placement: dict[str, dict[str, int]] | None = None  # modules per device of each device-mapped model

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


# ---------------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Case:
    name: str
    inputs: dict[str, torch.Tensor]


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, or None when it has none (tiny test models)."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception:  # a broken or partial tokenizer: random tokens still verify the numbers
        return None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def make_cases(config: dict[str, Any], tokenizer: Any, prompts: Sequence[str], seed: int, causal: bool) -> list[Case]:
    """Tokenized prompts (when there is a tokenizer) and seeded random batches of several shapes, one padded."""
    cases = []
    if tokenizer is not None and prompts and tokenizer.pad_token is not None:
        tokenizer.padding_side = "left" if causal else "right"
        chat = causal and bool(getattr(tokenizer, "chat_template", None))
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts] if chat else list(prompts)
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
        name = f"{'chat ' if chat else ''}prompts {len(prompts)}×{enc['input_ids'].shape[1]}"
        cases.append(Case(name, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}))
    text = config.get("text_config") or config
    vocab = int(text["vocab_size"])
    limit = int(text.get("max_position_embeddings") or text.get("n_positions") or 512)
    g = torch.Generator().manual_seed(seed)
    for batch, seq in ((1, min(8, limit)), (4, min(24, limit))):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if batch > 1:  # padded rows of different lengths: left padding for decoders, right for encoders
            for row in range(1, batch):
                pad = int(torch.randint(1, seq // 2, (1,), generator=g))
                if causal:
                    mask[row, :pad] = 0
                else:
                    mask[row, seq - pad:] = 0
        cases.append(Case(f"random {batch}×{seq}{' padded' if batch > 1 else ''}", {"input_ids": ids, "attention_mask": mask}))
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# Outputs and metrics


@torch.no_grad()
def outputs_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = input_device(model)
    out = model(**{k: v.to(device) for k, v in inputs.items()})
    names = ["logits"] if getattr(out, "logits", None) is not None else ["last_hidden_state", "pooler_output"]
    return {n: getattr(out, n).float().cpu() for n in names if getattr(out, n, None) is not None}


def compare(case: Case, name: str, ref: torch.Tensor, got: torch.Tensor) -> Metrics:
    if ref.dim() == 3:  # (batch, seq, features): only tokens the attention mask keeps
        mask = case.inputs["attention_mask"].bool()
        ref, got = ref[mask], got[mask]
    ref, got = ref.double(), got.double()
    max_abs = float((got - ref).abs().max())
    max_rel = max_abs / max(float(ref.abs().max()), 1e-30)
    cosine = float(F.cosine_similarity(got, ref, dim=-1).min())
    top1 = gap = kl = None
    if name == "logits":
        ref_top, got_top = ref.argmax(-1), got.argmax(-1)
        top1 = float((got_top == ref_top).double().mean())
        log_p, log_q = F.log_softmax(ref, -1), F.log_softmax(got, -1)
        p = log_p.exp()
        gap = float((p.gather(-1, ref_top[..., None]) - p.gather(-1, got_top[..., None])).max())
        kl = float((p * (log_p - log_q)).sum(-1).max().clamp_min(0.0))
    return Metrics(case.name, name, max_abs, max_rel, cosine, top1, gap, kl)


def output_check(name: str, compares: str, dtype: str, cases: list[Case], ref: list[dict[str, torch.Tensor]], got: list[dict[str, torch.Tensor]]) -> Check:
    metrics = [compare(case, out, r[out], g[out]) for case, r, g in zip(cases, ref, got) for out in r]
    return metrics_check(name, compares, dtype, metrics)


def metrics_check(name: str, compares: str, dtype: str, metrics: list[Metrics], summary: str | None = None) -> Check:
    """The verdict on compared outputs: every metric against the dtype's tolerance; all failures listed."""
    tol = TOLERANCES[dtype]
    failures = [f for m in metrics for f in m.failures(tol)]
    if summary is None:
        worst = max(metrics, key=lambda m: m.max_rel if math.isfinite(m.max_rel) else math.inf)
        parts = [f"worst rel {worst.max_rel:.2g} (≤ {tol.max_rel:g})", f"cos ≥ {min(m.min_cosine for m in metrics):.7f}"]
        top1 = [m.top1 for m in metrics if m.top1 is not None]
        kls = [m.max_kl for m in metrics if m.max_kl is not None]
        if top1:
            gaps = [m.flip_gap for m in metrics if m.flip_gap is not None]
            parts.append(f"top-1 {min(top1):.1%} (flip gap ≤ {max(gaps):.2g})")
        if kls:
            parts.append(f"KL ≤ {max(kls):.2g}")
        summary = ", ".join(parts)
    return Check(name, compares, dtype, not failures, summary, failures, metrics)


# ---------------------------------------------------------------------------------------------------------------------
# Weights: the artifact's tensors against W0 + ΔW


def weights_check(merged_dir: Path, expected: dict[str, torch.Tensor], dtype: str) -> Check:
    tol = TOLERANCES[dtype]
    eps = torch.finfo(DTYPES[dtype]).eps
    store = TensorStore.open_safetensors(sorted(merged_dir.glob("*.safetensors")))
    rows, failures, missing = [], [], []
    try:
        for name in store.names():
            exp = expected.get(name)
            if exp is None:
                missing.append(name)
                continue
            got, exp = store.read(name).float(), exp.float().cpu()
            if tuple(got.shape) != tuple(exp.shape):
                failures.append(f"{name}: shape {tuple(got.shape)}, expected {tuple(exp.shape)}")
                continue
            scale = max(float(exp.abs().max()), 1e-30)
            excess = ((got - exp).abs() - tol.weight_ulps * eps * exp.abs()).max() / scale if exp.numel() else torch.tensor(0.0)
            rel = float((got - exp).abs().max()) / scale if exp.numel() else 0.0
            rows.append((name, rel, float(excess)))
            if not float(excess) <= 1e-6:
                failures.append(f"{name}: max |merged − (W0 + ΔW)| = {rel:.3g}·max|W|, beyond {tol.weight_ulps:g} ulp + 1e-6·max|W|")
    finally:
        store.close()
    rows.sort(key=lambda r: -r[2] if math.isfinite(r[2]) else -math.inf)
    worst = [{"tensor": n, "max_rel": r, "excess_over_tolerance": e} for n, r, e in rows[:5]]
    allowed = f"{tol.weight_ulps:g} ulp of {dtype} + 1e-6·max|W|" if tol.weight_ulps else "1e-6·max|W|"
    summary = f"{len(rows) - len(failures)}/{len(rows)} tensors within {allowed} of W0 + ΔW" + (f"; {len(missing)} not in the model" if missing else "")
    return Check(f"weights ({dtype})", "MERGED_DIR's tensors vs W0 + ΔW of the unmerged model", dtype, not failures, summary, failures, details={"worst_tensors": worst, "unexpected_tensors": missing[:20]})


# ---------------------------------------------------------------------------------------------------------------------
# Greedy generation


@torch.no_grad()
def greedy(model: nn.Module, inputs: dict[str, torch.Tensor], n: int, pad_id: int | None) -> list[int]:
    device = input_device(model)
    out = model.generate(**{k: v.to(device) for k, v in inputs.items()}, max_new_tokens=n, do_sample=False,
                         num_beams=1, pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def compare_tokens(ref: list[int], got: list[int]) -> dict[str, Any]:
    first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    if first is None and len(ref) != len(got):
        first = min(len(ref), len(got))
    return {"identical": first is None, "first_difference": first, "reference": ref, "tokens": got}


# ---------------------------------------------------------------------------------------------------------------------
# Diagnosis: where two models first diverge


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


def diagnose(ref: nn.Module, other: nn.Module, case: Case, tol: float) -> dict[str, Any]:
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
    return {
        "case": case.name,
        "tolerance": tol,
        "first_divergence": None if first is None else {"module": first[0], "layer": layer_of(first[0]), "rel_error": first[1]},
        "worst_modules": [{"module": n, "rel_error": r} for n, r in worst],
    }


# ---------------------------------------------------------------------------------------------------------------------
# The verb


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


def verify(base_dir: Path | str, adapter_dirs: Sequence[Path | str], merged_dir: Path | str, options: VerifyOptions = VerifyOptions()) -> VerifyReport:
    """Check MERGED_DIR against the base with the adapters applied at run time. Never raises for a failed check:
    the report says what failed (`report.passed`)."""
    base_dir, merged_dir = Path(base_dir), Path(merged_dir)
    adapter_paths = [Path(a) for a in adapter_dirs]
    for folder in (base_dir, merged_dir, *adapter_paths):
        if not folder.is_dir():
            raise InputError(f"{folder} does not exist or is not a folder")
    config = read_json_object(merged_dir / "config.json", f"is {merged_dir} a merged model folder?")
    weights = tuple(options.weights) or (1.0,) * len(adapter_paths)
    dtype = stored_dtype(merged_dir)
    with tempfile.TemporaryDirectory(prefix="lora-export-verify-") as tmp:  # lives as long as the models: offloaded
        place = Placement(options.device, options.device_map, options.max_memory, Path(tmp) / "offload")  # weights are read from it
        return _verify(base_dir, adapter_paths, merged_dir, config, weights, dtype, options, place, Path(tmp))


def _verify(base_dir: Path, adapter_paths: list[Path], merged_dir: Path, config: dict[str, Any], weights: tuple[float, ...], dtype: str,
            options: VerifyOptions, place: Placement, tmp: Path) -> VerifyReport:
    torch.manual_seed(options.seed)
    unmerged = load_unmerged(base_dir, adapter_paths, weights, torch.float32, options.allow_pickle, place)
    kind = model_kind(unmerged)
    tokenizer = load_tokenizer(merged_dir) or load_tokenizer(base_dir)
    cases = make_cases(config, tokenizer, options.prompts, options.seed, kind == "causal-lm")
    checks: list[Check] = []
    expected = effective_state(unmerged)
    checks.append(weights_check(merged_dir, expected, dtype))
    del expected

    if dtype == "float32":
        merged32_dir = merged_dir
    else:  # the same inputs merged in float32: what MERGED_DIR would be without the cast
        merged32_dir = tmp / "merged32"
        merge(base_dir, adapter_paths, merged32_dir, MergeOptions(dtype="float32", weights=weights, allow_pickle=options.allow_pickle, progress=False))
    merged32 = load_model(merged32_dir, torch.float32, place)
    ref_out = [outputs_of(unmerged, c.inputs) for c in cases]
    m32_out = [outputs_of(merged32, c.inputs) for c in cases]
    checks.append(output_check("merge (float32)", "merged in float32 vs unmerged in float32", "float32", cases, ref_out, m32_out))
    merged = None
    if dtype != "float32":
        merged = load_model(merged_dir, DTYPES[dtype], place)
        dep_out = [outputs_of(merged, c.inputs) for c in cases]
        checks.append(output_check(f"cast ({dtype})", f"merged in {dtype} vs merged in float32", dtype, cases, m32_out, dep_out))

    generation = None
    if kind == "causal-lm" and options.max_new_tokens > 0:
        keep = cases[0].inputs["attention_mask"][0].bool()  # row 0 without its padding
        prompt = {k: v[:1, keep] for k, v in cases[0].inputs.items()}
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        pad = pad if pad is not None else (config.get("eos_token_id") if isinstance(config.get("eos_token_id"), int) else 0)
        ref_tokens = greedy(unmerged, prompt, options.max_new_tokens, pad)
        g32 = compare_tokens(ref_tokens, greedy(merged32, prompt, options.max_new_tokens, pad))
        ok = g32["identical"]
        checks.append(Check("generation (float32)", f"{options.max_new_tokens} greedy tokens, merged float32 vs unmerged float32", "float32", ok,
                            "identical" if ok else f"first difference at token {g32['first_difference']}",
                            [] if ok else [f"greedy tokens differ from token {g32['first_difference']}"], details=g32))
        generation = {"prompt_tokens": prompt["input_ids"][0].tolist(), "max_new_tokens": options.max_new_tokens, "float32": g32}
        if tokenizer is not None:
            generation["prompt"] = tokenizer.decode(prompt["input_ids"][0])
            generation["unmerged_text"] = tokenizer.decode(ref_tokens)
        if merged is not None:  # reported, not a check: a half dtype may legitimately pick another token after a while
            generation[dtype] = compare_tokens(ref_tokens, greedy(merged, prompt, options.max_new_tokens, pad))

    diagnosis = None
    failed = [c for c in checks if not c.passed]
    if failed:
        outputs_failed = next((c for c in failed if c.metrics), None)
        at_dtype = merged is not None and (outputs_failed is None or outputs_failed.name.startswith("cast"))
        pair, tol_dtype = ((merged32, merged), dtype) if at_dtype else ((unmerged, merged32), "float32")
        tol = TOLERANCES[tol_dtype]
        case = next((c for c in cases if outputs_failed and any(m.case == c.name and m.failures(tol) for m in outputs_failed.metrics)), cases[0])
        diagnosis = diagnose(*pair, case, tol.max_rel)
        diagnosis["compares"] = f"merged in {dtype} vs merged in float32" if at_dtype else "merged in float32 vs unmerged in float32"
        diagnosis["worst_tensors"] = checks[0].details["worst_tensors"]

    return VerifyReport(
        base=str(base_dir), adapters=[str(a) for a in adapter_paths], weights=list(weights), merged=str(merged_dir),
        model_class=type(unmerged).__name__, merged_dtype=dtype,
        tolerances={k: asdict(v) for k, v in TOLERANCES.items() if k in ("float32", dtype)},
        cases=[{"name": c.name, "shape": list(c.inputs["input_ids"].shape), "padded_tokens": int((c.inputs["attention_mask"] == 0).sum())} for c in cases],
        checks=checks, generation=generation, diagnosis=diagnosis,
        placement={name: p for name, m in (("unmerged", unmerged), ("merged float32", merged32), (f"merged {dtype}", merged))
                   if m is not None and (p := placement_summary(m))} or None,
    )
