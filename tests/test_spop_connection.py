"""SpopConnection: handshake, state machine, error statuses, buffering."""

from __future__ import annotations

import ipaddress

import pytest

from agent.spop import (
    Ack,
    AgentDisconnect,
    AgentHello,
    ConnectionClosed,
    DataType,
    Disconnect,
    Hello,
    LocalProtocolError,
    Message,
    Notify,
    ProtocolError,
    Scope,
    SetVar,
    SpopConnection,
    State,
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
    decode_kv_list,
    encode_frame,
    encode_haproxy_disconnect,
    encode_haproxy_hello,
    encode_kv_list,
    encode_notify,
)
from tests.support import COMPILED

CONNECT = Message(
    "mqtt-connect",
    (
        ("client_id", b"sensor-0042-4f1c9a7be3d2"),
        ("src", ipaddress.IPv4Address("10.1.2.3")),
        ("username", b"bob"),
        ("proto_ver", b"4"),
        ("flags", b"2"),
        ("sess_expiry", None),
        ("balancer", "lb-1"),
    ),
)
# Payload of a NOTIFY with 1-byte ids: after the 4-byte length and 7-byte header.
NOTIFY_PAYLOAD = encode_notify(1, 1, [CONNECT])[11:]
assert NOTIFY_PAYLOAD.startswith(b"\x0cmqtt-connect\x07")

#: What an ill-typed argument raises; compiled (tests/support.COMPILED) a TypeError may come first.
_ILL_TYPED = (LocalProtocolError, TypeError) if COMPILED else LocalProtocolError


def agent_hello_kv(frame_bytes: bytes) -> dict[str, object]:
    frame, used = decode_frame(frame_bytes)
    assert used == len(frame_bytes)
    assert (frame.type, frame.flags, frame.stream_id, frame.frame_id) == (FrameType.AGENT_HELLO, FLAG_FIN, 0, 0)
    kv = decode_kv_list(frame.payload)
    assert [(name, tid) for name, tid, _ in kv] == [
        ("version", DataType.STRING),
        ("max-frame-size", DataType.UINT32),
        ("capabilities", DataType.STRING),
    ]
    return {name: value for name, _, value in kv}


def ready(max_frame_size: int = 16380, haproxy_max: int = 16380) -> SpopConnection:
    conn = SpopConnection(max_frame_size)
    conn.receive_data(encode_haproxy_hello("2.0", haproxy_max, "pipelining"))
    conn.send(AgentHello())
    assert conn.state is State.READY
    return conn


def expect_error(conn: SpopConnection, data: bytes, status: Status) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(data)
    assert info.value.status is status
    assert conn.state is State.CLOSING
    return info.value


# --- handshake ---------------------------------------------------------------------


def test_handshake_haproxy_26_style() -> None:
    conn = SpopConnection()
    assert conn.state is State.AWAIT_HELLO
    events = conn.receive_data(
        encode_haproxy_hello("2.0", 16380, "pipelining,async", healthcheck=False, engine_id="eng-1")
    )
    assert events == [Hello(("2.0",), 16380, frozenset({"pipelining", "async"}), False, "eng-1")]
    assert conn.state is State.SEND_HELLO
    assert conn.capabilities == frozenset({"pipelining"})
    assert agent_hello_kv(conn.send(AgentHello())) == {
        "version": "2.0",
        "max-frame-size": 16380,
        "capabilities": "pipelining",
    }
    assert conn.state is State.READY and not conn.healthcheck


def test_handshake_haproxy_32_style_negotiates_smaller_size() -> None:
    conn = SpopConnection(max_frame_size=4096)
    (hello,) = conn.receive_data(encode_haproxy_hello("2.0", 16380, "pipelining"))
    assert isinstance(hello, Hello) and hello.engine_id is None
    assert conn.negotiated_max_frame_size == 4096
    kv = agent_hello_kv(conn.send(AgentHello()))
    assert kv["max-frame-size"] == 4096 and kv["capabilities"] == "pipelining"


def test_handshake_haproxy_smaller_frame_size_wins() -> None:
    conn = SpopConnection(max_frame_size=16380)
    conn.receive_data(encode_haproxy_hello("2.0", 1024, "pipelining"))
    assert conn.negotiated_max_frame_size == 1024
    assert agent_hello_kv(conn.send(AgentHello()))["max-frame-size"] == 1024


