"""SPOP frame layout: header and payload encoders/decoders.

Pure functions, no state: `connection.py` decides *which* frame is acceptable
when; this module only knows how frames look.  Decoders take the frame body
(the N bytes after the 4-byte length prefix) as `bytes` plus an offset and
raise `ProtocolError(INVALID_FRAME)` on anything malformed.  Encoders return a
complete frame, length prefix included, ready for ``transport.write``.

The NOTIFY decoder and ACK encoder are on the per-request hot path (the agent
must sustain >25k NOTIFY->ACK per second per core) so they inline the one-byte
varint case and cache the encoded ``action/nb-args/scope/name`` prefix of
set-var actions, which in practice is a handful of constant variable names.
The HAProxy-side encoders exist for tests and for fake-HAProxy harnesses.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address
from typing import Final

from .errors import LocalProtocolError, ProtocolError, Status
from .events import Action, Disconnect, Hello, Message, SetVar, UnsetVar
from .types import (
    DataType,
    Scope,
    Typed,
    decode_string,
    decode_typed_with_type,
    decode_varint,
    encode_string,
    encode_typed,
    encode_varint,
)

__all__ = [
    "FrameType",
    "ActionType",
    "FLAG_FIN",
    "FLAG_ABORT",
    "LENGTH_PREFIX_SIZE",
    "MIN_FRAME_SIZE",
    "MIN_MAX_FRAME_SIZE",
    "SPOP_VERSION",
    "Frame",
    "encode_frame",
    "decode_frame",
    "decode_frame_header",
    "encode_kv_list",
    "decode_kv_list",
    "decode_messages",
    "encode_messages",
    "encode_action",
    "decode_actions",
    "decode_hello_payload",
    "decode_disconnect_payload",
    "parse_list",
    "encode_agent_hello",
    "encode_agent_disconnect",
    "encode_ack",
    "encode_haproxy_hello",
    "encode_haproxy_disconnect",
    "encode_notify",
]


class FrameType(IntEnum):
    """Frame type byte.  UNSET only exists for fragment continuations."""

    UNSET = 0
    HAPROXY_HELLO = 1
    HAPROXY_DISCONNECT = 2
    NOTIFY = 3
    AGENT_HELLO = 101
    AGENT_DISCONNECT = 102
    ACK = 103


class ActionType(IntEnum):
    """Action type byte of an ACK payload entry."""

    SET_VAR = 1
    UNSET_VAR = 2


FLAG_FIN: Final = 0x1
FLAG_ABORT: Final = 0x2

#: Bytes of the big-endian length that precedes every frame.
LENGTH_PREFIX_SIZE: Final = 4
#: Smallest legal frame body: type (1) + flags (4) + stream-id (1) + frame-id (1).
MIN_FRAME_SIZE: Final = 7
#: SPOE.txt: "The maximum size supported by peers for a frame must be greater
#: than or equal to 256 bytes."
MIN_MAX_FRAME_SIZE: Final = 256
#: HAProxy's own default (tune.bufsize 16384 minus the 4-byte length prefix).
DEFAULT_MAX_FRAME_SIZE: Final = 16380
SPOP_VERSION: Final = "2.0"

_LEN: Final = struct.Struct(">I")
_TYPE_FLAGS: Final = struct.Struct(">BI")
_SCOPES: Final = frozenset(int(s) for s in Scope)


def _invalid(reason: str) -> ProtocolError:
    return ProtocolError(Status.INVALID_FRAME, reason)


# --- frame header ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame; the generic (slow-path) view used by tests and tools."""

    type: int
    flags: int
    stream_id: int
    frame_id: int
    payload: bytes


def encode_frame(
    frame_type: int, stream_id: int, frame_id: int, payload: bytes, flags: int = FLAG_FIN
) -> bytes:
    """Build a complete frame, length prefix included."""
    if not 0 <= frame_type <= 0xFF or not 0 <= flags <= 0xFFFFFFFF:
        raise LocalProtocolError("frame type or flags out of range")
    body = _TYPE_FLAGS.pack(frame_type, flags) + encode_varint(stream_id) + encode_varint(frame_id) + payload
    return _LEN.pack(len(body)) + body


