"""The media in a ``/v1`` chat body, found as vLLM's chat renderer finds it.

vLLM (``vllm/renderers/chat_utils.py``: ``_parse_chat_message_content_mm_part``) takes a
content part's kind from its ``type``, unless the part has no ``type`` or carries a
``uuid``: then the first media key it holds decides, so ``{"image_url": ...}`` is an
image and ``{"type": "text", "uuid": "u", "video_url": ...}`` a video. The ingress finds
parts the same way (:func:`vllm_part_kind`), and every part vLLM would render as media is

* an image (``image_url`` or ``input_image``, typed or not): checked like every image
  (:mod:`cloudllm_serve.ingress.images`) and rebuilt as ``{"type": "image_url",
  "image_url": {"url": <our data URL>}}``; its other keys go, ``uuid`` among them (vLLM
  takes a client's ``uuid`` as the image's cache identity, so one client could name
  another's image);
* anything else (audio, video, embeddings, ``image_pil``, or a media key on a text
  part): refused, a 400 naming the part.

On a text-only model any media part is a 501 (the caller asks first). The body fields
``media_io_kwargs`` and ``mm_processor_kwargs`` (per-request options of vLLM's media
loading and of the model's processor, which can undo our pixel limits or the image
token budget) are refused unless empty. ``tests/vision/test_media_parts_vllm.py`` runs
vLLM's own parser beside :func:`vllm_part_kind`, so an upgrade that adds a part kind or
changes the dispatch fails there first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cloudllm_serve.errors import InvalidRequestError
from cloudllm_serve.ingress.images import CheckedImage, check_image_count, load_image_reference
from cloudllm_serve.settings import Settings

#: vLLM's part types (``MM_PARSER_MAP``) that carry no media.
TEXT_PART_TYPES = frozenset(
    {"text", "thinking", "input_text", "output_text", "refusal", "tool_reference"}
)
#: vLLM's image part types that the ingress checks; rebuilt as ``image_url`` parts.
IMAGE_PART_TYPES = frozenset({"image_url", "input_image"})
#: The keys vLLM looks for, in its order, in a part without a ``type`` or with a ``uuid``.
UNTYPED_PART_KEYS = (
    "image_url",
    "image_pil",
    "image_embeds",
    "audio_embeds",
    "video_embeds",
    "prompt_embeds",
    "audio_url",
    "input_audio",
    "video_url",
    "tool_reference",
)
#: Keys that carry media, whatever the part's kind.
MEDIA_KEYS = frozenset(UNTYPED_PART_KEYS) - {"tool_reference"}
#: vLLM's other media part types: refused (no check of ours covers them).
REFUSED_PART_TYPES = MEDIA_KEYS - IMAGE_PART_TYPES
#: Chat body fields that set vLLM's media loading or processing per request.
REFUSED_BODY_FIELDS = ("media_io_kwargs", "mm_processor_kwargs")


def vllm_part_kind(part: dict[str, Any]) -> str | None:
    """The kind vLLM renders ``part`` as, or ``None`` where vLLM refuses the part."""
    part_type = part.get("type")
    has_uuid = part.get("uuid") is not None
    known = TEXT_PART_TYPES | IMAGE_PART_TYPES | REFUSED_PART_TYPES
    if isinstance(part_type, str) and part_type in known and not has_uuid:
        return part_type
    if part_type is None or has_uuid:
        return next((key for key in UNTYPED_PART_KEYS if key in part), None)
    return None


@dataclass
class MediaPart:
    """One content part that vLLM would render as media."""

    param: str
    content: list[Any]
    index: int
    kind: str

    @property
    def is_image(self) -> bool:
        """Whether the ingress checks this part (an image), rather than refusing it."""
        return self.kind in IMAGE_PART_TYPES

    @property
    def description(self) -> str:
        """How an error names the part."""
        return f"a {self.kind} content part ({self.param})"

    @property
    def url(self) -> str | None:
        """The image's URL: ``image_url`` as ``{"url": ...}`` or, as vLLM also takes, a string."""
        value = self.content[self.index].get("image_url")
        if isinstance(value, dict):
            value = value.get("url")
        return value if isinstance(value, str) else None


