"""CLIP BPE tokenizer read from a standard `vocab.json` + `merges.txt` folder.

Gives the ids A1111 gets for SD 1.5 (transformers' `CLIPTokenizer` with ftfy installed): the text
is split at the literal special tokens, each piece cleaned with `clean_text` (ftfy `fix_text`,
whitespace collapse, Python's `str.lower()`), then the CLIP word regex, the byte-level alphabet
and BPE with the end-of-word suffix `</w>`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import ftfy
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from ..runtime.session import ModelLoadError

CLIP_WORD_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
END_OF_WORD = "</w>"
DEFAULT_BOS = "<|startoftext|>"
DEFAULT_EOS = "<|endoftext|>"


_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """CLIP's clean-up before BPE: ftfy `fix_text` (curly quotes, ligatures, full-width letters,
    mojibake, control characters, HTML entities when the text has no `<`), whitespace runs to one
    space, stripped, then `str.lower()` (which knows the Greek final sigma)."""
    return _WHITESPACE.sub(" ", ftfy.fix_text(text)).strip().lower()


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table (the byte-level alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _token_name(config: dict, key: str, default: str) -> str:
    value = config.get(key, default)
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
        value = value.get("content", default)
    return value if isinstance(value, str) else default


class ClipTokenizer:
    """CLIP tokenizer: `encode` gives ids without special tokens; `bos_id`/`eos_id`/`pad_id` wrap them."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]],
                 bos_token: str = DEFAULT_BOS, eos_token: str = DEFAULT_EOS,
                 pad_token: str | None = None, max_length: int = 77):
        for name in (bos_token, eos_token):
            if name not in vocab:
                raise ValueError(f"tokenizer vocab has no special token {name!r}")
        pad_token = pad_token or eos_token
        if pad_token not in vocab:
            raise ValueError(f"tokenizer vocab has no pad token {pad_token!r}")
        self.bos_id = vocab[bos_token]
        self.eos_id = vocab[eos_token]
        self.pad_id = vocab[pad_token]  # SD1: the EOS token
        self.comma_id = vocab.get("," + END_OF_WORD)  # where A1111 prefers to end a long prompt's chunk
        self.max_length = max_length
        self.vocab_size = len(vocab)
        self._id_to_token = {i: t for t, i in vocab.items()}
        self._byte_of_char = {c: b for b, c in bytes_to_unicode().items()}
        self._special_ids = {bos_token: self.bos_id, eos_token: self.eos_id}
        self._special_split = re.compile("(" + "|".join(map(re.escape, self._special_ids)) + ")")
        self._tokenizer = self._build(vocab, merges, eos_token)

    @staticmethod
    def _build(vocab: dict[str, int], merges: list[tuple[str, str]], unk: str) -> Tokenizer:
        """Word regex + byte-level BPE of text that `clean_text` has already normalised."""
        model = models.BPE(vocab=vocab, merges=merges, unk_token=unk,
                           continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD)
        tokenizer = Tokenizer(model)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            # keep the regex matches, drop what lies between them (whitespace)
            pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tokenizer.decoder = decoders.BPEDecoder(suffix=END_OF_WORD)
        return tokenizer

    @classmethod
    def from_dir(cls, folder: Path | str) -> ClipTokenizer:
        """Read `vocab.json`, `merges.txt` and (optional) `tokenizer_config.json` from `folder`.

        FileNotFoundError when a required file is missing; ModelLoadError naming the file when one
        cannot be read or parsed.
        """
        folder = Path(folder)
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        for path in (vocab_path, merges_path):
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer file missing: {path}")
        vocab = _read_json(vocab_path)
        if not vocab or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
            raise ModelLoadError(f"{vocab_path}: expected a JSON object of token -> id", vocab_path)
        try:
            merges = read_merges(merges_path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{merges_path}: unreadable: {exc}", merges_path) from exc
        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        max_length = config.get("model_max_length", 77)
        if not isinstance(max_length, int) or not 2 < max_length <= 4096:
            max_length = 77
        eos = _token_name(config, "eos_token", DEFAULT_EOS)
        try:
            return cls(vocab, merges,
                       bos_token=_token_name(config, "bos_token", DEFAULT_BOS),
                       eos_token=eos,
                       pad_token=_token_name(config, "pad_token", eos),
                       max_length=max_length)
        except Exception as exc:  # noqa: BLE001 - missing special tokens, merges the BPE model refuses
            raise ModelLoadError(f"{folder}: not a usable CLIP tokenizer: {exc}", folder) from exc

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without added BOS/EOS; `<|endoftext|>` written in the text is the
        EOS id (any letter case, as CLIP's tokenizer gives it after lowercasing)."""
        ids: list[int] = []
        for piece in self._special_split.split(text):
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
                continue
            for word in self._special_split.split(clean_text(piece)):
                if word in self._special_ids:
                    ids.append(self._special_ids[word])
                elif word:
                    ids += self._tokenizer.encode(word, add_special_tokens=False).ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`: tokens joined, `</w>` becomes a space, byte-level characters decoded."""
        joined = "".join(self._id_to_token.get(int(i), "") for i in ids)
        raw = bytearray()
        for word in joined.split(END_OF_WORD):
            for char in word:
                byte = self._byte_of_char.get(char)
                raw.extend(char.encode("utf-8") if byte is None else bytes([byte]))
            raw.extend(b" ")
        return raw.decode("utf-8", errors="replace")[:-1].strip()


def _read_json(path: Path) -> dict:
    """A JSON object from `path` (ModelLoadError naming the file otherwise)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not readable JSON: {exc}", path) from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(value).__name__}", path)
    return value


def read_merges(path: Path) -> list[tuple[str, str]]:
    """Merge pairs from a CLIP `merges.txt` (a `#version` header line is skipped)."""
    pairs: list[tuple[str, str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#version"):
            continue
        left, _, right = line.strip().partition(" ")
        if right:
            pairs.append((left, right))
    return pairs
