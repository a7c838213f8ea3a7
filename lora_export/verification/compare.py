"""What every check compares: the input cases (prompts through the tokenizer, seeded random batches, padded), the
outputs of a model on them, the metrics of two outputs and the verdict against the (comparison, dtype) tolerance,
and greedy tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..io.errors import InputError
from ..io.jsonio import read_json_object
from ..model.config import ModelConfig
from ..model.loading import input_device
from ..records import Check, Metrics
from ..records.sections import TokenComparison
from ..records.tolerances import metric_failures, tolerance

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Case:
    name: str
    inputs: dict[str, torch.Tensor]

    def describe(self) -> dict[str, Any]:
        first = self.inputs.get("input_ids", next(iter(self.inputs.values())))
        mask = self.inputs.get("attention_mask")
        described = {
            "name": self.name,
            "shape": list(first.shape),
            "padded_tokens": int((mask == 0).sum()) if mask is not None else 0,
        }
        if "decoder_input_ids" in self.inputs:
            described["decoder_shape"] = list(self.inputs["decoder_input_ids"].shape)
        return described

    @property
    def output_mask(self) -> torch.Tensor | None:
        """Which positions of a (batch, seq, …) output count: the attention mask's tokens; an encoder-decoder's
        outputs are the decoder's positions, all of them (its tokens are not padded)."""
        if "decoder_input_ids" in self.inputs:
            return self.inputs.get("decoder_attention_mask")
        return self.inputs.get("attention_mask")


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, or None when it has none (tiny test models)."""
    if not any(
        (folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
    ):
        return None
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():  # a damaged file would otherwise be shipped beside the graph
            read_json_object(folder / name, "", fix=f"; fix or remove {name} (it would be shipped as it is)")
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # shipped beside the graph, so it must load: refuse rather than check with random tokens
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise InputError(f"{folder}: its tokenizer files do not load ({first}); fix or remove them") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    _check_chat_template(folder, tok)
    return tok


def _check_chat_template(folder: Path, tokenizer: Any) -> None:
    """A chat template is code (Jinja) that every runtime runs on each request: it must compile and render one user
    turn, or it is refused here naming its file — not a crash in the middle of a check, nor a file shipped broken."""
    if not getattr(tokenizer, "chat_template", None):
        return
    where = next(
        (folder / f for f in ("chat_template.jinja", "chat_template.json") if (folder / f).is_file()),
        folder / "tokenizer_config.json",
    )
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # jinja2's TemplateSyntaxError / TemplateError, or the template's raise_exception()
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise InputError(
            f"{where}: its chat template does not render a user turn ({type(e).__name__}: {first}); fix the template "
            "or remove it"
        ) from None
    if not isinstance(text, str):
        raise InputError(f"{where}: its chat template renders {type(text).__name__}, not text; fix the template")


def make_cases(
    config: ModelConfig,
    tokenizer: Any,
    prompts: Sequence[str],
    seed: int,
    causal: bool,
    room: int = 0,
    source: Path | str | None = None,
) -> list[Case]:
    """Tokenized prompts (when there is a tokenizer) and seeded random batches of several shapes, one padded."""
    cases = []
    if tokenizer is not None and prompts and tokenizer.pad_token is not None:
        tokenizer.padding_side = "left" if causal else "right"
        chat = causal and bool(getattr(tokenizer, "chat_template", None))
        texts = (
            [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts
            ]
            if chat
            else list(prompts)
        )
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
        context = config.context
        lengths = enc["attention_mask"].sum(-1).tolist() if enc["input_ids"].numel() else [0] * len(texts)
        if min(lengths) == 0:  # nothing to run: a tokenizer that does not encode this text (seen: a vocabulary the
            i = lengths.index(0)  # tokenizer class transformers picks for the model type reads otherwise)
            raise InputError(
                f"{source or getattr(tokenizer, 'name_or_path', 'the model folder')}: its tokenizer ({type(tokenizer).__name__}) "
                f"encodes prompt {i + 1} ({prompts[i][:40]!r}) to no tokens: fix the tokenizer files, or give "
                "--prompts that it encodes"
            )
        if context and max(lengths) + room > int(context):  # room: the tokens generated after the prompt
            i = max(range(len(lengths)), key=lambda k: lengths[k])
            raise InputError(
                f"prompt {i + 1} is {lengths[i]} tokens; with the tokens generated after it, that exceeds the model's "
                f"context of {context}: shorten it (or give fewer --max-new-tokens)"
            )
        name = f"{'chat ' if chat else ''}prompts {len(prompts)}×{enc['input_ids'].shape[1]}"
        cases.append(Case(name, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}))
    vocab = config.vocab_size
    limit = config.context or 512
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
                    mask[row, seq - pad :] = 0
        cases.append(
            Case(f"random {batch}×{seq}{' padded' if batch > 1 else ''}", {"input_ids": ids, "attention_mask": mask})
        )
    return cases


@torch.no_grad()
def outputs_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = input_device(model)
    out = model(**{k: v.to(device) for k, v in inputs.items()})
    names = ["logits"] if getattr(out, "logits", None) is not None else ["last_hidden_state", "pooler_output"]
    return {n: getattr(out, n).float().cpu() for n in names if getattr(out, n, None) is not None}


def row_cosine(got: torch.Tensor, ref: torch.Tensor) -> float:
    """The smallest cosine similarity over rows, where two all-zero rows count as identical (1, not 0): a pad token
    with a zero embedding row gives zero logits on both sides of a correct merge."""
    cos = F.cosine_similarity(got, ref, dim=-1)
    both_zero = (got == 0).all(dim=-1) & (ref == 0).all(dim=-1)
    return float(torch.where(both_zero, torch.ones_like(cos), cos).min())


def compare(case: Case, name: str, ref: torch.Tensor, got: torch.Tensor) -> Metrics:
    mask = case.output_mask
    if ref.dim() == 3 and mask is not None:  # (batch, seq, features): only tokens the attention mask keeps
        ref, got = ref[mask.bool()], got[mask.bool()]
    ref, got = ref.double(), got.double()
    if ref.numel() == 0:  # nothing kept by the mask: nothing differs
        return Metrics(case.name, name, 0.0, 0.0, 1.0, None, None, None)
    max_abs = float((got - ref).abs().max())
    max_rel = max_abs / max(float(ref.abs().max()), 1e-30)
    cosine = row_cosine(got, ref)
    top1 = gap = kl = None
    if name == "logits":
        ref_top, got_top = ref.argmax(-1), got.argmax(-1)
        top1 = float((got_top == ref_top).double().mean())
        log_p, log_q = F.log_softmax(ref, -1), F.log_softmax(got, -1)
        p = log_p.exp()
        gap = float((p.gather(-1, ref_top[..., None]) - p.gather(-1, got_top[..., None])).max())
        kl = float((p * (log_p - log_q)).sum(-1).max().clamp_min(0.0))
    return Metrics(case.name, name, max_abs, max_rel, cosine, top1, gap, kl)


def output_check(
    name: str,
    compares: str,
    comparison: str,
    dtype: str,
    cases: list[Case],
    ref: list[dict[str, torch.Tensor]],
    got: list[dict[str, torch.Tensor]],
) -> Check:
    metrics = [compare(case, out, r[out], g[out]) for case, r, g in zip(cases, ref, got, strict=True) for out in r]
    return metrics_check(name, compares, comparison, dtype, metrics)


def metrics_check(
    name: str, compares: str, comparison: str, dtype: str, metrics: list[Metrics], summary: str | None = None
) -> Check:
    """The verdict on compared outputs: every metric against the (comparison, dtype) tolerance; all failures listed."""
    tol = tolerance(comparison, dtype)
    failures = [f for m in metrics for f in metric_failures(m, tol)]
    if summary is None:
        worst = max(metrics, key=lambda m: m.max_rel if math.isfinite(m.max_rel) else math.inf)
        parts = [
            f"worst rel {worst.max_rel:.2g} (≤ {tol.max_rel:g})",
            f"cos ≥ {min(m.min_cosine for m in metrics):.7f}",
        ]
        top1 = [m.top1 for m in metrics if m.top1 is not None]
        kls = [m.max_kl for m in metrics if m.max_kl is not None]
        if top1:
            gaps = [m.flip_gap for m in metrics if m.flip_gap is not None]
            parts.append(f"top-1 {min(top1):.1%} (flip gap ≤ {max(gaps):.2g})")
        if kls:
            parts.append(f"KL ≤ {max(kls):.2g}")
        summary = ", ".join(parts)
    return Check(
        name,
        compares,
        dtype,
        bool(metrics) and not failures,
        summary,
        tuple(failures),
        tuple(metrics),
        {"tolerance": f"{comparison}/{dtype}"},
    )


@torch.no_grad()
def greedy(model: nn.Module, inputs: dict[str, torch.Tensor], n: int, pad_id: int | None) -> list[int]:
    device = input_device(model)
    out = model.generate(
        **{k: v.to(device) for k, v in inputs.items()},
        max_new_tokens=n,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


# generation_config fields that leave greedy decoding's choice the argmax of the logits (the rest process the logits:
# a repetition penalty, a minimum length, banned or forced tokens)
ARGMAX_FIELDS = frozenset({
    "_from_model_config", "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id",
    "decoder_start_token_id", "use_cache", "cache_implementation", "output_attentions", "output_hidden_states",
    "output_scores", "output_logits", "return_dict_in_generate", "max_length", "max_new_tokens", "do_sample",
    "num_beams", "num_return_sequences", "temperature", "top_p", "top_k", "min_p", "typical_p",
})  # fmt: skip


@torch.no_grad()
def greedy_as(
    model: nn.Module, inputs: dict[str, torch.Tensor], reference: list[int], n: int, pad_id: int | None
) -> list[int]:
    """The model's n greedy tokens after the prompt, checked against `reference` (n tokens, or fewer ending where
    generation stopped at an end token) in one forward pass over the prompt and `reference`: the argmax after each
    prefix is the token greedy decoding picks there, so a model that picks `reference` throughout decodes it, and
    stops where it stopped (the decoding steps saved). Where a choice differs, or the generation config processes the
    logits, the tokens are those of its own greedy decoding (`greedy`)."""
    config = getattr(model, "generation_config", None)
    processed = config is None or not set(config.to_diff_dict()) <= ARGMAX_FIELDS
    ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
    if processed or not 0 < len(reference) <= n or ids is None or set(inputs) - {"input_ids", "attention_mask"}:
        return greedy(model, inputs, n, pad_id)
    if mask is not None and not bool(mask.all()):
        return greedy(model, inputs, n, pad_id)
    full = torch.cat([ids, torch.tensor([reference], dtype=ids.dtype)], dim=1)
    device = input_device(model)
    logits = model(input_ids=full.to(device), attention_mask=torch.ones_like(full).to(device)).logits
    picked = logits[0, ids.shape[1] - 1 : -1].argmax(-1).tolist()
    return picked if picked == reference else greedy(model, inputs, n, pad_id)


def compare_tokens(ref: list[int], got: list[int]) -> dict[str, Any]:
    """A token comparison as a check's details (records.sections.TokenComparison)."""
    return TokenComparison.of(ref, got).to_dict()
