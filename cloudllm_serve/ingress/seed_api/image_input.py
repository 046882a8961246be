"""The bodies of ``POST /vision`` and ``POST /multimodal``: JSON or ``multipart/form-data``.

Both carry the fields of ``/generate`` (a bad one is a 400 naming it) plus images:
``/vision`` exactly one (``image``), ``/multimodal`` up to ``MAX_IMAGES_PER_REQUEST``
(``images``, a list in JSON, a repeated field in a form). In JSON an image is base64
or a data URL; in a form, a file (or a base64 text field). Form fields are strings,
so numbers, booleans and the JSON schema are read from their text before the same
pydantic model checks them all.

Every image then goes through :mod:`cloudllm_serve.ingress.images`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Request
from pydantic import ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from cloudllm_serve.errors import InvalidRequestError, UnsupportedMediaTypeError
from cloudllm_serve.ingress.images import (
    CheckedImage,
    ImageLimits,
    check_image_async,
    check_image_count,
    decode_base64_image,
    load_image_reference,
)
from cloudllm_serve.ingress.json_limits import JSONLimitError, loads_checked
from cloudllm_serve.ingress.seed_api.schemas import GenerateRequest
from cloudllm_serve.settings import Settings

#: The media types of an image upload (what ``images.sniff_format`` takes).
IMAGE_CONTENT_TYPES = "image/png, image/jpeg, image/webp, image/gif"
#: An image as read from the request, unchecked: its field name, and its bytes or the
#: reference the JSON carried (base64, a data URL or an http(s) URL).
RawImage = tuple[str, bytes | str]
#: Form fields beside the images (``/generate``'s fields).
_FORM_FIELDS = ("message", "conversation_id", "max_tokens", "temperature", "stream", "json_schema")


#: A small picture (8x8 PNG) as a data URL, for the documented examples.
EXAMPLE_IMAGE = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mM8"
    "UaHBgA0wMeAAg1MCAB4nAXgllso1AAAAAElFTkSuQmCC"
)


class VisionRequest(GenerateRequest):
    """Body of ``POST /vision`` (JSON; a form has the same fields, ``image`` a file)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"message": "What is in this picture?", "image": EXAMPLE_IMAGE}]
        }
    )

    image: str = Field(
        description="the image (PNG, JPEG, WEBP or GIF): base64, a data URL, or an http(s) "
        "URL on a MEDIA_ALLOWED_DOMAINS host; in multipart/form-data a file field",
        json_schema_extra={"minLength": 1},
    )


class MultimodalRequest(GenerateRequest):
    """Body of ``POST /multimodal`` (JSON; a form repeats the ``images`` file field)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"message": "Compare them", "images": [EXAMPLE_IMAGE, EXAMPLE_IMAGE]}]
        }
    )

    images: list[Annotated[str, Field(json_schema_extra={"minLength": 1})]] = Field(
        default_factory=list,
        description="images, each as /vision's image, shown before the message "
        "(at most MAX_IMAGES_PER_REQUEST; later turns still see earlier turns' images)",
    )


def _form_value(name: str, value: str) -> Any:
    """A form field's text as the JSON body would carry it (left as text when unreadable)."""
    text = value.strip()
    if name == "max_tokens" and text.lstrip("-").isdigit():
        return int(text)
    if name in ("max_tokens", "temperature"):  # max_tokens: 3.0 is 3, as in JSON
        try:
            return float(text)
        except ValueError:
            return value
    if name == "stream" and text.lower() in ("true", "false", "1", "0"):
        return text.lower() in ("true", "1")
    if name == "json_schema":
        try:
            return loads_checked(text)
        except JSONLimitError as error:
            raise error.request_error("json_schema") from None
        except ValueError:
            raise InvalidRequestError(
                "json_schema is not valid JSON", param="json_schema"
            ) from None
    if name == "conversation_id" and not text:
        return None
    return value


