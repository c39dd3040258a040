"""The SPOP connection state machine (agent side), sans-IO.

Bytes in -> events out, events in -> bytes out, in the style of h11's
`Connection`.  The caller owns the socket:

    conn = SpopConnection()
    while True:
        data = await reader.read(conn.room)   # never more than one frame buffered
        try:
            events = conn.receive_data(data)  # b"" is EOF
        except ProtocolError as err:
            writer.write(conn.send(AgentDisconnect(err.status, err.reason)))
            break
        for ev in events: ...                 # Hello -> send(AgentHello()), Notify -> send(Ack(...))

States (`State`)::

    AWAIT_HELLO --HAPROXY-HELLO--> SEND_HELLO --send(AgentHello)--> READY
                                          \\--(health check)--> CLOSED
    READY --HAPROXY-DISCONNECT--> CLOSING --send(AgentDisconnect)--> CLOSED
    any --ProtocolError--> CLOSING;  any --EOF--> CLOSED

Choices the spec leaves open, made here once:

* Negotiation happens when the HELLO is *received*, so frames that follow it
  in the same chunk are already parsed against the negotiated limit.
* The ABORT flag on an unfragmented NOTIFY (FIN set) is ignored, as SPOE.txt
  allows ("can be ignored for frames with an unfragmented payload"): the NOTIFY
  is handled like any other, so its stream still gets an ACK.
* In CLOSING (after a `ProtocolError` or a `Disconnect`) and in CLOSED,
  received bytes are discarded and `receive_data` returns ``[]``: SPOE.txt says
  HAProxy ignores everything but DISCONNECT at that point, so we do the same
  rather than raise.  EOF still yields one `ConnectionClosed`.
* When a chunk holds valid frames followed by a bad one, the events of the
  valid frames are dropped with the raised `ProtocolError`: the connection is
  going down and the ACKs could not be sent anyway.
* After a health-check HELLO nothing HAProxy sends matters; further data is
  discarded until the AgentHello is sent (then the state is CLOSED).
* Events already handed out stay answerable in CLOSING: one chunk may hold
  HELLO+DISCONNECT or NOTIFY+DISCONNECT, and with pipelining an ACK may be
  ready after the DISCONNECT arrived.  So `AgentHello` (if the HELLO is still
  unanswered) and `Ack` (once the AgentHello went out) are still encoded in
  CLOSING; HAProxy ignores them.  Only AgentDisconnect moves to CLOSED, and
  after that every send raises `LocalProtocolError`.
"""

from __future__ import annotations

import struct
from enum import Enum
from typing import Final

from .errors import LocalProtocolError, ProtocolError, Status
from .events import (
    Ack,
    AgentDisconnect,
    AgentHello,
    ConnectionClosed,
    Event,
    Hello,
    Notify,
    SendEvent,
)
from .frames import (
    DEFAULT_MAX_FRAME_SIZE,
    FLAG_FIN,
    LENGTH_PREFIX_SIZE,
    MIN_FRAME_SIZE,
    MIN_MAX_FRAME_SIZE,
    SPOP_VERSION,
    FrameType,
    decode_disconnect_payload,
    decode_frame_header,
    decode_hello_payload,
    decode_messages,
    encode_ack,
    encode_agent_disconnect,
    encode_agent_hello,
)

__all__ = ["State", "SpopConnection", "DEFAULT_MAX_FRAME_SIZE"]


_LEN: Final = struct.Struct(">I")
_U32_MAX: Final = 0xFFFFFFFF

_NOTIFY: Final = int(FrameType.NOTIFY)
_HELLO: Final = int(FrameType.HAPROXY_HELLO)
_DISCONNECT: Final = int(FrameType.HAPROXY_DISCONNECT)
_KNOWN_TYPES: Final = frozenset(int(t) for t in FrameType if t is not FrameType.UNSET)

# Capabilities we are willing to answer with.  Never "async" (ACKs must come
# back on the NOTIFY's connection, which is all we do) nor "fragmentation"
# (we refuse fragmented frames).
_OUR_CAPABILITIES: Final = frozenset({"pipelining"})


class State(Enum):
    """Where the connection stands; see the module docstring for transitions."""

    AWAIT_HELLO = "await_hello"
    SEND_HELLO = "send_hello"
    READY = "ready"
    CLOSING = "closing"
    CLOSED = "closed"


