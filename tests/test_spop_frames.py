"""Frame layout: header, payloads, whole-frame encoders and decoders."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest

from agent.spop import (
    DataType,
    Disconnect,
    Hello,
    LocalProtocolError,
    Message,
    ProtocolError,
    Scope,
    SetVar,
    Status,
    Typed,
    UnsetVar,
)
from agent.spop.frames import (
    FLAG_ABORT,
    FLAG_FIN,
    FrameType,
    decode_actions,
    decode_disconnect_payload,
    decode_frame,
    decode_frame_header,
    decode_hello_payload,
    decode_kv_list,
    decode_messages,
    encode_ack,
    encode_action,
    encode_agent_disconnect,
    encode_agent_hello,
    encode_frame,
    encode_haproxy_disconnect,
    encode_haproxy_hello,
    encode_kv_list,
    encode_notify,
    parse_list,
)
from agent.spop.types import encode_varint
from tests.support import COMPILED


def _s(text: str) -> bytes:
    """Raw SPOP string by hand: one-byte length + bytes (only for short names)."""
    raw = text.encode()
    assert len(raw) < 240
    return bytes((len(raw),)) + raw


# HAPROXY-HELLO built byte by byte from SPOE.txt sections 3.1, 3.2 and 3.2.4.
HAND_HELLO_PAYLOAD = (
    _s("supported-versions") + b"\x08" + _s("2.0")
    + _s("max-frame-size") + b"\x03" + b"\xfc\xf0\x06"  # UINT32 16380 as a varint
    + _s("capabilities") + b"\x08" + _s("pipelining")
    + _s("healthcheck") + b"\x11"  # BOOL with the TRUE flag (0x10)
)  # fmt: skip
HAND_HELLO_BODY = b"\x01" + b"\x00\x00\x00\x01" + b"\x00" + b"\x00" + HAND_HELLO_PAYLOAD
HAND_HELLO = len(HAND_HELLO_BODY).to_bytes(4, "big") + HAND_HELLO_BODY


def test_haproxy_hello_byte_exact() -> None:
    assert encode_haproxy_hello("2.0", 16380, "pipelining", healthcheck=True) == HAND_HELLO
    frame, used = decode_frame(HAND_HELLO)
    assert used == len(HAND_HELLO)
    assert (frame.type, frame.flags, frame.stream_id, frame.frame_id) == (1, FLAG_FIN, 0, 0)
    assert decode_hello_payload(frame.payload) == Hello(("2.0",), 16380, frozenset({"pipelining"}), True, None)


def test_agent_hello_byte_exact() -> None:
    payload = (
        _s("version") + b"\x08" + _s("2.0")
        + _s("max-frame-size") + b"\x03" + encode_varint(1024)
        + _s("capabilities") + b"\x08" + _s("pipelining")
    )  # fmt: skip
    body = bytes((101,)) + b"\x00\x00\x00\x01\x00\x00" + payload
    assert encode_agent_hello("2.0", 1024, "pipelining") == len(body).to_bytes(4, "big") + body


def test_ack_byte_exact() -> None:
    frame = encode_ack(1234, 7, (SetVar(Scope.TRANSACTION, "node", "node2"), UnsetVar(Scope.SESSION, "x")))
    body = (
        bytes((103,)) + b"\x00\x00\x00\x01" + encode_varint(1234) + b"\x07"
        + b"\x01\x03\x02" + _s("node") + b"\x08" + _s("node2")
        + b"\x02\x02\x01" + _s("x")
    )  # fmt: skip
    assert frame == len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize("frame_type", list(FrameType))
@pytest.mark.parametrize(("sid", "fid"), [(0, 0), (239, 240), (2**32, 2**64 - 1)])
@pytest.mark.parametrize("flags", [FLAG_FIN, FLAG_FIN | FLAG_ABORT, 0, 0xFFFFFFFF])
def test_frame_round_trip(frame_type: FrameType, sid: int, fid: int, flags: int) -> None:
    data = encode_frame(frame_type, sid, fid, b"payload", flags)
    frame, used = decode_frame(data + b"next")
    assert used == len(data)
    assert (frame.type, frame.flags, frame.stream_id, frame.frame_id, frame.payload) == (
        frame_type,
        flags,
        sid,
        fid,
        b"payload",
    )


def test_frame_header_two_byte_stream_id_fast_path() -> None:
    for sid in (240, 241, 2287, 2288, 70000):
        body = encode_frame(FrameType.NOTIFY, sid, 3, b"")[4:]
        assert decode_frame_header(body) == (3, FLAG_FIN, sid, 3, len(body))


@pytest.mark.parametrize(
    "body",
    [
        b"\x03\x00\x00\x00\x01\x00",  # 6 bytes: shorter than any header
        b"\x03\x00\x00\x00\x01\xf0\x80",  # stream-id varint runs out
        b"\x03\x00\x00\x00\x01\x00\xf0",  # frame-id varint runs out
        b"\x03\x00\x00\x00\x01\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # 11-byte varint
    ],
)
def test_frame_header_rejects(body: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_frame_header(body)
    assert info.value.status is Status.INVALID_FRAME


def test_decode_frame_rejects_truncation() -> None:
    data = encode_haproxy_hello()
    for cut in (0, 3, 4, len(data) - 1):
        with pytest.raises(ProtocolError):
            decode_frame(data[:cut])


def test_notify_round_trip_ordered_and_repeated() -> None:
    messages = (
        Message(
            "mqtt-connect",
            (
                ("client_id", b"c" * 24),
                ("src", ipaddress.IPv4Address("192.0.2.1")),
                ("", "unnamed"),
                ("client_id", b"second"),
                ("sess_expiry", None),
                ("v6", ipaddress.IPv6Address("::1")),
                ("n", -5),
                ("b", True),
                ("long", "y" * 500),
            ),
        ),
        Message("mqtt-connect", ()),
        Message("other", (("k", Typed(DataType.UINT32, 9)),)),
    )
    frame, _ = decode_frame(encode_notify(3000, 1, messages))
    assert (frame.type, frame.stream_id, frame.frame_id) == (FrameType.NOTIFY, 3000, 1)
    decoded = decode_messages(frame.payload)
    assert decoded[:2] == messages[:2]
    assert decoded[2] == Message("other", (("k", 9),))
    assert decoded[0].get("client_id") == b"c" * 24  # the first one wins
    assert decoded[0].get("") == "unnamed"
    assert decoded[0].get("missing", 42) == 42


def test_notify_truncations_never_misparse() -> None:
    messages = (Message("a", (("x", b"1"), ("y", "2"))), Message("b", (("z", None),)))
    payload = encode_notify(1, 1, messages)[4 + 7 :]
    assert decode_messages(payload) == messages
    for cut in range(len(payload)):
        try:
            decoded = decode_messages(payload[:cut])
        except ProtocolError as err:
            assert err.status is Status.INVALID_FRAME
        else:  # only a cut on a message boundary may decode, to a prefix
            assert decoded == messages[: len(decoded)]


def test_notify_bad_type_and_nb_args_overflow() -> None:
    with pytest.raises(ProtocolError):
        decode_messages(_s("m") + b"\x01" + _s("a") + b"\x0c")  # reserved type id
    with pytest.raises(ProtocolError):
        decode_messages(_s("m") + b"\x02" + _s("a") + b"\x00")  # announces 2 args, has 1


@pytest.mark.parametrize("scope", list(Scope))
def test_actions_round_trip_every_scope(scope: Scope) -> None:
    actions = (
        SetVar(scope, "node", "node2"),
        SetVar(scope, "count", 3),
        SetVar(scope, "raw", b"\x00\xff"),
        SetVar(scope, "ip", ipaddress.IPv4Address("10.0.0.2")),
        SetVar(scope, "flag", False),
        SetVar(scope, "nothing", None),
        UnsetVar(scope, "how"),
    )
    frame, _ = decode_frame(encode_ack(7, 8, actions))
    assert (frame.type, frame.flags, frame.stream_id, frame.frame_id) == (FrameType.ACK, FLAG_FIN, 7, 8)
    assert decode_actions(frame.payload) == actions
    assert b"".join(encode_action(a) for a in actions) == frame.payload
    assert encode_action(actions[0])[:3] == bytes((1, 3, scope))
    assert encode_action(actions[-1])[:3] == bytes((2, 2, scope))


@pytest.mark.parametrize(
    "make",
    [
        lambda: SetVar(7, "x", 1),  # type: ignore[arg-type]
        lambda: SetVar(Scope.TRANSACTION, 5, 1),  # type: ignore[arg-type]
        lambda: SetVar(Scope.TRANSACTION, "x", object()),
        lambda: UnsetVar(Scope.TRANSACTION, ["x"]),  # type: ignore[arg-type]
        lambda: "not an action",
    ],
)
def test_ack_rejects_bad_actions(make: Callable[[], object]) -> None:
    # Compiled (tests/support.COMPILED), an ill-typed SetVar may already fail to be built.
    with pytest.raises((LocalProtocolError, TypeError) if COMPILED else LocalProtocolError):
        encode_ack(1, 1, (make(),))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "payload",
    [
        b"\x01\x03\x09" + _s("x") + b"\x00",  # unknown scope
        b"\x03\x02\x02" + _s("x"),  # unknown action type
        b"\x01\x02\x02" + _s("x") + b"\x00",  # set-var with 2 args
        b"\x01\x03",  # truncated
    ],
)
def test_decode_actions_rejects(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_actions(payload)


def test_kv_list_round_trip() -> None:
    items = [("a", "x"), ("b", Typed(DataType.UINT32, 5)), ("a", None)]
    assert decode_kv_list(encode_kv_list(items)) == [
        ("a", DataType.STRING, "x"),
        ("b", DataType.UINT32, 5),
        ("a", DataType.NULL, None),
    ]


def test_parse_list_ignores_spaces_and_empties() -> None:
    assert parse_list(" pipelining , async,,") == ("pipelining", "async")
    assert parse_list("") == ()


def test_hello_payload_optional_items_and_unknown_keys() -> None:
    payload = encode_kv_list(
        [
            ("supported-versions", "2.0, 1.5"),
            ("max-frame-size", Typed(DataType.UINT32, 1000)),
            ("capabilities", ""),
            ("engine-id", "E1"),
            ("future-key", 12),
        ]
    )
    assert decode_hello_payload(payload) == Hello(("2.0", "1.5"), 1000, frozenset(), False, "E1")


@pytest.mark.parametrize(
    ("drop", "status"),
    [
        ("supported-versions", Status.NO_VERSION),
        ("max-frame-size", Status.NO_FRAME_SIZE),
        ("capabilities", Status.NO_CAPABILITIES),
    ],
)
def test_hello_payload_missing_items(drop: str, status: Status) -> None:
    items = [
        ("supported-versions", "2.0"),
        ("max-frame-size", Typed(DataType.UINT32, 1000)),
        ("capabilities", "pipelining"),
    ]
    with pytest.raises(ProtocolError) as info:
        decode_hello_payload(encode_kv_list([kv for kv in items if kv[0] != drop]))
    assert info.value.status is status


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("supported-versions", b"2.0"),
        ("max-frame-size", "16380"),
        ("max-frame-size", -1),
        ("capabilities", None),
        ("healthcheck", "true"),
        ("engine-id", 3),
    ],
)
def test_hello_payload_wrong_types(key: str, value: object) -> None:
    items = dict(
        [
            ("supported-versions", "2.0"),
            ("max-frame-size", Typed(DataType.UINT32, 1000)),
            ("capabilities", "pipelining"),
        ]
    )
    items[key] = value
    with pytest.raises(ProtocolError) as info:
        decode_hello_payload(encode_kv_list(items.items()))
    assert info.value.status is Status.INVALID_FRAME


def test_disconnect_frames() -> None:
    frame, _ = decode_frame(encode_haproxy_disconnect(2, "timeout"))
    assert (frame.type, frame.stream_id, frame.frame_id) == (FrameType.HAPROXY_DISCONNECT, 0, 0)
    assert decode_disconnect_payload(frame.payload) == Disconnect(2, "timeout")
    frame, _ = decode_frame(encode_agent_disconnect(Status.INVALID_FRAME, "bad"))
    assert frame.type == FrameType.AGENT_DISCONNECT
    kv = decode_kv_list(frame.payload)
    assert kv == [("status-code", DataType.UINT32, 4), ("message", DataType.STRING, "bad")]
    # Missing items are tolerated: the peer is leaving anyway.
    assert decode_disconnect_payload(b"") == Disconnect(Status.UNKNOWN, "")
    with pytest.raises(ProtocolError):
        decode_disconnect_payload(encode_kv_list([("status-code", "x")]))


def test_agent_disconnect_message_truncated_to_frame_limit() -> None:
    data = encode_agent_disconnect(Status.UNKNOWN, "m" * 5000, max_frame_size=256)
    assert len(data) - 4 <= 256
    frame, _ = decode_frame(data)
    message = decode_disconnect_payload(frame.payload).message
    assert 200 < len(message) < 256 and set(message) == {"m"}
