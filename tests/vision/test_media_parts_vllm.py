"""The ingress finds media parts as vLLM's chat renderer does (no stack: vLLM's own parser).

:mod:`cloudllm_serve.ingress.openai_api.media` mirrors vLLM's part dispatch
(``_parse_chat_message_content_mm_part``, private); an upgrade that adds a part kind,
a key or changes their order fails here, before a part can pass the ingress unchecked.
"""

from __future__ import annotations

import itertools
from typing import Any

from cloudllm_serve.ingress.openai_api import media

#: A valid value of each part kind's payload key (typed parts are validated by vLLM).
PAYLOADS: dict[str, Any] = {
    "text": "hi",
    "thinking": "hmm",
    "input_text": "hi",
    "output_text": "hi",
    "refusal": "no",
    "tool_reference": "tool",
    "image_url": {"url": "data:image/png;base64,AA=="},
    "input_image": "data:image/png;base64,AA==",
    "image_pil": None,
    "image_embeds": "AA==",
    "audio_embeds": "AA==",
    "video_embeds": "AA==",
    "prompt_embeds": "AA==",
    "audio_url": {"url": "data:audio/wav;base64,AA=="},
    "input_audio": {"data": "AA==", "format": "wav"},
    "video_url": {"url": "data:video/mp4;base64,AA=="},
}
#: The key a typed part of each kind carries its payload under.
PAYLOAD_KEY = {"input_image": "image_url", "input_text": "text", "output_text": "text"}


def _typed(kind: str) -> dict[str, Any]:
    part = {"type": kind, PAYLOAD_KEY.get(kind, kind): PAYLOADS[kind]}
    return {**part, "detail": "auto"} if kind == "input_image" else part


def _vllm_kind(part: dict[str, Any]) -> str | None:
    from vllm.renderers.chat_utils import MM_PARSER_MAP, _parse_chat_message_content_mm_part

    try:
        kind, _ = _parse_chat_message_content_mm_part(part)  # type: ignore[arg-type]
    except Exception:  # vLLM refuses the part
        return None
    return kind if kind in MM_PARSER_MAP else None  # an unknown type: refused later


def test_part_kinds_match_vllms_tables() -> None:
    from vllm.renderers import chat_utils

    assert media.TEXT_PART_TYPES == chat_utils._TEXT_CONTENT_PART_TYPES
    assert media.IMAGE_PART_TYPES | media.REFUSED_PART_TYPES == chat_utils._MEDIA_CONTENT_PART_KEYS
    assert set(chat_utils.MM_PARSER_MAP) == (
        media.TEXT_PART_TYPES | media.IMAGE_PART_TYPES | media.REFUSED_PART_TYPES
    )


def test_every_part_shape_gets_vllms_kind() -> None:
    keys = media.UNTYPED_PART_KEYS
    parts: list[dict[str, Any]] = [_typed(kind) for kind in PAYLOADS]
    parts += [{"type": "unknown", "image_url": PAYLOADS["image_url"]}, {"type": 7}, {}]
    for first, second in itertools.permutations(keys, 2):  # vLLM's order decides
        untyped = {first: PAYLOADS[first], second: PAYLOADS[second]}
        parts += [untyped, {**_typed("text"), "uuid": "u", **untyped}]
    for key in keys:
        parts += [{key: PAYLOADS[key]}, {**_typed("image_url"), "uuid": "u", key: PAYLOADS[key]}]
    rendered = 0
    for part in parts:
        expected = _vllm_kind(part)
        if expected is not None:  # a part vLLM refuses may be anything to us
            assert media.vllm_part_kind(part) == expected, part
            rendered += 1
    assert rendered > len(parts) // 2
