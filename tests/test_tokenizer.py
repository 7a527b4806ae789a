"""ClipTokenizer on a tiny CLIP-format vocabulary written in the test."""

from __future__ import annotations

import json
import re
from pathlib import Path

import ftfy
import pytest
from tiny_vocab import MERGES, tiny_clip_vocab

from pi_axera_sd_service.pipeline.tokenizer import ClipTokenizer, bytes_to_unicode
from pi_axera_sd_service.runtime.session import ModelLoadError


def write_clip_tokenizer(folder: Path, config: dict | None = None) -> dict[str, int]:
    """The tiny vocabulary as vocab.json + merges.txt (+ tokenizer_config.json) in `folder`."""
    vocab = tiny_clip_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in MERGES) + "\n"
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return vocab


@pytest.fixture()
def tokenizer_and_vocab(tmp_path: Path) -> tuple[ClipTokenizer, dict[str, int]]:
    vocab = write_clip_tokenizer(tmp_path / "tokenizer")
    return ClipTokenizer.from_dir(tmp_path / "tokenizer"), vocab


def test_special_ids_come_from_the_vocab(tokenizer_and_vocab):
    tokenizer, vocab = tokenizer_and_vocab
    assert tokenizer.bos_id == vocab["<|startoftext|>"]
    assert tokenizer.eos_id == vocab["<|endoftext|>"]
    assert tokenizer.pad_id == tokenizer.eos_id  # SD1 pads with EOS
    assert tokenizer.max_length == 77


def test_words_use_merges_and_end_of_word_suffix(tokenizer_and_vocab):
    tokenizer, vocab = tokenizer_and_vocab
    assert tokenizer.encode("cat dog") == [vocab["cat</w>"], vocab["dog</w>"]]
    # "cats" does not end in "t</w>", so only the ("c","a") merge applies
    assert tokenizer.encode("cats") == [vocab["ca"], vocab["t"], vocab["s</w>"]]


def test_lowercase_whitespace_and_no_special_tokens(tokenizer_and_vocab):
    tokenizer, vocab = tokenizer_and_vocab
    ids = tokenizer.encode("  A \n\t Cat  ")
    assert ids == [vocab["a</w>"], vocab["cat</w>"]]
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids


def test_clip_regex_splits_digits_punctuation_and_contractions(tokenizer_and_vocab):
    tokenizer, vocab = tokenizer_and_vocab
    ids = tokenizer.encode("dog's 42!!")
    tokens = [vocab_key(vocab, i) for i in ids]
    assert tokens == ["dog</w>", "'", "s</w>", "4</w>", "2</w>", "!", "!</w>"]


def test_non_ascii_round_trips_through_byte_level(tokenizer_and_vocab):
    tokenizer, _ = tokenizer_and_vocab
    for text in ["café photo", "日本の猫", "a cat"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_decode_turns_end_of_word_into_spaces(tokenizer_and_vocab):
    tokenizer, vocab = tokenizer_and_vocab
    assert tokenizer.decode([vocab["a</w>"], vocab["cat</w>"], vocab["pho"], vocab["t"], vocab["o</w>"]]) == (
        "a cat photo"
    )


def test_config_can_name_another_pad_token(tmp_path: Path):
    vocab = write_clip_tokenizer(tmp_path, {"pad_token": "!", "model_max_length": 77})
    tokenizer = ClipTokenizer.from_dir(tmp_path)
    assert tokenizer.pad_id == vocab["!"] != tokenizer.eos_id


def test_missing_files_are_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        ClipTokenizer.from_dir(tmp_path)


def vocab_key(vocab: dict[str, int], token_id: int) -> str:
    return next(token for token, i in vocab.items() if i == token_id)


@pytest.mark.parametrize(
    ("name", "content"),
    [("vocab.json", "{broken"), ("vocab.json", "[1, 2]"), ("vocab.json", "{}"),
     ("merges.txt", b"\xff\xfe\x00"), ("tokenizer_config.json", "{broken")],
)
def test_corrupt_tokenizer_files_are_a_model_load_error_naming_the_file(tmp_path: Path, name, content):
    write_clip_tokenizer(tmp_path, {})
    target = tmp_path / name
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ModelLoadError, match=name):
        ClipTokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    "text", ["", "   ", "\t\n", "🐱🐶", "日本語のプロンプト", "x" * 5000, "a\u200bb", "\x00", "e\u0301"]
)
def test_unusual_text_round_trips_and_never_yields_unknown_tokens(tokenizer_and_vocab, text):
    tokenizer, _ = tokenizer_and_vocab
    ids = tokenizer.encode(text)
    assert tokenizer.eos_id not in ids and tokenizer.bos_id not in ids
    normalised = " ".join(ftfy.fix_text(text).lower().split())
    assert tokenizer.decode(ids).replace(" ", "") == normalised.replace(" ", "")


