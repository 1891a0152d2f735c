"""Which of Gradio's routes a visitor may reach, and which need a login.

Deny by default: with `--auth`, every route needs the login cookie except what the login
page itself loads. Routes this app never uses (monitoring, run history, the vibe editor, the
URL proxy, MCP, ...) answer 404 for everyone, signed in or not.
"""

from __future__ import annotations

API = "/gradio_api"
UPLOAD_PATH = f"{API}/upload"
FILE_PREFIXES = (f"{API}/file=", f"{API}/file/")

# What the login page loads before anyone is signed in (checked in Chromium), and the
# startup call `launch()` makes to its own server (it runs the startup events once).
PUBLIC_PATHS = frozenset({
    "/", "/login", "/login/", "/logout", "/favicon.ico", "/theme.css", "/manifest.json", "/robots.txt",
    "/pwa_icon", f"{API}/startup-events",
})
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon/")

# Never used by this app; some read other sessions' state or fetch remote URLs.
UNUSED_PREFIXES = (
    "/monitoring", f"{API}/runs", f"{API}/run-history", f"{API}/vibe-", f"{API}/undo-vibe-edit",
    f"{API}/dev/", f"{API}/mcp", f"{API}/process_recording", f"{API}/proxy=", f"{API}/deep_link",
)
# Gradio's API page, its schemas and the client-library call routes: only with `--show-api`.
# (`/gradio_api/run/` stays: the page sends every `queue=False` event there.)
API_PREFIXES = (
    f"{API}/info", f"{API}/openapi.json", "/openapi.json", "/docs", "/redoc", f"{API}/api/", f"{API}/call/",
)


# The OpenAI-compatible API: its own keys instead of the login, and OpenAI's error format.
OPENAI_API = "/v1"
OPENAI_CHAT_PATH = f"{OPENAI_API}/chat/completions"


def is_openai_api(path: str) -> bool:
    return path == OPENAI_API or path.startswith(f"{OPENAI_API}/")


def is_hidden(path: str, *, show_api: bool) -> bool:
    """True for routes that answer 404 whoever asks."""
    if path.startswith(UNUSED_PREFIXES):
        return True
    return not show_api and path.startswith(API_PREFIXES)


def needs_login(path: str) -> bool:
    """True for every route except the login page and the static files it loads."""
    return path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES)


def requested_file(path: str) -> str | None:
    """The file a `/gradio_api/file=...` request names (already percent-decoded), else None."""
    for prefix in FILE_PREFIXES:
        if path.startswith(prefix):
            return path[len(prefix):]
    return None
