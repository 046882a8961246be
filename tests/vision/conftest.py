"""The stack on the test vision-language model (``LLM_MODEL=test-vlm``), and a media server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Stack, running_stack
from tests.support import MediaServer, RedisServer, image_bytes

#: Settings of the VLM stack (the tests derive their expectations from these).
MAX_IMAGE_SIDE = 640
MAX_UPLOAD_BYTES = 1024 * 1024
MEDIA_FETCH_TIMEOUT_S = 2.0


@pytest.fixture(scope="session")
def media() -> Iterator[MediaServer]:
    """A loopback HTTP server the stack may fetch images from (127.0.0.1, its network and
    its port are allowlisted)."""
    server = MediaServer(
        image_bytes(96, 64, seed=11),
        slow_s=MEDIA_FETCH_TIMEOUT_S + 3,
        big_bytes=2 * MAX_UPLOAD_BYTES,
    )
    yield server
    server.close()


@pytest.fixture(scope="module")
def vlm_stack(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, media: MediaServer
) -> Iterator[Stack]:
    """``make serve`` with ``LLM_MODEL=test-vlm`` (the tiny random-weight Qwen2.5-VL).

    Module-scoped: the other stacks of this pytest process start after it stops.
    """
    overrides = {
        "LLM_MODEL": "test-vlm",
        "MAX_IMAGE_SIDE": str(MAX_IMAGE_SIDE),
        "MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
        "MEDIA_ALLOWED_DOMAINS": "127.0.0.1",
        "MEDIA_ALLOWED_NETWORKS": "127.0.0.0/8",
        "MEDIA_ALLOWED_PORTS": str(media.port),
        "MEDIA_FETCH_TIMEOUT_S": str(MEDIA_FETCH_TIMEOUT_S),
    }
    with running_stack(redis_server, tmp_path_factory.mktemp("vlm"), overrides) as running:
        yield running