def _media_kind(part: Any) -> str | None:
    if not isinstance(part, dict):
        return None
    kind = vllm_part_kind(part)
    if kind in IMAGE_PART_TYPES or kind in REFUSED_PART_TYPES:
        return kind
    stray = sorted(MEDIA_KEYS & part.keys())
    return stray[0] if stray else None


class CheckedParts:
    """The images of a request's image parts, checked: by digest and by part."""

    def __init__(self) -> None:
        self.images: dict[str, CheckedImage] = {}
        self._digest_of_part: dict[int, str] = {}

    def add(self, part: dict[str, Any], image: CheckedImage) -> None:
        """Record that ``part`` now shows ``image``."""
        self.images[image.digest] = image
        self._digest_of_part[id(part)] = image.digest

    def digest(self, part: Any) -> str | None:
        """The digest of the image ``part`` shows, if it is a checked image part."""
        return self._digest_of_part.get(id(part))


@dataclass
class ChatMedia:
    """The media parts of one chat body, in order."""

    parts: list[MediaPart] = field(default_factory=list)

    @classmethod
    def find(cls, messages: Any) -> ChatMedia:
        """Every part of ``messages`` that vLLM would render as media.

        Malformed messages are skipped: vLLM's request model refuses them.
        """
        found = cls()
        if not isinstance(messages, list):
            return found
        for number, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                continue
            for index, part in enumerate(content):
                kind = _media_kind(part)
                if kind is not None:
                    param = f"messages.{number}.content.{index}"
                    found.parts.append(MediaPart(param, content, index, kind))
        return found

    @property
    def images(self) -> list[MediaPart]:
        """The image parts (checked by :meth:`check`)."""
        return [part for part in self.parts if part.is_image]

    @property
    def image_chars(self) -> int:
        """Characters of the images' URLs (not prompt text, for the rate limiter)."""
        return sum(len(part.url or "") for part in self.images)

    def refuse_unchecked(self, body: dict[str, Any], max_images: int) -> None:
        """400 for a media part we do not check, a media option, or too many images."""
        for name in REFUSED_BODY_FIELDS:
            if body.get(name) not in (None, {}):
                raise InvalidRequestError(
                    f"{name} is not supported: media are checked and sized by this server "
                    "(MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE)",
                    param=name,
                )
        for part in self.parts:
            if not part.is_image:
                raise InvalidRequestError(
                    f"{part.description} is not supported: this server takes images only, "
                    'as {"type": "image_url", "image_url": {"url": ...}} parts',
                    param=part.param,
                )
            if part.url is None:
                raise InvalidRequestError(
                    f"{part.description} has no image_url URL (a data: URL, or an http(s) "
                    "URL to a MEDIA_ALLOWED_DOMAINS host)",
                    param=f"{part.param}.image_url",
                )
        check_image_count(len(self.parts), max_images, param="messages")

    async def check(self, settings: Settings) -> CheckedParts:
        """Check each image and put a plain ``image_url`` part of our re-encoding in its place.

        Call :meth:`refuse_unchecked` first: every part is then an image with a URL.
        """
        checked = CheckedParts()
        for media in self.images:
            url = media.url
            if url is None:
                continue
            image = await load_image_reference(
                url, field=f"{media.param}.image_url", settings=settings
            )
            old = media.content[media.index].get("image_url")
            detail = old.get("detail") if isinstance(old, dict) else None
            url_field = {"url": image.data_url(), **({"detail": detail} if detail else {})}
            part = {"type": "image_url", "image_url": url_field}
            media.content[media.index] = part
            checked.add(part, image)
        return checked