@pytest.mark.parametrize("offered", ["", "async", "fragmentation", "async, fragmentation", "foo,bar"])
def test_never_answers_async_or_fragmentation(offered: str) -> None:
    conn = SpopConnection()
    conn.receive_data(encode_haproxy_hello("2.0", 16380, offered))
    assert conn.capabilities == frozenset()
    assert agent_hello_kv(conn.send(AgentHello()))["capabilities"] == ""


@pytest.mark.parametrize("versions", ["2.0", " 1.0 , 2.0 ", "2.0,1.5", "2.1"])
def test_accepted_versions(versions: str) -> None:
    conn = SpopConnection()
    conn.receive_data(encode_haproxy_hello(versions, 16380, "pipelining"))
    assert agent_hello_kv(conn.send(AgentHello()))["version"] == "2.0"


def test_healthcheck_hello_closes_after_agent_hello() -> None:
    conn = SpopConnection()
    (hello,) = conn.receive_data(encode_haproxy_hello("2.0", 16380, "", healthcheck=True))
    assert isinstance(hello, Hello) and hello.healthcheck and conn.healthcheck
    assert agent_hello_kv(conn.send(AgentHello()))["version"] == "2.0"
    assert conn.state is State.CLOSED
    assert conn.receive_data(encode_notify(1, 1, [CONNECT])) == []
    with pytest.raises(LocalProtocolError):
        conn.send(Ack(1, 1, ()))
    assert conn.receive_data(b"") == [ConnectionClosed()]


def test_hello_and_notify_in_one_chunk() -> None:
    conn = SpopConnection()
    events = conn.receive_data(encode_haproxy_hello() + encode_notify(9, 1, [CONNECT]))
    assert [type(e) for e in events] == [Hello, Notify]
    with pytest.raises(LocalProtocolError):  # must answer the HELLO first
        conn.send(Ack(9, 1, ()))
    conn.send(AgentHello())
    assert decode_frame(conn.send(Ack(9, 1, ())))[0].frame_id == 1


# --- NOTIFY / ACK --------------------------------------------------------------------


def test_notify_event_keeps_order_and_repeats() -> None:
    conn = ready()
    message = Message("mqtt-connect", (("a", b"1"), ("", "anon"), ("a", b"2"), ("n", None)))
    events = conn.receive_data(encode_notify(300, 2, [CONNECT, message, CONNECT]))
    assert events == [Notify(300, 2, (CONNECT, message, CONNECT))]
    assert events[0].messages[1].get("a") == b"1"


def test_abort_flag_on_an_unfragmented_notify_is_ignored() -> None:
    """SPOE.txt: ABORT "can be ignored for frames with an unfragmented payload": the stream is answered."""
    conn = ready()
    aborted = encode_notify(1, 1, [CONNECT], flags=FLAG_FIN | FLAG_ABORT)
    assert conn.receive_data(aborted + encode_notify(1, 2, [CONNECT])) == [
        Notify(1, 1, (CONNECT,)),
        Notify(1, 2, (CONNECT,)),
    ]
    assert conn.state is State.READY


def test_empty_notify_is_an_event_with_no_messages() -> None:
    conn = ready()
    assert conn.receive_data(encode_notify(5, 6, [])) == [Notify(5, 6, ())]


@pytest.mark.parametrize("scope", list(Scope))
def test_ack_set_and_unset_in_every_scope(scope: Scope) -> None:
    conn = ready()
    actions = (SetVar(scope, "node", "node2"), SetVar(scope, "ttl", Typed(DataType.UINT32, 30)), UnsetVar(scope, "how"))
    frame, _used = decode_frame(conn.send(Ack(2**40, 77, actions)))
    assert (frame.type, frame.flags, frame.stream_id, frame.frame_id) == (FrameType.ACK, FLAG_FIN, 2**40, 77)
    assert decode_actions(frame.payload) == (SetVar(scope, "node", "node2"), SetVar(scope, "ttl", 30), actions[2])


def test_ack_larger_than_negotiated_size_is_refused() -> None:
    conn = ready(max_frame_size=16380, haproxy_max=256)
    conn.send(Ack(1, 1, (SetVar(Scope.TRANSACTION, "v", "x" * 200),)))  # fits
    with pytest.raises(LocalProtocolError):
        conn.send(Ack(1, 1, (SetVar(Scope.TRANSACTION, "v", "x" * 300),)))
    assert conn.state is State.READY


@pytest.mark.parametrize("ids", [(-1, 0), (0, -1), ("1", 0)])
def test_ack_with_bad_ids_is_refused(ids: tuple[object, object]) -> None:
    with pytest.raises(_ILL_TYPED):
        ready().send(Ack(ids[0], ids[1], ()))  # type: ignore[arg-type]


