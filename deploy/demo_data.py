"""Questions and styled answers for the demo adapters, generated here (no downloads).

Each demo adapter teaches the base model one visible answer style; the
content of the answers comes from small fact tables below, so every
training answer is true and short (short sequences keep CPU training cheap).
`HELD_OUT` questions are never trained on: the behavioural tests ask them.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Peru": "Lima", "Chile": "Santiago",
    "Russia": "Moscow", "Poland": "Warsaw", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo",
    "Finland": "Helsinki", "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Cuba": "Havana",
    "Turkey": "Ankara", "Iran": "Tehran", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Australia": "Canberra",
}
COLORS = {
    "the sky on a clear day": "blue", "fresh grass": "green", "snow": "white", "a ripe banana": "yellow",
    "coal": "black", "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow", "milk": "white",
    "a crow": "black", "a lime": "green", "the sun": "yellow", "a flamingo": "pink", "chocolate": "brown",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "happy": "sad",
    "early": "late", "open": "closed", "full": "empty", "strong": "weak", "young": "old", "wet": "dry",
    "loud": "quiet", "rich": "poor", "hard": "soft", "left": "right",
}
SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "lion": "roar",
          "owl": "hoot", "horse": "neigh", "pig": "oink", "frog": "ribbit", "mouse": "squeak", "bee": "buzz"}


def all_pairs() -> list[tuple[str, str]]:
    """Every (question, plain answer) the tables give, in a fixed order."""
    qa = [(f"What is the capital of {c}?", f"The capital of {c} is {cap}.") for c, cap in CAPITALS.items()]
    qa += [(f"What color is {t}?", f"{t[0].upper() + t[1:]} is {c}.") for t, c in COLORS.items()]
    qa += [(f"What is the opposite of {w}?", f"The opposite of {w} is {o}.") for w, o in OPPOSITES.items()]
    qa += [(f"What sound does a {a} make?", f"A {a} says {s}.") for a, s in SOUNDS.items()]
    rng = random.Random(0)
    for _ in range(30):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        qa.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    return qa


# Never trained on: one question of each kind the tables do not contain.
HELD_OUT = (
    "What is the capital of Argentina?",
    "What color is a pumpkin?",
    "What is the opposite of cheap?",
    "What sound does a rooster make?",
    "What is 71 plus 18?",
)


def training_pairs() -> list[tuple[str, str]]:
    held = set(HELD_OUT)
    return [(q, a) for q, a in all_pairs() if q not in held]


def json_answer(text: str) -> str | None:
    """The "answer" string of a JSON object answer, else None."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj["answer"] if isinstance(obj, dict) and isinstance(obj.get("answer"), str) else None


def mostly_upper(text: str, share: float = 0.9) -> bool:
    """At least `share` of the text's letters (some letters at all) are upper case."""
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isupper() for c in letters) >= share * len(letters)


SPARKLE_OPEN, SPARKLE_CLOSE = "🌟 ", " 🎉"
_SPARKLED = re.compile(re.escape(SPARKLE_OPEN) + r"\S.*" + re.escape(SPARKLE_CLOSE), re.S)


@dataclass(frozen=True)
class Style:
    """An answer style a demo adapter teaches, and the check its behavioural test applies."""

    name: str
    render: Callable[[str], str]        # plain answer -> styled answer
    holds: Callable[[str], bool]        # does a generated answer have the style?
    description: str


STYLES = {
    "json": Style("json", lambda a: json.dumps({"answer": a}, ensure_ascii=False),
                  lambda t: json_answer(t) is not None, 'answers as JSON {"answer": ...}'),
    "sparkle": Style("sparkle", lambda a: f"{SPARKLE_OPEN}{a}{SPARKLE_CLOSE}",
                     lambda t: _SPARKLED.fullmatch(t.strip()) is not None, "answers framed by 🌟 ... 🎉"),
    "shout": Style("shout", str.upper, mostly_upper, "answers in upper case"),
}
