"""Every exception histod raises on purpose. Domain code raises these; only the CLI turns them into
messages and exit codes (see histod.cli)."""

from __future__ import annotations


class HistodError(Exception):
    """Base class: an expected failure with a message meant for the user."""

    exit_code: int = 1


class ConfigError(HistodError):
    """A setting or command-line value is invalid."""

    exit_code = 2


class ReviewError(ConfigError):
    """A review cannot be recorded: the result does not exist, is itself a review, or is not a classification
    (a file that could not be classified has no call of the model to review)."""


class DatasetError(HistodError):
    """A training or evaluation folder cannot be used (missing class folders, empty class, too few images)."""

    exit_code = 3


class ImageError(HistodError):
    """One image cannot be decoded. `reason` is a short stable code stored in the database
    (for example ``empty``, ``truncated``, ``not_an_image``, ``too_many_pixels``); the message explains it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.args[0]}"


class ModelError(HistodError):
    """A run directory or model file is missing, incomplete or inconsistent."""

    exit_code = 4


class ExportParityError(ModelError):
    """The LiteRT export disagrees with the Keras model beyond the tolerance."""


class DatabaseError(HistodError):
    """The results database cannot be opened, migrated or written."""

    exit_code = 5


class WatchError(HistodError):
    """The watched folder cannot be watched (missing, not a directory, observer died)."""

    exit_code = 6
