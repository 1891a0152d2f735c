"""Text from the page made safe to store, tokenize and send back as JSON."""

from __future__ import annotations

import re

_UNWANTED_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_text(text: str) -> str:
    """`text` with lone UTF-16 surrogates replaced by U+FFFD and control characters removed.

    A browser can send a lone surrogate (half of an emoji, e.g. after a cut paste); it cannot
    be encoded as UTF-8, so the database, the tokenizer and the JSON reply would each fail on
    it. NUL and other C0 controls have no place in chat text (PostgreSQL refuses NUL);
    tabs and newlines stay.
    """
    if not isinstance(text, str):
        return ""
    repaired = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return _UNWANTED_CONTROLS.sub("", repaired)
