"""The built-in demo task: restaurant attributes -> one sentence (the shape of E2E NLG).

``prefixtune train`` with no ``--data`` trains on these. The examples are generated from
a few lists and sentence patterns, so the demo needs no download, and the held-out set is
drawn with another seed. Each attribute set gets one sentence, so BLEU here measures how
well the prefix learned the task's phrasing and its use of the attributes.
"""

from __future__ import annotations

import random

from .data import Example

NAMES = ["The Eagle", "Zizzi", "Aromi", "The Mill", "Loch Fyne", "Blue Spice", "Cotto", "Giraffe",
         "The Punter", "Wildwood", "Alimentum", "Bibimbap House", "Clowns", "Strada", "The Vaults", "Fitzbillies"]
FOODS = ["French", "Italian", "Chinese", "Indian", "Japanese", "English", "fast food"]
AREAS = ["riverside", "city centre"]
PRICES = ["cheap", "moderately priced", "expensive"]
PATTERNS = [
    "{name} is a {price} {food} restaurant in the {area}.",
    "In the {area} there is a {price} {food} place called {name}.",
    "{name} serves {price} {food} food in the {area}.",
]
PROMPT = "name[{name}], food[{food}], area[{area}], price[{price}]\nDescription:"
TRAIN_SIZE, HELD_OUT_SIZE = 640, 32


def examples(count: int, seed: int) -> list[Example]:
    """``count`` random examples; the pattern is chosen by the attributes, so it is learnable."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        slots = dict(name=rng.choice(NAMES), food=rng.choice(FOODS), area=rng.choice(AREAS), price=rng.choice(PRICES))
        pattern = PATTERNS[(NAMES.index(slots["name"]) + FOODS.index(slots["food"])) % len(PATTERNS)]
        prompt = PROMPT.format(**slots)
        out.append(Example(prompt=prompt, completion=" " + pattern.format(**slots), fields={"prompt": prompt, **slots},
                           where=f"demo:{i + 1}"))
    return out


def train_and_held_out(seed: int) -> tuple[list[Example], list[Example]]:
    """The demo's training set and its held-out set (disjoint draws)."""
    return examples(TRAIN_SIZE, seed + 1), examples(HELD_OUT_SIZE, seed + 10_000)
