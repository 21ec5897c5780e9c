"""The built-in demo task: restaurant attributes -> one sentence (the shape of E2E NLG).

The examples are generated here, from a few lists and sentence patterns, so the demo
needs no download and its held-out set is disjoint from training (by seed). Used by
``prefixtune demo``, the README's first command, until the full training command exists.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from .config import PrefixConfig
from .model import PrefixModel

NAMES = ["The Eagle", "Zizzi", "Aromi", "The Mill", "Loch Fyne", "Blue Spice", "Cotto", "Giraffe",
         "The Punter", "Wildwood", "Alimentum", "Bibimbap House", "Clowns", "Strada", "The Vaults", "Fitzbillies"]
FOODS = ["French", "Italian", "Chinese", "Indian", "Japanese", "English", "fast food"]
AREAS = ["riverside", "city centre"]
PRICES = ["cheap", "moderately priced", "expensive"]
PATTERNS = [
    "{name} is a {price} {food} restaurant in the {area}.",
    "In the {area} there is a {price} {food} place called {name}.",
    "{name} serves {price} {food} food in the {area}.",
    "For {price} {food} food in the {area}, try {name}.",
]
PROMPT = "name[{name}], food[{food}], area[{area}], price[{price}]\nDescription:"


@dataclass
class Example:
    prompt: str
    completion: str
    slots: dict


def make_examples(count: int, seed: int) -> list[Example]:
    """``count`` random examples; different seeds give different draws."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        slots = dict(name=rng.choice(NAMES), food=rng.choice(FOODS), area=rng.choice(AREAS), price=rng.choice(PRICES))
        out.append(Example(PROMPT.format(**slots), " " + rng.choice(PATTERNS).format(**slots), slots))
    return out


def encode(examples: list[Example], tokenizer) -> dict:
    """Right-padded batch; labels are -100 on prompt and padding (loss on completions only)."""
    rows, labels = [], []
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=False).input_ids
        completion = tokenizer(ex.completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(prompt + completion)
        labels.append([-100] * len(prompt) + completion)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


def slot_coverage(text: str, slots: dict) -> float:
    """Share of the attribute values that the sentence mentions (case-insensitive): the
    complement of E2E's slot error rate, without its paraphrase matching."""
    return sum(value.lower() in text.lower() for value in slots.values()) / len(slots)


@torch.no_grad()
def evaluate(pm: PrefixModel, tokenizer, examples: list[Example], prefix) -> dict:
    """Held-out completion loss, perplexity and slot coverage of greedy outputs."""
    pm.eval()
    batch = encode(examples, tokenizer)
    loss = pm(**batch, prefix=prefix).loss.item()
    prompts = tokenizer([ex.prompt for ex in examples], return_tensors="pt", padding=True, padding_side="left")
    out = pm.generate(**prompts, prefix=prefix, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, prompts.input_ids.shape[1]:], skip_special_tokens=True)
    texts = [t.strip().split("\n")[0] for t in texts]
    coverage = sum(slot_coverage(t, ex.slots) for t, ex in zip(texts, examples)) / len(examples)
    return {"loss": loss, "perplexity": math.exp(loss), "slot_coverage": coverage, "sample": texts[0]}


def run(model, tokenizer, steps: int = 80, batch_size: int = 8, lr: float = 3e-3, seed: int = 0, log=print) -> dict:
    """Train a prefix on generated examples and report base vs prefix on held-out ones."""
    torch.manual_seed(seed)
    config = PrefixConfig(prefix_length=10, reparam_hidden_size=512, init="text",
                          init_text="Describe the restaurant in one sentence.")
    pm = PrefixModel.wrap(model, config, tokenizer=tokenizer)
    train, held_out = make_examples(steps * batch_size, seed + 1), make_examples(24, seed + 1000)
    before = evaluate(pm, tokenizer, held_out, prefix=None)
    optimizer = torch.optim.AdamW(pm.trainable_parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * (1 - s / steps))
    pm.train()
    start = time.time()
    for step in range(steps):
        loss = pm(**encode(train[step * batch_size:(step + 1) * batch_size], tokenizer)).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            log(f"step {step + 1:4d}/{steps}  loss {loss.item():.3f}  {time.time() - start:.0f}s")
    after = evaluate(pm, tokenizer, held_out, prefix="default")
    return {"pm": pm, "before": before, "after": after, "seconds": time.time() - start}
