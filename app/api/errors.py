"""Errors of the `/v1` API in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

The message is one sentence for the client's user; causes and tracebacks go to the log only.
"""

from __future__ import annotations

import json

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
"""OpenAI's `type` by status; anything else is a `server_error`."""


class ApiError(Exception):
    """A request the API answers with an error status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def headers(self) -> dict[str, str]:
        return error_headers(self.status)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_json(status: int, message: str, *, code: str | None = None) -> bytes:
    return json.dumps(error_body(status, message, code=code)).encode()


def error_headers(status: int) -> dict[str, str]:
    if status == 401:
        return {"www-authenticate": "Bearer"}
    if status in (429, 503):
        return {"retry-after": "30"}
    return {}


WRONG_KEY = ApiError(401, "Incorrect or missing API key: send `Authorization: Bearer KEY` with a key this server "
                          "was started with (--api-key).", code="invalid_api_key")
