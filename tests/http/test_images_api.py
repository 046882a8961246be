"""Images at the ingress: every check, both body kinds, remote fetching, stored images.

The app is the real one over a real Redis; the engine is the fake one, declared a
vision-language model (the real one: ``tests/vision``). What is tested here is our
own code before any engine: decoding, limits, normalisation, the allowlist.
"""

from __future__ import annotations

import base64
import hashlib
import io
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings, strategies
from PIL import Image

from cloudllm_serve.conversations.store import ConversationStore
from cloudllm_serve.ingress.app import create_app
from cloudllm_serve.ingress.images import ImageLimits, check_image
from cloudllm_serve.ingress.service import CloudLLMService
from cloudllm_serve.settings import Settings
from tests.fakes import FakeEngine
from tests.http.conftest import App
from tests.support import MediaServer, RedisServer, data_url, image_bytes

MAX_UPLOAD = 64 * 1024
MAX_SIDE = 96
#: The app's fetch timeout: long enough for the allowed fetches to finish while stack tests
#: load the CPU beside these tests (make test), short beside ``/slow``, which takes 3x.
FETCH_TIMEOUT_S = 2.0
PNG = image_bytes(32, 24, seed=1)


@pytest.fixture(scope="module")
def media() -> Iterator[MediaServer]:
    server = MediaServer(
        image_bytes(40, 40, seed=7), slow_s=3 * FETCH_TIMEOUT_S, big_bytes=MAX_UPLOAD * 2
    )
    yield server
    server.close()


@pytest.fixture
def vlm(redis_server: RedisServer, media: MediaServer) -> Iterator[tuple[App, str]]:
    """The app with a fake vision-language engine; also the store's key prefix.

    It may fetch from ``media`` (loopback, on its own port: both listed).
    """
    app_settings = Settings(
        REDIS_URL=redis_server.url,
        MAX_TOKENS_CAP=32,
        MAX_UPLOAD_BYTES=MAX_UPLOAD,
        MAX_IMAGE_SIDE=MAX_SIDE,
        MAX_IMAGE_PIXELS=200_000,
        MAX_IMAGES_PER_REQUEST=3,
        MEDIA_ALLOWED_DOMAINS=["127.0.0.1"],
        MEDIA_ALLOWED_NETWORKS=["127.0.0.0/8"],
        MEDIA_ALLOWED_PORTS=[media.port],
        MEDIA_FETCH_TIMEOUT_S=FETCH_TIMEOUT_S,
    )
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    store = ConversationStore.from_url(app_settings.REDIS_URL, timeout_s=1.0, key_prefix=prefix)
    engine = FakeEngine()
    engine.supports_images = True
    with TestClient(create_app(CloudLLMService(app_settings, store, engine))) as client:
        yield App(client, engine, app_settings), prefix


def vision_json(app: App, image: str, message: str = "what is this?", **extra: Any) -> Any:
    return app.client.post("/vision", json={"message": message, "image": image, **extra})


def test_json_and_multipart_both_answer(vlm: tuple[App, str]) -> None:
    app, _ = vlm
    by_json = vision_json(app, base64.b64encode(PNG).decode())
    assert by_json.status_code == 200, by_json.text
    assert by_json.json()["response"].endswith("1 images: what is this?")
    by_form = app.client.post(
        "/vision",
        data={"message": "and this?", "max_tokens": "16", "temperature": "0"},
        files={"image": ("photo.png", PNG, "image/png")},
    )
    assert by_form.status_code == 200, by_form.text
    assert by_form.json()["model_info"]["max_tokens"] == 16
    sent = app.engine.requests[-1].messages
    assert sent is not None
    parts = sent[-1]["content"]
    assert parts[0]["type"] == "image_url"
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[1] == {"type": "text", "text": "and this?"}


