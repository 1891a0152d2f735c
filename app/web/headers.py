"""Security headers for every response, and the nonce that lets Gradio's inline scripts run.

Gradio's page carries its config in inline `<script>` tags, so the policy allows scripts
from this origin plus a fresh nonce per page, written into each `<script>` tag of the page
here. Styles stay `'unsafe-inline'`: Svelte sets `style` attributes everywhere. Nothing
remote is allowed: no images, scripts, fonts or connections to other sites.
"""

from __future__ import annotations

import logging
import re
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

SPACE_FRAME_ANCESTORS = "https://huggingface.co https://*.hf.space"
CORS_HEADERS = (
    "access-control-allow-origin", "access-control-allow-credentials", "access-control-allow-methods",
    "access-control-allow-headers", "access-control-expose-headers", "access-control-max-age",
)
_SCRIPT_TAG = re.compile(rb"<script(?=[\s>])", re.IGNORECASE)
# `--share` pages load Gradio's frontend from S3; the same bundle ships in the package.
_REMOTE_BUNDLE = re.compile(
    rb'<script type="module" crossorigin src="https://gradio\.s3-us-west-2\.amazonaws\.com/[^"]*/gradio\.js">'
    rb"</script>")
_LOCAL_BUNDLE = re.compile(
    r'<script type="module" crossorigin src="\./assets/index-[\w-]+\.js"></script>\s*'
    r'<link rel="stylesheet" crossorigin href="\./assets/index-[\w-]+\.css">')


def content_security_policy(*, on_space: bool, nonce: str | None = None, sandbox: bool = False) -> str:
    """The policy for one response; `nonce` for a page, `sandbox` for served files."""
    scripts = "'self'" + (f" 'nonce-{nonce}'" if nonce else "")
    ancestors = f"'self' {SPACE_FRAME_ANCESTORS}" if on_space else "'self'"
    directives = [
        "default-src 'self'",
        f"script-src {scripts}",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "media-src 'self' data: blob:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "worker-src 'self' blob:",
        "frame-src 'none'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        f"frame-ancestors {ancestors}",
    ]
    if sandbox:
        directives.append("sandbox")
    return "; ".join(directives)


def security_headers(*, on_space: bool, csp: str) -> dict[str, str]:
    """The headers added to every response (a Space is framed by huggingface.co)."""
    headers = {
        "content-security-policy": csp,
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "cross-origin-resource-policy": "same-origin",
        "permissions-policy": "camera=(), microphone=(), geolocation=()",
    }
    if not on_space:
        headers["x-frame-options"] = "SAMEORIGIN"
    return headers


def add_nonce(page: bytes, nonce: str) -> bytes:
    """Every `<script` tag of the page gets the nonce (the config JSON in it escapes `<`)."""
    page = _use_local_bundle(page)
    return _SCRIPT_TAG.sub(f'<script nonce="{nonce}"'.encode(), page)


def _use_local_bundle(page: bytes) -> bytes:
    tags = _local_bundle_tags()
    if tags is None or not _REMOTE_BUNDLE.search(page):
        return page
    return _REMOTE_BUNDLE.sub(lambda _: tags, page, count=1)


@cache
def _local_bundle_tags() -> bytes | None:
    """The script and stylesheet tags of the frontend bundled with gradio (from its index.html)."""
    import gradio

    index = Path(gradio.__file__).parent / "templates" / "frontend" / "index.html"
    match = _LOCAL_BUNDLE.search(index.read_text(encoding="utf-8"))
    if match is None:
        log.warning("gradio's index.html has no frontend bundle tag; --share pages will not load")
        return None
    return match.group(0).encode()
