"""The SPOP engine (agent.server + agent.spop) against real HAProxy 2.6 and 3.2.

The agent here is the product's SpopServer with a small test handler (a fixed
rule: client id -> node), run in a thread of the test process, so these tests
prove the protocol engine, not the affinity logic (see test_e2e_*.py).
"""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections.abc import Iterator

import pytest

from agent.server import AsyncDispatcher, SpopServer
from agent.spop import Message, Scope, SetVar
from devstack import DISCONNECT, HAPROXY_CFG, connect_packet, free_port, haproxy_env, read_packet, wait_until

pytestmark = pytest.mark.haproxy

NODES = ("node1", "node2", "node3")


def rule(client_id: bytes) -> str:
    return NODES[zlib.crc32(client_id) % 3]


class CountingObserver:
    def __init__(self) -> None:
        self.healthchecks = 0
        self.notifies = 0
        self.disconnects: list[tuple[str, int]] = []

    def connection_opened(self) -> None: pass
    def connection_closed(self) -> None: pass
    def healthcheck(self) -> None: self.healthchecks += 1
    def frame_received(self, kind: str) -> None:
        if kind == "notify":
            self.notifies += 1
    def frame_sent(self, kind: str) -> None: pass
    def disconnect(self, side: str, status: int) -> None: self.disconnects.append((side, status))


class RuleDispatcher:
    def __init__(self) -> None:
        self.seen: list[tuple[bytes | None, object, object]] = []

    async def handle(self, message: Message) -> list:
        cid = message.get("client_id")
        self.seen.append((cid, message.get("src"), message.get("proto_ver")))
        await asyncio.sleep(0)  # answer from a later loop iteration, like a real lookup
        if not isinstance(cid, bytes):
            return [SetVar(Scope.TRANSACTION, "how", "none")]
        return [SetVar(Scope.TRANSACTION, "node", rule(cid)), SetVar(Scope.TRANSACTION, "how", "test")]

    def on_error(self, message: Message, exc: BaseException) -> list:
        return [SetVar(Scope.TRANSACTION, "how", "none")]


