"""Finding JSON in a model's answer, for ``response_json``."""

from __future__ import annotations

import json
import re
from typing import Any

_FENCED = re.compile(r"```(?:json|JSON)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_json(text: str) -> dict[str, Any] | list[Any] | None:
    """Return the JSON object or array the text is, or holds in a fenced block.

    The whole text is tried first, then each fenced block (```json ... ``` or plain
    ``` ... ```) in order. Scalars (a bare number or string) do not count: every
    numeric answer would otherwise be "JSON".
    """
    candidates = [text.strip(), *(m.group(1).strip() for m in _FENCED.finditer(text))]
    for candidate in candidates:
        if not candidate or candidate[0] not in "[{":
            continue
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, (dict, list)):
            return value
    return None
