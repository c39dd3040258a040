"""Health probes and the rise/fall monitor.

Probes run against a real mosquitto; hostile peers are small asyncio servers
in the test. Rise/fall arithmetic is checked deterministically with an
injected probe and explicit rounds (no sleeping, no timing).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.config import HealthConfig, NodeConfig
from agent.health import (
    HealthMonitor,
    ProbeError,
    default_probe_client_id,
    probe_mqtt,
    probe_tcp,
)
from devstack import Mosquitto, free_port

T = TypeVar("T")
DEADLINE = 20.0  # generous: only bounds a broken test, never asserts speed


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, DEADLINE))


async def until(pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def broker(tmp_workdir: Callable[[str], Path]) -> Iterator[Mosquitto]:
    b = Mosquitto(workdir=tmp_workdir("broker"), label="health")
    b.start()
    try:
        yield b
    finally:
        b.kill()


class Peer:
    """A hostile or fake 'broker': answers the first bytes it reads with ``reply``."""

    def __init__(self, reply: bytes | None, *, close: bool = True, read_first: bool = True) -> None:
        self.reply = reply
        self.close = close
        self.read_first = read_first
        self.received = bytearray()
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self._hold: list[asyncio.StreamWriter] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.read_first:
                self.received += await reader.read(1024)
            if self.reply is not None:
                writer.write(self.reply)
                await writer.drain()
            if self.close:
                writer.close()
            else:
                self._hold.append(writer)
                self.received += await reader.read(1024)
        except OSError:
            pass

    async def __aenter__(self) -> Peer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for w in self._hold:
            w.close()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def node(name: str, port: int) -> NodeConfig:
    return NodeConfig(name, "127.0.0.1", port)


class ScriptedProbe:
    """Injected probe whose result per node is set by the test between rounds."""

    def __init__(self) -> None:
        self.ok: dict[str, bool] = {}
        self.calls: list[str] = []

    async def __call__(self, n: NodeConfig) -> None:
        self.calls.append(n.name)
        if not self.ok.get(n.name, True):
            raise ConnectionRefusedError(111, "Connection refused")


# ---------------------------------------------------------------- probes, live broker


def test_probes_succeed_against_live_broker(broker: Mosquitto) -> None:
    client_id = b"mqtt-affinity-probe-test-%d" % os.getpid()
    run(probe_tcp(broker.host, broker.port, 5.0))
    run(probe_mqtt(broker.host, broker.port, 5.0, client_id))
    # The broker really accepted our CONNECT (not just the TCP handshake).
    assert client_id.decode() in broker.connected_client_ids()


def test_probes_fail_fast_on_closed_port() -> None:
    port = free_port()  # nothing listens there
    # A long timeout: failing with ConnectionRefusedError (not a timeout
    # ProbeError) proves the probe did not wait for the deadline.
    with pytest.raises(ConnectionRefusedError):
        run(probe_tcp("127.0.0.1", port, 15.0))
    with pytest.raises(ConnectionRefusedError):
        run(probe_mqtt("127.0.0.1", port, 15.0, b"probe"))


def test_monitor_start_knows_real_state(broker: Mosquitto) -> None:
    """start() returns only after a round, so a dead node is already down."""
    dead = free_port()
    changes: list[tuple[str, bool]] = []

    async def scenario() -> None:
        mon = HealthMonitor(
            [node("live", broker.port), node("dead", dead)],
            HealthConfig(check="tcp", interval=5.0, timeout=5.0, rise=2, fall=3),
            on_change=lambda name, up: changes.append((name, up)),
        )
        assert mon.healthy == frozenset()  # a node never probed is not offered
        await mon.start()
        try:
            assert mon.running
            assert mon.healthy == {"live"}
            assert mon.is_up("live") and not mon.is_up("dead") and not mon.is_up("nope")
            st = mon.status()
            assert st["dead"].checks == 1 and "ConnectionRefusedError" in (st["dead"].last_error or "")
            assert st["live"].up and st["live"].last_error is None
        finally:
            await mon.stop()
        assert not mon.running

    run(scenario())
    assert changes == [("dead", False)]


def test_stopped_broker_goes_down_and_comes_back(broker: Mosquitto) -> None:
    cfg = HealthConfig(check="mqtt", interval=0.3, timeout=0.3, rise=2, fall=2)
    changes: list[tuple[str, bool, int]] = []
    mon: HealthMonitor

    def on_change(name: str, up: bool) -> None:
        changes.append((name, up, mon.status()[name].checks))

    async def scenario() -> None:
        nonlocal mon
        mon = HealthMonitor([node("n1", broker.port)], cfg, on_change=on_change)
        await mon.start()
        try:
            assert mon.is_up("n1")
            await asyncio.to_thread(broker.stop)
            checks_at_stop = mon.status()["n1"].checks
            await until(lambda: not mon.is_up("n1"), "n1 marked down")
            assert changes[0][2] - checks_at_stop >= cfg.fall
            await asyncio.to_thread(broker.start)  # same port
            checks_at_restart = mon.status()["n1"].checks
            await until(lambda: mon.is_up("n1"), "n1 marked up again")
            assert changes[1][2] - checks_at_restart >= cfg.rise
            assert mon.healthy == {"n1"}
        finally:
            await mon.stop()

    run(scenario())
    assert [(n, up) for n, up, _ in changes] == [("n1", False), ("n1", True)]


# ---------------------------------------------------------------- hostile peers


def test_garbage_reply_fails_mqtt_probe() -> None:
    async def scenario() -> None:
        async with Peer(b"HTTP/1.1 400 Bad Request\r\n\r\n") as peer:
            with pytest.raises(ProbeError, match="not an MQTT CONNACK"):
                await probe_mqtt("127.0.0.1", peer.port, 5.0, b"probe")
            # TCP alone cannot tell: exactly why the mqtt check exists.
            await probe_tcp("127.0.0.1", peer.port, 5.0)

    run(scenario())


@pytest.mark.parametrize(
    "reply",
    [
        b"\x20\x02\x00",  # truncated CONNACK, then close
        b"",  # accept and close at once
    ],
)
def test_early_close_fails_mqtt_probe(reply: bytes) -> None:
    async def scenario() -> None:
        async with Peer(reply) as peer:
            with pytest.raises(ProbeError, match="before a CONNACK"):
                await probe_mqtt("127.0.0.1", peer.port, 5.0, b"probe")

    run(scenario())


def test_silent_peer_times_out() -> None:
    async def scenario() -> None:
        async with Peer(None, close=False) as peer:
            with pytest.raises(ProbeError, match="timeout"):
                await probe_mqtt("127.0.0.1", peer.port, 0.2, b"probe")

    run(scenario())


def test_refusing_connack_still_means_alive_and_connect_is_well_formed() -> None:
    client_id = default_probe_client_id()
    assert client_id == f"mqtt-affinity-probe-{socket.gethostname()}-{os.getpid()}".encode()

    async def scenario() -> bytes:
        # return code 5 = not authorised: the broker is up, it just dislikes us.
        async with Peer(b"\x20\x02\x00\x05", close=False) as peer:
            await probe_mqtt("127.0.0.1", peer.port, 5.0, client_id)
            await until(lambda: peer.received.endswith(b"\xe0\x00"), "DISCONNECT received")
            return bytes(peer.received)

    data = run(scenario())
    body = b"\x00\x04MQTT\x04\x02\x00\x00" + struct.pack("!H", len(client_id)) + client_id
    assert len(body) < 128
    assert data == b"\x10" + bytes([len(body)]) + body + b"\xe0\x00"


@pytest.mark.parametrize(
    "reply",
    [
        b"\x20\x02\x04\x00",  # reserved CONNACK flag bits set
        b"\x30\x02\x00\x00",  # a PUBLISH header, not a CONNACK
        b"\x20\x03\x00\x00\x00",  # wrong remaining length
    ],
)
def test_malformed_connack_fails(reply: bytes) -> None:
    async def scenario() -> None:
        async with Peer(reply) as peer:
            with pytest.raises(ProbeError, match="not an MQTT CONNACK"):
                await probe_mqtt("127.0.0.1", peer.port, 5.0, b"probe")

    run(scenario())


# ---------------------------------------------------------------- monitor logic (injected probe)


def test_rise_fall_counts_consecutive_rounds() -> None:
    probe = ScriptedProbe()
    changes: list[tuple[str, bool]] = []
    mon = HealthMonitor(
        [node("a", 1), node("b", 2)],
        HealthConfig(interval=1.0, timeout=1.0, rise=2, fall=3),
        on_change=lambda n, up: changes.append((n, up)),
        probe=probe,
    )

    async def rounds(*a_results: bool) -> list[bool]:
        seen = []
        for ok in a_results:
            probe.ok["a"] = ok
            await mon.run_round()
            seen.append(mon.is_up("a"))
        return seen

    async def scenario() -> None:
        assert await rounds(True) == [True]  # the first probe makes "a" eligible
        cached = mon.healthy
        assert await rounds(True) == [True]
        assert mon.healthy is cached  # no transition, no rebuild
        # Two failures, a success (resets), then three failures: down on the 3rd.
        assert await rounds(False, False, True, False, False, False) == [
            True, True, True, True, True, False,
        ]
        assert mon.healthy == {"b"}
        assert mon.status()["a"].last_error == "ConnectionRefusedError: [Errno 111] Connection refused"
        # One success, a failure (resets), then two successes: up on the 2nd.
        assert await rounds(True, False, True, True) == [False, False, False, True]
        assert mon.healthy == {"a", "b"}
        assert mon.status()["a"].checks == 12

    run(scenario())
    assert changes == [("a", False), ("a", True)]


def test_first_probe_is_decisive_only_once() -> None:
    probe = ScriptedProbe()
    probe.ok["a"] = False
    mon = HealthMonitor([node("a", 1)], HealthConfig(interval=1.0, timeout=1.0, rise=1, fall=3), probe=probe)

    async def scenario() -> None:
        await mon.run_round()  # first probe failed: down at once
        assert not mon.is_up("a")
        probe.ok["a"] = True
        await mon.run_round()  # rise=1
        assert mon.is_up("a")
        probe.ok["a"] = False
        await mon.run_round()  # not the first probe any more: fall=3 applies
        assert mon.is_up("a")

    run(scenario())


def test_hanging_probe_is_cut_off_by_timeout() -> None:
    async def hang(n: NodeConfig) -> None:
        await asyncio.Event().wait()

    mon = HealthMonitor([node("a", 1)], HealthConfig(interval=0.2, timeout=0.1, fall=1), probe=hang)

    async def scenario() -> None:
        await mon.run_round()
        assert not mon.is_up("a")
        assert mon.status()["a"].last_error == "timeout after 0.1s"

    run(scenario())


def test_update_nodes_keeps_state_and_probes_new_nodes_at_once() -> None:
    probe = ScriptedProbe()
    probe.ok.update(a=False, b=True, c=False)
    # interval far beyond the test: any probe after start() comes from update_nodes.
    mon = HealthMonitor(
        [node("a", 1), node("b", 2), node("c", 3)],
        HealthConfig(interval=3600.0, timeout=1.0, rise=2, fall=2),
        probe=probe,
    )

    async def scenario() -> None:
        await mon.start()
        try:
            assert mon.healthy == {"b"}
            a_since = mon.status()["a"].since
            probe.calls.clear()
            probe.ok.update(c=True, d=False)
            mon.update_nodes(
                [
                    NodeConfig("a", "127.0.0.1", 1, weight=5.0),  # stays: weight only
                    NodeConfig("c", "127.0.0.1", 30),  # moved: fresh state
                    node("d", 4),  # new
                ]
            )  # b removed
            assert mon.healthy == frozenset()  # new/moved nodes wait for their first probe
            st = mon.status()
            assert st["a"].since == a_since and st["a"].checks == 1 and not st["a"].up
            assert "b" not in st
            await until(lambda: sorted(probe.calls) == ["c", "d"], "new nodes probed")
            await until(lambda: mon.status()["d"].checks == 1, "d result applied")
            assert mon.healthy == {"c"}
        finally:
            await mon.stop()

    run(scenario())


def test_result_for_removed_node_is_dropped() -> None:
    """A reload during a round must not resurrect or report a removed node."""
    release = asyncio.Event()
    changes: list[tuple[str, bool]] = []

    async def slow_fail(n: NodeConfig) -> None:
        await release.wait()
        raise ConnectionRefusedError(111, "Connection refused")

    mon = HealthMonitor(
        [node("a", 1), node("b", 2)],
        HealthConfig(interval=5.0, timeout=5.0, fall=1),
        on_change=lambda n, up: changes.append((n, up)),
        probe=slow_fail,
    )

    async def scenario() -> None:
        round_task = asyncio.create_task(mon.run_round())
        await asyncio.sleep(0)  # let the probes start
        mon.update_nodes([node("b", 2)])
        release.set()
        await round_task
        assert mon.healthy == frozenset()
        assert list(mon.status()) == ["b"]

    run(scenario())
    assert changes == [("b", False)]


def test_loop_survives_failing_callback() -> None:
    probe = ScriptedProbe()
    calls: list[tuple[str, bool]] = []

    def on_change(name: str, up: bool) -> None:
        calls.append((name, up))
        raise RuntimeError("callback bug")

    mon = HealthMonitor(
        [node("a", 1)],
        HealthConfig(interval=0.02, timeout=0.02, rise=1, fall=1),
        on_change=on_change,
        probe=probe,
    )

    async def scenario() -> None:
        await mon.start()
        try:
            probe.ok["a"] = False
            await until(lambda: len(calls) == 1, "down reported")
            probe.ok["a"] = True
            await until(lambda: len(calls) == 2, "up reported after a raising callback")
            assert mon.running
        finally:
            await mon.stop()

    run(scenario())
    assert calls == [("a", False), ("a", True)]


def test_start_twice_is_an_error() -> None:
    mon = HealthMonitor([node("a", 1)], HealthConfig(), probe=ScriptedProbe())

    async def scenario() -> None:
        await mon.start()
        try:
            with pytest.raises(RuntimeError):
                await mon.start()
        finally:
            await mon.stop()
            await mon.stop()  # idempotent

    run(scenario())


def test_down_since_is_wall_time_of_the_down_transition() -> None:
    probe = ScriptedProbe()
    mon = HealthMonitor([node("a", 1), node("b", 2)], HealthConfig(interval=1.0, timeout=1.0, rise=1, fall=1),
                        probe=probe)

    async def scenario() -> None:
        await mon.run_round()
        assert mon.down_since == {}
        before = time.time()
        probe.ok["a"] = False
        await mon.run_round()
        seen = mon.down_since
        assert set(seen) == {"a"} and before <= seen["a"] <= time.time()
        await mon.run_round()
        assert mon.down_since is seen  # no transition: same mapping (callers cache on it)
        probe.ok["a"] = True
        await mon.run_round()
        assert mon.down_since == {}
        probe.ok["b"] = False
        await mon.run_round()
        mon.update_nodes([node("a", 1)])  # b removed by a reload
        assert mon.down_since == {}

    run(scenario())
