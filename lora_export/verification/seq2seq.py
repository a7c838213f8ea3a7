"""Encoder-decoders (T5, BART, Whisper): their input cases — the encoder's input (tokens, or Whisper's log-mel
features) with the decoder's tokens beside it — and greedy decoding from the model's own logits.

Greedy tokens are decoded here, not by `generate`: each family's generation config adds its own rules (BART forces an
end token, Whisper suppresses tokens and strips its prompt), and a check of the merge compares what the weights
compute. The encoder runs once; each step runs the decoder on the tokens so far and takes the most likely next one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.errors import InputError
from ..model.config import ModelConfig
from ..model.loading import input_device
from .compare import Case


def seq2seq_cases(
    config: ModelConfig, tokenizer: Any, prompts: Sequence[str], seed: int, source: Path | str | None = None
) -> list[Case]:
    """The prompts as encoder input (text models with a tokenizer) and seeded random batches, one padded; each case
    with seeded decoder tokens that start from the decoder's start token."""
    g = torch.Generator().manual_seed(seed)
    decoder_len = min(8, config.decoder_context or 8)
    encoder: list[tuple[str, dict[str, torch.Tensor]]] = []
    speech = config.speech_input
    if speech is not None:  # Whisper: fixed-length features, no padding mask
        bins, frames = speech
        for batch in (1, 2):
            features = torch.randn(batch, bins, frames, generator=g)
            encoder.append((f"random features {batch}×{bins}×{frames}", {"input_features": features}))
    else:
        if tokenizer is not None and prompts and tokenizer.pad_token is not None:
            tokenizer.padding_side = "right"
            enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
            if enc["input_ids"].shape[1] == 0 or int(enc["attention_mask"].sum(-1).min()) == 0:
                raise InputError(
                    f"{source or 'the model folder'}: its tokenizer ({type(tokenizer).__name__}) encodes a prompt to "
                    "no tokens: fix the tokenizer files, or give --prompts that it encodes"
                )
            name = f"prompts {len(prompts)}×{enc['input_ids'].shape[1]}"
            encoder.append((name, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}))
        limit = config.context or 512
        for batch, seq in ((1, min(8, limit)), (4, min(24, limit))):
            ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
            mask = torch.ones(batch, seq, dtype=torch.long)
            for row in range(1, batch):  # right padding of different lengths
                mask[row, seq - int(torch.randint(1, seq // 2, (1,), generator=g)) :] = 0
            name = f"random {batch}×{seq}{' padded' if batch > 1 else ''}"
            encoder.append((name, {"input_ids": ids, "attention_mask": mask}))
    cases = []
    for name, inputs in encoder:
        batch = next(iter(inputs.values())).shape[0]
        decoder = torch.randint(0, config.vocab_size, (batch, decoder_len), generator=g)
        decoder[:, 0] = config.decoder_start
        cases.append(Case(f"{name}, decoder {decoder_len}", {**inputs, "decoder_input_ids": decoder}))
    return cases


def encoder_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A case's inputs without the decoder's: what greedy decoding starts from."""
    return {k: v for k, v in inputs.items() if not k.startswith("decoder_")}


@torch.no_grad()
def seq2seq_greedy(model: nn.Module, inputs: dict[str, torch.Tensor], n: int, start: int) -> list[int]:
    """n greedy tokens of the first row, from the decoder's start token (which is not returned), no early stop."""
    device = input_device(model)
    inputs = {k: v[:1].to(device) for k, v in encoder_inputs(inputs).items()}
    encoded = model.get_encoder()(**inputs)
    tokens = torch.tensor([[start]], device=device)
    mask = inputs.get("attention_mask")
    for _ in range(n):
        logits = model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=tokens, use_cache=False).logits
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[0, 1:].tolist()
