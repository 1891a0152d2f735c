"""What the HTTP guard enforces, derived once from `Settings`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.api.keys import ApiKeys
from app.settings import Settings

MB = 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024
"""Room for the multipart boundary and part headers around one photo."""


@dataclass(frozen=True)
class WebPolicy:
    """Exposure and limits of the HTTP layer; built by `from_settings`, plain values only."""

    auth_required: bool
    show_api: bool
    on_space: bool
    local_only: bool
    data_dir: Path
    temp_dir: Path
    max_upload_bytes: int
    max_request_bytes: int
    uploads_per_minute: int
    upload_bytes_per_hour: int
    upload_total_bytes_per_hour: int
    temp_max_age_s: float
    api_keys: ApiKeys

    @classmethod
    def from_settings(cls, settings: Settings) -> WebPolicy:
        return cls(
            auth_required=bool(settings.auth),
            show_api=settings.show_api,
            on_space=settings.on_space,
            local_only=settings.is_local_only,
            data_dir=settings.data_dir.resolve(),
            temp_dir=settings.temp_dir.resolve(),
            max_upload_bytes=settings.max_upload_mb * MB,
            max_request_bytes=settings.max_request_kb * 1024,
            uploads_per_minute=settings.uploads_per_minute,
            upload_bytes_per_hour=settings.upload_mb_per_hour * MB,
            upload_total_bytes_per_hour=settings.upload_total_mb_per_hour * MB,
            temp_max_age_s=settings.temp_max_age_minutes * 60.0,
            api_keys=ApiKeys(settings.api_keys),
        )

    @property
    def max_api_body_bytes(self) -> int:
        """The largest chat-completions body: one photo at the size limit, base64-encoded, and the text."""
        return -(-self.max_upload_bytes * 4 // 3) + self.max_request_bytes

    @property
    def max_upload_body_bytes(self) -> int:
        """The largest upload request body: one photo at the size limit plus its multipart framing."""
        return self.max_upload_bytes + MULTIPART_OVERHEAD
