"""A1111 prompt syntax: emphasis, schedules for editing/alternation, AND, extra-network tags."""

from __future__ import annotations

import pytest

from pi_axera_sd_service.pipeline.prompt_parser import (
    MAX_PROMPT_NESTING,
    PromptError,
    check_prompt_text,
    extract_extra_networks,
    get_learned_conditioning_prompt_schedules,
    parse_prompt_attention,
    prompt_schedule,
    split_and_prompts,
)

# --- emphasis: the doctest vectors of A1111 parse_prompt_attention ---------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
             ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
        ),
    ],
)
def test_a1111_doctest_vectors(text, expected):
    assert parse_prompt_attention(text) == expected


def test_square_brackets_divide_and_nesting_multiplies():
    assert parse_prompt_attention("[x]") == [("x", 1 / 1.1)]
    assert parse_prompt_attention("[[x]]") == [("x", 1 / 1.1 / 1.1)]
    assert parse_prompt_attention("((x))") == [("x", 1.1 * 1.1)]


def test_explicit_weight_replaces_the_bracket_factor_and_allows_spaces():
    assert parse_prompt_attention("(x:1.5)") == [("x", 1.5)]
    assert parse_prompt_attention("(x: 1.5 )") == [("x", 1.5)]
    assert parse_prompt_attention("a (x:-1)") == [("a ", 1.0), ("x", -1.0)]


def test_unmatched_closers_and_stray_colons_are_text():
    assert parse_prompt_attention("a) b] c:d") == [("a) b] c:d", 1.0)]
    assert parse_prompt_attention("x:1.2)") == [("x:1.2)", 1.0)]


def test_escapes():
    assert parse_prompt_attention("\\\\") == [("\\", 1.0)]
    assert parse_prompt_attention("(a\\)b)") == [("a)b", 1.1)]
    assert parse_prompt_attention("\\[x\\]") == [("[x]", 1.0)]


def test_unclosed_square_bracket_applies_to_the_end():
    assert parse_prompt_attention("a [b c") == [("a ", 1.0), ("b c", 1 / 1.1)]


def test_break_marker_splits_text_and_eats_surrounding_spaces():
    assert parse_prompt_attention("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1), ("a dog", 1.0)]
    # BREAK must be a whole word
    assert parse_prompt_attention("BREAKFAST") == [("BREAKFAST", 1.0)]
    # inside brackets the marker's weight is scaled too, so (as in A1111) it no longer acts as BREAK
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]


def test_empty_prompt_is_one_empty_piece():
    assert parse_prompt_attention("") == [("", 1.0)]
    assert parse_prompt_attention("()") == [("", 1.0)]


# --- editing and alternation ----------------------------------------------------------------


def g(prompt: str, steps: int = 10) -> list[tuple[int, str]]:
    return get_learned_conditioning_prompt_schedules([prompt], steps)[0]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("test", [(10, "test")]),
        ("a [b:3]", [(3, "a "), (10, "a b")]),
        ("a [b: 3]", [(3, "a "), (10, "a b")]),
        ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
        ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
        ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
        ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
        ("a [unbalanced", [(10, "a [unbalanced")]),
        ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
        ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
        ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    ],
)
def test_a1111_schedule_doctests(prompt, expected):
    assert g(prompt) == expected


def test_doctest_marked_not_handled_is_literal_as_in_a1111():
    # A1111 lists [[5,'a  c'],[10,'a {b|d{ c']] "not handling this right now"; its parser in fact
    # rejects the bare "|" and falls back to the literal prompt, which is what we do.
    assert g("a [{b|d{:.5] c") == [(10, "a [{b|d{:.5] c")]


def test_editing_with_four_steps():
    assert g("a [dog:cat:0.5] photo", 4) == [(2, "a dog photo"), (4, "a cat photo")]
    assert g("a [dog:cat:2] photo", 4) == [(2, "a dog photo"), (4, "a cat photo")]
    assert g("a [dog:cat:0.3] photo", 4) == [(1, "a dog photo"), (4, "a cat photo")]
    assert g("a [dog:cat:0.1] photo", 4) == [(4, "a cat photo")]  # switch before step 1
    assert g("a [dog:cat:9] photo", 4) == [(4, "a dog photo")]  # never switches


def test_add_and_remove_forms():
    assert g("a [red:2] car", 4) == [(2, "a  car"), (4, "a red car")]
    assert g("a [red::2] car", 4) == [(2, "a red car"), (4, "a  car")]


def test_alternation_cycles_every_step():
    assert g("[cat|dog] photo", 4) == [(1, "cat photo"), (2, "dog photo"), (3, "cat photo"), (4, "dog photo")]
    assert g("[a|b|c]", 4) == [(1, "a"), (2, "b"), (3, "c"), (4, "a")]
    assert g("[fe|]male", 4) == [(1, "female"), (2, "male"), (3, "female"), (4, "male")]


def test_alternation_keeps_emphasis_syntax_for_the_emphasis_parser():
    assert g("[a|(b:1.1)]", 2) == [(1, "a"), (2, "(b:1.1)")]