# --- chunking and buffering -----------------------------------------------------


def _stream() -> bytes:
    return encode_haproxy_hello("2.0", 16380, "pipelining,async") + b"".join(
        encode_notify(sid, fid, [CONNECT]) for sid, fid in [(1, 1), (240, 2), (70000, 3), (1, 4)]
    )


def test_byte_by_byte_gives_the_same_events() -> None:
    whole = SpopConnection().receive_data(_stream())
    conn = SpopConnection()
    split: list[object] = []
    data = _stream()
    for i in range(len(data)):
        split.extend(conn.receive_data(data[i : i + 1]))
    assert split == whole and len(whole) == 5
    assert conn.buffered == 0


def test_many_frames_in_one_chunk() -> None:
    conn = ready()
    chunk = b"".join(encode_notify(i, i + 1, [CONNECT]) for i in range(200))
    events = conn.receive_data(chunk + encode_notify(999, 1, [CONNECT])[:10])
    assert [(e.stream_id, e.frame_id) for e in events] == [(i, i + 1) for i in range(200)]  # type: ignore[union-attr]
    assert conn.buffered == 10
    assert conn.receive_data(encode_notify(999, 1, [CONNECT])[10:]) == [Notify(999, 1, (CONNECT,))]


def test_accepts_bytearray_and_memoryview_input() -> None:
    conn = ready()
    frame = encode_notify(1, 1, [CONNECT])
    assert conn.receive_data(bytearray(frame)) == [Notify(1, 1, (CONNECT,))]
    assert conn.receive_data(memoryview(frame)[:5]) == []
    assert conn.receive_data(memoryview(frame)[5:]) == [Notify(1, 1, (CONNECT,))]


def test_room_never_lets_the_buffer_exceed_one_frame() -> None:
    conn = SpopConnection(max_frame_size=300)
    big = Message("m", (("x", b"y" * 250),))
    data = encode_haproxy_hello("2.0", 300, "pipelining") + b"".join(
        encode_notify(i, 1, [big if i % 2 else CONNECT]) for i in range(40)
    )
    assert len(encode_notify(1, 1, [big])) - 4 <= 300
    received = 0
    pos = 0
    while pos < len(data):
        room = conn.room
        assert room >= 1  # a read(room) of 0 bytes would look like EOF
        chunk = data[pos : pos + room]
        pos += len(chunk)
        received += sum(isinstance(e, Notify) for e in conn.receive_data(chunk))
        assert conn.buffered <= 4 + conn.negotiated_max_frame_size
        assert conn.buffered + conn.room == 4 + conn.negotiated_max_frame_size
    assert received == 40


# --- error statuses ----------------------------------------------------------------------


def test_frame_too_big_detected_from_the_length_prefix_alone() -> None:
    conn = SpopConnection(max_frame_size=1000)
    expect_error(conn, (1001).to_bytes(4, "big"), Status.FRAME_TOO_BIG)
    assert conn.buffered == 0


def test_frame_too_big_after_hello_uses_negotiated_limit() -> None:
    conn = ready(max_frame_size=16380, haproxy_max=512)
    conn.receive_data((512).to_bytes(4, "big"))  # at the limit: fine, waits for the body
    conn2 = ready(max_frame_size=16380, haproxy_max=512)
    expect_error(conn2, (513).to_bytes(4, "big") + b"\x03", Status.FRAME_TOO_BIG)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00\x00",  # zero length
        b"\x00\x00\x00\x06" + b"\x03\x00\x00\x00\x01\x00",  # shorter than a header
        encode_frame(50, 0, 0, b""),  # unknown type
        encode_frame(FrameType.ACK, 1, 1, b""),  # an agent frame type
        encode_frame(FrameType.NOTIFY, 1, 1, NOTIFY_PAYLOAD.replace(b"connect\x07", b"connect\x08")),  # nb-args
        encode_frame(FrameType.NOTIFY, 1, 1, NOTIFY_PAYLOAD[:-2]),  # payload cut short
        encode_frame(FrameType.NOTIFY, 1, 1, b"\x01m\x01\x01a\x0e"),  # reserved data type
    ],
)
def test_invalid_frames_after_hello(data: bytes) -> None:
    conn = ready()
    payload_len = int.from_bytes(data[:4], "big")
    assert payload_len == len(data) - 4
    expect_error(conn, data, Status.INVALID_FRAME)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (encode_notify(1, 1, [CONNECT]), Status.INVALID_FRAME),
        (encode_haproxy_disconnect(0, "bye"), Status.INVALID_FRAME),
        (encode_frame(FrameType.HAPROXY_HELLO, 1, 0, b""), Status.INVALID_FRAME),  # non-zero stream-id
        (encode_frame(FrameType.HAPROXY_HELLO, 0, 0, b""), Status.NO_VERSION),  # empty KV-list
        (encode_frame(FrameType.HAPROXY_HELLO, 0, 0, b"\x12supported-versions\x08\x03" + b"2."), Status.INVALID_FRAME),
    ],
)
def test_invalid_frames_before_hello(data: bytes, status: Status) -> None:
    expect_error(SpopConnection(), data, status)


