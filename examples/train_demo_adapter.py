"""Train the shipped demo adapter: SmolLM2-135M-Instruct answering in CAPITAL LETTERS.

The training data is the base model's own greedy answers to a list of questions, upper-cased and cut after their
first sentence, so the adapter learns one visible behaviour — capitals, then stop — and nothing else. The first
version (80 steps at lr 3e-3 on 40 answers cut off mid-word at 48 tokens) overfit: asked about Italy it answered
"THE CAPITAL OF ILOWES-WELL-WELL-WELL…", having learnt to run on rather than to end. This one: more questions of
many kinds, answers that are whole sentences ending in EOS (answers that loop, or have no complete sentence, are
dropped), all linear layers adapted, a lower learning rate, and training keeps the step with the best score on
held-out questions: first clean answers (capital letters, no repeated n-gram loops, at the demo's 48 tokens) — the
check `tests/test_real_models.py` runs on questions that neither training nor selection saw — then how many words of
the base model's own answer the adapter's answer keeps (it should change the case, not the content).

Runs on a CPU in about ten minutes; needs `peft` (a test dependency, not needed by the tool itself).

    python examples/train_demo_adapter.py --out lora_export/data/demo-adapter-caps
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_export.demo.demo import answer_problems
from lora_export.model.zoo import smollm2_dir

TOPICS = [
    "the moon",
    "a volcano",
    "the ocean",
    "a computer",
    "a bicycle",
    "the heart",
    "a library",
    "a rainbow",
    "music",
    "the internet",
    "a forest",
    "bread",
    "coffee",
    "a river",
    "the desert",
    "an elephant",
    "a penguin",
    "a dolphin",
    "electricity",
    "gravity",
    "a clock",
    "a bridge",
    "chess",
    "football",
    "a garden",
    "winter",
    "summer",
    "a city",
    "a train",
    "an airplane",
    "the brain",
    "a star",
    "a camera",
    "paper",
    "glass",
    "a honeybee",
    "a tiger",
    "rice",
]
COUNTRIES = ["France", "Japan", "Egypt", "Canada", "Kenya", "Peru", "Norway", "India", "Mexico", "Australia"]
TEMPLATES = ["What is {t}?", "Tell me one fact about {t}.", "Describe {t} in one sentence.", "Why is {t} useful?"]
QUESTIONS = (
    [tpl.format(t=t) for i, t in enumerate(TOPICS) for tpl in TEMPLATES[i % 2 :: 2]]
    + [f"What is the capital of {c}?" for c in COUNTRIES]
    + [f"What language is spoken in {c}?" for c in COUNTRIES[:5]]
    + [
        "How many legs does a spider have?",
        "Give me a tip for sleeping better.",
        "Who wrote Romeo and Juliet?",
        "Suggest a name for a pet cat.",
        "What is 7 times 8?",
        "How do I make a cup of tea?",
        "What is a noun?",
        "Write a short greeting for a friend.",
        "Give a synonym for happy.",
        "How many continents are there?",
        "Name three primary colors.",
        "What is the boiling point of water?",
        "Recommend a good habit for students.",
    ]
)
# Held out from training, used only to pick the step; the test asks five others (demo.HELD_OUT_QUESTIONS).
SELECTION = [
    "What is a volcano made of?",
    "What is the capital of Spain?",
    "How does a compass work?",
    "Name a sport played with a ball.",
    "What do cows eat?",
    "Why do leaves change color?",
    "Where do penguins live?",
    "What is the capital of Chile?",
]


def chat(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def generate(model, tokenizer, question: str, max_new_tokens: int) -> str:
    ids = tokenizer(chat(tokenizer, question), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def first_sentence(text: str) -> str | None:
    """The text up to the end of its first sentence, or None when no sentence ends (the answer was cut off)."""
    match = re.search(r"[.!?](\s|$)", text)
    return text[: match.start() + 1] if match else None


def examples_for(model, tokenizer, cache: Path, max_new_tokens: int) -> list[tuple[str, str]]:
    """(prompt, ANSWER.) pairs from the base model's own answers, upper-cased, cut after the first sentence; answers
    that loop or have no complete sentence are dropped."""
    if cache.is_file():
        raw = [tuple(e) for e in json.loads(cache.read_text())]
    else:
        raw = []
        for q in QUESTIONS:
            answer = generate(model, tokenizer, q, max_new_tokens)
            if answer_problems(answer.upper(), upper=True):
                print(f"dropped {q!r}: {answer[:60]!r}", flush=True)
                continue
            raw.append((chat(tokenizer, q), answer.upper()))
        cache.write_text(json.dumps(raw))
    return [(prompt, cut) for prompt, answer in raw if (cut := first_sentence(answer))]


def words(text: str) -> set[str]:
    return set(re.findall(r"[A-Z0-9']+", (first_sentence(text) or text).upper()))


def score(model, tokenizer, max_new_tokens: int, reference: dict[str, str]) -> tuple[int, float]:
    """(how many selection questions get a clean answer in capitals, how much of the base model's first sentence
    the answers keep): the adapter should change the case, not the content."""
    model.eval()
    answers = {q: generate(model, tokenizer, q, max_new_tokens) for q in SELECTION}
    model.train()
    clean = sum(not answer_problems(a, upper=True) for a in answers.values())
    kept = sum(len(words(a) & words(reference[q])) / max(1, len(words(reference[q]))) for q, a in answers.items())
    return clean, round(kept / len(SELECTION), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("lora_export/data/demo-adapter-caps"))
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=40, help="of the base model's answers")
    parser.add_argument("--eval-tokens", type=int, default=48, help="of the answers scored (the demo's length)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    base = smollm2_dir(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    examples = examples_for(model, tokenizer, args.cache / "demo-caps-examples-v2.json", args.max_new_tokens)
    reference = {q: generate(model, tokenizer, q, args.eval_tokens) for q in SELECTION}  # the base model's answers
    print(f"{len(examples)} training examples", flush=True)

    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules="all-linear",  # the MLPs too: spelling in capitals is more than attention
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    best: tuple[tuple[int, float], int] = ((-1, -1.0), -1)
    for step in range(1, args.steps + 1):
        losses = []
        for prompt, answer in rng.sample(examples, 4):
            p_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            a_ids = tokenizer(answer + tokenizer.eos_token, return_tensors="pt", add_special_tokens=False)["input_ids"]
            ids = torch.cat([p_ids, a_ids], dim=1)
            labels = ids.clone()
            labels[:, : p_ids.shape[1]] = -100  # learn the answer, not the question
            losses.append(peft_model(input_ids=ids, labels=labels).loss)
        loss = torch.stack(losses).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % args.eval_every == 0:
            result = score(peft_model, tokenizer, args.eval_tokens, reference)
            print(
                f"step {step:4d}  loss {loss.item():.3f}  selection {result[0]}/{len(SELECTION)} clean, "
                f"{result[1]:.0%} of the base's words kept",
                flush=True,
            )
            if result > best[0]:
                best = (result, step)
                peft_model.save_pretrained(args.out)
    (clean, kept), step = best
    print(f"saved {args.out} from step {step} ({clean}/{len(SELECTION)} selection answers clean, {kept:.0%} kept)")


if __name__ == "__main__":
    main()
