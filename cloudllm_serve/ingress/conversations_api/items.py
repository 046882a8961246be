"""Items of OpenAI's Conversations and Responses APIs as our stored messages, and back.

One stored conversation serves ``/v1/conversations``, ``/generate``'s ``conversation_id``
and ``/v1/chat/completions``' ``store``. What maps:

* a ``message`` item (``user``, ``assistant``, ``system``, ``developer``; its text parts
  ``input_text``/``output_text``/``text``, or a string) is a message of that role;
* a ``function_call`` item is an assistant message with that one tool call, and a
  ``function_call_output`` item a ``tool`` message answering it.

Other item types (images, reasoning, web search...) cannot be kept in a conversation
yet: 400 naming the item. A stored message read back as an item keeps the id it was
given, or gets one derived from it (:attr:`StoredMessage.item`); a ``/generate`` turn with
images reads back as its text.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from cloudllm_serve.conversations.store import StoredMessage
from cloudllm_serve.errors import InvalidRequestError

#: Message roles an item may have.
ROLES = ("user", "assistant", "system", "developer")
#: Text part types of a message item's content.
TEXT_PARTS = ("input_text", "output_text", "text")


def to_message(item: Any, param: str, now: float | None = None) -> StoredMessage:
    """One item as a stored message (400 naming ``param`` for what does not map)."""
    if not isinstance(item, dict):
        raise InvalidRequestError("an item must be an object", param=param)
    kind = item.get("type", "message")
    stamp = time.time() if now is None else now
    item_id = item.get("id")
    if item_id is not None and not (isinstance(item_id, str) and 0 < len(item_id) <= 128):
        raise InvalidRequestError("an item's id must be a string of 1-128 characters", param=param)
    if kind == "message":
        role = item.get("role")
        if role not in ROLES:
            raise InvalidRequestError(f"role must be one of {', '.join(ROLES)}", param=param)
        return StoredMessage(
            role, _text(item.get("content"), param), stamp, item_id=item_id or _new("msg")
        )
    if kind == "function_call":
        call_id, name = item.get("call_id"), item.get("name")
        arguments = item.get("arguments", "")
        if not all(isinstance(v, str) and v for v in (call_id, name)) or not isinstance(
            arguments, str
        ):
            raise InvalidRequestError(
                "a function_call item needs call_id, name and arguments (strings)", param=param
            )
        call = {
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        return StoredMessage(
            "assistant", "", stamp, tool_calls=[call], item_id=item_id or _new("fc")
        )
    if kind == "function_call_output":
        call_id, output = item.get("call_id"), item.get("output")
        if not (isinstance(call_id, str) and call_id and isinstance(output, str)):
            raise InvalidRequestError(
                "a function_call_output item needs call_id and output (strings)", param=param
            )
        return StoredMessage(
            "tool", output, stamp, tool_call_id=call_id, item_id=item_id or _new("fco")
        )
    raise InvalidRequestError(
        f"items of type {kind!r} cannot be kept in a conversation (message, function_call "
        "and function_call_output can)",
        param=param,
    )


def to_item(message: StoredMessage) -> dict[str, Any]:
    """A stored message as an item (the first of its tool calls, for an assistant's)."""
    if message.role == "tool":
        return {
            "type": "function_call_output",
            "id": message.item,
            "call_id": message.tool_call_id or "",
            "output": message.content,
            "status": "completed",
        }
    if message.tool_calls:
        call = message.tool_calls[0]
        function = call.get("function") or {}
        return {
            "type": "function_call",
            "id": message.item,
            "call_id": call.get("id", ""),
            "name": function.get("name", ""),
            "arguments": function.get("arguments", ""),
            "status": "completed",
        }
    part: dict[str, Any] = {
        "type": "output_text" if message.role == "assistant" else "input_text",
        "text": message.content,
    }
    if message.role == "assistant":
        part["annotations"] = []
    return {
        "type": "message",
        "id": message.item,
        "role": message.role,
        "status": "completed",
        "content": [part],
    }


def _text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") in TEXT_PARTS):
                raise InvalidRequestError(
                    "only text parts (input_text, output_text) can be kept in a conversation",
                    param=f"{param}.content.{index}",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequestError(
                    "a text part needs text", param=f"{param}.content.{index}"
                )
            texts.append(text)
        return "".join(texts)
    raise InvalidRequestError("content must be a string or a list of parts", param=param)


def _new(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"
