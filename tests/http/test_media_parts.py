"""``/v1`` chat media parts in every shape vLLM renders: checked like typed images, or refused.

vLLM renders a part without a ``type`` (or with a ``uuid``) by the first media key it
holds, and takes audio, video and per-request media options; none of these may pass the
ingress unchecked. The app is the real one over a real Redis with the fake engine (the
real stack: ``tests/vision``); the engine's recorded calls show what would reach vLLM.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.fakes import FakeEngine
from tests.http.conftest import App, build_app
from tests.support import RedisServer, data_url, image_bytes

CHAT = "/v1/chat/completions"
MAX_SIDE = 96
MAX_PIXELS = 200_000
SMALL = data_url(image_bytes(200, 50, seed=3))
#: 250,000 pixels: over MAX_PIXELS (a solid colour: a few hundred bytes as PNG).
HUGE = data_url(image_bytes(500, 500, seed=4))


@pytest.fixture
def vlm(redis_server: RedisServer) -> Iterator[App]:
    """The app with a fake vision-language engine and small image limits."""
    engine = FakeEngine()
    engine.supports_images = True
    app, settings = build_app(
        redis_server,
        engine,
        MAX_UPLOAD_BYTES=64 * 1024,
        MAX_IMAGE_SIDE=MAX_SIDE,
        MAX_IMAGE_PIXELS=MAX_PIXELS,
        MAX_IMAGES_PER_REQUEST=2,
    )
    with TestClient(app) as client:
        yield App(client, engine, settings)


def chat(app: App, *parts: Any, **extra: Any) -> Any:
    content = [*parts, {"type": "text", "text": "what is this?"}]
    body = {"messages": [{"role": "user", "content": content}], **extra}
    return app.client.post(CHAT, json=body)


#: Image parts in the shapes vLLM renders as images, given an image URL.
IMAGE_SHAPES = {
    "no type": lambda url: {"image_url": {"url": url}},
    "no type, a string": lambda url: {"image_url": url},
    "a text part with a uuid": lambda url: {
        "type": "text",
        "text": "hi",
        "uuid": "someone-elses-image",
        "image_url": {"url": url},
    },
    "typed, with a uuid": lambda url: {
        "type": "image_url",
        "image_url": {"url": url},
        "uuid": "someone-elses-image",
    },
    "input_image": lambda url: {"type": "input_image", "image_url": url},
}


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
def test_every_image_shape_is_checked_and_reencoded(vlm: App, shape: str) -> None:
    part = IMAGE_SHAPES[shape]
    refused = chat(vlm, part(HUGE))
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "messages.0.content.0.image_url"
    assert "MAX_IMAGE_PIXELS" in refused.json()["error"]["message"]
    assert not vlm.engine.calls
    answered = chat(vlm, part(SMALL), store=True)
    assert answered.status_code == 200, answered.text
    sent = vlm.engine.calls[-1].body["messages"][0]["content"][0]
    assert sent.keys() == {"type", "image_url"} and sent["type"] == "image_url"
    url = sent["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and url != SMALL
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",")[1]))).size == (MAX_SIDE, 24)
    cid = answered.headers["X-Conversation-Id"]
    stored = vlm.client.get(f"/conversations/{cid}").json()["messages"][0]
    assert len(stored["images"]) == 1


def test_untyped_images_count_toward_the_limit(vlm: App) -> None:
    parts = [IMAGE_SHAPES["no type"](SMALL)] * 2 + [{"type": "image_url", "image_url": SMALL}]
    response = chat(vlm, *parts)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages"
    assert "MAX_IMAGES_PER_REQUEST" in response.json()["error"]["message"]
    assert not vlm.engine.calls


#: Media parts that no check of ours covers, in typed and untyped shapes.
UNCHECKED_PARTS = {
    "video_url": {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
    "untyped video_url": {"video_url": {"url": "data:video/mp4;base64,AAAA"}},
    "audio_url": {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,AAAA"}},
    "untyped audio_url": {"audio_url": "data:audio/wav;base64,AAAA"},
    "input_audio": {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    "untyped input_audio": {"input_audio": {"data": "AAAA", "format": "wav"}},
    "image_embeds": {"image_embeds": "AAAA"},
    "image_pil": {"type": "image_pil", "image_pil": "AAAA"},
    "prompt_embeds": {"prompt_embeds": True, "data": "AAAA"},
    "a text part with a video_url key": {
        "type": "text",
        "text": "hi",
        "video_url": {"url": "data:video/mp4;base64,AAAA"},
    },
}


@pytest.mark.parametrize("name", UNCHECKED_PARTS)
def test_other_media_parts_are_refused_naming_the_part(vlm: App, name: str) -> None:
    response = chat(vlm, {"type": "text", "text": "first"}, UNCHECKED_PARTS[name])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages.0.content.1"
    assert "not supported" in error["message"] and "images only" in error["message"]
    assert not vlm.engine.calls


@pytest.mark.parametrize("field", ["media_io_kwargs", "mm_processor_kwargs"])
def test_per_request_media_options_are_refused(vlm: App, field: str) -> None:
    options = {"image": {"max_pixels": 10**8}} if field == "media_io_kwargs" else {"max_pixels": 1}
    response = chat(vlm, IMAGE_SHAPES["no type"](SMALL), **{field: options})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field
    assert not vlm.engine.calls
    for empty in (None, {}):
        assert chat(vlm, **{field: empty}).status_code == 200


@pytest.mark.parametrize(
    "part",
    [IMAGE_SHAPES["no type"](SMALL), UNCHECKED_PARTS["video_url"], UNCHECKED_PARTS["input_audio"]],
    ids=["untyped image", "video_url", "input_audio"],
)
def test_text_only_model_answers_any_media_part_with_501(app: App, part: dict[str, Any]) -> None:
    response = chat(app, part)
    assert response.status_code == 501, response.text
    assert "messages.0.content.0" in response.json()["error"]["message"]
    assert app.engine.model in response.json()["error"]["message"]
    assert not app.engine.calls
