"""One tolerance table, keyed by (comparison, dtype). Every check looks its tolerance up here and prints it.

Relative errors are max |a − b| / max |reference| over valid (unmasked) tokens. No torch here: reports that are read
back (package --check) use it too. It sits with the records because every report prints the tolerances it used and
both the merge stage (swap) and the checking stages look them up.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .checks import Metrics


@dataclass(frozen=True)
class Tolerance:
    """What one comparison at one dtype may show."""

    max_rel: float
    min_cosine: float = -1.0  # the worst token's cosine similarity
    max_flip_gap: float = 1.0  # where the argmax differs: p_ref(ref's top-1) − p_ref(other's top-1), worst token
    max_kl: float = float("inf")  # the worst token's KL(reference ‖ other) of the next-token distribution, nats
    weight_ulps: float = 0.0  # weights: |got − (W0 + ΔW)| ≤ ulps·eps·|W0 + ΔW| + max_rel·max|W0 + ΔW|

    def to_dict(self) -> dict[str, float]:
        """The bounds; one that is not set (infinite: no bound) is left out."""
        return {k: v for k, v in asdict(self).items() if math.isfinite(v)}


# What each comparison is, and why its numbers are what they are:
#
# merge    merged vs unmerged, both float32. PEFT's own test accepts 1e-4 absolute on tiny models; on SmolLM2 (30
#          layers, activations in the thousands) fp32 rounding alone moves the logits by up to 6.5e-3 (1.8e-4 of
#          their scale) between processes (the first forward call's kernels differ). 1e-3 keeps 5× above that noise
#          and far below what a wrong merge does (≥ 1e-2 in every broken case of the tests).
# cast     merged in a half dtype vs merged in float32: the dtype's own error, apart from the merge's. Calibrated on
#          SmolLM2 + the demo adapter (bf16: rel 0.071, KL 0.043; fp16: rel 0.009, KL 3.5e-4).
# weights  every merged tensor vs W0 + ΔW computed in float64 from the same files: the one cast (half dtypes: 1.5 ulp
#          of the stored value) and float32 summation order (1e-6 of the tensor's largest element).
# runtime  an exported artifact (ONNX Runtime, TorchScript, torch.export) vs PyTorch eager in the same dtype. In
#          float32 measured ~3e-7 on tiny models and ~5e-5 on SmolLM2; float16 graphs reorder half-precision sums.
#          Used alike by merge-and-onnx, export and package (and package --check).
# swap     W − ΔW_A + ΔW_B vs a fresh merge of B into the base, relative to max|W|: float32 summation order, or the
#          half dtype's one-ulp bound of two roundings (the swapped folder was cast twice).
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("merge", "float32"): Tolerance(max_rel=1e-3, min_cosine=1 - 1e-6, max_flip_gap=1e-3, max_kl=1e-5),
    ("cast", "bfloat16"): Tolerance(max_rel=0.15, min_cosine=0.98, max_flip_gap=0.1, max_kl=0.1),
    ("cast", "float16"): Tolerance(max_rel=0.03, min_cosine=0.998, max_flip_gap=0.03, max_kl=0.02),
    ("weights", "float32"): Tolerance(max_rel=1e-6),
    ("weights", "bfloat16"): Tolerance(max_rel=1e-6, weight_ulps=1.5),
    ("weights", "float16"): Tolerance(max_rel=1e-6, weight_ulps=1.5),
    ("runtime", "float32"): Tolerance(max_rel=1e-3, min_cosine=1 - 1e-6, max_flip_gap=1e-3, max_kl=1e-5),
    ("runtime", "float16"): Tolerance(max_rel=0.03, min_cosine=0.998, max_flip_gap=0.03, max_kl=0.02),
    ("swap", "float32"): Tolerance(max_rel=1e-6),
    ("swap", "bfloat16"): Tolerance(max_rel=2.0**-7 + 1e-6),
    ("swap", "float16"): Tolerance(max_rel=2.0**-10 + 1e-6),
}


@dataclass(frozen=True)
class QualityTolerance:
    """What a weight-quantized graph may cost against the truth (PyTorch float32, adapters unmerged), per token of the
    evaluation text: mean and 99th-percentile KL of the next-token distributions, same top-1, perplexity ratio."""

    max_kl_mean: float
    max_kl_p99: float
    min_top1: float
    max_ppl_ratio: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class EffectTolerance:
    """When the adapters' effect survived deployment: the deployed change in log-probabilities (deployed merged −
    deployed base) points the trained way (cosine with the float32 change) and keeps its size (norm ratio band)."""

    min_cosine: float
    min_ratio: float
    max_ratio: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


# quantized   int8/int4 weight-only graphs (the builder's MatMulNBits, CPU, its defaults) in GenAI vs the truth, on the
#             built-in text (2082 tokens, windows of 256). Calibrated on SmolLM2-135M-Instruct + the demo adapter:
#             int8 KL mean 0.0049, p99 0.023, top-1 95.7%, perplexity ×1.007 — the bounds are ~4× that; int4 measured
#             KL mean 0.42, p99 1.6, top-1 64%, ×1.24 — the bounds (~3× llama.cpp's q4_K_M on Llama-3-8B: KL 0.031,
#             91.9%, ×1.028) are what a deployable 4-bit model shows, so SmolLM2-135M at int4 fails them: small models
#             lose far more to 4 bits, and a check that passed it would pass anything.
# effect      the adapters' effect, deployed vs float32 (benchmarks/precision.md, tools/bench_precision.py): the
#             demo adapter at int8 keeps cosine 0.98, ratio 1.03; a q/v adapter whose effect (KL 0.0039) is at int8's
#             noise floor (0.0045) drops to cosine 0.66, ratio 1.56 (int4: 0.15, 3.8) — and with an effect of 5e-4,
#             to 0.33 and 3.1: what ships then is the base plus noise.
QUANTIZED: dict[str, QualityTolerance] = {
    "int8": QualityTolerance(max_kl_mean=0.02, max_kl_p99=0.1, min_top1=0.9, max_ppl_ratio=1.03),
    "int4": QualityTolerance(max_kl_mean=0.1, max_kl_p99=0.5, min_top1=0.8, max_ppl_ratio=1.1),
}
ADAPTER_EFFECT = EffectTolerance(min_cosine=0.9, min_ratio=0.67, max_ratio=1.5)


def quality_tolerance(precision: str) -> QualityTolerance:
    try:
        return QUANTIZED[precision]
    except KeyError:
        raise LookupError(f"no quality tolerance for {precision}: known are {', '.join(QUANTIZED)}") from None


def tolerance(comparison: str, dtype: str) -> Tolerance:
    try:
        return TOLERANCES[(comparison, dtype)]
    except KeyError:
        known = ", ".join(f"{c}/{d}" for c, d in TOLERANCES)
        # a key no check of ours asks for is a bug here, not bad input: the CLI reports it as an internal error (3)
        raise LookupError(f"no tolerance for comparing {comparison} in {dtype}: known are {known}") from None


def tolerances_for(*keys: tuple[str, str]) -> dict[str, dict[str, float]]:
    """{"comparison/dtype": tolerance} for the checks a report ran, as printed beside it."""
    return {f"{c}/{d}": tolerance(c, d).to_dict() for c, d in keys}


def metric_failures(m: Metrics, tol: Tolerance) -> list[str]:
    """Every way one compared output misses its tolerance (`not <=`, so that NaN fails)."""
    bad = []
    if not m.max_rel <= tol.max_rel:
        bad.append(f"rel error {m.max_rel:.3g} > {tol.max_rel:g}")
    if not m.min_cosine >= tol.min_cosine:
        bad.append(f"cosine {m.min_cosine:.7f} < {tol.min_cosine:g}")
    if m.flip_gap is not None and not m.flip_gap <= tol.max_flip_gap:
        bad.append(
            f"a top-1 token changed where the reference preferred it by {m.flip_gap:.3g} in probability > {tol.max_flip_gap:g}"
        )
    if m.max_kl is not None and not m.max_kl <= tol.max_kl:
        bad.append(f"KL {m.max_kl:.3g} > {tol.max_kl:g}")
    return [f"{m.case}/{m.output}: {b}" for b in bad]
