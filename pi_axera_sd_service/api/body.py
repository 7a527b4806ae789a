"""The one JSON body parser of the API: syntax, nesting depth, number range and Unicode checked once.

`parse_json_body` runs in the body middleware for every route; `check_json_value` is also what the
protocol models run over their free-form fields (`override_settings`, `script_args`, ...). Every
refusal is a `BodyError` whose message names the JSON path of the offending value.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_JSON_DEPTH = 64          # nested arrays/objects; A1111 clients (ControlNet units) use < 10
MAX_JSON_INT = 2**64         # |int| above this is no seed, size or count: refused, never float()ed
MAX_INT_DIGITS = len(str(MAX_JSON_INT))  # longer literals are not even converted (Python refuses > 4300)
MAX_JSON_VALUES = 100_000    # commas in a body (≈ values); a flat list of millions costs seconds of CPU
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


class BodyError(ValueError):
    """A request body (or a value in it) the service refuses; `path` names where ("" = the body)."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


def parse_json_body(raw: bytes) -> Any:
    """Decode and check a JSON body; BodyError (naming the field) instead of any parser exception."""
    if raw.count(b",") > MAX_JSON_VALUES:
        raise BodyError("", f"the request body holds more than {MAX_JSON_VALUES} values")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError("", f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_int=_read_int)
    except RecursionError:
        raise BodyError("", f"the request body is nested too deeply (limit {MAX_JSON_DEPTH})") from None
    except json.JSONDecodeError as exc:
        raise BodyError("", f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                            f"column {exc.colno}") from None
    check_json_value(value)
    return value


class _LongInt:
    """Stands for an integer literal too long to be any field's value, so the walk can name its field."""

    def __init__(self, digits: int):
        self.digits = digits


def _read_int(literal: str) -> int | _LongInt:
    digits = len(literal.lstrip("-"))
    return int(literal) if digits <= MAX_INT_DIGITS else _LongInt(digits)


def check_json_value(value: Any, path: str = "", depth_left: int = MAX_JSON_DEPTH) -> None:
    """Refuse nesting deeper than `depth_left`, non-finite floats, huge ints and lone surrogates.

    Iterative, so a value built in code (not from JSON) cannot exhaust the stack either."""
    pending: list[tuple[Any, str, int]] = [(value, path, depth_left)]
    while pending:
        item, where, left = pending.pop()
        if isinstance(item, (dict, list, tuple)):
            if left <= 0:
                raise BodyError(where, f"nested more than {MAX_JSON_DEPTH} levels deep")
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_text(key, _join(where, str(key)), is_key=True)
                    pending.append((child, _join(where, str(key)), left - 1))
            else:
                pending.extend((child, f"{where}[{i}]", left - 1) for i, child in enumerate(item))
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, _LongInt):
            raise BodyError(where, f"the number is out of range (|n| <= 2^64, it has {item.digits} digits)")
        elif isinstance(item, int):
            if abs(item) > MAX_JSON_INT:
                raise BodyError(where, f"the number is out of range (|n| <= 2^64, it has {_digits(item)} "
                                       "digits)")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise BodyError(where, "the number is too large for a float or not a number "
                                       "(JSON has no NaN or Infinity)")
        elif isinstance(item, str):
            _check_text(item, where)


def _check_text(text: Any, where: str, is_key: bool = False) -> None:
    if not isinstance(text, str) or text.isascii():  # isascii is O(1): a base64 image is not scanned
        return
    bad = _LONE_SURROGATE.search(text)
    if bad is not None:
        what = "a key" if is_key else "the text"
        raise BodyError(where, f"{what} is not valid Unicode: lone surrogate U+{ord(bad.group()):04X} at "
                               f"character {bad.start()}")


def _join(path: str, key: str) -> str:
    """`a.b`; a key that is not valid Unicode is shown escaped (the path goes into logs and bodies)."""
    key = key.encode("utf-8", "backslashreplace").decode("utf-8")
    return f"{path}.{key}" if path else key


def _digits(number: int) -> str:
    """Digit count without str() (which itself refuses more than 4300 digits)."""
    return f"~{max(1, int(abs(number).bit_length() * 0.30103))}"
