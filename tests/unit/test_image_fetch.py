"""Remote image fetching: which addresses and ports, and one DNS answer per fetch.

A local HTTP server on 127.0.0.1 stands for an internal service; a resolver handed in
stands for DNS, so that a name can resolve to what each test needs.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest

from cloudllm_serve.errors import InvalidRequestError
from cloudllm_serve.ingress.images import fetch_image, is_public_address
from cloudllm_serve.settings import Settings
from tests.support import MediaServer, image_bytes

PICTURE = image_bytes(8, 8, seed=3)
NAME = "images.example.com"


@pytest.fixture(scope="module")
def media() -> Iterator[MediaServer]:
    server = MediaServer(PICTURE)
    yield server
    server.close()


def fetch(url: str, resolve: Any = None, **settings: Any) -> bytes:
    options: dict[str, Any] = {"MEDIA_ALLOWED_DOMAINS": ["127.0.0.1", NAME], **settings}
    extra = {"resolve": resolve} if resolve is not None else {}
    return asyncio.run(fetch_image(url, field="image", settings=Settings(**options), **extra))


def refusal(url: str, resolve: Any = None, **settings: Any) -> str:
    with pytest.raises(InvalidRequestError) as refused:
        fetch(url, resolve, **settings)
    assert refused.value.param == "image"
    return refused.value.message


@pytest.mark.parametrize(
    "address",
    [
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "127.0.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.1",
        "224.0.0.1",
        "fc00::1",
        "fe80::1",
        "::1",
        "::ffff:10.0.0.1",
        "64:ff9b::a00:1",
        "2002:a00:1::",
    ],
)
def test_non_public_addresses(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


def test_loopback_is_refused_unless_its_network_is_listed(media: MediaServer) -> None:
    url = media.url("/image.png")
    port = [media.port]
    seen = len(media.requests)
    words = refusal(url, MEDIA_ALLOWED_PORTS=port)
    assert "not public" in words and "MEDIA_ALLOWED_NETWORKS" in words, words
    assert len(media.requests) == seen
    assert fetch(url, MEDIA_ALLOWED_PORTS=port, MEDIA_ALLOWED_NETWORKS=["127.0.0.0/8"]) == PICTURE
    # A name whose answers mix a public and a private address is refused too.
    mixed = refusal(
        f"http://{NAME}:{media.port}/image.png",
        _resolver(["8.8.8.8", "10.0.0.1"]),
        MEDIA_ALLOWED_PORTS=port,
    )
    assert "MEDIA_ALLOWED_NETWORKS" in mixed


def test_only_listed_ports(media: MediaServer) -> None:
    seen = len(media.requests)
    words = refusal(media.url("/image.png"), MEDIA_ALLOWED_NETWORKS=["127.0.0.0/8"])
    assert words == f"image: port {media.port} is not in MEDIA_ALLOWED_PORTS (80, 443)"
    assert len(media.requests) == seen


def _resolver(*answers: list[str]) -> Any:
    """A resolver giving ``answers`` in turn (the last one from then on); counts calls."""
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return answers[min(len(calls), len(answers)) - 1]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


def test_the_fetch_goes_to_the_address_checked(media: MediaServer) -> None:
    # First answer: the server's address (listed); any later answer: an address that is
    # neither listed nor reachable. A second lookup would fail the fetch.
    resolve = _resolver(["127.0.0.1", "127.0.0.2"], ["10.255.255.1"])
    url = f"http://{NAME}:{media.port}/image.png"
    fetched = fetch(
        url, resolve, MEDIA_ALLOWED_PORTS=[media.port], MEDIA_ALLOWED_NETWORKS=["127.0.0.0/8"]
    )
    assert fetched == PICTURE
    assert resolve.calls == [NAME]
    assert media.hosts[-1] == f"{NAME}:{media.port}"  # the name, not the address