async def read_image_request(
    request: Request, model: type[GenerateRequest], image_field: str, settings: Settings
) -> tuple[GenerateRequest, list[RawImage]]:
    """The validated fields and each image's field name and bytes (or reference), unchecked.

    A reference is the JSON text: base64, a data URL or an allowlisted http(s) URL.

    Raises 415 for another content type, the 422/400 of ``/generate`` for bad fields,
    400 (or 413) for images that are not base64 or too many of them.
    """
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    limits = ImageLimits.from_settings(settings)
    many = image_field == "images"
    fields: dict[str, Any]
    if media_type == "application/json":
        try:
            raw = loads_checked(await request.body())
        except JSONLimitError as error:
            raise error.request_error() from None
        except (ValueError, UnicodeDecodeError) as error:
            raise InvalidRequestError(
                f"request body is not valid JSON: {error}", param="body"
            ) from None
        if not isinstance(raw, dict):
            raise InvalidRequestError(
                "request body must be a JSON object, e.g. "
                f'{{"message": "What is in this picture?", "{image_field}": "<base64>"}}',
                param="body",
            )
        body = _validated(model, raw)
        references = list(body.images) if isinstance(body, MultimodalRequest) else []
        if isinstance(body, VisionRequest):
            references = [body.image]
        names = [f"{image_field}.{i}" if many else image_field for i in range(len(references))]
        _check_count(len(references), image_field, settings)
        return body, list(zip(names, references, strict=True))
    if media_type == "multipart/form-data":
        limit = settings.MAX_IMAGES_PER_REQUEST
        async with request.form(
            max_files=limit + 1, max_fields=len(_FORM_FIELDS) + limit + 1
        ) as form:
            fields = {}
            uploads: list[Any] = []
            for name, value in form.multi_items():
                if name == image_field:
                    uploads.append(value)
                elif name in fields:
                    raise InvalidRequestError(f"form field {name} is given twice", param=name)
                elif isinstance(value, UploadFile):
                    raise InvalidRequestError(
                        f"form field {name} must be text, not a file", param=name
                    )
                else:
                    fields[name] = _form_value(name, value)
            _check_count(len(uploads), image_field, settings)
            if model is VisionRequest:
                if not uploads:
                    raise InvalidRequestError("image is required (a file field)", param="image")
                fields["image"] = ""  # checked below, from the upload
            body = _validated(model, fields)
            images: list[RawImage] = []
            for index, upload in enumerate(uploads):
                name = f"{image_field}.{index}" if many else image_field
                if isinstance(upload, UploadFile):
                    data = await upload.read(limits.max_bytes + 1)
                else:
                    data = decode_base64_image(str(upload), field=name, limits=limits)
                images.append((name, data))
        return body, images
    raise UnsupportedMediaTypeError(
        "Content-Type must be application/json or multipart/form-data "
        f"(got {media_type or 'none'})",
        param="body",
    )


def _validated(model: type[GenerateRequest], fields: dict[str, Any]) -> GenerateRequest:
    """The fields as ``model``; a bad one is a 400 naming it (the first, if several)."""
    try:
        return model.model_validate(fields)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            name = ".".join(str(p) for p in item.get("loc", ())) or "body"
            text = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
            problems.append(
                (name, "unknown field" if item.get("type") == "extra_forbidden" else text)
            )
        detail = "; ".join(f"{name}: {text}" for name, text in problems)
        raise InvalidRequestError(detail, param=problems[0][0]) from None


def _check_count(count: int, field: str, settings: Settings) -> None:
    if field == "image" and count > 1:
        raise InvalidRequestError(
            "POST /vision takes one image; use /multimodal for more", param=field
        )
    check_image_count(count, settings.MAX_IMAGES_PER_REQUEST, param=field)


async def check_images(images: list[RawImage], settings: Settings) -> list[CheckedImage]:
    """Each image loaded (references), checked and normalised (errors name its field).

    Fetching is asynchronous and decoding runs in a worker thread: never on the event loop.
    """
    limits = ImageLimits.from_settings(settings)
    checked = []
    for name, image in images:
        if isinstance(image, str):
            checked.append(await load_image_reference(image, field=name, settings=settings))
        else:
            checked.append(await check_image_async(image, field=name, limits=limits))
    return checked


def openapi_body(model: type[GenerateRequest], image_field: str) -> dict[str, Any]:
    """The ``requestBody`` of an image endpoint: its JSON model, or the same as a form."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    form_properties = dict(schema.get("properties", {}))
    file_schema = {"type": "string", "format": "binary"}
    form_properties[image_field] = (
        {"type": "array", "items": file_schema} if image_field == "images" else file_schema
    )
    form_properties["json_schema"] = {
        "type": "object",
        "description": "a JSON Schema the answer must follow, as JSON text",
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": form_properties,
                        "required": schema.get("required", []),
                        "additionalProperties": False,
                    },
                    "encoding": {
                        image_field: {"contentType": IMAGE_CONTENT_TYPES},
                        "json_schema": {"contentType": "application/json"},
                    },
                },
            },
        }
    }
