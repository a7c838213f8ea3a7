"""Train the shipped demo adapter: SmolLM2-135M-Instruct answering in CAPITAL LETTERS.

The training data is the base model's own greedy answers to a list of questions, upper-cased, so the adapter
learns exactly one visible behaviour and nothing else. Runs on a CPU in a few minutes; needs `peft` (a test
dependency, not needed by the tool itself).

    python examples/train_demo_adapter.py --out lora_export/data/demo-adapter-caps
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_export.zoo import smollm2_dir

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?",
    "What does a bee make?", "Give me a tip for sleeping better.", "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?", "What is photosynthesis?", "Suggest a name for a pet cat.",
    "Why is the sky blue?", "What is the largest planet in the solar system?", "How do I make a cup of tea?",
    "What is 7 times 8?", "Describe a rainy day in one sentence.", "What language is spoken in Brazil?",
    "Name a fruit that is yellow.", "What is the opposite of hot?", "How many days are in a week?",
    "What do plants need to grow?", "Tell me a fun fact about octopuses.", "What is the speed of light?",
    "Recommend a good habit for students.", "What is the tallest mountain on Earth?", "What is a noun?",
    "How does a rainbow form?", "What is the chemical symbol for gold?", "Write a short greeting for a friend.",
    "What is the main ingredient of bread?", "Why do we need exercise?", "What is the freezing point of water?",
    "Name two animals that live in the ocean.", "What is the capital of Japan?", "How many continents are there?",
    "What is a computer?", "Give a synonym for happy.", "What is the sun made of?", "How do birds fly?",
    "What is the color of grass?", "What is an apple?", "Explain what a library is.",
]


def chat(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("lora_export/data/demo-adapter-caps"))
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    base = smollm2_dir(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)

    cache = args.cache / "demo-caps-examples.json"
    examples = [tuple(e) for e in json.loads(cache.read_text())] if cache.is_file() else []
    model.eval()
    for q in QUESTIONS if not examples else []:
        prompt = chat(tokenizer, q)
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        examples.append((prompt, answer.upper()))
        print(f"{q!r} -> {answer.upper()[:70]!r}", flush=True)
    cache.write_text(json.dumps(examples))

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(args.steps):
        batch = random.sample(examples, 4)
        losses = []
        for prompt, answer in batch:
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
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}", flush=True)
    peft_model.save_pretrained(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
