"""What the ingress takes in a client's JSON, beyond what each field's schema says.

Python's ``json`` parses any nesting its stack allows, integers of any size and strings
with lone surrogates (an escape of half a UTF-16 pair). Each of those breaks something
later: code that walks the value recursively (``RecursionError``), Redis and the response
encoder (lone surrogates are not UTF-8), vLLM's 64-bit MessagePack transport (huge
integers). So every JSON value a client sends is held here to :data:`MAX_JSON_DEPTH`
levels of nesting, 64-bit (signed) integers, and strings (keys too) that are valid
Unicode. The check is iterative: a value nested too deeply to walk recursively is still
refused cleanly.
"""

from __future__ import annotations

import json
from typing import Any

from cloudllm_serve.errors import InvalidRequestError

#: Most levels of nesting of objects and arrays (a tool's JSON Schema needs a few dozen).
MAX_JSON_DEPTH = 100
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


class JSONLimitError(ValueError):
    """A JSON value outside the limits.

    ``path`` is where (object keys and list indexes); ``problem`` says what, as a predicate
    ("is nested deeper than ...") to follow the value's name.
    """

    def __init__(self, path: tuple[str | int, ...], problem: str) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem

    def param(self, prefix: str = "") -> str:
        """The dotted path of the offending value, under ``prefix`` (``body`` at the root)."""
        parts = [prefix] if prefix else []
        parts.extend(str(part) for part in self.path)
        return ".".join(parts) or "body"

    def request_error(self, prefix: str = "") -> InvalidRequestError:
        """The 400 for this value: its path (under ``prefix``) and the problem."""
        param = self.param(prefix)
        return InvalidRequestError(f"{param} {self.problem}", param=param)


def is_valid_unicode(text: str) -> bool:
    """Whether ``text`` can be encoded as UTF-8 (no lone surrogates)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_json_limits(value: Any) -> None:
    """Raise :class:`JSONLimitError` at the first place ``value`` breaks the limits."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict):
            if len(path) >= MAX_JSON_DEPTH:
                raise JSONLimitError(path, f"is nested deeper than {MAX_JSON_DEPTH} levels")
            for key, child in item.items():
                if isinstance(key, str) and not is_valid_unicode(key):
                    raise JSONLimitError(path, "has a key that is not valid Unicode")
                stack.append((child, (*path, key)))
        elif isinstance(item, list):
            if len(path) >= MAX_JSON_DEPTH:
                raise JSONLimitError(path, f"is nested deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((child, (*path, index)) for index, child in enumerate(item))
        elif isinstance(item, str) and not is_valid_unicode(item):
            raise JSONLimitError(path, "is not valid Unicode (a lone surrogate)")
        elif isinstance(item, int) and not INT64_MIN <= item <= INT64_MAX:
            raise JSONLimitError(
                path, "is an integer out of range (64-bit signed: -2**63 to 2**63-1)"
            )


def loads_checked(raw: bytes | str) -> Any:
    """``json.loads`` held to the limits; every failure is a :class:`ValueError`.

    A document nested too deeply for the parser's own recursion is refused as well.
    """
    try:
        value = json.loads(raw)
    except RecursionError:
        raise JSONLimitError((), f"is nested deeper than {MAX_JSON_DEPTH} levels") from None
    check_json_limits(value)
    return value
