"""A1111 prompt syntax: emphasis, editing/alternation schedules, AND, extra-network tags.

Behaviour follows AUTOMATIC1111 `modules/prompt_parser.py` and `modules/extra_networks.py`; the
schedule grammar is a small recursive-descent parser instead of A1111's lark grammar:

    start:     (prompt | stray "[" "]" "(" ")" ":")*
    prompt:    (emphasized | scheduled | alternate | plain | whitespace)*
    emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
    scheduled: "[" [prompt ":"] prompt ":" ws? NUMBER ws? "]"
    alternate: "[" prompt ("|" prompt?)+ "]"
    plain:     ([^\\[]():|] | "\\" any-but-newline)+

`check_prompt_text` is the gate every prompt passes before parsing and tokenizing: valid Unicode,
brackets nested at most MAX_PROMPT_NESTING deep (the schedule parser recurses per level).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

# --- the gate: Unicode and nesting depth ----------------------------------------------------

MAX_PROMPT_NESTING = 100  # "(" / "[" levels; ≈3 parser frames each, far below the recursion limit
_RE_BRACKET = re.compile(r"\\.|[()\[\]]", re.S)
_RE_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


class PromptError(ValueError):
    """A prompt the pipeline refuses (a client error); `field` names the prompt it came from."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def nesting_depth(text: str) -> int:
    """Deepest level of unescaped "(" / "[" (a closer never takes the level below zero)."""
    depth = deepest = 0
    for match in _RE_BRACKET.finditer(text):
        token = match.group(0)
        if token in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif token in ")]":
            depth = max(depth - 1, 0)
    return deepest


def check_prompt_text(text: str, field: str = "prompt") -> None:
    """PromptError naming `field` unless `text` is valid Unicode and nested at most MAX_PROMPT_NESTING."""
    bad = _RE_LONE_SURROGATE.search(text)
    if bad is not None:
        raise PromptError(field, f"not valid Unicode: lone surrogate U+{ord(bad.group()):04X} at character "
                                 f"{bad.start()}")
    depth = nesting_depth(text)
    if depth > MAX_PROMPT_NESTING:
        raise PromptError(field, f"brackets nested {depth} deep; the limit is {MAX_PROMPT_NESTING}")


# --- emphasis: parse_prompt_attention ------------------------------------------------------

# Newer A1111 variant: whitespace allowed around an explicit weight, e.g. "(word: 1.2 )".
RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1
BREAK_MARKER = ("BREAK", -1.0)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split `text` into (piece, weight) runs; ("BREAK", -1.0) marks a BREAK keyword.

    `(x)` multiplies by 1.1, `[x]` by 1/1.1, `(x:w)` by w; `\\(` etc. are literal; unbalanced
    openers apply to the end of the text; adjacent runs with equal weight are merged.
    """
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for position in range(start, len(res)):
            res[position][1] *= multiplier

    for match in RE_ATTENTION.finditer(text):
        item, weight = match.group(0), match.group(1)
        if item.startswith("\\"):
            res.append([item[1:], 1.0])
        elif item == "(":
            round_brackets.append(len(res))
        elif item == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), _to_float(weight))
        elif item == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_BRACKET_MULTIPLIER)
        elif item == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            for index, part in enumerate(RE_BREAK.split(item)):
                if index > 0:
                    res.append(list(BREAK_MARKER))
                res.append([part, 1.0])

    for start in round_brackets:
        multiply_range(start, ROUND_BRACKET_MULTIPLIER)
    for start in square_brackets:
        multiply_range(start, SQUARE_BRACKET_MULTIPLIER)

    if not res:
        res = [["", 1.0]]
    merged: list[list] = [res[0]]
    for piece in res[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(piece, weight) for piece, weight in merged]


def _to_float(number: str) -> float:
    """float() of the weight regex's match; "1.2.3"-like garbage counts as 1.0 instead of raising."""
    try:
        return float(number)
    except ValueError:
        return 1.0


# --- AND and extra networks ----------------------------------------------------------------

RE_AND = re.compile(r"\bAND\b")
RE_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")


def split_and_prompts(prompt: str) -> list[tuple[str, float]]:
    """Sub-prompts joined with `AND`, each with its trailing `:weight` (default 1.0)."""
    result = []
    for subprompt in RE_AND.split(prompt):
        match = RE_WEIGHT.search(subprompt)
        if match is None:
            result.append((subprompt, 1.0))
            continue
        text, weight = match.groups()
        result.append((text, float(weight) if weight is not None else 1.0))
    return result


def extract_extra_networks(prompt: str) -> tuple[str, dict[str, list[list[str]]]]:
    """Remove `<name:arg1:arg2>` tags; return the prompt without them and {name: [args, ...]}."""
    found: dict[str, list[list[str]]] = defaultdict(list)

    def remove(match: re.Match) -> str:
        found[match.group(1)].append(match.group(2).split(":"))
        return ""

    return RE_EXTRA_NET.sub(remove, prompt), dict(found)


# --- prompt editing and alternation: schedules ---------------------------------------------

RE_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
RE_WHEN = re.compile(
    r"\s*([+-]?(?:\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+))\s*\]"
)
STRAY = "[]():"