def test_typed_special_tokens_are_the_special_ids_as_in_a1111(tokenizer_and_vocab):
    # A1111 tokenizes with HF CLIPTokenizer, which matches special tokens in the text
    tokenizer, _ = tokenizer_and_vocab
    assert tokenizer.encode("a<|endoftext|>b")[1] == tokenizer.eos_id
    assert tokenizer.bos_id in tokenizer.encode("<|startoftext|> cat")


# --------------------------------------------------------------------------- A1111's text clean-up

# CLIP's word regex with Python `re` classes ([^\W\d_] letters, \d digits): enough for this corpus
_WORDS = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")


def reference_ids(normalised: str, vocab: dict[str, int]) -> list[int]:
    """CLIP's BPE written out (lowest-ranked pair first, every occurrence) over already-clean text."""
    ranks = {pair: rank for rank, pair in enumerate(MERGES)}
    byte_char = bytes_to_unicode()
    ids = []
    for word in _WORDS.findall(normalised):
        if word in ("<|startoftext|>", "<|endoftext|>"):
            ids.append(vocab[word])
            continue
        parts = [byte_char[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        while len(parts) > 1:
            pair = min(zip(parts[:-1], parts[1:], strict=True), key=lambda p: ranks.get(p, len(ranks)))
            if pair not in ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if tuple(parts[i:i + 2]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids += [vocab[p] for p in parts]
    return ids


# (prompt as typed, the text A1111's tokenizer sees after ftfy fix_text + whitespace clean + str.lower())
A1111_CORPUS = [
    ("it’s a cat", "it's a cat"),  # curly apostrophe
    ("a \ufb02ower", "a flower"),  # ligature
    ("\uff23\uff21\uff34 photo", "cat photo"),  # full-width letters
    ("cat &amp; dog", "cat & dog"),  # HTML entity
    ("caf\u00c3\u00a9 photo", "caf\u00e9 photo"),  # UTF-8 read as Latin-1 (mojibake)
    ("a\x07cat\x1b dog", "acat dog"),  # control characters
    ("\u039f\u0394\u039f\u03a3", "\u03bf\u03b4\u03bf\u03c2"),  # Greek final sigma
    ("a cat<|endoftext|>dog", "a cat <|endoftext|> dog"),
    ("<|startoftext|>A CAT", "<|startoftext|> a cat"),
    ("cat <|ENDOFTEXT|>", "cat <|endoftext|>"),  # lowercased, then CLIP's regex keeps it whole
    ("cat &amp; <dog>", "cat &amp; <dog>"),  # ftfy leaves entities alone in text that has a "<"
]


@pytest.mark.parametrize(("typed", "clean"), A1111_CORPUS)
def test_prompts_get_the_ids_a1111_gets(tokenizer_and_vocab, typed, clean):
    tokenizer, vocab = tokenizer_and_vocab
    assert tokenizer.encode(typed) == reference_ids(clean, vocab)


def test_the_clean_up_cases_differ_from_plain_lowercasing(tokenizer_and_vocab):
    """The first seven cases change ids: lowercasing character by character would give others."""
    _, vocab = tokenizer_and_vocab
    for typed, clean in A1111_CORPUS[:7]:
        naive = " ".join("".join(char.lower() for char in typed).split())
        assert reference_ids(naive, vocab) != reference_ids(clean, vocab), typed
