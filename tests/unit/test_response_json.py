from __future__ import annotations

import pytest

from cloudllm_serve.ingress.response_json import extract_json


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ("  [1, 2]\n", [1, 2]),
        ('Here you go:\n```json\n{"name": "Alice"}\n```\nDone.', {"name": "Alice"}),
        ('```\n{"x": [1]}\n```', {"x": [1]}),
        ('```json\nnot json\n```\n```json\n{"second": true}\n```', {"second": True}),
        ("42", None),
        ('"just a string"', None),
        ("The capital of France is Paris.", None),
        ('{"unterminated": ', None),
        ("", None),
    ],
)
def test_extract_json(text: str, expected: object) -> None:
    assert extract_json(text) == expected