def decode_frame_header(body: bytes) -> tuple[int, int, int, int, int]:
    """Parse the metadata of a frame body.

    Returns ``(type, flags, stream_id, frame_id, payload_offset)``; the payload
    is left in place so the caller can decode it without slicing.
    """
    if len(body) < MIN_FRAME_SIZE:
        raise _invalid(f"frame of {len(body)} bytes is shorter than its header")
    ftype, flags = _TYPE_FLAGS.unpack_from(body, 0)
    sid = body[5]
    if sid < 240:
        offset = 6
    elif body[6] < 128:  # two-byte varint, inlined: stream ids grow past 240 fast
        sid += body[6] << 4
        offset = 7
    else:
        sid, offset = decode_varint(body, 5)
    try:
        fid = body[offset]
    except IndexError:
        raise _invalid("truncated frame-id") from None
    if fid < 240:
        offset += 1
    else:
        fid, offset = decode_varint(body, offset)
    return ftype, flags, sid, fid, offset


def decode_frame(data: bytes) -> tuple[Frame, int]:
    """Decode one length-prefixed frame from the start of `data`.

    Returns ``(frame, bytes_consumed)``.  Raises INVALID_FRAME if `data` does
    not hold a whole frame: this is the convenience path for tests and
    tools; streaming input goes through `SpopConnection`.
    """
    if len(data) < LENGTH_PREFIX_SIZE:
        raise _invalid("truncated length prefix")
    (n,) = _LEN.unpack_from(data, 0)
    end = LENGTH_PREFIX_SIZE + n
    if len(data) < end:
        raise _invalid("truncated frame")
    body = bytes(data[LENGTH_PREFIX_SIZE:end])
    ftype, flags, sid, fid, offset = decode_frame_header(body)
    return Frame(ftype, flags, sid, fid, body[offset:]), end


# --- KV lists (HELLO, DISCONNECT) ----------------------------------------------------


def encode_kv_list(items: Iterable[tuple[str, object]]) -> bytes:
    """Encode ``(name, value)`` pairs; values follow `encode_typed` rules."""
    return b"".join(encode_string(name) + encode_typed(value) for name, value in items)


def decode_kv_list(data: bytes, offset: int = 0) -> list[tuple[str, DataType, object]]:
    """Decode a KV-list running to the end of `data`, keeping wire types."""
    out: list[tuple[str, DataType, object]] = []
    end = len(data)
    while offset < end:
        name, offset = decode_string(data, offset)
        tid, value, offset = decode_typed_with_type(data, offset)
        out.append((name, tid, value))
    return out


def parse_list(value: str) -> tuple[str, ...]:
    """Split a comma-separated SPOP list, ignoring spaces and empty items."""
    return tuple(item for item in (part.strip() for part in value.split(",")) if item)


_UNSIGNED: Final = (DataType.UINT32, DataType.UINT64)
_INTEGERS: Final = (DataType.INT32, DataType.UINT32, DataType.INT64, DataType.UINT64)


