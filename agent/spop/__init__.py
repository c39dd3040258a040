"""Sans-IO codec for SPOP 2.0, the protocol between HAProxy's SPOE filter and agents.

Re-exports the public API so callers write ``from agent.spop import ...``.
No sockets, threads or asyncio here: the server owns the I/O.
"""

from .connection import DEFAULT_MAX_FRAME_SIZE, SpopConnection, State
from .errors import LocalProtocolError, ProtocolError, SpopError, Status
from .events import (
    Ack,
    Action,
    AgentDisconnect,
    AgentHello,
    ConnectionClosed,
    Disconnect,
    Event,
    Hello,
    Message,
    Notify,
    SendEvent,
    SetVar,
    UnsetVar,
)
from .frames import ActionType, FrameType
from .types import DataType, Scope, Typed

__all__ = [
    "Ack",
    "Action",
    "ActionType",
    "AgentDisconnect",
    "AgentHello",
    "ConnectionClosed",
    "DataType",
    "DEFAULT_MAX_FRAME_SIZE",
    "Disconnect",
    "Event",
    "FrameType",
    "Hello",
    "LocalProtocolError",
    "Message",
    "Notify",
    "ProtocolError",
    "Scope",
    "SendEvent",
    "SetVar",
    "SpopConnection",
    "SpopError",
    "State",
    "Status",
    "Typed",
    "UnsetVar",
]
