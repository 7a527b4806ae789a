"""Prompt -> 77-token ids, weights and per-step embeddings (A1111 first-chunk semantics)."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_vocab import MERGES, tiny_clip_vocab

from pi_axera_sd_service.pipeline.conditioning import (
    TextConditioner,
    apply_emphasis,
    tokenize_weighted,
)
from pi_axera_sd_service.pipeline.prompt_parser import parse_prompt_attention
from pi_axera_sd_service.pipeline.tokenizer import ClipTokenizer

HIDDEN = 768


def make_tokenizer(pad_token: str | None = None) -> ClipTokenizer:
    return ClipTokenizer(tiny_clip_vocab(), MERGES, pad_token=pad_token)


class TableEncoder:
    """Fake text encoder: a fixed random row per token id plus a row per position."""

    def __init__(self, vocab_size: int):
        rng = np.random.default_rng(0)
        self.table = rng.normal(0.5, 1.0, size=(vocab_size, HIDDEN)).astype(np.float32)
        self.positions = rng.normal(0.0, 0.1, size=(77, HIDDEN)).astype(np.float32)
        self.calls: list[np.ndarray] = []

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        assert ids.shape == (1, 77) and ids.dtype == np.int64
        self.calls.append(ids.copy())
        return (self.table[ids[0]] + self.positions)[None]


@pytest.fixture()
def tokenizer() -> ClipTokenizer:
    return make_tokenizer()


@pytest.fixture()
def conditioner(tokenizer: ClipTokenizer) -> TextConditioner:
    return TextConditioner(tokenizer, TableEncoder(tokenizer.vocab_size))


# --- tokenize_weighted ----------------------------------------------------------------------


def test_one_chunk_is_bos_tokens_eos_padding(tokenizer):
    ids, weights, warnings = tokenize_weighted(tokenizer, [("a cat", 1.0)])
    assert ids.shape == (77,) and weights.shape == (77,) and warnings == []
    assert list(ids[:3]) == [tokenizer.bos_id, *tokenizer.encode("a cat")]
    assert set(ids[3:]) == {tokenizer.eos_id}
    assert np.all(weights == 1.0)


def test_each_token_carries_its_piece_weight(tokenizer):
    ids, weights, _ = tokenize_weighted(tokenizer, parse_prompt_attention("a (cat dog:1.5) [x]"))
    n_a, n_cd, n_x = (len(tokenizer.encode(t)) for t in ("a", "cat dog", "x"))
    assert list(ids[1:1 + n_a + n_cd + n_x]) == tokenizer.encode("a cat dog x")
    assert weights[0] == 1.0 and weights[1] == 1.0
    assert np.allclose(weights[2:2 + n_cd], 1.5)
    assert np.isclose(weights[2 + n_cd], 1 / 1.1)
    assert np.all(weights[3 + n_cd:] == 1.0)  # EOS and padding


def test_prompt_over_75_tokens_keeps_the_first_75_and_names_the_dropped_text(tokenizer):
    words = [f"w{i}" for i in range(40)]  # "w12" -> w, 1, 2: at least two tokens a word
    prompt = " ".join(words)
    all_ids = tokenizer.encode(prompt)
    assert len(all_ids) > 75
    ids, _, warnings = tokenize_weighted(tokenizer, [(prompt, 1.0)])
    assert list(ids[1:76]) == all_ids[:75]
    assert ids[76] == tokenizer.eos_id
    assert len(warnings) == 1
    dropped = len(all_ids) - 75
    assert f"{dropped} tokens dropped" in warnings[0]
    assert tokenizer.decode(all_ids[75:]) in warnings[0]
    assert "w39" in tokenizer.decode(all_ids[75:]).replace(" ", "")


def _a_comma_b(a_count: int, b_count: int) -> str:
    """`a_count` one-token words, a comma (token index `a_count`), `b_count` one-token words."""
    return " ".join(["a"] * a_count) + ", " + " ".join(["b"] * b_count)


@pytest.mark.parametrize("comma_at", [55, 60, 74])
def test_long_prompt_ends_at_a_comma_among_the_last_20_tokens_as_a1111(tokenizer, comma_at):
    vocab = tiny_clip_vocab()
    b_count = 80 - comma_at
    ids, weights, warnings = tokenize_weighted(tokenizer, [(_a_comma_b(comma_at, b_count), 1.0)])
    kept = [vocab["a</w>"]] * comma_at + [vocab[",</w>"]]
    assert list(ids[1:1 + len(kept)]) == kept
    assert set(ids[1 + len(kept):]) == {tokenizer.eos_id}  # the chunk is padded after the comma
    assert np.all(weights == 1.0)
    assert len(warnings) == 1 and "comma" in warnings[0]
    assert f"{b_count} tokens dropped: {' '.join(['b'] * b_count)!r}" in warnings[0]


@pytest.mark.parametrize(("comma_at", "first_dropped"), [(54, "b"), (75, ",")])
def test_long_prompt_is_cut_at_75_tokens_when_no_comma_is_close(tokenizer, comma_at, first_dropped):
    """A comma 21 tokens back is too far; a comma as token 76 is itself cut off (A1111 does both)."""
    vocab = tiny_clip_vocab()
    prompt = _a_comma_b(comma_at, 30)
    ids, _, warnings = tokenize_weighted(tokenizer, [(prompt, 1.0)])
    all_ids = tokenizer.encode(prompt)
    assert list(ids[1:76]) == all_ids[:75] and ids[76] == tokenizer.eos_id
    assert all_ids[75] == vocab[f"{first_dropped}</w>"]
    assert len(warnings) == 1 and "comma" not in warnings[0]
    assert f"{len(all_ids) - 75} tokens dropped" in warnings[0]


def test_comma_cut_drops_the_weights_of_the_moved_tokens(tokenizer):
    parsed = parse_prompt_attention(" ".join(["a"] * 60) + ", (b b b b b b b b b b b b b b b b:1.3)")
    ids, weights, _ = tokenize_weighted(tokenizer, parsed)
    assert ids[62] == tokenizer.eos_id and np.all(weights == 1.0)


def test_break_pads_the_chunk_and_text_after_it_is_dropped_with_a_warning(tokenizer):
    ids, weights, warnings = tokenize_weighted(tokenizer, parse_prompt_attention("a cat BREAK dog"))
    plain_ids, _, _ = tokenize_weighted(tokenizer, [("a cat", 1.0)])
    assert np.array_equal(ids, plain_ids)
    assert np.all(weights == 1.0)
    assert len(warnings) == 1 and "BREAK" in warnings[0] and "'dog'" in warnings[0]


def test_trailing_break_changes_nothing(tokenizer):
    ids, _, warnings = tokenize_weighted(tokenizer, parse_prompt_attention("a cat BREAK"))
    assert np.array_equal(ids, tokenize_weighted(tokenizer, [("a cat", 1.0)])[0])
    assert warnings == []


def test_separate_pad_token_follows_the_first_eos():
    tokenizer = make_tokenizer(pad_token="!")
    ids, _, _ = tokenize_weighted(tokenizer, [("cat", 1.0)])
    assert list(ids[:3]) == [tokenizer.bos_id, *tokenizer.encode("cat"), tokenizer.eos_id]
    assert set(ids[3:]) == {tokenizer.pad_id}


# --- apply_emphasis -------------------------------------------------------------------------


def hidden_states(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.3, 1.0, size=(1, 77, HIDDEN)).astype(np.float32)


def test_original_weights_tokens_then_restores_the_mean():
    z = hidden_states()
    weights = np.ones(77, dtype=np.float32)
    weights[5] = 1.5
    out = apply_emphasis(z, weights, "Original")
    assert out.dtype == np.float32 and out.shape == z.shape
    assert abs(float(out.astype(np.float64).mean()) - float(z.astype(np.float64).mean())) < 1e-6
    ratio = out / z
    others = np.delete(ratio[0], 5, axis=0)
    assert np.allclose(others, others.flat[0], rtol=1e-4)  # one common rescale factor
    assert np.allclose(ratio[0, 5], 1.5 * others.flat[0], rtol=1e-4)


def test_no_norm_multiplies_only_and_ignore_changes_nothing():
    z = hidden_states()
    weights = np.ones(77, dtype=np.float32)
    weights[2] = 0.5
    no_norm = apply_emphasis(z, weights, "No norm")
    assert np.allclose(no_norm[0, 2], z[0, 2] * 0.5)
    assert np.array_equal(np.delete(no_norm[0], 2, axis=0), np.delete(z[0], 2, axis=0))
    assert np.array_equal(apply_emphasis(z, weights, "Ignore"), z)


# --- TextConditioner ------------------------------------------------------------------------


def test_weight_reaches_exactly_the_weighted_tokens(conditioner, tokenizer):
    weighted = conditioner.embedding("a (cat:1.5) photo")
    plain = conditioner.embedding("a cat photo")
    ratio = weighted[0] / plain[0]
    cat_positions = [2]  # BOS, "a", "cat"
    assert tokenizer.encode("cat") == [int(conditioner.tokenize("a cat photo")[0][2])]
    others = np.delete(ratio, cat_positions, axis=0)
    assert np.allclose(others, others.flat[0], rtol=1e-4)
    assert not np.allclose(ratio[2], others.flat[0], rtol=1e-2)
    assert np.allclose(ratio[2] / others.flat[0], 1.5, rtol=1e-4)
    assert abs(float(weighted.mean(dtype=np.float64)) - float(plain.mean(dtype=np.float64))) < 1e-6


def test_emphasis_ignore_strips_brackets_but_not_weights(tokenizer):
    conditioner = TextConditioner(tokenizer, TableEncoder(tokenizer.vocab_size), emphasis="Ignore")
    assert np.array_equal(conditioner.embedding("(cat:1.5)"), conditioner.embedding("cat"))


def test_emphasis_none_takes_the_text_literally(tokenizer):
    conditioner = TextConditioner(tokenizer, TableEncoder(tokenizer.vocab_size), emphasis="None")
    ids, weights, _ = conditioner.tokenize("(cat:1.5)")
    assert list(ids[1:1 + len(tokenizer.encode("(cat:1.5)"))]) == tokenizer.encode("(cat:1.5)")
    assert np.all(weights == 1.0)


def test_each_distinct_text_is_encoded_once_across_steps(tokenizer):
    encoder = TableEncoder(tokenizer.vocab_size)
    conditioner = TextConditioner(tokenizer, encoder)
    plan = conditioner.plan("a [dog:cat:0.5] photo", "blurry", steps=4)
    assert plan.conds == [[(2, "a dog photo", 1.0), (4, "a cat photo", 1.0)]]
    assert plan.uncond == [(4, "blurry")]
    per_step = [conditioner.conds_at(plan, step) for step in range(1, 5)]
    assert conditioner.encoder_calls == 3 == len(encoder.calls)
    dog, cat = conditioner.embedding("a dog photo"), conditioner.embedding("a cat photo")
    for step, (conds, uncond) in enumerate(per_step, start=1):
        assert len(conds) == 1 and conds[0][1] == 1.0
        assert conds[0][0] is (dog if step <= 2 else cat)
        assert uncond is conditioner.embedding("blurry")
    assert conditioner.encoder_calls == 3
    with pytest.raises(ValueError, match="1-based"):
        conditioner.conds_at(plan, 0)


def test_alternation_changes_the_embedding_every_step(conditioner):
    plan = conditioner.plan("[cat|dog] photo", "", steps=4)
    cat, dog = conditioner.embedding("cat photo"), conditioner.embedding("dog photo")
    per_step = [conditioner.conds_at(plan, step)[0][0][0] for step in range(1, 5)]
    assert [e is cat for e in per_step] == [True, False, True, False]
    assert [e is dog for e in per_step] == [False, True, False, True]


def test_and_subprompts_with_weights_and_limit(conditioner):
    plan = conditioner.plan("a cat AND a dog:0.5 AND sky:0.2 AND sea", "", steps=2, max_and_prompts=3)
    assert [[(end, text.strip(), w) for end, text, w in cond] for cond in plan.conds] == [
        [(2, "a cat", 1.0)], [(2, "a dog", 0.5)], [(2, "sky", 0.2)]
    ]
    assert any("4 sub-prompts" in w and "first 3" in w for w in plan.warnings)
    conds, _ = conditioner.conds_at(plan, 1)
    assert [weight for _, weight in conds] == [1.0, 0.5, 0.2]


def test_without_guidance_only_the_first_subprompt_and_no_uncond(tokenizer):
    encoder = TableEncoder(tokenizer.vocab_size)
    conditioner = TextConditioner(tokenizer, encoder)
    plan = conditioner.plan("a cat AND a dog", "blurry", steps=1, guidance=False)
    assert len(plan.conds) == 1 and any("guidance" in w for w in plan.warnings)
    conds, uncond = conditioner.conds_at(plan, 1)
    assert uncond is None and len(conds) == 1 and len(encoder.calls) == 1


def test_extra_network_tags_are_removed_with_a_warning(conditioner):
    plan = conditioner.plan("a cat <lora:style:0.7>, <lora:b>", "", steps=1)
    assert plan.extra_networks == {"lora": [["style", "0.7"], ["b"]]}
    assert plan.conds[0][0][1] == "a cat ,"  # tags gone; AND split strips trailing space
    assert len(plan.warnings) == 1
    assert "<lora:style:0.7>" in plan.warnings[0] and "compiled into the NPU" in plan.warnings[0]


def test_truncation_warnings_are_collected_once_and_name_the_negative_prompt(conditioner):
    long_text = " ".join(f"w{i}" for i in range(40))
    plan = conditioner.plan(f"[{long_text}:{long_text} x:1]", long_text, steps=2)
    assert len([w for w in plan.warnings if w.startswith("Prompt longer")]) == 2  # two distinct texts
    assert not any(w.startswith("Negative prompt") for w in plan.warnings)  # same text as step 1
    plan = conditioner.plan("cat", long_text + " y", steps=1)
    assert [w for w in plan.warnings if w.startswith("Negative prompt longer")]
    assert len(plan.warnings) == len(set(plan.warnings))


def test_text_encoder_object_with_encode_method_and_shape_check(tokenizer):
    class Stage:
        def encode(self, ids: np.ndarray) -> np.ndarray:
            return np.zeros((1, 76, HIDDEN), dtype=np.float32)

    with pytest.raises(ValueError, match="shape"):
        TextConditioner(tokenizer, Stage()).embedding("cat")


@pytest.mark.parametrize("guidance", [True, False])
def test_a_max_and_prompts_below_one_still_keeps_the_first_subprompt(tokenizer, guidance):
    conditioner = TextConditioner(tokenizer, TableEncoder(tokenizer.vocab_size))
    plan = conditioner.plan("a cat AND a dog", "", steps=1, max_and_prompts=0, guidance=guidance)
    conds, _ = conditioner.conds_at(plan, 1)
    assert len(conds) == 1
