"""Who may call the `/v1` API: the configured keys, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from app.settings import ApiKey


class ApiKeys:
    """The keys of `--api-key` / `MIPHA_API_KEYS`; none means the API is off."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._digests = [(key.label, _digest(key.secret)) for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, authorization: str | None) -> str | None:
        """The label of the key an `Authorization: Bearer KEY` header carries, or None.

        Every key is compared, each in constant time over fixed-length digests, so neither the
        time taken nor an early exit says how much of a guess was right, or which key it was near.
        """
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        offered = _digest(token.strip())
        found = None
        for label, expected in self._digests:
            if hmac.compare_digest(offered, expected):
                found = label
        return found


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()
