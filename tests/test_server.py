"""The asyncio SPOP server over real TCP sockets, driven by a peer that frames like HAProxy.

HAProxy itself drives the server in test_haproxy_spop.py; here the peer is
scripted so that edge cases HAProxy never produces on demand (garbage,
oversize frames, a flood past the in-flight limit) can be sent exactly.
"""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from agent.server import AsyncDispatcher, SpopServer
from agent.spop import Message, Scope, SetVar, Status
from agent.spop.frames import (
    FrameType,
    decode_actions,
    decode_disconnect_payload,
    decode_frame,
    decode_kv_list,
    encode_frame,
    encode_haproxy_disconnect,
    encode_haproxy_hello,
    encode_notify,
)

MSG = Message("mqtt-connect", (("client_id", b"dev-1"), ("src", ipaddress.IPv4Address("10.0.0.1"))))


class EchoDispatcher:
    """Answers with the client id it was given; optional gate to hold handlers in flight."""

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.calls = 0
        self.running = 0
        self.max_running = 0
        self.delays: dict[bytes, float] = {}

    async def handle(self, message: Message) -> list:
        self.calls += 1
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            cid = message.get("client_id")
            if cid == b"boom":
                raise RuntimeError("handler bug")
            if cid == b"big":
                return [SetVar(Scope.TRANSACTION, "blob", b"x" * 300)]
            if self.gate is not None:
                await self.gate.wait()
            if isinstance(cid, bytes) and cid in self.delays:
                await asyncio.sleep(self.delays[cid])
            return [SetVar(Scope.TRANSACTION, "node", "node1"), SetVar(Scope.TRANSACTION, "echo", cid)]
        finally:
            self.running -= 1

    def on_error(self, message: Message, exc: BaseException) -> list:
        return [SetVar(Scope.TRANSACTION, "how", "none")]