def test_nested_alternation_inside_editing():
    assert g("[x:[a|b]:2]", 4) == [(1, "x"), (2, "x"), (3, "a"), (4, "b")]


def test_bare_pipe_or_trailing_backslash_falls_back_to_literal():
    assert g("a | b", 4) == [(4, "a | b")]
    assert g("[a:b:1]\\", 4) == [(4, "[a:b:1]\\")]


def test_emphasis_and_escapes_pass_through_unchanged():
    assert prompt_schedule("(a:1.2) \\[b\\] [c]", 4) == [(4, "(a:1.2) \\[b\\] [c]")]


def test_schedules_for_several_prompts_keep_order():
    assert get_learned_conditioning_prompt_schedules(["x", "[y:z:1]", "x"], 2) == [
        [(2, "x")], [(1, "y"), (2, "z")], [(2, "x")]
    ]


# --- AND and extra networks -----------------------------------------------------------------


def test_and_splits_with_weights():
    assert split_and_prompts("a cat AND a dog:0.5") == [("a cat", 1.0), (" a dog", 0.5)]
    assert split_and_prompts("x AND y : -1.25 ") == [("x", 1.0), (" y", -1.25)]
    assert split_and_prompts("a cat and a dog") == [("a cat and a dog", 1.0)]  # lowercase is text
    assert split_and_prompts("ANDROID") == [("ANDROID", 1.0)]


def test_weight_only_at_the_end_of_a_subprompt():
    assert split_and_prompts("(a:1.2) b") == [("(a:1.2) b", 1.0)]
    assert split_and_prompts("a:2") == [("a", 2.0)]


def test_extra_network_tags_are_removed_and_collected():
    text, networks = extract_extra_networks("a cat <lora:styleA:0.7>, <lora:b> <hypernet:h:1:te=2>")
    assert text == "a cat ,  "
    assert networks == {"lora": [["styleA", "0.7"], ["b"]], "hypernet": [["h", "1", "te=2"]]}


def test_text_without_tags_is_unchanged():
    assert extract_extra_networks("a <b> c") == ("a <b> c", {})


@pytest.mark.parametrize(
    ("prompt", "by_steps"),
    [
        # A1111: int(when * steps) for a decimal `when`, min(steps, when) otherwise; `step <= when` = before
        ("[a:b:0.5]", {1: [(1, "b")], 2: [(1, "a"), (2, "b")], 3: [(1, "a"), (3, "b")],
                       4: [(2, "a"), (4, "b")]}),
        ("[a:b:2]", {1: [(1, "a")], 2: [(2, "a")], 3: [(2, "a"), (3, "b")], 4: [(2, "a"), (4, "b")]}),
        ("[a:b:0.25]", {1: [(1, "b")], 2: [(2, "b")], 3: [(3, "b")], 4: [(1, "a"), (4, "b")]}),
        ("[a|b]", {1: [(1, "a")], 2: [(1, "a"), (2, "b")], 3: [(1, "a"), (2, "b"), (3, "a")],
                   4: [(1, "a"), (2, "b"), (3, "a"), (4, "b")]}),
    ],
)
def test_editing_schedules_for_one_to_four_steps(prompt, by_steps):
    for steps, expected in by_steps.items():
        assert get_learned_conditioning_prompt_schedules([prompt], steps)[0] == expected, steps


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("[a:b:1e999]", [(4, "a")]),               # inf switch step: "a" to the end, no OverflowError
        ("[a:b:" + "9" * 400 + "]", [(4, "a")]),   # 400 digits: the same
        ("[a:b:-1e999]", [(4, "b")]),              # -inf: "b" from the start
        ("[a:b:" + "9" * 400 + ".5]", [(4, "a")]),
    ],
)
def test_switch_steps_beyond_float_range_are_clamped(prompt, expected):
    assert prompt_schedule(prompt, 4) == expected


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        ("(" * (MAX_PROMPT_NESTING + 1) + "x", "prompt", f"nested {MAX_PROMPT_NESTING + 1} deep"),
        ("[" * 500 + "x" + "]" * 500, "negative_prompt", "nested 500 deep"),
        ("ok \ud800", "prompt", "lone surrogate U+D800 at character 3"),
        ("\udc80tail", "negative_prompt", "U+DC80"),
    ],
)
def test_the_gate_refuses_deep_nesting_and_lone_surrogates_naming_the_field(text, field, fragment):
    with pytest.raises(PromptError) as caught:
        check_prompt_text(text, field)
    assert caught.value.field == field and fragment in str(caught.value)
    with pytest.raises(PromptError):
        prompt_schedule(text, 4, field)


@pytest.mark.parametrize("text", ["\\(" * 500 + "x", "(" * MAX_PROMPT_NESTING + "x", "a" + ")" * 500 + "(b)",
                                  "emoji 🦊 and é", "[a:b:0.5]" * 200])
def test_the_gate_lets_escaped_shallow_and_unicode_prompts_through(text):
    check_prompt_text(text)
    assert prompt_schedule(text, 4)[-1][0] == 4
