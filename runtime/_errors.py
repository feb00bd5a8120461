"""Typed errors. A user or artifact problem raises one of these; anything else is a bug."""

from __future__ import annotations


class AttnxError(Exception):
    """Base of every error attnx raises on purpose. The CLI prints it as one line, exit 2."""


class ArtifactError(AttnxError):
    """A bundle on disk is bad: the message names the file (and the manifest key, if any)."""


class InputError(AttnxError):
    """A request is bad: the message names the input, the axis, the expected and actual value."""


class ProviderError(AttnxError):
    """The requested execution provider is not available or was not used by onnxruntime."""


class ParityError(AttnxError):
    """Numbers differ beyond tolerance.

    `records` holds the failing records that were checked (OutputParity or ParityRecord), and
    the message lists every one of them, not only the first; `checked` holds every record
    that was checked, passing ones too (the failing ones where not given).
    """

    def __init__(self, message: str, records=(), checked=()):
        super().__init__(message)
        self.records = tuple(records)
        self.checked = tuple(checked) or self.records
