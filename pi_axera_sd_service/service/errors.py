"""Every error the service raises to its callers, each with the HTTP status it stands for.

The API maps them to a response body once (`api/errors.py`); the CLI prints their message. Model
stage failures stay `pipeline.stages.StageError` and are mapped beside these.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the service's errors: `message` for the client, `status_code`, extra `headers`."""

    status_code = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        return {}

    @property
    def error_name(self) -> str:
        """The `error` of A1111's body: the exception's class name."""
        return type(self).__name__


class RequestError(ServiceError):
    """A client error; the message names the field (400 unless given)."""

    status_code = 400

    def __init__(self, field: str, message: str, status_code: int | None = None):
        super().__init__(message)
        self.field = field
        if status_code is not None:
            self.status_code = status_code

    @property
    def error_name(self) -> str:
        return "HTTPException"  # A1111 raises HTTPException for bad requests


class CapabilityError(RequestError):
    """The capability table rejects a field value (422; /generate answers every client error with 400)."""

    status_code = 422


class FeatureUnavailableError(ServiceError):
    """A route this service has but cannot serve with the loaded models (501)."""

    status_code = 501

    @property
    def error_name(self) -> str:
        return "NotImplementedError"


class ServiceUnavailableError(ServiceError):
    """A job refused or dropped without running; HTTP 503 (with Retry-After when known)."""

    status_code = 503

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class QueueFullError(ServiceUnavailableError):
    """max_queue jobs are already waiting."""


class QueueTimeoutError(ServiceUnavailableError):
    """The job waited longer than queue_timeout."""


class ShuttingDownError(ServiceUnavailableError):
    """The service is stopping and takes no new work."""


class DeviceLostError(ServiceUnavailableError):
    """The NPU (or its runtime) is gone, or the models failed to load; jobs fail fast until restart."""


class NotReadyError(ServiceUnavailableError):
    """Models are not loaded yet."""


class ClientDisconnectedError(ServiceError):
    """The client left while its job was queued; the job was dropped (HTTP 499, never seen)."""

    status_code = 499


class StateWriteError(ServiceError):
    """Persistent state (options.json) could not be written; nothing was changed (500: the server's
    storage, not the request, is at fault, and retrying will not help until it is fixed)."""

    status_code = 500

    @property
    def error_name(self) -> str:
        return "OSError"
