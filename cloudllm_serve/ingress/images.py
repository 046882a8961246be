"""Every image is checked here, at the ingress, before any engine sees it.

:func:`check_image` takes the bytes a client sent (an upload, base64, a data URL, or
what :func:`fetch_image` got from an allowlisted host) and either refuses them with an
error naming the request field, or returns a :class:`CheckedImage`: decoded, turned
upright (EXIF orientation), made RGB, downscaled so its longer side is at most
``MAX_IMAGE_SIDE``, and encoded again (JPEG stays JPEG, everything else becomes PNG).
Re-encoding means the engine only ever decodes images this module made; the
SHA-256 of the result addresses it in the conversation store.

Refusals, in the order they are checked: bigger than ``MAX_UPLOAD_BYTES`` → 413; not
PNG, JPEG, WEBP or GIF (by its magic bytes) → 415; more than ``MAX_IMAGE_PIXELS``
pixels → 400; bytes that do not decode → 400.

Remote images (:func:`fetch_image`) are fetched by this module only, never by vLLM:
``http``/``https`` to hosts in ``MEDIA_ALLOWED_DOMAINS`` (exact names; empty: none) on a
port in ``MEDIA_ALLOWED_PORTS`` (80 and 443 by default), redirects followed by hand and
each hop checked again. Each host name is resolved once, every address it resolves to
must be public (not private, loopback, link-local, CGNAT, multicast or reserved) unless
it lies in ``MEDIA_ALLOWED_NETWORKS``, and the connection goes to the first of those
addresses (the ``Host`` header and the TLS server name stay the host name), so a second
DNS answer cannot send the fetch elsewhere. At most ``MAX_UPLOAD_BYTES`` are read, all
within ``MEDIA_FETCH_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import socket
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import urljoin, urlsplit

import httpx

from cloudllm_serve.errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from cloudllm_serve.settings import Settings

#: Magic bytes of the formats we take, and the PIL format name of each.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)
ACCEPTED_FORMATS = "PNG, JPEG, WEBP or GIF"
#: Redirect hops a remote fetch follows (each one checked against the allowlist).
MAX_REDIRECTS = 3

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Resolves a host name and port to addresses, in the order to try them.
Resolver = Callable[[str, int], Awaitable[list[str]]]
#: IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64).
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True)
class CheckedImage:
    """An image that passed every check, encoded again by us."""

    data: bytes
    mime_type: str
    width: int
    height: int

    @cached_property
    def digest(self) -> str:
        """SHA-256 of :attr:`data` (hex): the image's address in the conversation store."""
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def _data_url(self) -> str:
        return f"data:{self.mime_type};base64,{base64.b64encode(self.data).decode('ascii')}"

    def data_url(self) -> str:
        """The image as a ``data:`` URL (how the engine receives it; encoded once)."""
        return self._data_url


@dataclass(frozen=True)
class ImageLimits:
    """The settings :func:`check_image` enforces."""

    max_bytes: int
    max_pixels: int
    max_side: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        """``MAX_UPLOAD_BYTES``, ``MAX_IMAGE_PIXELS`` and ``MAX_IMAGE_SIDE``."""
        return cls(settings.MAX_UPLOAD_BYTES, settings.MAX_IMAGE_PIXELS, settings.MAX_IMAGE_SIDE)


def check_image_count(count: int, max_images: int, *, param: str) -> None:
    """Refuse (400, naming ``param``) more than ``MAX_IMAGES_PER_REQUEST`` images in one request."""
    if count > max_images:
        raise InvalidRequestError(
            f"{count} images, more than MAX_IMAGES_PER_REQUEST ({max_images})", param=param
        )


def sniff_format(data: bytes) -> str | None:
    """The PIL format name of ``data`` by its magic bytes, or ``None`` if not one we take."""
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_base64_image(text: str, *, field: str, limits: ImageLimits) -> bytes:
    """The bytes of base64 text or a ``data:image/...;base64,`` URL (400/413 name ``field``)."""
    payload = text.strip()
    if payload[:5].lower() == "data:":
        header, comma, payload = payload.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise InvalidRequestError(
                f"{field} is a data URL that is not base64-encoded "
                "(expected data:image/<type>;base64,<data>)",
                param=field,
            )
    payload = "".join(payload.split())
    if not payload:
        raise InvalidRequestError(f"{field} is empty", param=field)
    if len(payload) // 4 * 3 > limits.max_bytes + 2:
        raise _too_large(field, limits)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(
            f"{field} is not valid base64 (or a data URL)", param=field
        ) from None