def decode_hello_payload(data: bytes, offset: int = 0) -> Hello:
    """Decode and shape-check a HAPROXY-HELLO payload.

    Missing mandatory items map to their dedicated status codes; items of the
    wrong type are INVALID_FRAME.  Unknown keys are ignored (forward
    compatibility) and when a key repeats the last one wins.  Version and size
    *negotiation* is the connection's job.
    """
    kv = {name: (tid, value) for name, tid, value in decode_kv_list(data, offset)}
    if "supported-versions" not in kv:
        raise ProtocolError(Status.NO_VERSION, "supported-versions missing")
    if "max-frame-size" not in kv:
        raise ProtocolError(Status.NO_FRAME_SIZE, "max-frame-size missing")
    if "capabilities" not in kv:
        raise ProtocolError(Status.NO_CAPABILITIES, "capabilities missing")
    vtype, versions = kv["supported-versions"]
    if vtype is not DataType.STRING:
        raise _invalid("supported-versions is not a STRING")
    stype, size = kv["max-frame-size"]
    if stype not in _UNSIGNED:
        raise _invalid("max-frame-size is not an unsigned integer")
    ctype, caps = kv["capabilities"]
    if ctype is not DataType.STRING:
        raise _invalid("capabilities is not a STRING")
    healthcheck = False
    if "healthcheck" in kv:
        htype, hc = kv["healthcheck"]
        if htype is not DataType.BOOL:
            raise _invalid("healthcheck is not a BOOL")
        healthcheck = bool(hc)
    engine_id: str | None = None
    if "engine-id" in kv:
        etype, eid = kv["engine-id"]
        if etype is not DataType.STRING:
            raise _invalid("engine-id is not a STRING")
        engine_id = str(eid)
    return Hello(
        supported_versions=parse_list(str(versions)),
        max_frame_size=int(size),  # type: ignore[call-overload]
        capabilities=frozenset(parse_list(str(caps))),
        healthcheck=healthcheck,
        engine_id=engine_id,
    )


def decode_disconnect_payload(data: bytes, offset: int = 0) -> Disconnect:
    """Decode a (HAPROXY- or AGENT-) DISCONNECT payload.

    Lenient about *missing* items (UNKNOWN / empty message): the peer is
    leaving anyway and we only want to log why.  Wrongly typed items are still
    INVALID_FRAME.
    """
    kv = {name: (tid, value) for name, tid, value in decode_kv_list(data, offset)}
    status: int = Status.UNKNOWN
    message = ""
    if "status-code" in kv:
        tid, value = kv["status-code"]
        if tid not in _INTEGERS:
            raise _invalid("status-code is not an integer")
        status = int(value)  # type: ignore[call-overload]
    if "message" in kv:
        tid, value = kv["message"]
        if tid is not DataType.STRING:
            raise _invalid("message is not a STRING")
        message = str(value)
    return Disconnect(status=status, message=message)


# --- NOTIFY (hot path) ------------------------------------------------------------------


def decode_messages(data: bytes, offset: int = 0) -> tuple[Message, ...]:
    """Decode a LIST-OF-MESSAGES running to the end of `data`.

    Hot path: one-byte lengths and the BINARY/STRING/NULL/IPV4 values HAProxy
    typically sends are decoded inline; everything else falls back to
    `decode_typed_with_type`.  `data` must not extend past the frame, since
    the end of the buffer is the end of the list.
    """
    if type(data) is not bytes:
        data = bytes(data)
    end = len(data)
    messages: list[Message] = []
    try:
        while offset < end:
            n = data[offset]
            if n < 240:
                offset += 1
            else:
                n, offset = decode_varint(data, offset)
            stop = offset + n
            if stop > end:
                raise _invalid("truncated message name")
            name = data[offset:stop].decode("utf-8", "surrogateescape")
            nb_args = data[stop]
            offset = stop + 1
            args: list[tuple[str, object]] = []
            for _ in range(nb_args):
                n = data[offset]
                if n < 240:
                    offset += 1
                else:
                    n, offset = decode_varint(data, offset)
                stop = offset + n
                if stop > end:
                    raise _invalid("truncated argument name")
                arg_name = data[offset:stop].decode("utf-8", "surrogateescape") if n else ""
                tid = data[stop] & 0x0F
                value: object
                if tid == 9 or tid == 8:
                    n = data[stop + 1]
                    if n < 240:
                        offset = stop + 2
                    else:
                        n, offset = decode_varint(data, stop + 1)
                    stop = offset + n
                    if stop > end:
                        raise _invalid("truncated string value")
                    if tid == 9:
                        value = data[offset:stop]
                    else:
                        value = data[offset:stop].decode("utf-8", "surrogateescape")
                    offset = stop
                elif tid == 0:
                    value = None
                    offset = stop + 1
                elif tid == 6:
                    offset = stop + 5
                    if offset > end:
                        raise _invalid("truncated IPv4 address")
                    value = IPv4Address(data[stop + 1 : offset])
                else:
                    _, value, offset = decode_typed_with_type(data, stop)
                args.append((arg_name, value))
            messages.append(Message(name, tuple(args)))
    except IndexError:
        raise _invalid("truncated NOTIFY payload") from None
    return tuple(messages)


