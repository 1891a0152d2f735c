"""Upload limits: one photo per request, a size cap, and per-visitor rate and volume.

Bodies are read here with a byte cap (Content-Length is a claim, not a fact) before Gradio
sees them, so an oversized or multi-file upload is refused before anything reaches the disk.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.types import Receive

from app.web.responses import Refusal

MINUTE = 60.0
HOUR = 3600.0
MAX_VISITORS = 10_000
"""Visitors remembered at once; the least recent is forgotten first, so memory stays bounded."""
TOTAL = "\0all visitors"


class BodyRefused(Exception):
    """Reading the body stopped early; `refusal` says why."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


class ClientGone(Exception):
    """The client disconnected before sending the whole body."""


class UploadBudget:
    """Sliding windows of upload starts (per minute) and bytes (per hour), per visitor and in total."""

    def __init__(self, *, per_minute: int, bytes_per_hour: int, total_bytes_per_hour: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.bytes_per_hour = bytes_per_hour
        self.total_bytes_per_hour = total_bytes_per_hour
        self._clock = clock
        self._starts: OrderedDict[str, deque[float]] = OrderedDict()
        self._bytes: OrderedDict[str, deque[tuple[float, int]]] = OrderedDict()

    def start(self, visitor: str) -> Refusal | None:
        """Count one upload start; a refusal when the visitor started too many this minute."""
        now = self._clock()
        starts = _recent(self._starts, visitor)
        while starts and starts[0] <= now - MINUTE:
            starts.popleft()
        if len(starts) >= self.per_minute:
            return Refusal(429, "Too many uploads in a minute; wait a moment and try again.")
        starts.append(now)
        return None

    def bytes_left(self, visitor: str) -> tuple[int, int]:
        """Bytes this visitor, and all visitors together, may still send this hour."""
        return (self.bytes_per_hour - self._used(visitor), self.total_bytes_per_hour - self._used(TOTAL))

    def spend(self, visitor: str, size: int) -> None:
        now = self._clock()
        for key in (visitor, TOTAL):
            _recent(self._bytes, key).append((now, size))

    def _used(self, key: str) -> int:
        spent = _recent(self._bytes, key)
        hour_ago = self._clock() - HOUR
        while spent and spent[0][0] <= hour_ago:
            spent.popleft()
        return sum(size for _, size in spent)


def _recent(table: OrderedDict, key: str) -> deque:
    """The visitor's window, marked as most recently used; forgets the oldest visitor when full."""
    window = table.pop(key, None)
    table[key] = window if window is not None else deque()
    if len(table) > MAX_VISITORS:
        table.popitem(last=False)
    return table[key]


async def read_body(receive: Receive, *, limit: int, too_large: Refusal,
                    on_chunk: Callable[[bytes], None] | None = None) -> bytes:
    """The whole request body, refused with `too_large` as soon as it passes `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyRefused(too_large)
        if on_chunk is not None:
            on_chunk(chunk)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def part_counter(content_type: str, *, max_parts: int) -> Callable[[bytes], None]:
    """A chunk callback that refuses a multipart body with more than `max_parts` parts."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise BodyRefused(Refusal(400, "Uploads must be sent as a form with one photo."))
    parts = 0

    def begin_part() -> None:
        nonlocal parts
        parts += 1
        if parts > max_parts:
            raise BodyRefused(Refusal(413, "Send one photo per upload."))

    parser = MultipartParser(boundary, callbacks={"on_part_begin": begin_part})

    def feed(chunk: bytes) -> None:
        try:
            parser.write(chunk)
        except MultipartParseError as e:
            raise BodyRefused(Refusal(400, "The upload could not be read; add the photo again.")) from e

    return feed


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body read earlier, then waits on the client as before."""
    sent = False

    async def receive_again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_again
