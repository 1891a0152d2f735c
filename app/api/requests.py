"""Reading an OpenAI chat-completions request into a turn, refusing what it cannot be.

Images come only as `data:` URIs and are decoded by the one photo pipeline (`mipha_core.images`)
within the same bounds as an upload; a URL is refused and never fetched. Mipha sees one image, the
newest, so only that one is decoded: older ones are checked for their form and dropped.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any

from PIL import Image

from app.api.errors import ApiError
from mipha_core import TEMPERATURE_RANGE, TOP_P_RANGE, GenerationParams, MiphaError, load_image

MAX_MESSAGES = 1000
MAX_STOPS = 4
MAX_STOP_CHARS = 64
ROLES = frozenset({"system", "developer", "user", "assistant"})


@dataclass(frozen=True)
class ApiLimits:
    """The bounds an API request is held to: the page's, where the page has one."""

    max_question_chars: int
    max_new_tokens: int
    max_image_bytes: int
    max_image_pixels: int


@dataclass(frozen=True)
class ChatRequest:
    """A chat-completions request, checked and ready for `app.turn`."""

    model: str | None
    messages: list[dict[str, Any]]
    """In mipha_core's format: text parts and at most one decoded image."""
    params: GenerationParams
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]
    seed: int | None


def parse_chat_request(body: bytes, *, limits: ApiLimits) -> ChatRequest:
    """The request in ``body``, or `ApiError` (400/413) naming the field that is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    if data.get("n", 1) not in (1, None):
        raise ApiError(400, "Only n=1 is supported: ask again for another reply.", param="n")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model must be a string.", param="model")
    messages = _messages(data.get("messages"), limits=limits)
    stream = _flag(data, "stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object.", param="stream_options")
    return ChatRequest(
        model=model,
        messages=messages,
        params=_params(data, limits=limits),
        stream=stream,
        include_usage=stream and _flag(options, "include_usage", param="stream_options.include_usage"),
        stop=_stops(data.get("stop")),
        seed=_seed(data.get("seed")),
    )


def _messages(raw: Any, *, limits: ApiLimits) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "messages must be a non-empty list.", param="messages")
    if len(raw) > MAX_MESSAGES:
        raise ApiError(400, f"messages has {len(raw)} entries; at most {MAX_MESSAGES} are accepted.", param="messages")
    newest_image = max((i for i, m in enumerate(raw) if _has_image(m)), default=None)
    merged: list[dict[str, Any]] = []
    for index, message in enumerate(raw):
        role, parts = _message(message, index, decode=index == newest_image, limits=limits)
        if merged and merged[-1]["role"] == role:  # two user messages in a row are one question
            merged[-1]["content"].extend(parts)
        else:
            merged.append({"role": role, "content": parts})
    question = merged[-1]
    if question["role"] != "user":
        raise ApiError(400, "The last message must come from the user.", param="messages")
    chars = sum(len(part["text"]) for part in question["content"] if part["type"] == "text")
    if chars > limits.max_question_chars:
        raise ApiError(400, f"The last message has {chars:,} characters; at most {limits.max_question_chars:,} "
                            "are accepted.", param="messages", code="message_too_long")
    return merged


def _has_image(message: Any) -> bool:
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image_url" for p in content)


def _message(message: Any, index: int, *, decode: bool, limits: ApiLimits) -> tuple[str, list[dict[str, Any]]]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ApiError(400, f"{where} must be an object with role and content.", param=where)
    role = message.get("role")
    if role not in ROLES:
        raise ApiError(400, f"{where}.role {str(role)[:40]!r} is not supported: use system, user or assistant.",
                       param=f"{where}.role")
    content = message.get("content")
    if isinstance(content, str):
        return role, [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of parts.", param=f"{where}.content")
    parts = []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url" and role == "user":
            image = _image(part.get("image_url"), f"{where}.content[{number}].image_url", decode=decode,
                           limits=limits)
            if image is not None:
                parts.append({"type": "image", "image": image})
        else:
            raise ApiError(400, f"{where}.content[{number}] is not a text part or, in a user message, an image_url "
                                "part.", param=f"{where}.content[{number}]")
    return role, parts


def _image(raw: Any, where: str, *, decode: bool, limits: ApiLimits) -> Image.Image | None:
    url = raw.get("url") if isinstance(raw, dict) else raw
    if not isinstance(url, str):
        raise ApiError(400, f"{where}.url must be a string.", param=where)
    if not url[:5].lower() == "data:":
        raise ApiError(400, "Images must be sent inline as data: URIs (data:image/jpeg;base64,...); this server "
                            "never fetches image URLs.", param=where, code="image_url_not_supported")
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().startswith("data:image/") or not header.lower().endswith(";base64"):
        raise ApiError(400, "The image must be a base64 data URI of an image (data:image/...;base64,...).",
                       param=where)
    mb = limits.max_image_bytes / (1024 * 1024)
    if math.floor(len(payload) * 3 / 4) > limits.max_image_bytes + 2:
        raise ApiError(413, f"The image is larger than the {mb:g} MB limit; send a smaller one.", param=where)
    if not decode:
        return None
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "The image's base64 data is not valid.", param=where) from None
    try:
        return load_image(data, max_pixels=limits.max_image_pixels)
    except MiphaError as e:
        raise ApiError(400, f"The image could not be used: {e}.", param=where, code="invalid_image") from None


def _params(data: dict[str, Any], *, limits: ApiLimits) -> GenerationParams:
    temperature = _number(data, "temperature", default=GenerationParams.temperature, bounds=TEMPERATURE_RANGE)
    top_p = _number(data, "top_p", default=GenerationParams.top_p, bounds=(0.0, 1.0))
    asked = data.get("max_completion_tokens", data.get("max_tokens"))
    if asked is None:
        max_new_tokens = limits.max_new_tokens
    elif isinstance(asked, int) and not isinstance(asked, bool) and asked >= 1:
        max_new_tokens = min(asked, limits.max_new_tokens)  # the server's cap, as the page's slider has it
    else:
        raise ApiError(400, "max_tokens must be a positive integer.", param="max_tokens")
    return GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=max(top_p, TOP_P_RANGE[0]))


def _number(data: dict[str, Any], name: str, *, default: float, bounds: tuple[float, float]) -> float:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not bounds[0] <= value <= bounds[1]:
        raise ApiError(400, f"{name} must be a number from {bounds[0]:g} to {bounds[1]:g}.", param=name)
    return float(value)


def _flag(data: dict[str, Any], name: str, *, param: str | None = None) -> bool:
    value = data.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{param or name} must be true or false.", param=param or name)
    return value


def _stops(raw: Any) -> tuple[str, ...]:
    stops = [raw] if isinstance(raw, str) else raw if raw is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS \
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop must be a string or a list of up to {MAX_STOPS} strings of 1 to "
                            f"{MAX_STOP_CHARS} characters.", param="stop")
    return tuple(stops)


def _seed(raw: Any) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or not -(2**63) <= raw < 2**64:
        raise ApiError(400, "seed must be an integer.", param="seed")
    return raw % 2**63
