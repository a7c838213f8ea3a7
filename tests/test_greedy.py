"""verify's greedy check in one forward pass (`greedy_as`): the tokens it returns are those of the model's own greedy
decoding, for any reference — the one it decodes (no decoding steps run), one it leaves at some token (its own
continuation from there), one that stopped at an end token, and under a generation config that processes logits."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_export.verification.compare import greedy, greedy_as


def _model(seed: int) -> Any:
    torch.manual_seed(seed)
    return tiny_llama(tied=False).eval()


def _perturbed(model: Any, scale: float, seed: int) -> Any:
    other = _model(0)
    other.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


def _prompt(seed: int, length: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 96, (1, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _counting(model: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return calls


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 10_000),
    length=st.integers(1, 12),
    n=st.integers(1, 16),
    scale=st.sampled_from([0.0, 1e-3, 0.05, 0.5]),
)
def test_greedy_as_returns_the_models_own_greedy_tokens(seed: int, length: int, n: int, scale: float) -> None:
    model, prompt = _model(seed), _prompt(seed, length)
    reference = greedy(_perturbed(model, scale, seed), prompt, n, 0) if scale else greedy(model, prompt, n, 0)
    assert greedy_as(model, prompt, reference, n, 0) == greedy(model, prompt, n, 0)


def test_a_reference_it_decodes_costs_no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    model, prompt = _model(1), _prompt(1, 7)
    reference = greedy(model, prompt, 20, 0)
    calls = _counting(model, monkeypatch)
    assert greedy_as(model, prompt, reference, 20, 0) == reference and not calls
    other = reference[:5] + [(reference[5] + 1) % 96] + reference[6:]  # left at token 5: its own decoding
    assert greedy_as(model, prompt, other, 20, 0) == reference and len(calls) == 1


def test_a_reference_that_stopped_at_an_end_token(monkeypatch: pytest.MonkeyPatch) -> None:
    model, prompt = _model(2), _prompt(2, 5)
    tokens = greedy(model, prompt, 12, 0)
    model.generation_config.eos_token_id = tokens[3]
    stopped = greedy(model, prompt, 12, 0)
    assert stopped == tokens[: tokens.index(tokens[3]) + 1]
    calls = _counting(model, monkeypatch)
    assert greedy_as(model, prompt, stopped, 12, 0) == stopped and not calls


def test_processed_logits_are_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A repetition penalty changes the choice from the argmax: the model's own decoding, never the forward pass."""
    model, prompt = _model(3), _prompt(3, 6)
    model.generation_config.repetition_penalty = 5.0
    reference = greedy(model, prompt, 16, 0)
    calls = _counting(model, monkeypatch)
    assert greedy_as(model, prompt, reference, 16, 0) == reference and calls == [1]
    assert greedy(_model(3), prompt, 16, 0) != reference  # the penalty matters: the argmax path is another one