def encode_messages(messages: Iterable[Message]) -> bytes:
    """Encode a LIST-OF-MESSAGES (what HAProxy puts in a NOTIFY)."""
    parts: list[bytes] = []
    for message in messages:
        if len(message.args) > 255:
            raise LocalProtocolError("a message carries at most 255 arguments")
        parts.append(encode_string(message.name))
        parts.append(bytes((len(message.args),)))
        for arg_name, value in message.args:
            parts.append(encode_string(arg_name))
            parts.append(encode_typed(value))
    return b"".join(parts)


# --- ACK (hot path) -------------------------------------------------------------------------

_PREFIX_CACHE: dict[tuple[int, int, str], bytes] = {}
_PREFIX_CACHE_MAX: Final = 4096


def _action_prefix(action_type: int, scope: object, name: object) -> bytes:
    """``<action><nb-args><scope><name>`` of an action, cached.

    Variable names are a few constants in practice, so this turns the encoding
    of most of an action into one dict lookup.
    """
    try:
        return _PREFIX_CACHE[(action_type, scope, name)]  # type: ignore[index]
    except KeyError:
        pass
    except TypeError:
        raise LocalProtocolError(f"invalid action scope/name: {scope!r}, {name!r}") from None
    if isinstance(scope, bool) or not isinstance(scope, int) or scope not in _SCOPES:
        raise LocalProtocolError(f"invalid variable scope: {scope!r}")
    if not isinstance(name, str):
        raise LocalProtocolError(f"variable name must be a str, got {type(name).__name__}")
    nb_args = 3 if action_type == ActionType.SET_VAR else 2
    prefix = bytes((action_type, nb_args, scope)) + encode_string(name)
    if len(_PREFIX_CACHE) >= _PREFIX_CACHE_MAX:
        _PREFIX_CACHE.clear()
    _PREFIX_CACHE[(action_type, int(scope), name)] = prefix
    return prefix


def encode_action(action: Action) -> bytes:
    """Encode one set-var / unset-var action."""
    cls = type(action)
    if cls is SetVar:
        return _action_prefix(1, action.scope, action.name) + encode_typed(action.value)  # type: ignore[union-attr]
    if cls is UnsetVar:
        return _action_prefix(2, action.scope, action.name)
    raise LocalProtocolError(f"not an action: {action!r}")


_ACK_HEAD: Final = _TYPE_FLAGS.pack(FrameType.ACK, FLAG_FIN)
_SMALL_VARINT: Final[tuple[bytes, ...]] = tuple(bytes((i,)) for i in range(240))


def encode_ack(stream_id: int, frame_id: int, actions: Iterable[Action]) -> bytes:
    """Build a complete ACK frame (length prefix included).

    The frame-size limit is checked by the connection, which knows it.
    """
    parts = [
        _ACK_HEAD,
        _SMALL_VARINT[stream_id] if 0 <= stream_id < 240 else encode_varint(stream_id),
        _SMALL_VARINT[frame_id] if 0 <= frame_id < 240 else encode_varint(frame_id),
    ]
    for action in actions:
        cls = type(action)
        if cls is SetVar:
            parts.append(_action_prefix(1, action.scope, action.name))
            parts.append(encode_typed(action.value))  # type: ignore[union-attr]
        elif cls is UnsetVar:
            parts.append(_action_prefix(2, action.scope, action.name))
        else:
            raise LocalProtocolError(f"not an action: {action!r}")
    body = b"".join(parts)
    return _LEN.pack(len(body)) + body


