"""Errors meant for a person. The CLI maps each class to an exit code."""

import os


class StationError(Exception):
    """Something the user can fix; the message says what and where."""

    exit_code = 1


class ConfigError(StationError):
    """A configuration file or argument is wrong (EX_CONFIG)."""

    exit_code = os.EX_CONFIG if hasattr(os, "EX_CONFIG") else 78


class DataError(StationError):
    """Input data (images, folders) cannot be used as given (EX_DATAERR)."""

    exit_code = 65


class ImageReadError(DataError):
    """One image file could not be decoded; the path is in the message."""

    def __init__(self, path, reason="cannot be decoded as an image"):
        super().__init__(f"{path}: {reason}")
        self.path = path


class RoiError(DataError):
    """The region of interest does not fit inside the frame."""


class ModelError(StationError):
    """A model file is missing, corrupt or does not describe itself."""

    exit_code = 66


class AlreadyRunningError(StationError):
    """Another process owns the state folder (a second `station run` on the same config).
    systemd must not restart into it: station@.service lists 75 in RestartPreventExitStatus."""

    exit_code = 75  # EX_TEMPFAIL: it works once the other one stops


class MissingExtraError(StationError):
    """A subcommand needs an optional dependency that is not installed."""

    exit_code = 69


class ExportGateError(ModelError):
    """An exported model does not reproduce the trained trunk closely enough
    (e.g. int8 quantization drifted); nothing was written at --out."""


class OutboxError(StationError):
    """The on-disk outbox cannot take a message; the caller decides what to do."""

    exit_code = 74  # EX_IOERR


class OutboxFullError(OutboxError):
    """The outbox holds its configured maximum of undelivered messages."""


class OutboxDiskError(OutboxError):
    """The disk (or filesystem) holding the outbox is full."""


class PublisherError(StationError):
    """The MQTT side cannot be set up as configured (credentials, TLS files)."""

    exit_code = os.EX_CONFIG if hasattr(os, "EX_CONFIG") else 78
