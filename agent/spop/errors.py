"""Status codes and the single exception hierarchy of the SPOP codec.

Modelled on h11: one root (`SpopError`) so callers can catch everything the
codec raises, split into "the peer broke the protocol" (`ProtocolError`, which
carries the status code to put in our AGENT-DISCONNECT) and "our own code asked
for something impossible" (`LocalProtocolError`, a bug on our side).
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["Status", "SpopError", "ProtocolError", "LocalProtocolError"]


class Status(IntEnum):
    """SPOP status codes (HAProxy doc/SPOE.txt, "Errors & timeouts").

    An IntEnum so the value can go straight into a UINT32 on the wire and be
    compared with the plain int a HAPROXY-DISCONNECT carries.
    """

    NORMAL = 0
    IO_ERROR = 1
    TIMEOUT = 2
    FRAME_TOO_BIG = 3
    INVALID_FRAME = 4
    NO_VERSION = 5
    NO_FRAME_SIZE = 6
    NO_CAPABILITIES = 7
    UNSUPPORTED_VERSION = 8
    BAD_FRAME_SIZE = 9
    FRAGMENTATION_UNSUPPORTED = 10
    INTERLACED_FRAMES = 11
    FRAME_ID_NOT_FOUND = 12
    RESOURCE_ALLOCATION = 13
    UNKNOWN = 99


class SpopError(Exception):
    """Root of every exception the codec raises on purpose."""


class ProtocolError(SpopError):
    """The peer sent something SPOP forbids.

    `status` and `reason` are exactly what the caller should put in the
    AGENT-DISCONNECT it sends before closing, so error handling in the server is
    one line: ``send(AgentDisconnect(err.status, err.reason))``.
    """

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(f"{status.name}: {reason}")
        self.status: Status = status
        self.reason: str = reason


class LocalProtocolError(SpopError):
    """We asked the codec for something invalid in the current state.

    Kept apart from `ProtocolError` because it is our bug, not the peer's, and
    must never be reported to HAProxy as if HAProxy had misbehaved.
    """