def test_images_are_normalised_before_the_engine(vlm: tuple[App, str]) -> None:
    app, _ = vlm
    # A 200x50 RGBA PNG lying on its side (EXIF orientation 6: rotate 90° clockwise).
    image = Image.new("RGBA", (200, 50), (10, 20, 30, 128))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, format="PNG", exif=exif)
    response = vision_json(app, data_url(out.getvalue()))
    assert response.status_code == 200, response.text
    url = app.engine.requests[-1].messages[-1]["content"][0]["image_url"]["url"]  # type: ignore[index]
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.mode == "RGB"
    # upright (50 wide, 200 high), then the longer side down to MAX_IMAGE_SIDE
    assert sent.size == (MAX_SIDE // 4, MAX_SIDE)
    jpeg = vision_json(app, data_url(image_bytes(30, 30, image_format="JPEG"), "image/jpeg"))
    assert jpeg.status_code == 200
    url = app.engine.requests[-1].messages[-1]["content"][0]["image_url"]["url"]  # type: ignore[index]
    assert url.startswith("data:image/jpeg;base64,")


@pytest.mark.parametrize(
    ("image", "status", "words"),
    [
        (base64.b64encode(b"\0" * (MAX_UPLOAD + 10)).decode(), 413, "MAX_UPLOAD_BYTES"),
        (base64.b64encode(b"%PDF-1.4 not a picture").decode(), 415, "PNG, JPEG, WEBP or GIF"),
        (base64.b64encode(PNG[:40]).decode(), 400, "could not be decoded"),
        ("this is not base64!", 400, "not valid base64"),
        ("data:image/png,rawbytes", 400, "not base64-encoded"),
        (base64.b64encode(image_bytes(600, 400)).decode(), 400, "MAX_IMAGE_PIXELS"),
        ("file:///etc/passwd", 400, "only data: URLs"),
    ],
)
def test_bad_images_are_refused_naming_the_field(
    vlm: tuple[App, str], image: str, status: int, words: str
) -> None:
    app, _ = vlm
    response = vision_json(app, image)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["param"] == "image", body
    assert words in body["detail"], body
    assert not app.engine.requests


def test_bad_fields_are_400_naming_them(vlm: tuple[App, str]) -> None:
    app, _ = vlm
    image = base64.b64encode(PNG).decode()
    for body, param in [
        ({"message": "   ", "image": image}, "message"),
        ({"message": "hi"}, "image"),
        ({"message": "hi", "image": image, "max_tokens": 0}, "max_tokens"),
        ({"message": "hi", "image": image, "colour": "red"}, "colour"),
    ]:
        response = app.client.post("/vision", json=body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["param"] == param, response.json()
    too_many = app.client.post("/multimodal", json={"message": "hi", "images": [image] * 4})
    assert too_many.status_code == 400
    assert too_many.json()["param"] == "images"
    assert "MAX_IMAGES_PER_REQUEST" in too_many.json()["detail"]
    two = app.client.post(
        "/vision",
        data={"message": "hi"},
        files=[("image", ("a.png", PNG, "image/png")), ("image", ("b.png", PNG, "image/png"))],
    )
    assert two.status_code == 400
    assert two.json()["param"] == "image"
    text = app.client.post("/vision", content=b"hello", headers={"Content-Type": "text/plain"})
    assert text.status_code == 415
    assert "multipart/form-data" in text.json()["detail"]


def test_malformed_input_is_400_naming_where(vlm: tuple[App, str]) -> None:
    """Found by tests/http/test_fuzz_openapi.py: each of these was a 500."""
    app, _ = vlm
    for url in ("http://[x", "https://127.0.0.1:99999/image.png"):
        response = vision_json(app, url)
        assert response.status_code == 400, response.text
        assert response.json()["param"] == "image" and "not a valid URL" in response.text
        part = {"type": "image_url", "image_url": {"url": url}}
        chat = app.client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": [part]}]}
        )
        assert chat.status_code == 400, chat.text
        assert chat.json()["error"]["param"] == "messages.0.content.0.image_url"
    deep = b"[" * 1500 + b"]" * 1500
    response = app.client.post(
        "/vision", content=deep, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["param"] == "body", response.text
    form = app.client.post(
        "/vision",
        data={"message": "hi", "json_schema": deep.decode()},
        files={"image": ("a.png", PNG, "image/png")},
    )
    assert form.status_code == 400 and form.json()["param"] == "json_schema", form.text
    assert not app.engine.requests and not app.engine.calls


def test_text_only_model_is_501_naming_it(app: App) -> None:
    image = base64.b64encode(PNG).decode()
    for path, body in [
        ("/vision", {"message": "hi", "image": image}),
        ("/multimodal", {"message": "hi", "images": [image]}),
    ]:
        response = app.client.post(path, json=body)
        assert response.status_code == 501
        assert app.engine.model in response.json()["detail"]


def test_a_conversation_keeps_each_image_once_until_deleted(vlm: tuple[App, str]) -> None:
    app, prefix = vlm
    client = redis.Redis.from_url(app.settings.REDIS_URL)
    one, other = data_url(PNG), data_url(image_bytes(20, 20, seed=2))
    first = app.client.post("/multimodal", json={"message": "look", "images": [one, other, one]})
    assert first.status_code == 200, first.text
    cid = first.json()["conversation_id"]
    images_key = f"{prefix}conv:{{{cid}}}:images"
    assert client.hlen(images_key) == 2
    second = app.client.post("/multimodal", json={"message": "again", "conversation_id": cid})
    assert second.status_code == 200
    sent = app.engine.requests[-1].messages
    assert sent is not None
    shown = [p for p in sent[0]["content"] if p["type"] == "image_url"]
    assert len(shown) == 3  # the first turn's images, shown again in the second
    third = app.client.post(
        "/multimodal", json={"message": "once more", "images": [other], "conversation_id": cid}
    )
    assert third.status_code == 200
    assert client.hlen(images_key) == 2
    stored = app.client.get(f"/conversations/{cid}").json()["messages"]
    assert len(stored[0]["images"]) == 3 and len(stored[4]["images"]) == 1
    keys_before = set(client.scan_iter(f"{prefix}conv:{{{cid}}}*"))
    assert images_key.encode() in keys_before
    assert app.client.delete(f"/conversations/{cid}").status_code == 200
    assert not set(client.scan_iter(f"{prefix}conv:{{{cid}}}*"))


def test_v1_image_parts_are_checked_and_stored(vlm: tuple[App, str]) -> None:
    app, _ = vlm
    wide = image_bytes(200, 50)
    part = {"type": "image_url", "image_url": {"url": data_url(wide)}}
    body = {
        "model": app.engine.model,
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}],
        "store": True,
    }
    response = app.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    cid = response.headers["X-Conversation-Id"]
    sent = app.engine.calls[-1].body["messages"][0]["content"][0]["image_url"]["url"]
    assert sent.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(sent.split(",")[1]))).size == (MAX_SIDE, 24)
    stored = app.client.get(f"/conversations/{cid}").json()["messages"][0]
    assert stored["content"] == "hi" and len(stored["images"]) == 1
    bad = dict(
        body,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(b"GIF89a broken")}}
                ],
            }
        ],
    )
    refused = app.client.post("/v1/chat/completions", json=bad)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "messages.0.content.0.image_url"