class Peer:
    """A scripted HAProxy side of one SPOP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Peer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def frame(self, timeout: float = 5.0):
        head = await asyncio.wait_for(self.reader.readexactly(4), timeout)
        body = await asyncio.wait_for(self.reader.readexactly(int.from_bytes(head, "big")), timeout)
        return decode_frame(head + body)[0]

    async def hello(self, capabilities: str = "pipelining,async", max_frame_size: int = 16380):
        await self.send(encode_haproxy_hello(max_frame_size=max_frame_size, capabilities=capabilities, engine_id="e1"))
        frame = await self.frame()
        assert frame.type == FrameType.AGENT_HELLO
        return {k: v for k, _, v in decode_kv_list(frame.payload)}

    async def closed(self, timeout: float = 5.0) -> bool:
        return await asyncio.wait_for(self.reader.read(), timeout) == b""

    def close(self) -> None:
        self.writer.close()


async def start(dispatcher=None, **kw) -> tuple[SpopServer, EchoDispatcher]:
    d = dispatcher or EchoDispatcher()
    server = SpopServer(AsyncDispatcher(d), "127.0.0.1", 0, **kw)
    await server.start()
    return server, d


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_hello_negotiates_pipelining_only_and_acks_carry_actions():
    async def scenario():
        server, _ = await start()
        peer = await Peer.open(server.port)
        hello = await peer.hello("pipelining,async,fragmentation", max_frame_size=4096)
        assert hello == {"version": "2.0", "max-frame-size": 4096, "capabilities": "pipelining"}
        await peer.send(encode_notify(7, 3, [MSG]))
        ack = await peer.frame()
        assert (ack.type, ack.stream_id, ack.frame_id) == (FrameType.ACK, 7, 3)
        actions = decode_actions(ack.payload)
        assert SetVar(Scope.TRANSACTION, "node", "node1") in actions
        assert SetVar(Scope.TRANSACTION, "echo", b"dev-1") in actions
        peer.close()
        await server.shutdown()

    run(scenario())


def test_pipelined_notifies_are_answered_out_of_order_as_each_completes():
    async def scenario():
        server, d = await start()
        # The first frames finish last: ACKs must not wait for each other.
        for i in range(20):
            d.delays[b"c%d" % i] = (20 - i) * 0.01
        peer = await Peer.open(server.port)
        await peer.hello()
        await peer.send(b"".join(
            encode_notify(i + 1, 1, [Message("mqtt-connect", (("client_id", b"c%d" % i),))]) for i in range(20)
        ))
        order = []
        for _ in range(20):
            ack = await peer.frame()
            order.append(ack.stream_id)
            assert SetVar(Scope.TRANSACTION, "echo", b"c%d" % (ack.stream_id - 1)) in decode_actions(ack.payload)
        assert sorted(order) == list(range(1, 21))
        assert order[0] == 20 and order[-1] == 1
        assert d.max_running == 20
        peer.close()
        await server.shutdown()

    run(scenario())


def test_flood_past_in_flight_limit_is_bounded_and_fully_answered():
    async def scenario():
        server, d = await start(max_in_flight=4, max_frame_size=1024)
        d.gate = asyncio.Event()
        peer = await Peer.open(server.port)
        await peer.hello(max_frame_size=1024)
        # ~18 MB: more than loopback socket buffers hold, so a server that kept
        # reading would let the sender finish.
        big = Message("mqtt-connect", (("client_id", b"x" * 900),))
        n = 20000
        frames = b"".join(encode_notify(i, 1, [big]) for i in range(1, n + 1))
        sender = asyncio.create_task(peer.send(frames))
        await asyncio.sleep(0.3)
        (proto,) = server._connections
        # Handlers never exceed the limit, parsed-but-waiting frames come from
        # at most one buffer of 4+1024 bytes, and the codec holds at most one frame.
        assert d.max_running <= 4
        assert len(proto._pending) <= (4 + 1024) // len(encode_notify(1, 1, [big])) + 1
        assert proto._conn.room >= 0 and proto._reading_paused
        assert not sender.done()  # the peer is blocked by TCP flow control, not buffered by us
        d.gate.set()
        seen = set()
        while len(seen) < n:
            seen.add((await peer.frame()).stream_id)
        await sender
        assert seen == set(range(1, n + 1)) and d.calls == n
        peer.close()
        await server.shutdown()

    run(scenario())


def test_healthcheck_hello_is_answered_then_closed():
    async def scenario():
        server, _ = await start()
        peer = await Peer.open(server.port)
        await peer.send(encode_haproxy_hello(capabilities="", healthcheck=True))
        frame = await peer.frame()
        assert frame.type == FrameType.AGENT_HELLO
        assert await peer.closed()
        await server.shutdown()

    run(scenario())


def test_haproxy_disconnect_is_answered_with_agent_disconnect():
    async def scenario():
        server, _ = await start()
        peer = await Peer.open(server.port)
        await peer.hello()
        await peer.send(encode_haproxy_disconnect(0, "bye"))
        frame = await peer.frame()
        assert frame.type == FrameType.AGENT_DISCONNECT
        assert decode_disconnect_payload(frame.payload).status == Status.NORMAL
        assert await peer.closed()
        await server.shutdown()

    run(scenario())


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x00\x00\x00\x09" + b"\xff" * 9, Status.INVALID_FRAME),
        ((20000).to_bytes(4, "big") + b"\x01", Status.FRAME_TOO_BIG),
        (encode_frame(FrameType.NOTIFY, 1, 1, b"", flags=0), Status.FRAGMENTATION_UNSUPPORTED),
    ],
    ids=["garbage", "too-big", "no-fin"],
)
def test_protocol_errors_get_agent_disconnect_with_status(data: bytes, status: Status):
    async def scenario():
        server, _ = await start()
        peer = await Peer.open(server.port)
        await peer.hello()
        await peer.send(data)
        frame = await peer.frame()
        assert frame.type == FrameType.AGENT_DISCONNECT
        assert decode_disconnect_payload(frame.payload).status == status
        assert await peer.closed()
        # The server survives and serves the next connection.
        peer2 = await Peer.open(server.port)
        await peer2.hello()
        await peer2.send(encode_notify(1, 1, [MSG]))
        assert (await peer2.frame()).type == FrameType.ACK
        peer2.close()
        await server.shutdown()

    run(scenario())


def test_handler_exception_still_acks_with_on_error_actions():
    async def scenario():
        server, _ = await start()
        peer = await Peer.open(server.port)
        await peer.hello()
        await peer.send(encode_notify(5, 1, [Message("mqtt-connect", (("client_id", b"boom"),))]))
        ack = await peer.frame()
        assert ack.type == FrameType.ACK
        assert decode_actions(ack.payload) == (SetVar(Scope.TRANSACTION, "how", "none"),)
        peer.close()
        await server.shutdown()

    run(scenario())


def test_reset_mid_frame_is_a_normal_close():
    async def scenario():
        server, _ = await start()
        peer = await Peer.open(server.port)
        await peer.hello()
        await peer.send(encode_notify(1, 1, [MSG])[:-3])
        peer.writer.transport.abort()
        await asyncio.sleep(0.1)
        assert server.connection_count == 0
        peer2 = await Peer.open(server.port)
        await peer2.hello()
        peer2.close()
        await server.shutdown()

    run(scenario())


def test_shutdown_finishes_in_flight_then_disconnects():
    async def scenario():
        server, d = await start()
        d.gate = asyncio.Event()
        peer = await Peer.open(server.port)
        await peer.hello()
        await peer.send(encode_notify(1, 1, [MSG]) + encode_notify(2, 1, [MSG]))
        while d.running < 2:
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(server.shutdown(grace=5))
        await asyncio.sleep(0.1)
        # No new connections while stopping.
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", server.port)
        d.gate.set()
        kinds = [(await peer.frame()).type for _ in range(3)]
        assert kinds == [FrameType.ACK, FrameType.ACK, FrameType.AGENT_DISCONNECT]
        assert await peer.closed()
        await stopping

    run(scenario())


def test_shutdown_answers_queued_notifies_too():
    async def scenario():
        server, d = await start(max_in_flight=1)
        d.delays[b"q"] = 0.05
        peer = await Peer.open(server.port)
        await peer.hello()
        q = Message("mqtt-connect", (("client_id", b"q"),))
        await peer.send(b"".join(encode_notify(i, 1, [q]) for i in (1, 2, 3)))
        while d.calls < 1:
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(server.shutdown(grace=5))
        frames = [await peer.frame() for _ in range(4)]
        assert [f.type for f in frames] == [FrameType.ACK] * 3 + [FrameType.AGENT_DISCONNECT]
        assert sorted(f.stream_id for f in frames[:3]) == [1, 2, 3]
        await stopping

    run(scenario())


def test_ack_too_large_for_the_frame_falls_back_to_the_error_answer():
    async def scenario():
        server, _ = await start()
        peer = await Peer.open(server.port)
        await peer.hello(max_frame_size=256)
        big = Message("mqtt-connect", (("client_id", b"big"),))  # answered with a 300-byte value
        await peer.send(encode_notify(9, 1, [big]))
        ack = await peer.frame()
        assert (ack.type, ack.stream_id) == (FrameType.ACK, 9)
        assert decode_actions(ack.payload) == (SetVar(Scope.TRANSACTION, "how", "none"),)
        peer.close()
        await server.shutdown()

    run(scenario())


def test_connections_past_max_connections_are_closed_at_once_and_logged(caplog):
    import logging

    from agent.logs import reset_rate_limits

    reset_rate_limits()
    caplog.set_level(logging.WARNING, logger="mqtt_affinity.spop")

    async def scenario():
        server, _ = await start(max_connections=3)
        peers = [await Peer.open(server.port) for _ in range(3)]
        for p in peers:
            await p.hello()
        extra = await Peer.open(server.port)
        assert await extra.closed()  # refused: EOF without a frame
        assert server.refused == 1 and server.connection_count == 3
        assert any("max_connections (3) reached" in r.getMessage() for r in caplog.records)
        # The served ones keep working, and a freed slot takes a new connection.
        await peers[0].send(encode_notify(1, 1, [MSG]))
        assert (await peers[0].frame()).type == FrameType.ACK
        peers[1].close()
        for _ in range(100):
            if server.connection_count == 2:
                break
            await asyncio.sleep(0.01)
        again = await Peer.open(server.port)
        assert (await again.hello())["version"] == "2.0"
        for p in (peers[0], peers[2], again):
            p.close()
        await server.shutdown()

    run(scenario())


def test_an_idle_connection_costs_no_read_buffer():
    """Reads go into one shared buffer: 300 idle connections must not cost 300 frame buffers (16 KB each)."""
    import tracemalloc

    async def scenario():
        server, _ = await start(max_frame_size=16380)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        peers = [await Peer.open(server.port) for _ in range(300)]
        for _ in range(200):
            if server.connection_count == 300:
                break
            await asyncio.sleep(0.01)
        assert server.connection_count == 300
        per_connection = (tracemalloc.get_traced_memory()[0] - before) / 300
        tracemalloc.stop()
        # Both ends of each connection live in this process (client streams included); a
        # per-connection frame buffer alone would be 16384 bytes.
        assert per_connection < 8000, per_connection
        for p in peers:
            p.close()
        await server.shutdown()

    run(scenario())


def test_a_connection_without_hello_is_closed_with_the_timeout_status():
    """hello_timeout: half a HELLO (or nothing) gets AGENT-DISCONNECT status 2 and a close;
    a connection that said HELLO in time is not affected by the deadline."""
    async def scenario():
        server, _ = await start(hello_timeout=0.3)
        served = await Peer.open(server.port)
        await served.hello()
        silent = await Peer.open(server.port)
        half = await Peer.open(server.port)
        hello = encode_haproxy_hello(capabilities="pipelining")
        await half.send(hello[: len(hello) // 2])
        opened = asyncio.get_running_loop().time()
        for peer in (silent, half):
            frame = await peer.frame(timeout=5)
            assert frame.type == FrameType.AGENT_DISCONNECT
            assert decode_disconnect_payload(frame.payload).status == Status.TIMEOUT
            assert await peer.closed()
        # A timer never fires early (asyncio may round by its clock resolution).
        assert asyncio.get_running_loop().time() - opened >= 0.3 - 0.05
        assert server.hello_timeouts == 2 and server.connection_count == 1
        # The connection that completed its HELLO is still served after the deadline passed.
        await served.send(encode_notify(1, 1, [MSG]))
        assert (await served.frame()).type == FrameType.ACK
        served.close()
        await server.shutdown()

    run(scenario())


def test_at_max_connections_the_oldest_connection_without_hello_makes_room():
    async def scenario():
        server, _ = await start(max_connections=3, hello_timeout=60)
        served = await Peer.open(server.port)
        await served.hello()
        oldest, newer = await Peer.open(server.port), await Peer.open(server.port)
        for _ in range(100):
            if server.connection_count == 3:
                break
            await asyncio.sleep(0.01)
        # A fourth connection: the oldest one still without a HELLO is closed for it.
        fourth = await Peer.open(server.port)
        frame = await oldest.frame()
        assert frame.type == FrameType.AGENT_DISCONNECT
        assert decode_disconnect_payload(frame.payload).status == Status.RESOURCE_ALLOCATION
        assert await oldest.closed()
        assert (await fourth.hello())["version"] == "2.0"
        assert (await newer.hello())["version"] == "2.0"
        assert server.evicted == 1 and server.refused == 0
        # Every slot now holds a connection past its HELLO: the next one is refused.
        extra = await Peer.open(server.port)
        assert await extra.closed()
        assert server.refused == 1
        for p in (served, newer, fourth):
            await p.send(encode_notify(1, 1, [MSG]))
            assert (await p.frame()).type == FrameType.ACK
            p.close()
        await server.shutdown()

    run(scenario())


def test_draining_fails_health_checks_and_serves_everything_else():
    async def scenario():
        server, _ = await start()
        before = await Peer.open(server.port)
        await before.hello()
        server.begin_drain()
        check = await Peer.open(server.port)
        await check.send(encode_haproxy_hello(capabilities="", healthcheck=True))
        frame = await check.frame()
        # HAProxy's spop-check counts an AGENT-DISCONNECT answer as a failed check.
        assert frame.type == FrameType.AGENT_DISCONNECT
        assert "draining" in decode_disconnect_payload(frame.payload).message
        assert await check.closed()
        # Existing and new SPOE connections are still served while draining.
        after = await Peer.open(server.port)
        await after.hello()
        for p in (before, after):
            await p.send(encode_notify(3, 1, [MSG]))
            assert (await p.frame()).type == FrameType.ACK
        stopping = asyncio.create_task(server.shutdown(grace=5))
        for p in (before, after):
            assert (await p.frame()).type == FrameType.AGENT_DISCONNECT
            assert await p.closed()
        await stopping

    run(scenario())
