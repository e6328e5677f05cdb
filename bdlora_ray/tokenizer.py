"""Tokenizers: the checkpoint's own HF tokenizer, and a byte-level one that the
embedded tiny model ships (saved in HF format so one loading path serves both)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2; bytes follow from id 3
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (256) after three specials: any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_byte_tokenizer(path: str | Path) -> None:
    make_byte_tokenizer().save_pretrained(str(path))


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The HF tokenizer saved with the checkpoint at `path` (local files only)."""
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
