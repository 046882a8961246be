"""OpenAI's Conversations API (``/v1/conversations``) over the conversation store.

A conversation here is one of ours (:mod:`cloudllm_serve.conversations.store`): the one
``/generate``'s ``conversation_id`` and ``/v1/chat/completions``' ``store`` keep, per
tenant, with the same retention and quotas; another tenant's id is an unknown one (404,
the same body). Items map to messages as :mod:`.items` says.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from cloudllm_serve.conversations.store import Conversation, ConversationStore, StoredMessage
from cloudllm_serve.errors import CloudLLMError, InvalidRequestError
from cloudllm_serve.ingress.conversations_api.items import to_item, to_message
from cloudllm_serve.ingress.dependencies import Admitted, Service
from cloudllm_serve.ingress.item_lists import item_list, item_page
from cloudllm_serve.ingress.openai_api.routes import OPENAI_ERRORS
from cloudllm_serve.ingress.openai_api.serving import BadBody, bad_body_response, read_json_body

router = APIRouter(prefix="/v1")

#: OpenAI's bounds: items given at once, and metadata's keys, key and value lengths.
MAX_ITEMS = 20
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


class ItemNotFoundError(CloudLLMError):
    """No item of the conversation has the id (404)."""

    status_code = 404

    def __init__(self, item_id: str) -> None:
        super().__init__(f"Item with id '{item_id}' not found.", param="item_id")


def conversation_object(conversation: Conversation) -> dict[str, Any]:
    """A conversation as OpenAI's API shows it."""
    return {
        "id": conversation.conversation_id,
        "object": "conversation",
        "created_at": int(conversation.created_at),
        "metadata": conversation.metadata,
    }


def metadata_of(value: Any) -> dict[str, str]:
    """``metadata`` checked as OpenAI bounds it (400 naming it)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_METADATA_KEYS:
        raise InvalidRequestError(
            f"metadata must be an object of at most {MAX_METADATA_KEYS} pairs", param="metadata"
        )
    for key, text in value.items():
        if not (isinstance(text, str) and len(key) <= MAX_METADATA_KEY):
            raise InvalidRequestError(
                f"metadata keys have at most {MAX_METADATA_KEY} characters and values are strings",
                param=f"metadata.{key}",
            )
        if len(text) > MAX_METADATA_VALUE:
            raise InvalidRequestError(
                f"a metadata value has at most {MAX_METADATA_VALUE} characters",
                param=f"metadata.{key}",
            )
    return dict(value)


def messages_of(value: Any, param: str = "items") -> list[StoredMessage]:
    """``items`` as stored messages (400 naming the item that does not map)."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise InvalidRequestError(
            f"{param} must be a list of at most {MAX_ITEMS} items", param=param
        )
    return [to_message(item, f"{param}.{index}") for index, item in enumerate(value)]


async def _body(request: Request) -> dict[str, Any] | JSONResponse:
    try:
        body = await read_json_body(request)
    except BadBody as error:
        return bad_body_response(error)
    return body


def _store(service: Any, context: Any) -> ConversationStore:
    store: ConversationStore = service.conversations(context)
    return store


@router.post("/conversations", responses=OPENAI_ERRORS)
async def create_conversation(request: Request, service: Service, context: Admitted) -> Any:
    """Create a conversation, with up to 20 ``items`` and ``metadata``."""
    body = await _body(request)
    if isinstance(body, JSONResponse):
        return body
    metadata = metadata_of(body.get("metadata"))
    messages = messages_of(body.get("items"))
    store = _store(service, context)
    conversation_id = await store.create()
    if metadata:
        await store.set_metadata(conversation_id, metadata)
    if messages:
        await store.append(conversation_id, messages)
    context.conversation_id = conversation_id
    return JSONResponse(conversation_object(await store.get(conversation_id)))


@router.get("/conversations/{conversation_id}", responses=OPENAI_ERRORS)
async def get_conversation(conversation_id: str, service: Service, context: Admitted) -> Any:
    """A conversation: its id, creation time and metadata."""
    return JSONResponse(conversation_object(await _store(service, context).get(conversation_id)))


@router.post("/conversations/{conversation_id}", responses=OPENAI_ERRORS)
async def update_conversation(
    conversation_id: str, request: Request, service: Service, context: Admitted
) -> Any:
    """Replace a conversation's ``metadata``."""
    body = await _body(request)
    if isinstance(body, JSONResponse):
        return body
    store = _store(service, context)
    await store.set_metadata(conversation_id, metadata_of(body.get("metadata")))
    return JSONResponse(conversation_object(await store.get(conversation_id)))


@router.delete("/conversations/{conversation_id}", responses=OPENAI_ERRORS)
async def delete_conversation(conversation_id: str, service: Service, context: Admitted) -> Any:
    """Delete a conversation and everything it holds."""
    await _store(service, context).delete(conversation_id)
    return JSONResponse({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


@router.get("/conversations/{conversation_id}/items", responses=OPENAI_ERRORS)
async def list_items(
    conversation_id: str,
    service: Service,
    context: Admitted,
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> Any:
    """A conversation's items in OpenAI's list shape (``desc``: newest first)."""
    conversation = await _store(service, context).get(conversation_id)
    items = [to_item(m) for m in conversation.messages or []]
    return JSONResponse(
        item_page(items, limit=limit, order=order, after=after, unknown_after=ItemNotFoundError)
    )


@router.post("/conversations/{conversation_id}/items", responses=OPENAI_ERRORS)
async def create_items(
    conversation_id: str, request: Request, service: Service, context: Admitted
) -> Any:
    """Add up to 20 items at the end of a conversation."""
    body = await _body(request)
    if isinstance(body, JSONResponse):
        return body
    messages = messages_of(body.get("items"))
    if not messages:
        raise InvalidRequestError("items must hold at least one item", param="items")
    await _store(service, context).append(conversation_id, messages)
    return JSONResponse(item_list([to_item(m) for m in messages], has_more=False))


@router.get("/conversations/{conversation_id}/items/{item_id}", responses=OPENAI_ERRORS)
async def get_item(conversation_id: str, item_id: str, service: Service, context: Admitted) -> Any:
    """One item of a conversation."""
    conversation = await _store(service, context).get(conversation_id)
    return JSONResponse(to_item(_find(conversation, item_id)))


@router.delete("/conversations/{conversation_id}/items/{item_id}", responses=OPENAI_ERRORS)
async def delete_item(
    conversation_id: str, item_id: str, service: Service, context: Admitted
) -> Any:
    """Remove one item from a conversation; the conversation."""
    store = _store(service, context)
    conversation = await store.get(conversation_id)
    if not await store.remove_message(conversation_id, _find(conversation, item_id)):
        raise ItemNotFoundError(item_id)  # removed meanwhile
    return JSONResponse(conversation_object(conversation))


def _find(conversation: Conversation, item_id: str) -> StoredMessage:
    for message in conversation.messages or []:
        if message.item == item_id:
            return message
    raise ItemNotFoundError(item_id)
