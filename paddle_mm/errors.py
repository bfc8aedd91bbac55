"""Error types of paddle_mm.

Every error a user can cause (bad data, a bad recipe, a bad checkpoint) is raised as one of
these, with a message that names the file, the record and the cause, so a run fails at the
start with a readable line instead of deep inside a stack trace.
"""
from __future__ import annotations


class PaddleMMError(Exception):
    """Base class of the errors paddle_mm raises on bad input."""


class RecipeError(PaddleMMError, ValueError):
    """A recipe file or override is malformed: unknown key, wrong type, bad value."""


class DataError(PaddleMMError, ValueError):
    """A data file or one of its records is malformed or points at a missing image.

    `reason` is a short machine-readable name of the problem (e.g. "image_missing"), which
    `paddle-mm check-data` counts by; the message says the same for people.
    """

    def __init__(self, path: str, cause: str, record: int | str | None = None, reason: str = "bad_record"):
        self.path = str(path)
        self.record = record
        self.cause = cause
        self.reason = reason
        where = self.path if record is None else f"{self.path}, record {record}"
        super().__init__(f"{where}: {cause}")


class ImageTooLargeError(DataError):
    """An image is larger (bytes or pixels) than the limit the caller set."""


class CheckpointError(PaddleMMError, ValueError):
    """A checkpoint folder or file is missing, truncated or does not fit the model."""


class NonFiniteLossError(PaddleMMError, FloatingPointError):
    """Training met a NaN or infinite loss; the message names the step and the batch's samples."""
