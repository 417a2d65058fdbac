"""One error tree for the whole project.

Every failure a user can see carries a ``code`` from DESIGN.md §6. A :class:`PermanentError`
fails its item at once; a :class:`TransientError` is retried with backoff and, once the retry
budget is spent, fails the item with its code.
"""

from __future__ import annotations

ERROR_CODES = (
    "not_found",
    "access_denied",
    "bad_image",
    "bad_video",
    "too_large",
    "too_small",
    "invalid_item",
    "duplicate_output",
    "model_error",
    "storage_error",
    "timeout",
    "cancelled",
    "manifest_changed",
)


class CapvstError(Exception):
    """Base of every capvst error: a message for people and a machine-readable code."""

    code = "model_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            if code not in ERROR_CODES:
                raise ValueError(f"unknown error code {code!r}")
            self.code = code

    @property
    def message(self) -> str:
        """The human-readable message."""
        return str(self.args[0]) if self.args else ""

    def as_dict(self) -> dict[str, str]:
        """The report's ``error`` object."""
        return {"code": self.code, "message": self.message}


class PermanentError(CapvstError):
    """Retrying cannot help: fail the item now."""


class TransientError(CapvstError):
    """Worth retrying with backoff (network faults, throttling, a restarting Redis)."""

    code = "storage_error"


class NotFound(PermanentError):
    """An input object or file does not exist."""

    code = "not_found"


class AccessDenied(PermanentError):
    """The URI is outside what this deployment may read or write."""

    code = "access_denied"


class BadImage(PermanentError):
    """The bytes are not a decodable image."""

    code = "bad_image"


class BadVideo(PermanentError):
    """The bytes are not a decodable video, or the video is truncated or corrupt."""

    code = "bad_video"


class TooLarge(PermanentError):
    """The image exceeds the pixel or byte limit."""

    code = "too_large"


class TooSmall(PermanentError):
    """A side is under the network's minimum after resizing."""

    code = "too_small"


class InvalidItem(PermanentError):
    """A manifest line or option has a bad value."""

    code = "invalid_item"


class DuplicateOutput(PermanentError):
    """An earlier manifest line already names this output."""

    code = "duplicate_output"


class Cancelled(PermanentError):
    """The job was cancelled before the item ran."""

    code = "cancelled"


class Timeout(PermanentError):
    """The item ran past its time limit."""

    code = "timeout"


class ManifestChanged(PermanentError):
    """The manifest was overwritten after the job was submitted; lines would shift."""

    code = "manifest_changed"


class ModelError(PermanentError):
    """The model cannot run on this input or cannot be loaded."""

    code = "model_error"


class OutOfMemory(ModelError):
    """The device ran out of memory; a smaller tile may still fit (code ``model_error``)."""


class CheckpointError(ModelError):
    """A checkpoint is missing, unreadable, unsafe or of another network."""


class StorageError(TransientError):
    """Object storage failed in a way that may pass."""

    code = "storage_error"


class PermanentStorageError(PermanentError):
    """Object storage refused in a way retrying cannot fix (e.g. an unwritable prefix)."""

    code = "storage_error"