class SpopConnection:
    """Agent side of one SPOP connection; knows nothing about sockets."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if isinstance(max_frame_size, bool) or not isinstance(max_frame_size, int):
            raise LocalProtocolError("max_frame_size must be an int")
        if not MIN_MAX_FRAME_SIZE <= max_frame_size <= _U32_MAX:
            raise LocalProtocolError(f"max_frame_size must be in [{MIN_MAX_FRAME_SIZE}, {_U32_MAX}]")
        self._our_max = max_frame_size
        self._limit = max_frame_size  # frame-size limit for both directions
        self._state = State.AWAIT_HELLO
        self._buf = bytearray()
        self._healthcheck = False
        self._capabilities: frozenset[str] = frozenset()
        self._hello: Hello | None = None
        self._hello_sent = False
        self._eof_reported = False

    # --- introspection ---------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def negotiated_max_frame_size(self) -> int:
        """Current frame-size limit: ours until the HELLO, then min(ours, HAProxy's)."""
        return self._limit

    @property
    def healthcheck(self) -> bool:
        """True once a health-check HELLO was received."""
        return self._healthcheck

    @property
    def capabilities(self) -> frozenset[str]:
        """Capabilities we agreed to (sent in AGENT-HELLO); empty before HELLO."""
        return self._capabilities

    @property
    def hello(self) -> Hello | None:
        """The accepted HAPROXY-HELLO, for logging (engine-id...)."""
        return self._hello

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed (always part of one frame)."""
        return len(self._buf)

    @property
    def room(self) -> int:
        """How many bytes may be fed before the buffer would exceed one frame.

        Always >= 1 between calls (complete frames are always consumed), so a
        ``read(room)`` can never be mistaken for EOF.
        """
        return LENGTH_PREFIX_SIZE + self._limit - len(self._buf)

    # --- receiving -------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed received bytes; return the events of every complete frame.

        ``b""`` means EOF.  Raises `ProtocolError` (state -> CLOSING) when the
        peer violates SPOP; the caller then sends ``AgentDisconnect(err.status,
        err.reason)`` and closes.
        """
        state = self._state
        if not data:
            self._buf.clear()
            self._state = State.CLOSED
            if self._eof_reported:
                return []
            self._eof_reported = True
            return [ConnectionClosed()]
        if state is State.CLOSING or state is State.CLOSED or self._healthcheck:
            return []
        buf = self._buf
        if buf:
            buf += data
            src: bytes | bytearray | memoryview = buf
        else:
            # Common case: the chunk starts on a frame boundary; parse it in
            # place and only buffer the incomplete tail, if any.
            src = data
        try:
            events, pos = self._parse(src)
        except ProtocolError:
            buf.clear()
            self._state = State.CLOSING
            raise
        if src is buf:
            if pos:
                # O(1) in CPython: bytearray drops a prefix by moving its start.
                del buf[:pos]
        elif pos < len(data):
            buf += data[pos:]
        return events

    def _parse(self, src: bytes | bytearray | memoryview) -> tuple[list[Event], int]:
        """Handle every complete frame of `src`; return events and bytes consumed."""
        events: list[Event] = []
        total = len(src)
        pos = 0
        limit = self._limit
        with memoryview(src) as view:
            while total - pos >= LENGTH_PREFIX_SIZE:
                (length,) = _LEN.unpack_from(view, pos)
                # Checked from the prefix alone, before the body is buffered.
                if length > limit:
                    raise ProtocolError(
                        Status.FRAME_TOO_BIG, f"frame of {length} bytes exceeds the {limit}-byte limit"
                    )
                if length < MIN_FRAME_SIZE:
                    raise ProtocolError(Status.INVALID_FRAME, f"frame length {length} is too short")
                end = pos + LENGTH_PREFIX_SIZE + length
                if end > total:
                    break
                # One copy of the frame body: decoders get an immutable,
                # exactly-sized `bytes`, so its end is the end of the payload.
                event = self._handle_frame(view[pos + LENGTH_PREFIX_SIZE : end].tobytes())
                pos = end
                if event is not None:
                    events.append(event)
                    if self._healthcheck or self._state is State.CLOSING:
                        # Nothing after a health-check HELLO or a DISCONNECT matters.
                        return events, total
                limit = self._limit
        return events, pos

    def _handle_frame(self, body: bytes) -> Event | None:
        ftype, flags, sid, fid, offset = decode_frame_header(body)
        if ftype not in _KNOWN_TYPES:
            if ftype == FrameType.UNSET:
                raise ProtocolError(Status.FRAGMENTATION_UNSUPPORTED, "fragment continuation received")
            raise ProtocolError(Status.INVALID_FRAME, f"unknown frame type {ftype}")
        if not flags & FLAG_FIN:
            raise ProtocolError(Status.FRAGMENTATION_UNSUPPORTED, "frame without FIN: fragmentation unsupported")
        if ftype == _NOTIFY:
            if self._state is State.AWAIT_HELLO:
                raise ProtocolError(Status.INVALID_FRAME, "NOTIFY before HELLO")
            return Notify(sid, fid, decode_messages(body, offset))
        if ftype == _HELLO:
            if self._state is not State.AWAIT_HELLO:
                raise ProtocolError(Status.INVALID_FRAME, "second HAPROXY-HELLO")
            self._check_zero_ids(sid, fid, "HAPROXY-HELLO")
            return self._negotiate(decode_hello_payload(body, offset))
        if ftype == _DISCONNECT:
            if self._state is State.AWAIT_HELLO:
                raise ProtocolError(Status.INVALID_FRAME, "HAPROXY-DISCONNECT before HELLO")
            self._check_zero_ids(sid, fid, "HAPROXY-DISCONNECT")
            event = decode_disconnect_payload(body, offset)
            self._state = State.CLOSING
            return event
        raise ProtocolError(Status.INVALID_FRAME, f"agent frame type {ftype} sent by HAProxy")

    @staticmethod
    def _check_zero_ids(sid: int, fid: int, what: str) -> None:
        if sid or fid:
            raise ProtocolError(Status.INVALID_FRAME, f"{what} with non-zero stream-id/frame-id")

    def _negotiate(self, hello: Hello) -> Hello:
        if not any(_speaks_v2(v) for v in hello.supported_versions):
            raise ProtocolError(
                Status.UNSUPPORTED_VERSION,
                f"no supported version in {','.join(hello.supported_versions)!r}, need {SPOP_VERSION}",
            )
        if hello.max_frame_size < MIN_MAX_FRAME_SIZE:
            raise ProtocolError(
                Status.BAD_FRAME_SIZE, f"max-frame-size {hello.max_frame_size} < {MIN_MAX_FRAME_SIZE}"
            )
        self._limit = min(self._our_max, hello.max_frame_size)
        self._capabilities = hello.capabilities & _OUR_CAPABILITIES
        self._healthcheck = hello.healthcheck
        self._hello = hello
        self._state = State.SEND_HELLO
        return hello

    # --- sending ----------------------------------------------------------------------------

    def send(self, event: SendEvent) -> bytes:
        """Encode `event` as exactly one complete frame (length prefix included).

        Raises `LocalProtocolError` if the event is not allowed now: AgentHello
        only once per accepted HELLO, Ack only after the AgentHello (READY, or
        CLOSING for events already delivered), nothing once CLOSED.
        """
        cls = type(event)
        state = self._state
        if cls is Ack:
            if not (state is State.READY or (state is State.CLOSING and self._hello_sent)):
                raise LocalProtocolError(f"cannot send Ack in state {state.name}")
            sid, fid = event.stream_id, event.frame_id  # type: ignore[union-attr]
            if not (type(sid) is int and type(fid) is int and sid >= 0 and fid >= 0):
                raise LocalProtocolError(f"invalid Ack ids {sid!r}/{fid!r}")
            frame = encode_ack(sid, fid, event.actions)  # type: ignore[union-attr]
            if len(frame) - LENGTH_PREFIX_SIZE > self._limit:
                raise LocalProtocolError(
                    f"ACK of {len(frame) - LENGTH_PREFIX_SIZE} bytes exceeds the {self._limit}-byte frame limit"
                )
            return frame
        if cls is AgentHello:
            if self._hello is None or self._hello_sent or state is State.CLOSED:
                raise LocalProtocolError(f"cannot send AgentHello in state {state.name}")
            frame = encode_agent_hello(SPOP_VERSION, self._limit, ",".join(sorted(self._capabilities)))
            self._hello_sent = True
            if self._healthcheck:
                self._state = State.CLOSED
            elif state is State.SEND_HELLO:
                self._state = State.READY
            return frame
        if cls is AgentDisconnect:
            if state is State.CLOSED:
                raise LocalProtocolError("cannot send AgentDisconnect: connection closed")
            status = event.status  # type: ignore[union-attr]
            if isinstance(status, bool) or not isinstance(status, int) or not 0 <= status <= _U32_MAX:
                raise LocalProtocolError(f"invalid status code {status!r}")
            frame = encode_agent_disconnect(status, str(event.message), self._limit)  # type: ignore[union-attr]
            self._state = State.CLOSED
            self._buf.clear()
            return frame
        raise LocalProtocolError(f"cannot send {event!r}")


def _speaks_v2(version: str) -> bool:
    """True for "2.<minor>": announcing a major means all its minors (SPOE.txt)."""
    major, dot, minor = version.partition(".")
    return major == "2" and dot == "." and minor.isdigit()
