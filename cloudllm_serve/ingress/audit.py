"""The audit log: one JSON line per request, never message content, never a key.

Fields: ``time`` (Unix seconds), ``replica`` (the ingress replica), ``request_id`` (the
correlation id: the client's ``X-Request-Id``, or one made), ``internal_id`` (made by the
server: vLLM's request id, and the concurrency slot's), ``tenant``, ``key_id``, ``client``
(address), ``method``, ``route`` (the route template, e.g.
``/conversations/{conversation_id}``), ``status``, ``decision`` (see
:class:`~cloudllm_serve.ingress.context.RequestContext`), ``conversation_id``,
``prompt_tokens``, ``completion_tokens``, ``resumes`` (how many times the generation moved
to another engine replica after its engine died midway) and ``latency_ms``.

``AUDIT_LOG`` says where the lines go: a file appended to (one ``write`` per line, so
the ingress replicas of one host can share a file; by default ``audit.jsonl`` in the run
folder, created with its folder), ``stderr`` (the ingress replica's log, where Ray keeps
it, and so ``make serve``'s console), or ``off``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO


class AuditLog:
    """Writes audit records to ``AUDIT_LOG``'s target."""

    def __init__(self, target: str, *, replica: str | None = None) -> None:
        self.enabled = target != "off"
        self.replica = replica
        self._stream: TextIO | None = None
        self._fd: int | None = None
        if target == "stderr":
            self._stream = sys.stderr
        elif self.enabled:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as a JSON line."""
        if not self.enabled:
            return
        stamped = {"time": round(time.time(), 3), "replica": self.replica, **record}
        line = json.dumps(stamped, separators=(",", ":")) + "\n"
        if self._fd is not None:
            os.write(self._fd, line.encode())
        elif self._stream is not None:
            self._stream.write(line)
            self._stream.flush()

    def close(self) -> None:
        """Close the file, if any."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