def _too_large(field: str, limits: ImageLimits) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"{field} is larger than MAX_UPLOAD_BYTES ({limits.max_bytes} bytes)", param=field
    )


def check_image(data: bytes, *, field: str, limits: ImageLimits) -> CheckedImage:
    """Check, decode and normalise one image (see the module docstring). CPU-bound."""
    from PIL import Image, ImageOps

    if len(data) > limits.max_bytes:
        raise _too_large(field, limits)
    image_format = sniff_format(data)
    if image_format is None:
        raise UnsupportedMediaTypeError(f"{field} is not a {ACCEPTED_FORMATS} image", param=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=[image_format])
            width, height = opened.size
            if width * height > limits.max_pixels:
                raise InvalidRequestError(
                    f"{field} has {width}x{height} = {width * height} pixels, more than "
                    f"MAX_IMAGE_PIXELS ({limits.max_pixels})",
                    param=field,
                )
            opened.load()
            image = ImageOps.exif_transpose(opened)
            if image.mode != "RGB":
                image = image.convert("RGB")
    except InvalidRequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequestError(
            f"{field} has more pixels than MAX_IMAGE_PIXELS ({limits.max_pixels})", param=field
        ) from None
    except Exception as error:  # PIL raises many kinds for broken files
        raise InvalidRequestError(
            f"{field} could not be decoded as {image_format}: {error}", param=field
        ) from None
    if max(image.size) > limits.max_side:
        image.thumbnail((limits.max_side, limits.max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if image_format == "JPEG":
        image.save(out, format="JPEG", quality=95)
        mime_type = "image/jpeg"
    else:
        image.save(out, format="PNG")
        mime_type = "image/png"
    return CheckedImage(out.getvalue(), mime_type, image.width, image.height)


async def check_image_async(data: bytes, *, field: str, limits: ImageLimits) -> CheckedImage:
    """:func:`check_image` in a worker thread (decoding a photo takes tens of ms)."""
    return await asyncio.to_thread(check_image, data, field=field, limits=limits)


def _refuse(field: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"{field}: {message}", param=field)


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64), if any."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public_address(address: IPAddress) -> bool:
    """Whether ``address`` routes on the public internet (and so is no internal service).

    Private (10/8, 172.16/12, 192.168/16, fc00::/7), loopback, link-local, CGNAT
    (100.64/10), "this network" (0/8), documentation, multicast and reserved ranges are not.
    """
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        return is_public_address(embedded)
    return address.is_global and not address.is_multicast


def _address_allowed(address: IPAddress, networks: list[IPNetwork]) -> bool:
    candidates = [address, _embedded_ipv4(address)]
    listed = any(
        candidate in network
        for candidate in candidates
        if candidate is not None
        for network in networks
        if network.version == candidate.version
    )
    return listed or is_public_address(address)


async def resolve_host(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (the system resolver), in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class FetchTarget:
    """A checked remote URL and the one address it is fetched from."""

    url: str
    host: str
    port: int
    address: IPAddress

    def request(self, client: httpx.AsyncClient) -> httpx.Request:
        """A GET to :attr:`address`, with ``Host`` and the TLS server name of :attr:`host`."""
        original = httpx.URL(self.url)
        pinned = original.copy_with(host=str(self.address))
        default_port = 443 if original.scheme == "https" else 80
        host_header = self.host if self.port == default_port else f"{self.host}:{self.port}"
        if ":" in self.host:  # an IPv6 literal
            host_header = f"[{self.host}]" + ("" if self.port == default_port else f":{self.port}")
        extensions = {"sni_hostname": self.host} if original.scheme == "https" else {}
        return client.build_request(
            "GET", pinned, headers={"Host": host_header}, extensions=extensions
        )


async def check_url(
    url: str, *, field: str, settings: Settings, resolve: Resolver = resolve_host
) -> FetchTarget:
    """Refuse ``url`` (a 400 naming ``field`` and the rule) unless it may be fetched.

    It must be http(s) to a ``MEDIA_ALLOWED_DOMAINS`` host on a ``MEDIA_ALLOWED_PORTS``
    port, whose every address is public or in ``MEDIA_ALLOWED_NETWORKS``; the host is
    resolved once, here, and the fetch goes to the first address.
    """
    allowed = settings.MEDIA_ALLOWED_DOMAINS
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as error:  # a bad IPv6 literal or port
        raise _refuse(field, f"not a valid URL ({error})") from None
    if parts.scheme not in ("http", "https"):
        raise _refuse(field, "only data: URLs, and http(s) URLs to MEDIA_ALLOWED_DOMAINS hosts")
    host = (parts.hostname or "").lower().rstrip(".")
    if not allowed:
        raise _refuse(
            field, "remote images are off (MEDIA_ALLOWED_DOMAINS is empty); send a data: URL"
        )
    if host not in allowed:
        raise _refuse(field, f"host {host!r} is not in MEDIA_ALLOWED_DOMAINS")
    if port not in settings.MEDIA_ALLOWED_PORTS:
        ports = ", ".join(str(p) for p in settings.MEDIA_ALLOWED_PORTS)
        raise _refuse(field, f"port {port} is not in MEDIA_ALLOWED_PORTS ({ports})")
    try:
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in await resolve(host, port)]
    except (OSError, ValueError) as error:
        raise _refuse(field, f"host {host!r} could not be resolved ({error})") from None
    if not addresses:
        raise _refuse(field, f"host {host!r} could not be resolved (no address)")
    networks = settings.MEDIA_ALLOWED_NETWORKS
    if not all(_address_allowed(address, networks) for address in addresses):
        raise _refuse(
            field,
            f"host {host!r} resolves to an address that is not public (private, loopback, "
            "link-local, CGNAT or reserved); list its network in MEDIA_ALLOWED_NETWORKS "
            "to allow it",
        )
    return FetchTarget(url=url, host=host, port=port, address=addresses[0])


async def fetch_image(
    url: str,
    *,
    field: str,
    settings: Settings,
    client: httpx.AsyncClient | None = None,
    resolve: Resolver = resolve_host,
) -> bytes:
    """The bytes at ``url`` (see :func:`check_url`), or a 400/413 naming ``field``."""
    limits = ImageLimits.from_settings(settings)
    timeout_s = settings.MEDIA_FETCH_TIMEOUT_S
    own_client = client is None
    client = client or httpx.AsyncClient(follow_redirects=False, trust_env=False)
    try:
        async with asyncio.timeout(timeout_s):
            for _ in range(MAX_REDIRECTS + 1):
                target = await check_url(url, field=field, settings=settings, resolve=resolve)
                response = await client.send(target.request(client), stream=True)
                try:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        try:
                            url = urljoin(url, location)
                        except ValueError:
                            raise _refuse(field, "redirected to an invalid URL") from None
                        continue
                    return await _read_image(response, field=field, limits=limits)
                finally:
                    await response.aclose()
            raise _refuse(field, f"more than {MAX_REDIRECTS} redirects")
    except TimeoutError:
        raise _refuse(
            field, f"fetching the image took longer than MEDIA_FETCH_TIMEOUT_S ({timeout_s:g} s)"
        ) from None
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        raise _refuse(field, f"fetching the image failed: {type(error).__name__}") from None
    finally:
        if own_client:
            await client.aclose()


async def _read_image(response: httpx.Response, *, field: str, limits: ImageLimits) -> bytes:
    if response.status_code != 200:
        raise _refuse(field, f"fetching the image got HTTP {response.status_code}")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise _too_large(field, limits)
    body = bytearray()
    async for piece in response.aiter_bytes():
        body += piece
        if len(body) > limits.max_bytes:
            raise _too_large(field, limits)
    return bytes(body)


async def load_image_reference(reference: str, *, field: str, settings: Settings) -> CheckedImage:
    """A checked image from base64, a ``data:`` URL or an allowlisted ``http(s)`` URL."""
    limits = ImageLimits.from_settings(settings)
    if reference[:7].lower() == "http://" or reference[:8].lower() == "https://":
        data = await fetch_image(reference, field=field, settings=settings)
    elif ":" in reference[:12] and reference[:5].lower() != "data:":
        raise _refuse(field, "only data: URLs, and http(s) URLs to MEDIA_ALLOWED_DOMAINS hosts")
    else:
        data = decode_base64_image(reference, field=field, limits=limits)
    return await check_image_async(data, field=field, limits=limits)
