"""Prompt -> per-step text embeddings for one request, with A1111 prompt semantics.

The compiled text encoder takes exactly one 77-token chunk ([BOS] + 75 + [EOS]), so this is
A1111's *first* chunk: text beyond it (A1111's cut: after the last comma within the last 20
tokens, else after token 75) or after a BREAK is dropped with a warning that quotes it.
Emphasis weights are applied to the hidden states (`apply_emphasis`, A1111 `sd_emphasis`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .prompt_parser import (
    check_prompt_text,
    extract_extra_networks,
    get_learned_conditioning_prompt_schedules,
    parse_prompt_attention,
    split_and_prompts,
)
from .tokenizer import ClipTokenizer

EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
COMMA_BACKTRACK = 20  # A1111's `comma_padding_backtrack` default
EXTRA_NETWORK_WARNING = (
    "LoRA/hypernetwork tags cannot be applied: weights are compiled into the NPU models ({tags} ignored)"
)


class TextEncoderLike(Protocol):
    """stages.TextEncoder: ids [1, 77] -> hidden states [1, 77, 768]."""

    def encode(self, ids: np.ndarray) -> np.ndarray: ...


EncodeFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class PromptPlan:
    """Everything parsed from one positive + negative prompt."""

    conds: list[list[tuple[int, str, float]]]  # per AND sub-prompt: [(end_step, text, subprompt_weight)]
    uncond: list[tuple[int, str]]  # negative prompt schedule [(end_step, text)]
    warnings: list[str]
    extra_networks: dict[str, list[list[str]]]  # e.g. {"lora": [["name", "0.5"]]}
    steps: int = 1
    guidance: bool = True  # False: conds_at() returns no uncond embedding
    # infotext extras, e.g. {"Emphasis": "No norm"} (A1111 adds it when the text has ( or [)


def _dedupe(messages: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(messages))


def tokenize_weighted(
    tokenizer: ClipTokenizer, parsed: Sequence[tuple[str, float]], label: str = "Prompt"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(ids int64 [77], multipliers float32 [77], warnings) for parsed (text, weight) pieces.

    This is A1111's first chunk, token for token. Each token carries its piece's weight. A prompt
    longer than 75 tokens is cut as A1111 ends its first chunk: after the last comma when that
    comma is among the last `COMMA_BACKTRACK` tokens (phrases stay whole), else after token 75.
    ("BREAK", -1) closes the chunk (A1111 pads it to 75 and continues in a second chunk, which
    one 77-token encoder call cannot hold). The warning quotes the dropped text.
    """
    chunk_length = tokenizer.max_length - 2
    tokens: list[int] = []
    multipliers: list[float] = []
    dropped: list[int] = []
    closed_by_break = cut_at_comma = False
    last_comma = -1  # index in `tokens` of the chunk's last comma token
    for text, weight in parsed:
        if text == "BREAK" and weight == -1:
            closed_by_break = closed_by_break or len(tokens) < chunk_length
            tokens += [tokenizer.eos_id] * (chunk_length - len(tokens))
            multipliers += [1.0] * (chunk_length - len(multipliers))
            last_comma = -1
            continue
        for token in tokenizer.encode(text):
            if len(tokens) < chunk_length and not dropped:
                if token == tokenizer.comma_id:
                    last_comma = len(tokens)
                tokens.append(token)
                multipliers.append(weight)
                continue
            if (not dropped and token != tokenizer.comma_id and last_comma >= 0
                    and chunk_length - last_comma <= COMMA_BACKTRACK):
                dropped, cut_at_comma = tokens[last_comma + 1:], True
                del tokens[last_comma + 1:], multipliers[last_comma + 1:]
            dropped.append(token)

    padding = chunk_length - len(tokens)
    ids = [tokenizer.bos_id, *tokens] + [tokenizer.eos_id] * (padding + 1)
    weights = [1.0, *multipliers] + [1.0] * (padding + 1)
    if tokenizer.pad_id != tokenizer.eos_id:  # A1111: everything after the first EOS becomes pad
        first_eos = ids.index(tokenizer.eos_id)
        ids[first_eos + 1:] = [tokenizer.pad_id] * (len(ids) - first_eos - 1)
    warnings = []
    if dropped:
        where = (f"text after BREAK needs a second {chunk_length}-token chunk, which the compiled text "
                 f"encoder cannot take" if closed_by_break else f"longer than {chunk_length} tokens")
        if cut_at_comma:
            where += " (cut after its last comma, where A1111 ends the first chunk)"
        warnings.append(f"{label} {where}: {len(dropped)} tokens dropped: {tokenizer.decode(dropped)!r}")
    return np.asarray(ids, dtype=np.int64), np.asarray(weights, dtype=np.float32), warnings


def apply_emphasis(z: np.ndarray, multipliers: np.ndarray, mode: str = "Original") -> np.ndarray:
    """Apply token weights to hidden states z [1, 77, C] like A1111 `sd_emphasis`.

    "Original": z * w, then rescaled so mean(z) over the whole tensor is unchanged;
    "No norm": z * w; "Ignore" and "None": unchanged. Unknown names act as "Original".
    """
    if mode in ("Ignore", "None"):
        return z
    weights = np.asarray(multipliers, dtype=np.float64).reshape(1, -1, 1)
    if np.all(weights == 1.0):
        return z
    weighted = z.astype(np.float64) * weights
    if mode != "No norm":
        original_mean, new_mean = z.astype(np.float64).mean(), weighted.mean()
        if new_mean != 0.0:
            weighted *= original_mean / new_mean
    return weighted.astype(np.float32)


