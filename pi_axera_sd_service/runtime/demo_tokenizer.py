"""The demo pack's tokenizer: a small CLIP-format byte-level BPE learned from a fixed word list.

Written as the upstream `tokenizer/` folder (vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json), so the real CLIP loader reads it unchanged.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

CONTEXT_LEN = 77
N_MERGES = 480
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

_WORD_TEXT = """
a an the of and with in on at by for from to into over under near behind above below beside
portrait landscape painting photo photograph illustration drawing sketch render artwork poster
cat cats dog dogs bird birds horse fox wolf owl fish dragon lion tiger bear rabbit butterfly
girl boy woman man child people person knight wizard robot astronaut king queen warrior
mountain mountains forest tree trees river lake ocean sea beach island desert valley hill field
city street castle house village tower bridge garden temple ruins spaceship car train boat ship
sky cloud clouds sun sunset sunrise moon star stars night day morning evening rain snow storm fog
red blue green yellow orange purple pink black white golden silver brown gray colorful dark bright
beautiful pretty cute old young happy sad tiny huge giant small large tall ancient modern futuristic
detailed highly intricate realistic photorealistic cinematic dramatic soft sharp vivid epic magical
lighting light shadow shadows glow neon fire water ice stone wood metal glass crystal flower flowers
style art digital oil watercolor acoustic anime cartoon fantasy science fiction surreal abstract
masterpiece quality best trending artstation unreal engine octane studio focus depth bokeh lens
wide angle close up view scene background foreground texture pattern colors color warm cold
standing sitting running flying swimming walking looking smiling reading playing dancing sleeping
hat dress coat armor sword shield crown book lamp window door chair table cup bottle clock mirror
"""
WORDS = _WORD_TEXT.split()  # the BPE merges are learned from these


def byte_to_unicode() -> dict[int, str]:
    """The CLIP/GPT-2 byte-to-printable-character table (256 entries, in vocab order)."""
    ranges = (("!", "~"), ("¡", "¬"), ("®", "ÿ"))
    printable = [b for first, last in ranges for b in range(ord(first), ord(last) + 1)]
    table = {b: chr(b) for b in printable}  # printable bytes map to themselves, listed first
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def learn_bpe(words: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE over `words` (end-of-word marked `</w>`); ties go to the first pair seen."""
    encode = byte_to_unicode()
    corpus = Counter(
        tuple(encode[b] for b in w.encode("utf-8"))[:-1] + (encode[w.encode("utf-8")[-1]] + "</w>",)
        for w in words
    )
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in corpus.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda item: item[1])[0]  # Counter keeps first-seen order on ties
        merges.append(best)
        corpus = Counter({_merge(symbols, best): count for symbols, count in corpus.items()})
    return merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def write_tokenizer(folder: Path) -> int:
    """Write vocab.json, merges.txt and the two JSON configs; returns the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    base = list(byte_to_unicode().values())
    merges = learn_bpe(WORDS, N_MERGES)
    tokens = base + [c + "</w>" for c in base] + ["".join(pair) for pair in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    config = {
        **special,
        "tokenizer_class": "CLIPTokenizer",
        "do_lower_case": True,
        "model_max_length": CONTEXT_LEN,
        "errors": "replace",
        "add_prefix_space": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return len(vocab)
