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
``http``/``https`` to hosts in ``MEDIA_ALLOWED_DOMAINS`` (exact names; empty: none),
redirects followed by hand and each hop checked against the list, loopback, link-local
and other non-public-routing addresses refused unless the address itself is listed,
at most ``MAX_UPLOAD_BYTES`` read, all within ``MEDIA_FETCH_TIMEOUT_S``.
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


def _non_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or address.is_multicast
        or address.is_reserved
    )


async def _check_url(url: str, *, field: str, allowed: list[str]) -> None:
    """Refuse ``url`` unless it is http(s) to an allowed host with public addresses."""
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
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError) as error:
        raise _refuse(field, f"host {host!r} could not be resolved ({error})") from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if _non_public(address) and str(address) not in allowed:
            raise _refuse(
                field,
                f"host {host!r} resolves to {address}, a loopback, link-local or reserved "
                "address; list that address in MEDIA_ALLOWED_DOMAINS to allow it",
            )


async def fetch_image(
    url: str, *, field: str, settings: Settings, client: httpx.AsyncClient | None = None
) -> bytes:
    """The bytes at ``url`` (an allowlisted http(s) host), or a 400/413 naming ``field``."""
    limits = ImageLimits.from_settings(settings)
    allowed = settings.MEDIA_ALLOWED_DOMAINS
    timeout_s = settings.MEDIA_FETCH_TIMEOUT_S
    own_client = client is None
    client = client or httpx.AsyncClient(follow_redirects=False, trust_env=False)
    try:
        async with asyncio.timeout(timeout_s):
            for _ in range(MAX_REDIRECTS + 1):
                await _check_url(url, field=field, allowed=allowed)
                async with client.stream("GET", url, follow_redirects=False) as response:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        try:
                            url = urljoin(url, location)
                        except ValueError:
                            raise _refuse(field, "redirected to an invalid URL") from None
                        continue
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