def remote(app: App, url: str) -> Any:
    return app.client.post("/multimodal", json={"message": "hi", "images": [url]})


def test_remote_images_only_from_allowlisted_hosts(
    vlm: tuple[App, str], media: MediaServer
) -> None:
    app, _ = vlm
    assert remote(app, media.url("/image.png")).status_code == 200
    for url, words in [
        (media.url("/image.png", host="localhost"), "not in MEDIA_ALLOWED_DOMAINS"),
        (media.url("/redirect?to=" + media.url("/image.png", "localhost")), "not in MEDIA"),
        (media.url("/slow"), "MEDIA_FETCH_TIMEOUT_S"),
        ("http://127.0.0.1:9/image.png", "port 9 is not in MEDIA_ALLOWED_PORTS"),
        ("ftp://127.0.0.1/image.png", "only data: URLs"),
        (media.url("/missing"), "HTTP 404"),
    ]:
        response = remote(app, url)
        assert response.status_code == 400, (url, response.text)
        assert words in response.json()["detail"], response.json()
        assert response.json()["param"] == "images.0"
    redirected = remote(app, media.url("/redirect?to=" + media.url("/image.png")))
    assert redirected.status_code == 200
    big = remote(app, media.url("/big"))
    assert big.status_code == 413
    assert "MAX_UPLOAD_BYTES" in big.json()["detail"]


def test_remote_fetching_is_off_by_default(app: App, media: MediaServer) -> None:
    app.engine.supports_images = True
    fetched = len(media.requests)
    response = remote(app, media.url("/image.png"))
    assert response.status_code == 400
    assert "MEDIA_ALLOWED_DOMAINS is empty" in response.json()["detail"]
    assert len(media.requests) == fetched


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=strategies.one_of(
        strategies.binary(max_size=2048),
        strategies.integers(min_value=0, max_value=len(PNG)).map(lambda n: PNG[:n]),
        strategies.binary(max_size=64).map(lambda junk: PNG[:60] + junk),
    )
)
def test_random_and_truncated_bytes_never_give_a_5xx(vlm: tuple[App, str], data: bytes) -> None:
    app, _ = vlm
    response = app.client.post(
        "/vision", data={"message": "hi"}, files={"image": ("x.png", data, "image/png")}
    )
    assert response.status_code in (200, 400, 413, 415), response.text
    if response.status_code != 200:
        assert response.json()["param"] == "image", response.text


def test_check_image_downscales_and_keeps_the_format() -> None:
    limits = ImageLimits(max_bytes=10**6, max_pixels=10**6, max_side=50)
    checked = check_image(image_bytes(200, 100), field="image", limits=limits)
    assert (checked.width, checked.height) == (50, 25)
    assert checked.mime_type == "image/png"
    assert checked.digest == hashlib.sha256(checked.data).hexdigest()
    assert checked.data_url() == data_url(checked.data)
