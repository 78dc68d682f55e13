"""Typed decode errors: every way a frame can be refused has its own class and a short reason code.

The sidecar counts rejections by ``reason``; the class tells a programmer what went wrong.
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """Base of every error the decoder raises. ``reason`` is a stable code used for counters."""

    reason = "protocol_error"

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.reason}: {detail}")
        self.detail = detail


class MalformedFrame(ProtocolError):
    """The bytes are not the msgpack structure the protocol expects."""

    reason = "malformed"


class UnsupportedVersion(ProtocolError):
    """The envelope names a protocol version this side does not speak."""

    reason = "unsupported_version"


class UnknownKind(ProtocolError):
    """The envelope names a message kind this side does not know."""

    reason = "unknown_kind"


class InvalidField(ProtocolError):
    """A field is missing, unexpected, or of the wrong type."""

    reason = "invalid_field"


class LimitExceeded(ProtocolError):
    """A size, count, length, shape or dtype is outside the hard limits."""

    reason = "limit_exceeded"