class PromptSyntaxError(ValueError):
    """The prompt does not match the editing grammar (it is then taken literally)."""


@dataclass
class _Scheduled:
    before: list
    after: list
    when_text: str
    when: int = 0  # resolved step, set by _resolve_steps


@dataclass
class _Alternate:
    options: list[list]


# A node list holds str (literal text) and _Scheduled / _Alternate nodes.


class _ScheduleParser:
    """Recursive-descent parser of the editing grammar into node lists."""

    def __init__(self, text: str):
        self.text = text

    def parse(self) -> list:
        nodes: list = []
        position = 0
        while position < len(self.text):
            parsed = self._prompt(position)
            if parsed is not None and parsed[1] > position:
                nodes.extend(parsed[0])
                position = parsed[1]
            elif self.text[position] in STRAY:
                nodes.append(self.text[position])
                position += 1
            else:
                raise PromptSyntaxError(f"unexpected {self.text[position]!r} at {position}")
        return nodes

    def _prompt(self, position: int) -> tuple[list, int]:
        """Longest run of plain text and complete bracket constructs starting at `position`."""
        nodes: list = []
        while position < len(self.text):
            plain = RE_PLAIN.match(self.text, position)
            if plain:
                nodes.append(plain.group(0))
                position = plain.end()
                continue
            if self.text[position] in "([":
                construct = self._construct(position)
                if construct is not None:
                    node, position = construct
                    if isinstance(node, list):
                        nodes.extend(node)
                    else:
                        nodes.append(node)
                    continue
            break
        return nodes, position

    def _construct(self, position: int) -> tuple[list | _Scheduled | _Alternate, int] | None:
        opener = self.text[position]
        first, position = self._prompt(position + 1)
        following = self._peek(position)
        if opener == "(":
            if following == ")":
                return ["(", *first, ")"], position + 1
            if following == ":":
                second, position = self._prompt(position + 1)
                if self._peek(position) == ")":
                    return ["(", *first, ":", *second, ")"], position + 1
            return None
        if following == "]":
            return ["[", *first, "]"], position + 1
        if following == "|":
            return self._alternate(first, position)
        if following == ":":
            return self._scheduled(first, position + 1)
        return None

    def _alternate(self, first: list, position: int) -> tuple[_Alternate, int] | None:
        options = [first]
        while self._peek(position) == "|":
            option, position = self._prompt(position + 1)
            options.append(option)
        if self._peek(position) != "]":
            return None
        return _Alternate(options), position + 1

    def _scheduled(self, first: list, position: int) -> tuple[_Scheduled, int] | None:
        when = RE_WHEN.match(self.text, position)
        if when:  # [to:when]
            return _Scheduled([], first, when.group(1)), when.end()
        second, position = self._prompt(position)
        if self._peek(position) != ":":
            return None
        when = RE_WHEN.match(self.text, position + 1)
        if when is None:  # [from:to:when]
            return None
        return _Scheduled(first, second, when.group(1)), when.end()

    def _peek(self, position: int) -> str:
        return self.text[position] if position < len(self.text) else ""


def _walk(nodes: list):
    """Every _Scheduled / _Alternate node, nested ones included."""
    for node in nodes:
        if isinstance(node, _Scheduled):
            yield node
            yield from _walk(node.before)
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            yield node
            for option in node.options:
                yield from _walk(option)


def _resolve_steps(nodes: list, steps: int) -> list[int]:
    """Fix every edit's switch step and return the sorted steps at which the text may change.

    A `when` written with a decimal point is a fraction of `steps`, without one a step number
    (A1111 >= 1.6 rule: `[a:b:0.5]` and `[a:b:2]` are the same with 4 steps).
    """
    change_steps = {steps}
    for node in _walk(nodes):
        if isinstance(node, _Alternate):
            change_steps.update(range(1, steps + 1))
            continue
        value = float(node.when_text)  # "1e999" or 400 digits is inf: clamp before int()
        if "." in node.when_text:
            value *= steps
        node.when = int(min(max(value, 0.0), steps))
        if node.when >= 1:
            change_steps.add(node.when)
    return sorted(change_steps)


def _text_at(nodes: list, step: int) -> str:
    """The prompt text in effect at `step` (1-based)."""
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            out.append(_text_at(node.before if step <= node.when else node.after, step))
        else:
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, field: str = "prompt") -> list[tuple[int, str]]:
    """[(end_step, text)] for one prompt: `text` is used up to and including step `end_step`.

    PromptError (naming `field`) for a prompt `check_prompt_text` refuses."""
    check_prompt_text(prompt, field)
    try:
        nodes = _ScheduleParser(prompt).parse()
    except PromptSyntaxError:
        return [(steps, prompt)]
    return [(step, _text_at(nodes, step)) for step in _resolve_steps(nodes, steps)]


def get_learned_conditioning_prompt_schedules(prompts: list[str], steps: int) -> list[list[tuple[int, str]]]:
    """A1111's function of the same name (no hires pass): one schedule per prompt."""
    cache = {prompt: prompt_schedule(prompt, steps) for prompt in set(prompts)}
    return [cache[prompt] for prompt in prompts]
