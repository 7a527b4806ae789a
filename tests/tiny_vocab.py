"""A tiny CLIP-format vocabulary for tokenizer tests: 256 byte characters, their `</w>` forms,
a few merges, then the two special tokens (last, as in CLIP)."""

from __future__ import annotations

from pi_axera_sd_service.pipeline.tokenizer import bytes_to_unicode

MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("p", "h"), ("ph", "o")]


def tiny_clip_vocab() -> dict[str, int]:
    """token -> id for the bytes, their end-of-word forms, MERGES, <|startoftext|>, <|endoftext|>."""
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars] + [a + b for a, b in MERGES]:
        vocab[token] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab
