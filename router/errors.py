"""Every error the router answers with, and the one place mapping them to HTTP.

TGI's clients parse `{"error": str, "error_type": str}`; the status codes and
wording follow TGI (`Input validation error: ...` → 422, overload → 429,
failures during generation → 424).
"""

from __future__ import annotations


class EmberError(Exception):
    """Base of the errors that become an HTTP answer (status, body)."""

    status: int = 500
    error_type: str = "internal"
    prefix: str = ""
    # The `err` label of tgi_request_failure for this error.
    metric_label: str = "internal"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.detail = message

    @property
    def message(self) -> str:
        return f"{self.prefix}{self.detail}"

    def body(self) -> dict:
        return {"error": self.message, "error_type": self.error_type}

    def headers(self) -> dict[str, str]:
        return {}


class ValidationError(EmberError):
    status = 422
    error_type = "validation"
    prefix = "Input validation error: "
    metric_label = "validation"


class BodyError(EmberError):
    """A body that is not JSON, or not the expected shape (422 like TGI's extractor)."""

    status = 422
    error_type = "validation"
    prefix = "Failed to deserialize the JSON body into the target type: "
    metric_label = "validation"


class PayloadTooLarge(EmberError):
    status = 413
    error_type = "payload_too_large"
    metric_label = "validation"

    def __init__(self, limit: int) -> None:
        super().__init__(f"Payload too large: the body exceeds {limit} bytes")


class OverloadedError(EmberError):
    status = 429
    error_type = "overloaded"
    metric_label = "overloaded"

    def __init__(self) -> None:
        super().__init__("Model is overloaded")

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class GenerationError(EmberError):
    status = 424
    error_type = "generation"
    prefix = "Request failed during generation: "
    metric_label = "generation"


class IncompleteGeneration(EmberError):
    status = 500
    error_type = "incomplete_generation"
    metric_label = "incomplete"

    def __init__(self) -> None:
        super().__init__("Incomplete generation")


class UnhealthyError(EmberError):
    status = 503
    error_type = "healthcheck"

    def __init__(self) -> None:
        super().__init__("unhealthy")


class DrainingError(EmberError):
    """The server got SIGTERM: it finishes what is in flight and takes nothing new (retry elsewhere)."""

    status = 503
    error_type = "draining"
    metric_label = "draining"

    def __init__(self) -> None:
        super().__init__("the server is shutting down: it finishes the requests in flight and accepts no new ones")

    def headers(self) -> dict[str, str]:
        return {"retry-after": "1"}


class NotFound(EmberError):
    status = 404
    error_type = "not_found"


def error_response(exc: EmberError):
    """The Starlette response for an error (JSON body, status, extra headers)."""
    from starlette.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def openai_body(exc: EmberError, param: str | None = None) -> dict:
    """An error in OpenAI's shape (the /v1 routes: OpenAI's and Jan's), with the status the TGI routes use."""
    return {"error": {"message": exc.message, "type": exc.error_type, "param": param, "code": exc.status}}


def openai_response(exc: EmberError):
    from starlette.responses import JSONResponse

    return JSONResponse(openai_body(exc), status_code=exc.status, headers=exc.headers())


class ClientDisconnected(EmberError):
    """The client closed the connection; nobody reads this answer (nginx's 499)."""

    status = 499
    error_type = "client_closed"
    metric_label = "dropped"

    def __init__(self) -> None:
        super().__init__("Client closed the connection")