def test_second_hello_is_invalid() -> None:
    expect_error(ready(), encode_haproxy_hello(), Status.INVALID_FRAME)


@pytest.mark.parametrize(
    ("items", "status"),
    [
        ([("max-frame-size", Typed(DataType.UINT32, 16380)), ("capabilities", "")], Status.NO_VERSION),
        ([("supported-versions", "2.0"), ("capabilities", "")], Status.NO_FRAME_SIZE),
        ([("supported-versions", "2.0"), ("max-frame-size", Typed(DataType.UINT32, 16380))], Status.NO_CAPABILITIES),
    ],
)
def test_missing_hello_items(items: list[tuple[str, object]], status: Status) -> None:
    expect_error(SpopConnection(), encode_frame(FrameType.HAPROXY_HELLO, 0, 0, encode_kv_list(items)), status)


@pytest.mark.parametrize("versions", ["1.0", "3.0", "", "2", "2.x", "1.0, 2"])
def test_unsupported_version(versions: str) -> None:
    expect_error(SpopConnection(), encode_haproxy_hello(versions, 16380, "pipelining"), Status.UNSUPPORTED_VERSION)


@pytest.mark.parametrize("size", [0, 255])
def test_bad_frame_size(size: int) -> None:
    expect_error(SpopConnection(), encode_haproxy_hello("2.0", size, "pipelining"), Status.BAD_FRAME_SIZE)


def test_hello_at_minimum_frame_size_is_fine() -> None:
    conn = SpopConnection()
    conn.receive_data(encode_haproxy_hello("2.0", 256, "pipelining"))
    assert conn.negotiated_max_frame_size == 256


@pytest.mark.parametrize(
    "data",
    [
        encode_notify(1, 1, [CONNECT], flags=0),
        encode_notify(1, 1, [CONNECT], flags=FLAG_ABORT),
        encode_frame(FrameType.UNSET, 1, 1, b"", flags=FLAG_FIN),
    ],
)
def test_fragmentation_unsupported(data: bytes) -> None:
    expect_error(ready(), data, Status.FRAGMENTATION_UNSUPPORTED)


def test_hello_without_fin_is_fragmentation_unsupported() -> None:
    hello = encode_haproxy_hello()
    unfinished = hello[:5] + b"\x00\x00\x00\x00" + hello[9:]
    expect_error(SpopConnection(), unfinished, Status.FRAGMENTATION_UNSUPPORTED)


def test_after_protocol_error_data_is_ignored_and_disconnect_closes() -> None:
    conn = ready()
    err = expect_error(conn, encode_frame(77, 0, 0, b""), Status.INVALID_FRAME)
    assert conn.receive_data(encode_notify(1, 1, [CONNECT])) == []
    assert conn.room == 4 + conn.negotiated_max_frame_size
    conn.send(Ack(1, 1, ()))  # events delivered before the error stay answerable
    assert conn.state is State.CLOSING
    frame, _ = decode_frame(conn.send(AgentDisconnect(err.status, err.reason)))
    assert frame.type == FrameType.AGENT_DISCONNECT
    assert decode_disconnect_payload(frame.payload) == Disconnect(Status.INVALID_FRAME, err.reason)
    assert conn.state is State.CLOSED


def test_events_before_an_error_in_the_same_chunk_are_dropped() -> None:
    conn = ready()
    expect_error(conn, encode_notify(1, 1, [CONNECT]) + encode_frame(77, 0, 0, b""), Status.INVALID_FRAME)


# --- disconnect and EOF --------------------------------------------------------------------


