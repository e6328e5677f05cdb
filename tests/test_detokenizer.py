"""Incremental detokenization equals decoding the whole output, for any split of multi-byte text."""

from __future__ import annotations

import random

from bdlora_ray.detokenizer import IncrementalDetokenizer
from bdlora_ray.tokenizer import make_byte_tokenizer

TEXTS = ["plain ascii", "café crème brûlée", "naïve façade — “quotes”", "emoji 🙂👍🏽 and 日本語 text",
         "🧑‍🤝‍🧑 family ZWJ", "mixed: ü😀x€y"]


def test_incremental_text_equals_whole_decode_at_every_prefix():
    tok = make_byte_tokenizer()
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        d = IncrementalDetokenizer(tok)
        stable = ""
        for i, t in enumerate(ids):
            stable += d.add(t)
            whole = tok.decode(ids[:i + 1], skip_special_tokens=True)
            assert stable == d.text
            assert whole.startswith(stable)               # never emits what may still change
            assert "\ufffd" not in stable                 # no half characters
            assert stable + d.pending() == whole          # pending completes it exactly
        assert d.text == text


def test_random_byte_sequences_end_as_the_whole_decode():
    tok = make_byte_tokenizer()
    rng = random.Random(0)
    for _ in range(50):
        text = "".join(rng.choice(["a", "é", "€", "😀", " ", "ß", "中"]) for _ in range(rng.randint(1, 20)))
        ids = tok.encode(text, add_special_tokens=False)
        cut = rng.randint(0, len(ids))  # a request may end mid-character
        d = IncrementalDetokenizer(tok)
        for t in ids[:cut]:
            d.add(t)
        assert d.text + d.pending() == tok.decode(ids[:cut], skip_special_tokens=True)
