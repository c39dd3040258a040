"""Property tests: whatever HAProxy (or an attacker) sends, the codec only ever
returns events or raises ProtocolError, and never buffers more than one frame.
"""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.spop import (
    Ack,
    AgentDisconnect,
    AgentHello,
    ConnectionClosed,
    Disconnect,
    Hello,
    Message,
    Notify,
    ProtocolError,
    Scope,
    SetVar,
    SpopConnection,
    State,
    Status,
)
from agent.spop.frames import FLAG_ABORT, FLAG_FIN, encode_haproxy_disconnect, encode_haproxy_hello, encode_notify

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_FRAME = 512

values = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text(max_size=12)
    | st.binary(max_size=24)
    | st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
    | st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
)
messages = st.builds(
    Message,
    st.text(max_size=12),
    st.lists(st.tuples(st.text(max_size=8), values), max_size=5).map(tuple),
)
notify_frames = st.builds(
    encode_notify,
    st.integers(0, 2**40),
    st.integers(0, 2**20),
    st.lists(messages, max_size=2),
    st.sampled_from([FLAG_FIN] * 6 + [FLAG_FIN | FLAG_ABORT, 0]),
)
hello_frames = st.builds(
    encode_haproxy_hello,
    st.sampled_from(["2.0", "1.0, 2.0", "1.0", ""]),
    st.sampled_from([16380, 256, 300, 100]),
    st.sampled_from(["pipelining,async", "pipelining", ""]),
    st.sampled_from([None, False, True]),
    st.sampled_from([None, "engine"]),
)
disconnect_frames = st.builds(encode_haproxy_disconnect, st.integers(0, 99), st.text(max_size=20))
VALID_HELLO = encode_haproxy_hello("2.0", 16380, "pipelining,async")


@st.composite
def frame_lists(draw: st.DrawFn, with_hello: bool) -> tuple[bytes, list[bytes]]:
    """(untouched prefix, frames) of a plausible SPOP stream: mostly NOTIFYs."""
    frames = draw(st.lists(notify_frames, max_size=6))
    if draw(st.integers(0, 9)) == 0:
        frames.insert(draw(st.integers(0, len(frames))), draw(hello_frames))
    if draw(st.booleans()):
        frames.append(draw(disconnect_frames))
    if with_hello:
        return VALID_HELLO, frames
    first = draw(st.sampled_from([VALID_HELLO, VALID_HELLO]) | hello_frames)
    return b"", [first, *frames]


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """Apply a few bit flips, truncations, insertions and deletions."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "flip", "truncate", "insert", "delete"]))
        if op == "insert":
            at = draw(st.integers(0, len(buf)))
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif not buf:
            continue
        elif op == "flip":
            at = draw(st.integers(0, len(buf) - 1))
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del buf[draw(st.integers(0, len(buf) - 1)) :]
        else:
            at = draw(st.integers(0, len(buf) - 1))
            del buf[at : at + draw(st.integers(1, 8))]
    return bytes(buf)


@st.composite
def refitted(draw: st.DrawFn, frame: bytes) -> bytes:
    """Mutate a frame's body but fix its length prefix, so the frame is
    complete and only its header/payload is garbage (exercises the decoders,
    not just the framing)."""
    if draw(st.booleans()):
        return frame
    body = draw(mutated(frame[4:]))
    return len(body).to_bytes(4, "big") + body


def drive(data: bytes, chunk_sizes: list[int], respect_room: bool) -> None:
    """Feed `data` like a server would, answering events, checking invariants."""
    conn = SpopConnection(max_frame_size=MAX_FRAME)
    pos = 0
    sizes = iter(chunk_sizes * (len(data) + 1))
    calls = 0
    while pos < len(data):
        calls += 1
        assert calls <= len(data) + 1  # every call consumes at least one byte
        size = next(sizes)
        if respect_room:
            assert conn.room >= 1
            size = min(size, conn.room)
        chunk = data[pos : pos + size]
        pos += len(chunk)
        try:
            events = conn.receive_data(chunk)
        except ProtocolError as err:
            assert isinstance(err.status, Status) and err.status is not Status.NORMAL
            assert conn.state is State.CLOSING
            assert conn.receive_data(data[pos:] or b"x") == []
            conn.send(AgentDisconnect(err.status, err.reason))
            assert conn.state is State.CLOSED
            return
        assert conn.buffered <= 4 + conn.negotiated_max_frame_size
        for event in events:
            assert isinstance(event, (Hello, Notify, Disconnect))
            if isinstance(event, Hello):
                conn.send(AgentHello())
            elif isinstance(event, Notify):
                # Delivered NOTIFYs stay answerable even if a DISCONNECT followed.
                assert conn.state in (State.READY, State.CLOSING)
                for message in event.messages:
                    assert isinstance(message.name, str)
                    assert all(isinstance(name, str) for name, _ in message.args)
                conn.send(Ack(event.stream_id, event.frame_id, (SetVar(Scope.TRANSACTION, "node", "n1"),)))
            elif isinstance(event, Disconnect):
                assert conn.state is State.CLOSING
                conn.send(AgentDisconnect(Status.NORMAL, "bye"))
    assert conn.receive_data(b"") in ([ConnectionClosed()], [])
    assert conn.state is State.CLOSED


chunks = st.lists(st.integers(1, 200), min_size=1, max_size=8)


@given(st.binary(max_size=600), chunks, st.booleans())
@FUZZ
def test_random_bytes_without_hello(data: bytes, sizes: list[int], respect_room: bool) -> None:
    drive(data, sizes, respect_room)


@given(st.binary(max_size=600), chunks, st.booleans())
@FUZZ
def test_random_bytes_after_valid_hello(data: bytes, sizes: list[int], respect_room: bool) -> None:
    drive(VALID_HELLO + data, sizes, respect_room)


@given(st.data(), st.booleans(), chunks, st.booleans())
@FUZZ
def test_mutated_frame_streams(data: st.DataObject, with_hello: bool, sizes: list[int], respect_room: bool) -> None:
    prefix, frames = data.draw(frame_lists(with_hello))
    drive(prefix + data.draw(mutated(b"".join(frames))), sizes, respect_room)


@given(st.data(), st.booleans(), chunks, st.booleans())
@FUZZ
def test_mutated_frame_payloads(data: st.DataObject, with_hello: bool, sizes: list[int], respect_room: bool) -> None:
    prefix, frames = data.draw(frame_lists(with_hello))
    drive(prefix + b"".join(data.draw(refitted(f)) for f in frames), sizes, respect_room)


@given(st.lists(notify_frames.filter(lambda f: f[5:9] == b"\x00\x00\x00\x01"), max_size=5), chunks)
@settings(max_examples=100, deadline=None)
def test_valid_streams_parse_identically_in_any_chunking(frames: list[bytes], sizes: list[int]) -> None:
    data = VALID_HELLO + b"".join(frames)
    whole = SpopConnection(MAX_FRAME)
    try:
        expected = whole.receive_data(data)
    except ProtocolError as err:  # a generated NOTIFY may exceed MAX_FRAME
        assert err.status is Status.FRAME_TOO_BIG
        return
    conn = SpopConnection(MAX_FRAME)
    got = []
    pos = 0
    for size in sizes * (len(data) + 1):
        if pos >= len(data):
            break
        got.extend(conn.receive_data(data[pos : pos + size]))
        pos += size
    assert got == expected
    assert len(expected) == 1 + len(frames)
