"""Images on the real stack: Ray Serve + vLLM (CPU) on the test Qwen2.5-VL + Redis.

``prompt_tokens`` (vLLM's own count) proves what reached the model: Qwen2.5-VL resizes
an image to multiples of 28 pixels within its pixel bounds and gives it one token per
28x28 block, plus ``<|vision_start|>`` and ``<|vision_end|>``.
"""

from __future__ import annotations

import math
from typing import Any

import openai
import pytest
import redis
import requests
from hypothesis import HealthCheck, given, settings, strategies

from cloudllm_serve.devhost import test_vlm
from tests.conftest import Stack
from tests.support import MediaServer, data_url, image_bytes
from tests.vision.conftest import MAX_IMAGE_SIDE, MAX_UPLOAD_BYTES

TIMEOUT_S = 120


def qwen_image_tokens(width: int, height: int) -> int:
    """Tokens of one image in the prompt: Qwen2-VL's ``smart_resize``, blocks, 2 markers."""
    factor = 28
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > test_vlm.MAX_PIXELS:
        beta = math.sqrt(height * width / test_vlm.MAX_PIXELS)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < test_vlm.MIN_PIXELS:
        beta = math.sqrt(test_vlm.MIN_PIXELS / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return (h_bar // factor) * (w_bar // factor) + 2


def vision(stack: Stack, image: bytes, message: str = "What is in this picture?", **extra: Any):
    body = {"message": message, "image": data_url(image), "temperature": 0.0, **extra}
    return requests.post(f"{stack.base_url}/vision", json=body, timeout=TIMEOUT_S)


def answered(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return dict(response.json())


def prompt_tokens(answer: dict[str, Any]) -> int:
    return int(answer["model_info"]["timings"]["prompt_tokens"])


def test_prompt_tokens_follow_the_image_processor(vlm_stack: Stack) -> None:
    small = prompt_tokens(answered(vision(vlm_stack, image_bytes(64, 64), max_tokens=1)))
    large = prompt_tokens(answered(vision(vlm_stack, image_bytes(640, 640), max_tokens=1)))
    assert large - small == qwen_image_tokens(640, 640) - qwen_image_tokens(64, 64) == 525
    # An upload wider than MAX_IMAGE_SIDE counts as its downscaled size (640x160).
    upload = requests.post(
        f"{vlm_stack.base_url}/vision",
        data={"message": "What is in this picture?", "max_tokens": "1", "temperature": "0"},
        files={"image": ("wide.png", image_bytes(2 * MAX_IMAGE_SIDE, 320), "image/png")},
        timeout=TIMEOUT_S,
    )
    wide = prompt_tokens(answered(upload))
    assert wide - small == qwen_image_tokens(MAX_IMAGE_SIDE, 160) - qwen_image_tokens(64, 64)
    assert wide - small != qwen_image_tokens(2 * MAX_IMAGE_SIDE, 320) - qwen_image_tokens(64, 64)


def test_a_later_turn_still_shows_the_model_the_first_image(vlm_stack: Stack) -> None:
    def turn(path: str, body: dict[str, Any]) -> dict[str, Any]:
        body = {"temperature": 0.0, "max_tokens": 4, **body}
        response = requests.post(f"{vlm_stack.base_url}{path}", json=body, timeout=TIMEOUT_S)
        return answered(response)

    picture = data_url(image_bytes(640, 640, seed=3))
    with_image = turn("/multimodal", {"message": "Look at this.", "images": [picture]})
    without = turn("/multimodal", {"message": "Look at this."})
    follow_up = {"message": "And now?"}
    second = turn("/multimodal", {**follow_up, "conversation_id": with_image["conversation_id"]})
    control = turn("/multimodal", {**follow_up, "conversation_id": without["conversation_id"]})
    assert second["dropped_history_messages"] == 0
    difference = prompt_tokens(second) - prompt_tokens(control)
    # the image's tokens, give or take the two 4-token answers' re-tokenisation
    assert abs(difference - qwen_image_tokens(640, 640)) <= 8, difference


def test_greedy_answers_depend_on_the_image(vlm_stack: Stack) -> None:
    def text(seed: int) -> str:
        answer = answered(vision(vlm_stack, image_bytes(112, 112, seed=seed), max_tokens=8))
        return str(answer["response"])

    first = text(21)
    assert text(21) == first
    assert len({first, text(22), text(23)}) >= 2


def test_bad_images_get_a_4xx_naming_the_field(vlm_stack: Stack) -> None:
    base = vlm_stack.base_url
    cases: list[tuple[dict[str, Any], int, str]] = [
        (
            {"files": {"image": ("big.png", b"\x89PNG" + b"\0" * MAX_UPLOAD_BYTES, "image/png")}},
            413,
            "image",
        ),
        ({"files": {"image": ("doc.pdf", b"%PDF-1.7 hello", "application/pdf")}}, 415, "image"),
        ({"files": {"image": ("cut.png", image_bytes(64, 64)[:50], "image/png")}}, 400, "image"),
    ]
    for request, status, param in cases:
        response = requests.post(
            f"{base}/vision", data={"message": "hi"}, timeout=TIMEOUT_S, **request
        )
        assert response.status_code == status, response.text
        assert response.json()["param"] == param, response.text
    picture = data_url(image_bytes(32, 32))
    for body, param in [
        ({"message": "hi", "images": [picture] * 5}, "images"),
        ({"message": "  ", "images": [picture]}, "message"),
    ]:
        response = requests.post(f"{base}/multimodal", json=body, timeout=TIMEOUT_S)
        assert response.status_code == 400, response.text
        assert response.json()["param"] == param


PNG = image_bytes(28, 28, seed=5)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=strategies.one_of(
        strategies.binary(max_size=512),
        strategies.integers(min_value=0, max_value=len(PNG)).map(lambda n: PNG[:n]),
        strategies.binary(min_size=1, max_size=32).map(lambda junk: PNG[:80] + junk),
    )
)
def test_random_and_truncated_bytes_never_give_a_5xx(vlm_stack: Stack, data: bytes) -> None:
    response = requests.post(
        f"{vlm_stack.base_url}/vision",
        data={"message": "hi", "max_tokens": "1"},
        files={"image": ("x.png", data, "image/png")},
        timeout=TIMEOUT_S,
    )
    assert response.status_code in (200, 400, 413, 415), response.text
    if response.status_code != 200:
        assert response.json()["param"] == "image"


def test_remote_images_only_from_allowlisted_hosts(vlm_stack: Stack, media: MediaServer) -> None:
    def remote(url: str) -> requests.Response:
        body = {"message": "hi", "images": [url], "max_tokens": 1}
        return requests.post(f"{vlm_stack.base_url}/multimodal", json=body, timeout=TIMEOUT_S)

    local = prompt_tokens(answered(remote(data_url(image_bytes(96, 64, seed=11)))))
    fetched = answered(remote(media.url("/image.png")))
    assert prompt_tokens(fetched) == local  # the same picture, fetched by the ingress
    off_list = media.url("/image.png", host="localhost")
    for url, status, words in [
        (off_list, 400, "not in MEDIA_ALLOWED_DOMAINS"),
        (media.url("/redirect?to=" + off_list), 400, "not in MEDIA_ALLOWED_DOMAINS"),
        (media.url("/slow"), 400, "MEDIA_FETCH_TIMEOUT_S"),
        (media.url("/big"), 413, "MAX_UPLOAD_BYTES"),
    ]:
        response = remote(url)
        assert response.status_code == status, (url, response.text)
        assert words in response.json()["detail"], response.text
        assert response.json()["param"] == "images.0"
    assert "/image.png" in media.requests  # only the allowlisted host was reached


def test_openai_sdk_with_an_image_url_part(vlm_stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{vlm_stack.base_url}/v1", api_key="unused")
    model = client.models.list().data[0].id

    def ask(image: bytes) -> Any:
        content: Any = [
            {"type": "image_url", "image_url": {"url": data_url(image)}},
            {"type": "text", "text": "What is in this picture?"},
        ]
        return client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": content}],
            max_tokens=4,
            temperature=0.0,
        )

    small, large = ask(image_bytes(64, 64)), ask(image_bytes(640, 640))
    assert small.usage is not None and large.usage is not None
    assert large.usage.prompt_tokens - small.usage.prompt_tokens == 525
    with pytest.raises(openai.BadRequestError) as refused:
        ask(b"GIF89a" + b"\0" * 20)
    assert "messages.0.content.0.image_url" in str(refused.value)


def test_deleting_a_conversation_removes_its_images(vlm_stack: Stack) -> None:
    client = redis.Redis.from_url(vlm_stack.redis.url)
    pictures = [data_url(image_bytes(56, 56, seed=s)) for s in (31, 32)]
    first = answered(
        requests.post(
            f"{vlm_stack.base_url}/multimodal",
            json={"message": "two pictures", "images": pictures, "max_tokens": 2},
            timeout=TIMEOUT_S,
        )
    )
    cid = first["conversation_id"]
    # the same picture again, through /v1 this time: still stored once
    body = {
        "model": "test-vlm",
        "conversation_id": cid,
        "max_tokens": 2,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": pictures[0]}},
                    {"type": "text", "text": "the first one again"},
                ],
            }
        ],
    }
    again = requests.post(f"{vlm_stack.base_url}/v1/chat/completions", json=body, timeout=60)
    assert again.status_code == 200, again.text
    keys = sorted(k.decode() for k in client.scan_iter(f"*conv:{{{cid}}}*"))
    assert [k.rsplit(":", 1)[-1] for k in keys] == [f"{{{cid}}}", "images", "messages"], keys
    images_key = next(k for k in keys if k.endswith(":images"))
    assert client.hlen(images_key) == 2
    stored = requests.get(f"{vlm_stack.base_url}/conversations/{cid}", timeout=10).json()
    assert [len(m.get("images") or []) for m in stored["messages"]] == [2, 0, 1, 0]
    deleted = requests.delete(f"{vlm_stack.base_url}/conversations/{cid}", timeout=10)
    assert deleted.status_code == 200
    assert not list(client.scan_iter(f"*conv:{{{cid}}}*"))