def decode_actions(data: bytes, offset: int = 0) -> tuple[Action, ...]:
    """Decode a LIST-OF-ACTIONS (ACK payload); used by tests and fake HAProxies.

    Values come back as plain Python values (an INT32 set-var decodes to int,
    not to `Typed`).
    """
    end = len(data)
    actions: list[Action] = []
    try:
        while offset < end:
            action_type, nb_args, scope = data[offset], data[offset + 1], data[offset + 2]
            offset += 3
            if scope not in _SCOPES:
                raise _invalid(f"unknown variable scope {scope}")
            name, offset = decode_string(data, offset)
            if action_type == ActionType.SET_VAR and nb_args == 3:
                value, offset_after = decode_typed_with_type(data, offset)[1:]
                offset = offset_after
                actions.append(SetVar(Scope(scope), name, value))
            elif action_type == ActionType.UNSET_VAR and nb_args == 2:
                actions.append(UnsetVar(Scope(scope), name))
            else:
                raise _invalid(f"bad action type/nb-args {action_type}/{nb_args}")
    except IndexError:
        raise _invalid("truncated ACK payload") from None
    return tuple(actions)


# --- whole-frame encoders --------------------------------------------------------------------


def encode_agent_hello(version: str, max_frame_size: int, capabilities: str) -> bytes:
    """AGENT-HELLO frame; max-frame-size goes out as UINT32 like HAProxy expects."""
    payload = encode_kv_list(
        (
            ("version", version),
            ("max-frame-size", Typed(DataType.UINT32, max_frame_size)),
            ("capabilities", capabilities),
        )
    )
    return encode_frame(FrameType.AGENT_HELLO, 0, 0, payload)


def _disconnect_payload(status: int, message: str, limit: int | None) -> bytes:
    head = encode_kv_list((("status-code", Typed(DataType.UINT32, int(status))),))
    raw = message.encode("utf-8", "surrogateescape")
    if limit is not None:
        # Room left after header (<= 7 + 2*1 ids), the KV names and the length
        # varint; a diagnostic message is better truncated than dropped.
        budget = limit - (MIN_FRAME_SIZE + len(head) + len(encode_string("message")) + 1 + 5)
        raw = raw[: max(budget, 0)]
    return head + encode_string("message") + encode_typed(Typed(DataType.STRING, raw))


def encode_agent_disconnect(status: int, message: str, max_frame_size: int | None = None) -> bytes:
    """AGENT-DISCONNECT frame; `message` is truncated to fit `max_frame_size`."""
    return encode_frame(FrameType.AGENT_DISCONNECT, 0, 0, _disconnect_payload(status, message, max_frame_size))


def encode_haproxy_disconnect(status: int, message: str) -> bytes:
    """HAPROXY-DISCONNECT frame (HAProxy side; for tests and fake peers)."""
    return encode_frame(FrameType.HAPROXY_DISCONNECT, 0, 0, _disconnect_payload(status, message, None))


def encode_haproxy_hello(
    supported_versions: str = "2.0",
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    capabilities: str = "pipelining",
    healthcheck: bool | None = None,
    engine_id: str | None = None,
) -> bytes:
    """HAPROXY-HELLO frame as HAProxy builds it (for tests and fake peers)."""
    items: list[tuple[str, object]] = [
        ("supported-versions", supported_versions),
        ("max-frame-size", Typed(DataType.UINT32, max_frame_size)),
        ("capabilities", capabilities),
    ]
    if healthcheck is not None:
        items.append(("healthcheck", healthcheck))
    if engine_id is not None:
        items.append(("engine-id", engine_id))
    return encode_frame(FrameType.HAPROXY_HELLO, 0, 0, encode_kv_list(items))


def encode_notify(stream_id: int, frame_id: int, messages: Iterable[Message], flags: int = FLAG_FIN) -> bytes:
    """NOTIFY frame as HAProxy builds it (for tests and fake peers)."""
    return encode_frame(FrameType.NOTIFY, stream_id, frame_id, encode_messages(messages), flags)
