"""The one settings object the app runs with.

`launch.py` builds it from flags and environment variables and passes it down; nothing in
`app/` reads `sys.argv` or `os.environ` for these values.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Quantization = Literal["8bit", "4bit"]

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class Credential:
    """One `--auth USER:PASS` pair. The password is kept out of `repr` so it never reaches a log."""

    username: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if not self.username or not self.password:
            raise ValueError(f"auth needs USER:PASS with both parts non-empty, got user {self.username!r}")


@dataclass(frozen=True)
class ApiKey:
    """One `--api-key`: a secret a client of the `/v1` API sends as `Authorization: Bearer ...`.

    Kept out of `repr`; `label` (its position, "key 1") is what logs name."""

    secret: str = field(repr=False)
    label: str = "key"

    def __post_init__(self) -> None:
        if len(self.secret) < 16 or any(c.isspace() for c in self.secret):
            raise ValueError(f"API {self.label} must be at least 16 characters without spaces "
                             "(e.g. from `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")


@dataclass(frozen=True)
class RemoteEngineSettings:
    """`--engine-url` and its companions: an OpenAI-compatible server that generates the replies."""

    url: str
    api_key: str | None = field(default=None, repr=False)
    model: str | None = None
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"engine URL must start with http:// or https://, got {self.url!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"engine timeout must be positive, got {self.timeout_s}")


@dataclass(frozen=True)
class Settings:
    """Everything `launch.py` decides: model, server, exposure, storage and generation limits."""

    model: str = "zhumj34/Mipha-3B"
    device: str = "auto"
    dtype: str = "auto"
    quantization: Quantization | None = None
    runtime: str = "auto"
    """Where the language model runs: "auto", "llama.cpp" (CPU) or "torch"."""
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: tuple[Credential, ...] = ()
    data_dir: Path = Path("data")
    database_url: str | None = None
    max_new_tokens: int = 512
    concurrency: int = 1
    kv_cache_mb: int | None = None
    """Memory for keeping conversations' KV caches between turns; None: the engine's default."""
    max_message_chars: int = 4000
    max_upload_mb: int = 20
    """The largest photo one upload may carry."""
    uploads_per_minute: int = 10
    """Uploads one visitor (signed-in user, else client address) may start per minute."""
    upload_mb_per_hour: int = 200
    """Upload volume one visitor may send per hour."""
    upload_total_mb_per_hour: int = 2000
    """Upload volume all visitors together may send per hour, so many addresses cannot fill the disk."""
    max_request_kb: int = 1024
    """The largest body of any request other than an upload (questions are a few KB)."""
    temp_max_age_minutes: int = 60
    """Uploads and cached copies older than this are deleted from the temporary directory."""
    show_api: bool = False
    """Publish Gradio's API page and schema; off, they answer 404 and the footer has no API link."""
    on_space: bool = False
    oauth_enabled: bool = False
    """A Space with `hf_oauth: true`: show a Hugging Face login; the account then owns the chats."""
    zero_gpu: bool = False
    api_keys: tuple[ApiKey, ...] = ()
    """Keys of the OpenAI-compatible `/v1` API; without any, the API is off (its routes answer 404)."""
    api_queue: int = 16
    """API calls that may wait for a turn of the model; more are refused with 429."""
    remote_engine: RemoteEngineSettings | None = None
    """Send every turn to this server instead of loading the model here."""

    def __post_init__(self) -> None:
        if self.runtime not in ("auto", "llama.cpp", "torch"):
            raise ValueError(f"runtime must be auto, llama.cpp or torch, got {self.runtime!r}")
        if self.quantization not in (None, "8bit", "4bit"):
            raise ValueError(f"quantization must be None, '8bit' or '4bit', got {self.quantization!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be in [1, 65535], got {self.port}")
        if not 1 <= self.max_new_tokens <= 2048:
            raise ValueError(f"max_new_tokens must be in [1, 2048], got {self.max_new_tokens}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.kv_cache_mb is not None and self.kv_cache_mb < 0:
            raise ValueError(f"kv_cache_mb must be 0 or more, got {self.kv_cache_mb}")
        if self.api_queue < 0:
            raise ValueError(f"api_queue must be 0 or more, got {self.api_queue}")
        if self.max_message_chars < 1:
            raise ValueError(f"max_message_chars must be at least 1, got {self.max_message_chars}")
        for name in ("max_upload_mb", "uploads_per_minute", "upload_mb_per_hour", "upload_total_mb_per_hour",
                     "max_request_kb", "temp_max_age_minutes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def temp_dir(self) -> Path:
        """Gradio's upload and cache directory; this process empties it at start and sweeps it."""
        return self.data_dir / "tmp" / "gradio"

    @property
    def is_local_only(self) -> bool:
        """True when only this machine can reach the server (loopback host and no share link)."""
        if self.share:
            return False
        if self.host in LOCAL_HOSTS:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def exposure_warning(self) -> str | None:
        """The warning to print when strangers can reach the model without logging in."""
        if self.auth or self.is_local_only:
            return None
        where = "a public share link" if self.share else f"host {self.host}"
        return (
            f"Mipha Chat is reachable through {where} without --auth: anyone with the address can "
            "use the model on this machine. Their conversations stay private to their own browser. "
            "Add --auth USER:PASS (or --auth-file) to require a login."
        )