class TextConditioner:
    """One per request: plans prompt schedules and encodes each distinct text once."""

    def __init__(self, tokenizer: ClipTokenizer, text_encoder: TextEncoderLike | EncodeFn,
                 emphasis: str = "Original"):
        self.tokenizer = tokenizer
        self._encode: EncodeFn = getattr(text_encoder, "encode", text_encoder)
        self.emphasis = emphasis
        self.encoder_calls = 0
        self._tokenized: dict[str, tuple[np.ndarray, np.ndarray, list[str]]] = {}
        self._embeddings: dict[str, np.ndarray] = {}

    def parse(self, text: str) -> list[tuple[str, float]]:
        """Emphasis pieces of `text`; emphasis "None" takes the text literally."""
        return [(text, 1.0)] if self.emphasis == "None" else parse_prompt_attention(text)

    def tokenize(self, text: str, label: str = "Prompt") -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Cached `tokenize_weighted` of `text` (ids, multipliers, warnings)."""
        if text not in self._tokenized:
            self._tokenized[text] = tokenize_weighted(self.tokenizer, self.parse(text), label)
        return self._tokenized[text]

    def embedding(self, text: str) -> np.ndarray:
        """Weighted hidden states [1, 77, C] float32 of `text`, encoded once per conditioner."""
        if text not in self._embeddings:
            ids, multipliers, _ = self.tokenize(text)
            hidden = np.asarray(self._encode(ids.reshape(1, -1)), dtype=np.float32)
            self.encoder_calls += 1
            if hidden.ndim != 3 or hidden.shape[:2] != (1, ids.size):
                raise ValueError(f"text encoder returned shape {hidden.shape}, expected (1, {ids.size}, C)")
            self._embeddings[text] = apply_emphasis(hidden, multipliers, self.emphasis)
        return self._embeddings[text]

    def plan(self, prompt: str, negative_prompt: str, steps: int, max_and_prompts: int = 3,
             guidance: bool = True) -> PromptPlan:
        """Parse extra-network tags, AND sub-prompts and editing schedules; tokenize every text.

        PromptError (naming the field) for a prompt `check_prompt_text` refuses."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        check_prompt_text(prompt, "prompt")
        check_prompt_text(negative_prompt, "negative_prompt")
        max_and_prompts = max(1, max_and_prompts)  # 0 would drop the prompt and leave only uncond
        warnings: list[str] = []
        prompt, networks = extract_extra_networks(prompt)
        if networks:
            tags = ", ".join(f"<{name}:{':'.join(args)}>"
                             for name, calls in networks.items() for args in calls)
            warnings.append(EXTRA_NETWORK_WARNING.format(tags=tags))

        subprompts = split_and_prompts(prompt)
        if len(subprompts) > 1 and not guidance:
            warnings.append(f"AND needs guidance (cfg_scale > 1): only the first of {len(subprompts)} "
                            f"sub-prompts is used")
            subprompts = subprompts[:1]
        elif len(subprompts) > max_and_prompts:
            warnings.append(f"{len(subprompts)} sub-prompts joined with AND: only the first "
                            f"{max_and_prompts} are used (max_and_prompts)")
            subprompts = subprompts[:max_and_prompts]

        texts = [text for text, _ in subprompts]
        schedules = get_learned_conditioning_prompt_schedules([*texts, negative_prompt], steps)
        conds = [[(end, text, weight) for end, text in schedule]
                 for schedule, (_, weight) in zip(schedules[:-1], subprompts, strict=True)]
        uncond = schedules[-1]

        positive_texts = {text for schedule in conds for _, text, _ in schedule}
        negative_texts = {text for _, text in uncond} if guidance else set()
        for text in sorted(positive_texts):
            warnings += self.tokenize(text, "Prompt")[2]
        for text in sorted(negative_texts - positive_texts):
            warnings += self.tokenize(text, "Negative prompt")[2]
        return PromptPlan(conds=conds, uncond=uncond, warnings=_dedupe(warnings), extra_networks=networks,
                          steps=steps, guidance=guidance)

    def conds_at(self, plan: PromptPlan, step: int
                 ) -> tuple[list[tuple[np.ndarray, float]], np.ndarray | None]:
        """([(embedding, subprompt_weight)], uncond embedding or None) in effect at `step` (1-based).

        A schedule entry (end_step, text) covers every step <= end_step after the previous entry,
        so `[a:b:0.5]` with 4 steps gives a at steps 1-2 and b at steps 3-4.
        """
        if step < 1:
            raise ValueError(f"conds_at takes a 1-based step number, got {step}")
        conds = []
        for schedule in plan.conds:
            _, text, weight = _entry_at(schedule, step)
            conds.append((self.embedding(text), weight))
        uncond = self.embedding(_entry_at(plan.uncond, step)[1]) if plan.guidance else None
        return conds, uncond


def _entry_at(schedule: Sequence[tuple], step: int) -> tuple:
    """The first schedule entry whose end step is >= `step` (the last one past the end)."""
    for entry in schedule:
        if step <= entry[0]:
            return entry
    return schedule[-1]
