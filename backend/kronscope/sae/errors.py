"""Errors of the SAE core. Each names the file and the field at fault, in plain words."""

from __future__ import annotations


class SAEError(ValueError):
    """Base class: something about an SAE, its configuration or its files is wrong."""


class ConfigError(SAEError):
    """A configuration value is missing, of the wrong type, or inconsistent."""

    def __init__(self, message: str, *, field: str | None = None, file: str | None = None):
        self.field = field
        self.file = file
        where = ""
        if file:
            where += f"{file}: "
        if field:
            where += f"field '{field}': "
        super().__init__(where + message)


class CheckpointError(SAEError):
    """A checkpoint file cannot be read or fails validation."""

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None):
        self.file = file
        self.field = field
        where = ""
        if file:
            where += f"{file}: "
        if field:
            where += f"'{field}': "
        super().__init__(where + message)
