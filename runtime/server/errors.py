"""The API's error: every refusal of every adapter (OpenAI, Ollama) is an ApiError with an HTTP
status, a stable code and a message naming the fix; each adapter renders its own body from it."""

from __future__ import annotations

from rksmolvlm.errors import RkSmolVLMError

__all__ = ["ApiError"]


class ApiError(RkSmolVLMError):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                   429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout_error"}
