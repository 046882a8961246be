"""OpenAI's list shape for items (a response's input items, a conversation's items)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal


def item_list(items: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    """``items`` as OpenAI lists them: ``data``, ``first_id``, ``last_id``, ``has_more``."""
    return {
        "object": "list",
        "data": items,
        "first_id": items[0].get("id") if items else None,
        "last_id": items[-1].get("id") if items else None,
        "has_more": has_more,
    }


def item_page(
    items: list[dict[str, Any]],
    *,
    limit: int,
    order: Literal["asc", "desc"],
    after: str | None,
    unknown_after: Callable[[str], Exception],
) -> dict[str, Any]:
    """One page of ``items`` (given oldest first).

    In ``order``, after the item ``after`` (``unknown_after(after)`` is raised when no item
    has that id), at most ``limit``.
    """
    ordered = list(reversed(items)) if order == "desc" else list(items)
    if after is not None:
        ids = [item.get("id") for item in ordered]
        if after not in ids:
            raise unknown_after(after)
        ordered = ordered[ids.index(after) + 1 :]
    return item_list(ordered[:limit], has_more=len(ordered) > limit)
