"""Errors a client can cause, each with its HTTP status and OpenAI's error body.

OpenAI's clients read ``{"error": {"message", "type", "param", "code"}}`` and raise the
matching exception class from the status (400 ``BadRequestError``, 401
``AuthenticationError``, 404 ``NotFoundError``, 429 ``RateLimitError``, ...), so every
refusal of the server is one of these and never a bare traceback.
"""

from __future__ import annotations


class APIError(Exception):
    """A refusal with an HTTP status, in OpenAI's error format."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unknown_model(name: str) -> APIError:
    """A 404 that names only the model asked for: the list of what a server holds may be long, and
    other tenants' (``GET /v1/models`` gives it to those who hold a key)."""
    shown = name if len(name) <= 100 else name[:100] + "..."
    return APIError(404, f"The model {shown!r} does not exist", param="model", code="model_not_found")


def queue_full(limit: int) -> APIError:
    return APIError(429, f"The server is busy: {limit} requests are already waiting; retry later",
                    type="rate_limit_error", code="queue_full")


def unavailable(message: str = "The server is shutting down") -> APIError:
    return APIError(503, message, type="server_error", code="unavailable")


def internal(message: str) -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")
