"""Weight-only int8/int4 graphs (the GenAI model builder's MatMulNBits) and their proof, measured where they run: in
ONNX Runtime GenAI, on an evaluation text, against the truth — PyTorch in float32 with the adapters applied unmerged.

Two questions, two checks (judged by records.tolerances' `quantized` and `adapter effect` tables):

- quality: how far the deployed model's next-token distributions are from the truth's, per token — KL (mean, p99,
  max), same top-1, perplexity ratio: the measures llama.cpp's `perplexity --kl-divergence` reports;
- adapter effect: whether the fine-tune survived. Its effect in float32 is the log-probability change the adapters
  make (merged − base); its effect as deployed is the same difference between the deployed merged model and the base
  deployed the same way (built by the builder with the same options). Their cosine and norm ratio say whether the
  deployed change is the trained one; the base's own quantization error (KL(base ‖ deployed base)) is the noise floor
  it has to stand out from. A merged LoRA that quantization erased leaves the base plus noise: cosine near 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..io.errors import InputError
from ..io.jsonio import read_text

PRECISIONS = ("fp32", "fp16", "int8", "int4")
ALGORITHMS = ("default", "rtn", "k_quant")
BLOCK_SIZES = (16, 32, 64, 128, 256)
BUILTIN_TEXT = "built-in held-out text (lora_export/data/eval-text.txt)"


@dataclass(frozen=True)
class QuantOptions:
    """The deployed precision. int8/int4: weight-only MatMulNBits by the GenAI model builder, with its block size,
    algorithm (default/rtn: round to nearest; k_quant), symmetry and accuracy level (None: the builder's default,
    4 = int8 activations on CPU) passed through; `eval_text` is the text quality is measured on (None: built in)."""

    precision: str = "fp32"
    block_size: int = 32
    algorithm: str = "default"
    symmetric: bool = True
    accuracy_level: int | None = None
    eval_text: Path | None = None
    window: int = 256  # tokens per evaluation window (each run from an empty cache)
    max_tokens: int = 4096  # of the evaluation text

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.block_size not in BLOCK_SIZES:
            raise InputError(f"--block-size {self.block_size}: the builder takes {', '.join(map(str, BLOCK_SIZES))}")
        if self.algorithm not in ALGORITHMS:
            raise InputError(f"--quant-algorithm {self.algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
        if self.accuracy_level is not None and self.accuracy_level not in (1, 2, 3, 4):
            raise InputError(f"--accuracy-level {self.accuracy_level}: 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8)")
        if not 16 <= self.window <= 4096 or self.max_tokens < self.window:
            raise InputError(f"evaluation window {self.window} / {self.max_tokens} tokens: 16 ≤ window ≤ max tokens")

    @property
    def quantized(self) -> bool:
        return self.precision in ("int8", "int4")

    def builder_options(self) -> list[str]:
        """The builder's --extra_options for MatMulNBits."""
        extra = [f"block_size={self.block_size}", f"is_symmetric={str(self.symmetric).lower()}"]
        extra.append(f"algo_config={self.algorithm}")
        if self.accuracy_level is not None:
            extra.append(f"accuracy_level={self.accuracy_level}")
        return ["--extra_options", *extra]

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "block_size": self.block_size,
            "algorithm": self.algorithm,
            "symmetric": self.symmetric,
            "accuracy_level": self.accuracy_level if self.accuracy_level is not None else "builder default (CPU: 4)",
            "eval_text": str(self.eval_text) if self.eval_text else BUILTIN_TEXT,
            "window": self.window,
        }


def eval_windows(tokenizer: Any, options: QuantOptions, context: int | None) -> list[list[int]]:
    """The evaluation text as token windows of options.window (within the context), at most options.max_tokens."""
    if options.eval_text is not None:
        text = read_text(options.eval_text, "give a UTF-8 text file (--eval-text)")
    else:
        text = resources.files("lora_export").joinpath("data/eval-text.txt").read_text(encoding="utf-8")
    if tokenizer is None:
        raise InputError("the model folder has no tokenizer: the quality of an int8/int4 graph is measured on text")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: options.max_tokens]
    window = min(options.window, context - 1 if context else options.window)  # GenAI: room for one more token
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 16]
    if sum(map(len, windows)) < 128:
        where = options.eval_text or BUILTIN_TEXT
        raise InputError(f"{where}: {len(ids)} tokens; quality needs at least 128: give a longer --eval-text")
    return windows


@torch.no_grad()
def torch_logprobs(model: torch.nn.Module, windows: Sequence[list[int]]) -> list[torch.Tensor]:
    """log-softmax of the model's logits at every position of every window, float32 on the CPU."""
    out = []
    for window in windows:
        ids = torch.tensor([window])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0]
        out.append(F.log_softmax(logits.float(), -1).cpu())
    return out


def genai_logprobs(folder: Path, windows: Sequence[list[int]]) -> list[torch.Tensor]:
    """The same, from ONNX Runtime GenAI running the folder as written (each window from an empty cache)."""
    return next(iter_genai_logprobs(folder, windows, {}))[1]


