"""Events exchanged between the codec and its caller.

Frozen dataclasses, like h11's events: received frames come out of
`SpopConnection.receive_data` as the first group, the caller hands the second
group to `SpopConnection.send`.  They hold plain Python values only (no wire
details), so the dispatcher can be tested without the codec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from .errors import Status
from .types import Scope

__all__ = [
    "Hello",
    "Message",
    "Notify",
    "Disconnect",
    "ConnectionClosed",
    "AgentHello",
    "SetVar",
    "UnsetVar",
    "Action",
    "Ack",
    "AgentDisconnect",
    "Event",
    "SendEvent",
]


# --- received ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """A HAPROXY-HELLO that passed validation.

    `capabilities` is what HAProxy *offered*; what we agreed to is
    `SpopConnection.capabilities`.
    """

    supported_versions: tuple[str, ...]
    max_frame_size: int
    capabilities: frozenset[str]
    healthcheck: bool = False
    engine_id: str | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """One SPOE message of a NOTIFY.

    Arguments stay an ordered tuple of pairs rather than a dict because SPOE
    allows repeated and empty argument names.
    """

    name: str
    args: tuple[tuple[str, object], ...]

    def get(self, name: str, default: object = None) -> object:
        """Value of the first argument called `name`, else `default`."""
        for key, value in self.args:
            if key == name:
                return value
        return default


@dataclass(frozen=True, slots=True)
class Notify:
    """A NOTIFY frame; answer it with an `Ack` carrying the same ids."""

    stream_id: int
    frame_id: int
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class Disconnect:
    """HAPROXY-DISCONNECT: answer with `AgentDisconnect(Status.NORMAL, ...)` and close."""

    status: int
    message: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the stream (clean EOF or mid-frame: a reset is a normal close)."""


# --- sent ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentHello:
    """Reply to a `Hello`; the connection fills in the negotiated fields."""


@dataclass(frozen=True, slots=True)
class SetVar:
    """set-var action: HAProxy stores `value` in variable `<scope>.<prefix>.<name>`."""

    scope: Scope
    name: str
    #: ``Any`` rather than ``object`` for mypyc's sake (see ``Typed.value``).
    value: Any


@dataclass(frozen=True, slots=True)
class UnsetVar:
    """unset-var action."""

    scope: Scope
    name: str


Action: TypeAlias = SetVar | UnsetVar


@dataclass(frozen=True, slots=True)
class Ack:
    """ACK of the NOTIFY with the same (stream_id, frame_id)."""

    stream_id: int
    frame_id: int
    actions: tuple[Action, ...] = ()


@dataclass(frozen=True, slots=True)
class AgentDisconnect:
    """AGENT-DISCONNECT; the caller closes the socket right after sending it."""

    status: Status | int
    message: str = ""


Event: TypeAlias = Hello | Notify | Disconnect | ConnectionClosed
SendEvent: TypeAlias = AgentHello | Ack | AgentDisconnect
