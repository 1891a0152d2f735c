"""Is a JPEG or PNG file already free of metadata? Checked on the raw bytes.

Photos this app stores were re-encoded from pixels only, so their files hold
nothing but image data. An imported photo that passes these checks is such a
file (typically one of our own exports) and can be stored byte for byte:
re-encoding a JPEG again would change its pixels and its SHA-256. Anything
else, including a segment or chunk these lists do not know, is treated as not
clean and goes through the full clean-up like an upload.
"""

from __future__ import annotations

# Markers with a length field that carry image data only: SOF0-15 (except
# C4 DHT, C8 JPG and CC DAC, listed on their own), DHT, DAC, DQT, DRI.
_JPEG_IMAGE_SEGMENTS = (frozenset(range(0xC0, 0xD0)) - {0xC8}) | {0xDB, 0xDD}
_JPEG_SOS, _JPEG_EOI, _JPEG_APP0 = 0xDA, 0xD9, 0xE0
_JFIF_WITHOUT_THUMBNAIL_LENGTH = 16  # APP0 "JFIF\0" with a 0x0 thumbnail
_RESTART_MARKERS = range(0xD0, 0xD8)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IMAGE_CHUNKS = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"})


def is_clean_jpeg(data: bytes) -> bool:
    """Only image segments (and a thumbnail-less JFIF header), ending exactly at EOI.

    Rejects EXIF/XMP/ICC (APP1-15), comments, fill bytes and anything after EOI.
    """
    if not data.startswith(b"\xff\xd8"):
        return False
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == _JPEG_EOI:
            return position + 2 == len(data)
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if not _is_image_segment(marker, data[position + 4 : position + 2 + length], length):
            return False
        position += 2 + length
        if marker == _JPEG_SOS:
            position = _end_of_scan(data, position)
    return position + 2 == len(data) and data[position:] == b"\xff\xd9"


def _is_image_segment(marker: int, payload: bytes, length: int) -> bool:
    if marker == _JPEG_APP0:
        no_thumbnail = payload[12:14] == b"\0\0"
        return length == _JFIF_WITHOUT_THUMBNAIL_LENGTH and payload.startswith(b"JFIF\x00") and no_thumbnail
    return marker in _JPEG_IMAGE_SEGMENTS or marker == _JPEG_SOS


def _end_of_scan(data: bytes, position: int) -> int:
    """Where the entropy-coded data after SOS ends: the first 0xFF not followed by 0x00 or RSTn."""
    while True:
        position = data.find(b"\xff", position)
        if position < 0 or position + 1 >= len(data):
            return len(data)
        following = data[position + 1]
        if following != 0x00 and following not in _RESTART_MARKERS:
            return position
        position += 2


def is_clean_png(data: bytes) -> bool:
    """Only IHDR, PLTE, tRNS, IDAT and IEND chunks, ending exactly after IEND.

    Rejects eXIf, iTXt/tEXt/zTXt (XMP, comments), iCCP, tIME, pHYs and the rest.
    """
    if not data.startswith(_PNG_SIGNATURE):
        return False
    position = len(_PNG_SIGNATURE)
    while position + 12 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        if kind not in _PNG_IMAGE_CHUNKS:
            return False
        position += 12 + length  # length, type, data, CRC
        if kind == b"IEND":
            return position == len(data)
    return False