def iter_genai_logprobs(
    folder: Path, windows: Sequence[list[int]], adapters: Mapping[str, Path]
) -> Iterator[tuple[str | None, list[torch.Tensor]]]:
    """The folder's log-probabilities without an adapter (None), then with each `.onnx_adapter` active
    (og.Adapters), one after the other from one loaded model: one variant's logits in memory at a time."""
    import onnxruntime_genai as og

    from .runtime_files import genai_model, new_generator

    model = genai_model(og, folder)
    loaded = og.Adapters(model) if adapters else None
    for name, path in adapters.items():
        assert loaded is not None
        loaded.load(str(path), name)
    for active in (None, *adapters):
        out = []
        for window in windows:
            generator = new_generator(og, model, window, 1, folder)
            if active is not None:
                generator.set_active_adapter(loaded, active)
            generator.append_tokens(window)
            logits = torch.from_numpy(generator.get_output("logits").reshape(len(window), -1).astype("float32"))
            out.append(F.log_softmax(logits, -1))
            del generator
        yield active, out


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position, from log-probabilities, in nats (≥ 0 up to rounding)."""
    return (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0.0)


@dataclass(frozen=True)
class Quality:
    """The deployed model against the truth on the evaluation text, per token."""

    tokens: int
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    ppl_ratio: float  # the deployed model's perplexity / the truth's, on the text's next tokens

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def quality(truth: list[torch.Tensor], got: list[torch.Tensor], windows: Sequence[list[int]]) -> Quality:
    kl = torch.cat([_kl(t, g) for t, g in zip(truth, got, strict=True)]).double()
    same = torch.cat([t.argmax(-1) == g.argmax(-1) for t, g in zip(truth, got, strict=True)])
    nll_truth, nll_got = [], []
    for t, g, w in zip(truth, got, windows, strict=True):
        nxt = torch.tensor(w[1:])
        nll_truth.append(-t[:-1].gather(-1, nxt[:, None]).squeeze(-1))
        nll_got.append(-g[:-1].gather(-1, nxt[:, None]).squeeze(-1))
    ratio = math.exp(float(torch.cat(nll_got).double().mean() - torch.cat(nll_truth).double().mean()))
    return Quality(
        tokens=int(kl.numel()),
        kl_mean=float(kl.mean()),
        kl_p99=float(torch.quantile(kl, 0.99)),
        kl_max=float(kl.max()),
        top1_agreement=float(same.double().mean()),
        ppl_ratio=ratio,
    )


@dataclass(frozen=True)
class AdapterEffect:
    """The adapters' change to the log-probabilities in float32 (merged − base) against the same change as deployed
    (deployed merged − deployed base): cosine over every token, worst token's cosine, norm ratio; the KL each change
    makes, and the base's own quantization error (the noise floor)."""

    fp32_kl: float
    deployed_kl: float
    delta_cosine: float
    delta_cosine_min: float
    norm_ratio: float
    noise_floor_kl: float
    preserved: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _centered(delta: torch.Tensor) -> torch.Tensor:
    """A log-probability change without its per-token constant (log-probabilities shift with their normaliser)."""
    return delta - delta.mean(-1, keepdim=True)


def adapter_effect(
    merged: list[torch.Tensor],
    base: list[torch.Tensor],
    deployed: list[torch.Tensor],
    deployed_base: list[torch.Tensor],
    min_cosine: float,
    ratio_band: tuple[float, float],
) -> AdapterEffect:
    """Window by window in float32, sums in float64: one window's deltas in memory at a time (was a float64 copy of
    every delta, 7 s and 1.6 GB on SmolLM2's 2,082 tokens)."""
    dot = norm32 = normq = 0.0
    worst = math.inf
    kl = {"fp32": 0.0, "deployed": 0.0, "floor": 0.0}
    tokens = 0
    for m, b, dm, db in zip(merged, base, deployed, deployed_base, strict=True):
        d32, dq = _centered(m - b), _centered(dm - db)
        dot += float((d32 * dq).sum(dtype=torch.float64))
        norm32 += float(d32.square().sum(dtype=torch.float64))
        normq += float(dq.square().sum(dtype=torch.float64))
        worst = min(worst, float(F.cosine_similarity(d32, dq, dim=-1).min()))
        kl["fp32"] += float(_kl(m, b).sum(dtype=torch.float64))
        kl["deployed"] += float(_kl(dm, db).sum(dtype=torch.float64))
        kl["floor"] += float(_kl(b, db).sum(dtype=torch.float64))
        tokens += m.shape[0]
    cosine = dot / max(math.sqrt(norm32 * normq), 1e-30)
    ratio = math.sqrt(normq) / max(math.sqrt(norm32), 1e-30)
    preserved = cosine >= min_cosine and ratio_band[0] <= ratio <= ratio_band[1]
    return AdapterEffect(
        fp32_kl=kl["fp32"] / tokens,
        deployed_kl=kl["deployed"] / tokens,
        delta_cosine=cosine,
        delta_cosine_min=worst,
        norm_ratio=ratio,
        noise_floor_kl=kl["floor"] / tokens,
        preserved=bool(preserved),
    )
