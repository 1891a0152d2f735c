"""Same-origin checks: which page a request comes from, and which host name it was sent to.

A browser names the page that made a request in `Origin` (always on POST and on cross-origin
fetches). The app's own page has the origin of the address it was loaded from, which is the
`Host` the request arrives with (or `X-Forwarded-Host` behind a proxy such as a share link).
The scheme is not compared: a proxy in front may end TLS.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def is_same_origin(headers: Headers) -> bool:
    """True when the request has no `Origin` or names the address the request was sent to."""
    origin = headers.get("origin")
    if origin is None:
        return True
    origin_address = _origin_address(origin)
    if origin_address is None:
        return False  # "null" (sandboxed frames, files) and anything unparsable
    return origin_address in _request_addresses(headers, default_port=DEFAULT_PORTS.get(urlsplit(origin).scheme))


def is_loopback_host(headers: Headers) -> bool:
    """True when the `Host` header is a loopback name (against DNS rebinding of a local server)."""
    host = _split_host(headers.get("host", ""))[0]
    return host in LOOPBACK_NAMES


def _origin_address(origin: str) -> tuple[str, int | None] | None:
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.hostname, port or DEFAULT_PORTS[parts.scheme]


def _request_addresses(headers: Headers, *, default_port: int | None) -> set[tuple[str, int | None]]:
    names = [headers.get("host", "")]
    forwarded = headers.get("x-forwarded-host")
    if forwarded:
        names.append(forwarded.split(",")[0].strip())
    addresses = set()
    for name in names:
        host, port = _split_host(name)
        if host:
            addresses.add((host, port or default_port))
    return addresses


def _split_host(value: str) -> tuple[str, int | None]:
    """`name[:port]` or `[v6]:port` to a lower-case host name and port (None when absent or bad)."""
    try:
        parts = urlsplit(f"//{value.strip()}")
        return (parts.hostname or ""), parts.port
    except ValueError:
        return "", None
