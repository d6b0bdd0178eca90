"""The built-in corpus: generated on the fly, identical on every machine, no download.

Short documents in simple English about a small world of people, objects and numbers. Most
tokens are easy (template words); some are hard (the result of an addition, how many apples
are left after a gift), so a model can learn to spend more latent steps on them, which is
what the depth-vs-difficulty diagnostics look for. Deterministic: the same ``seed`` and
``documents`` always give the same text, so its cache key never changes.

For real experiments point ``data.source`` at WikiText-2 or another corpus (see the README).
"""

from __future__ import annotations

import random

NAMES = ["Mia", "Leo", "Ava", "Sam", "Ivy", "Max", "Zoe", "Ben", "Eli", "Ada", "Kai", "Una"]
THINGS = ["apples", "books", "stones", "cups", "shells", "coins", "pens", "cards", "eggs", "keys"]
PLACES = ["the garden", "the market", "the library", "the harbour", "the forest", "school"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "brown", "grey"]
NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
]  # fmt: skip


def _story(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    have = rng.randint(3, 12)
    give = rng.randint(1, have - 1)
    place = rng.choice(PLACES)
    colour = rng.choice(COLOURS)
    return (
        f"{a} went to {place} with {have} {colour} {thing}. "
        f"There {a} met {b}. {a} gave {give} {thing} to {b}. "
        f"Now {a} has {have - give} {thing} and {b} has {give} {thing}."
    )


def _arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(2, 5)):
        x, y = rng.randint(0, 10), rng.randint(0, 10)
        if rng.random() < 0.5:
            lines.append(f"{NUMBER_WORDS[x]} plus {NUMBER_WORDS[y]} is {NUMBER_WORDS[x + y]}.")
        else:
            lines.append(f"{x} + {y} = {x + y}.")
    return " ".join(lines)


def _counting(rng: random.Random) -> str:
    start = rng.randint(0, 12)
    step = rng.choice([1, 2])
    seq = [NUMBER_WORDS[i] for i in range(start, 21, step)][: rng.randint(4, 8)]
    return f"Let us count: {', '.join(seq)}."


def _description(rng: random.Random) -> str:
    who = rng.choice(NAMES)
    place = rng.choice(PLACES)
    things = rng.sample(THINGS, 3)
    return (
        f"In {place} {who} keeps {things[0]}, {things[1]} and {things[2]}. "
        f"The {things[0]} are {rng.choice(COLOURS)} and the {things[1]} are "
        f"{rng.choice(COLOURS)}. {who} likes {place} very much."
    )


KINDS = [_story, _arithmetic, _counting, _description]


def builtin_documents(documents: int = 4000, seed: int = 1234) -> list[str]:
    """``documents`` short documents, each a few paragraphs of one or more kinds."""
    rng = random.Random(seed)
    docs = []
    for _ in range(documents):
        parts = [rng.choice(KINDS)(rng) for _ in range(rng.randint(2, 5))]
        docs.append("\n".join(parts))
    return docs