class ThreadedAgent:
    """SpopServer on its own event loop thread; start/stop like a process."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.dispatcher = RuleDispatcher()
        self.observer = CountingObserver()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: SpopServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        started = threading.Event()
        self._loop = asyncio.new_event_loop()

        def main() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = SpopServer(AsyncDispatcher(self.dispatcher), "127.0.0.1", self.port,
                                      observer=self.observer)
            self._loop.run_until_complete(self._server.start())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        assert started.wait(10)

    def stop(self) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        assert self._server is not None and self._thread is not None
        asyncio.run_coroutine_threadsafe(self._server.shutdown(grace=5), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def connections(self) -> int:
        return self._server.connection_count if self._server else 0


@pytest.fixture
def stack(haproxy_version, haproxy_factory, brokers) -> Iterator[tuple]:
    spoa_port = free_port()
    agent = ThreadedAgent(spoa_port)
    agent.start()
    env = haproxy_env(mqtt_port=free_port(), broker_addrs=[b.addr for b in brokers], spoa_port=spoa_port)
    ha = haproxy_factory(HAPROXY_CFG, env)
    for node in NODES:
        ha.wait_server_status("be_mqtt", node, "UP")
    ha.wait_server_status("be_spoa", "spoa1", "UP")
    port = int(env["MQTT_BIND"].rsplit(":", 1)[1])
    try:
        yield ha, agent, port
    finally:
        agent.stop()


async def _connect_many(port: int, ids: list[bytes]) -> list[int]:
    """Open all connections at once, CONNECT on each, hold them all; return the CONNACK codes."""
    socks: list[asyncio.StreamWriter] = []

    async def one(cid: bytes) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        socks.append(writer)
        writer.write(connect_packet(cid, version=4))
        head = await asyncio.wait_for(reader.readexactly(4), 15)
        assert head[0] >> 4 == 2, head  # CONNACK
        return head[3]

    try:
        codes = await asyncio.gather(*(one(c) for c in ids))
    finally:
        for w in socks:
            w.write(DISCONNECT)
            w.close()
    return list(codes)


def _lines_for(ha, ids: set[str]) -> list[dict[str, str]]:
    return [d for d in ha.traffic_log() if d["cid"] in ids]


def test_healthcheck_marks_agent_up_and_is_answered(stack):
    ha, agent, _ = stack
    assert ha.server_status("be_spoa", "spoa1") == "UP"
    assert agent.observer.healthchecks >= 1


def test_notify_ack_sets_variables_that_route(stack, haproxy_version):
    ha, agent, port = stack
    import socket

    ids = [f"route-{haproxy_version}-{i}".encode() for i in range(12)]
    for cid in ids:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(connect_packet(cid, version=5, clean=False, session_expiry=60))
            assert read_packet(s)[0] == 2
            s.sendall(DISCONNECT)
    wanted = {c.decode() for c in ids}
    wait_until(lambda: len(_lines_for(ha, wanted)) == len(ids), timeout=10)
    for d in _lines_for(ha, wanted):
        expected = rule(d["cid"].encode())
        assert (d["node"], d["how"], d["err"]) == (expected, "test", "-"), d
        assert d["server"] == expected, d  # HAProxy really routed on the ACK's variable
    # The message reached the agent with HAProxy's types: BINARY id and fields, an address for src.
    seen = {cid: (src, ver) for cid, src, ver in agent.dispatcher.seen}
    assert seen[ids[0]][1] == b"5"
    assert str(seen[ids[0]][0]) == "127.0.0.1"


def test_200_concurrent_clients_zero_spoe_errors(stack, haproxy_version):
    ha, agent, port = stack
    ids = [f"conc-{haproxy_version}-{i:03d}".encode() for i in range(200)]
    codes = asyncio.run(_connect_many(port, ids))
    assert codes == [0] * 200
    wanted = {c.decode() for c in ids}
    wait_until(lambda: len(_lines_for(ha, wanted)) == 200, timeout=20)
    lines = _lines_for(ha, wanted)
    errors = [d for d in lines if d["err"] != "-" or d["how"] != "test"]
    assert errors == [], errors[:5]
    assert all(d["server"] == rule(d["cid"].encode()) for d in lines)
    # Each CONNECT cost exactly one NOTIFY (and got its ACK: how=test above).
    assert agent.observer.notifies == 200


def test_agent_restart_is_survived(stack, haproxy_version):
    ha, agent, port = stack
    import socket

    def connect(cid: bytes) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(connect_packet(cid, version=4))
            assert read_packet(s)[0] == 2
            s.sendall(DISCONNECT)

    connect(b"before-restart")
    agent.stop()  # graceful: AGENT-DISCONNECT to every HAProxy connection
    assert ("agent", 0) in agent.observer.disconnects
    ha.wait_server_status("be_spoa", "spoa1", "DOWN", timeout=15)
    # While the agent is away, clients still connect (hash fallback, no SPOE wait).
    connect(b"during-outage")
    agent2 = ThreadedAgent(agent.port)
    agent2.start()
    try:
        ha.wait_server_status("be_spoa", "spoa1", "UP", timeout=15)
        ids = [f"after-{haproxy_version}-{i}".encode() for i in range(30)]
        for cid in ids:
            connect(cid)
        wanted = {c.decode() for c in ids}
        wait_until(lambda: len(_lines_for(ha, wanted)) == len(ids), timeout=10)
        # Every stream after the restart got its answer: none waited out
        # `timeout processing` (err would be set) or fell back to the hash.
        for d in _lines_for(ha, wanted):
            assert (d["how"], d["err"], d["server"]) == ("test", "-", rule(d["cid"].encode())), d
        outage = _lines_for(ha, {"during-outage"})
        assert outage and outage[0]["node"] == "-" and outage[0]["err"] == "-"
    finally:
        agent2.stop()