def test_haproxy_disconnect_then_agent_disconnect_closes() -> None:
    conn = ready()
    events = conn.receive_data(encode_haproxy_disconnect(2, "timeout") + encode_notify(1, 1, [CONNECT]))
    assert events == [Disconnect(2, "timeout")]
    assert conn.state is State.CLOSING
    assert conn.receive_data(encode_notify(1, 2, [CONNECT])) == []  # ignored, as HAProxy does
    frame, _ = decode_frame(conn.send(AgentDisconnect(Status.NORMAL, "bye")))
    assert (frame.type, frame.stream_id, frame.frame_id) == (FrameType.AGENT_DISCONNECT, 0, 0)
    assert decode_disconnect_payload(frame.payload) == Disconnect(0, "bye")
    assert conn.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.send(AgentDisconnect(Status.NORMAL, "again"))


def test_hello_and_disconnect_in_one_chunk_stay_answerable() -> None:
    conn = SpopConnection()
    events = conn.receive_data(encode_haproxy_hello() + encode_haproxy_disconnect(0, "reload"))
    assert [type(e) for e in events] == [Hello, Disconnect]
    assert conn.state is State.CLOSING
    assert agent_hello_kv(conn.send(AgentHello()))["version"] == "2.0"
    assert conn.state is State.CLOSING
    with pytest.raises(LocalProtocolError):
        conn.send(AgentHello())  # only once
    conn.send(AgentDisconnect(Status.NORMAL, ""))
    assert conn.state is State.CLOSED


def test_ack_after_disconnect_then_not_after_close() -> None:
    conn = ready()
    events = conn.receive_data(encode_notify(4, 4, [CONNECT]) + encode_haproxy_disconnect(0, ""))
    assert [type(e) for e in events] == [Notify, Disconnect]
    assert decode_frame(conn.send(Ack(4, 4, ())))[0].type == FrameType.ACK
    conn.send(AgentDisconnect(Status.NORMAL, ""))
    with pytest.raises(LocalProtocolError):
        conn.send(Ack(4, 4, ()))


def test_ack_before_agent_hello_refused_even_when_closing() -> None:
    conn = SpopConnection()
    conn.receive_data(encode_haproxy_hello() + encode_haproxy_disconnect(0, ""))
    with pytest.raises(LocalProtocolError):
        conn.send(Ack(1, 1, ()))


def test_disconnect_with_non_zero_ids_is_invalid() -> None:
    bad = encode_frame(FrameType.HAPROXY_DISCONNECT, 1, 0, encode_kv_list([("status-code", 0), ("message", "")]))
    expect_error(ready(), bad, Status.INVALID_FRAME)


def test_agent_may_disconnect_before_hello() -> None:
    conn = SpopConnection()
    frame, _ = decode_frame(conn.send(AgentDisconnect(Status.RESOURCE_ALLOCATION, "shutting down")))
    assert decode_disconnect_payload(frame.payload).status == Status.RESOURCE_ALLOCATION
    assert conn.state is State.CLOSED


@pytest.mark.parametrize("fed", [None, b"\x00\x00", encode_notify(1, 1, [CONNECT])[:20]])
def test_eof_clean_or_mid_frame(fed: bytes | None) -> None:
    conn = ready()
    if fed is not None:
        assert conn.receive_data(fed) == []
    assert conn.receive_data(b"") == [ConnectionClosed()]
    assert conn.state is State.CLOSED and conn.buffered == 0
    assert conn.receive_data(b"") == []  # reported once
    assert conn.receive_data(b"late data") == []


def test_eof_before_hello() -> None:
    conn = SpopConnection()
    assert conn.receive_data(encode_haproxy_hello()[:7]) == []
    assert conn.receive_data(b"") == [ConnectionClosed()]
    assert conn.state is State.CLOSED


# --- local misuse ----------------------------------------------------------------------------


def test_local_protocol_errors() -> None:
    conn = SpopConnection()
    with pytest.raises(LocalProtocolError):
        conn.send(Ack(1, 1, ()))
    with pytest.raises(LocalProtocolError):
        conn.send(AgentHello())
    with pytest.raises(_ILL_TYPED):
        conn.send(Notify(1, 1, ()))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        conn.send(AgentDisconnect(-1, "x"))
    conn = ready()
    with pytest.raises(LocalProtocolError):
        conn.send(AgentHello())


@pytest.mark.parametrize("size", [255, 2**32, "16380", True])
def test_constructor_validates_max_frame_size(size: object) -> None:
    with pytest.raises(_ILL_TYPED):
        SpopConnection(size)  # type: ignore[arg-type]