def test_oldest_turns_and_their_images_drop_first_when_the_context_is_full(
    vlm_stack: Stack,
) -> None:
    per_image = qwen_image_tokens(640, 640)  # 531: four of them overflow the 2048 context
    cid = None
    for turn in range(3):
        body: dict[str, Any] = {
            "message": f"Picture {turn}.",
            "images": [data_url(image_bytes(640, 640, seed=40 + turn))],
            "max_tokens": 4,
            "temperature": 0.0,
        }
        if cid:
            body["conversation_id"] = cid
        answer = answered(
            requests.post(f"{vlm_stack.base_url}/multimodal", json=body, timeout=TIMEOUT_S)
        )
        cid = answer["conversation_id"]
        assert answer["dropped_history_messages"] == 0
        assert prompt_tokens(answer) > (turn + 1) * per_image
    # A fourth image through /v1 in the same stored conversation: the first turn goes.
    content = [
        {"type": "image_url", "image_url": {"url": data_url(image_bytes(640, 640, seed=43))}},
        {"type": "text", "text": "Picture 3."},
    ]
    response = requests.post(
        f"{vlm_stack.base_url}/v1/chat/completions",
        json={
            "model": "test-vlm",
            "conversation_id": cid,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 4,
        },
        timeout=TIMEOUT_S,
    )
    assert response.status_code == 200, response.text
    used = response.json()["usage"]["prompt_tokens"]
    assert 3 * per_image < used <= 2048 - 4, used
    # and /multimodal without an image: the two newest pictures' turns and this one fit
    last = answered(
        requests.post(
            f"{vlm_stack.base_url}/multimodal",
            json={"message": "And now?", "conversation_id": cid, "max_tokens": 4},
            timeout=TIMEOUT_S,
        )
    )
    assert last["dropped_history_messages"] == 2
    assert 3 * per_image < prompt_tokens(last) <= 2048 - 4


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none (a pixel bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_untyped_media_parts_are_checked_or_refused_before_vllm(vlm_stack: Stack) -> None:
    def chat(part: dict[str, Any]) -> requests.Response:
        content = [part, {"type": "text", "text": "What is in this picture?"}]
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1}
        return requests.post(
            f"{vlm_stack.base_url}/v1/chat/completions", json=body, timeout=TIMEOUT_S
        )

    bomb = chat({"image_url": {"url": data_url(png_header(8000, 8000))}})
    assert bomb.status_code == 400, bomb.text
    assert bomb.json()["error"]["param"] == "messages.0.content.0.image_url"
    assert "MAX_IMAGE_PIXELS" in bomb.json()["error"]["message"]
    video = chat({"video_url": {"url": "data:video/mp4;base64,AAAA"}})
    assert video.status_code == 400, video.text
    assert video.json()["error"]["param"] == "messages.0.content.0"
    # A checked untyped image reaches the model as the image it is (Qwen2.5-VL's count).
    image = data_url(image_bytes(640, 640, seed=9))
    untyped = chat({"image_url": image, "uuid": "any"})
    typed = chat({"type": "image_url", "image_url": {"url": image}})
    assert untyped.status_code == typed.status_code == 200, (untyped.text, typed.text)
    assert untyped.json()["usage"] == typed.json()["usage"]
