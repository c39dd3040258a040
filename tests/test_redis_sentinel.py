"""Redis Sentinel, real: a primary, one replica and three ``redis-server --sentinel``; two
agents behind two HAProxy (3.2: HAProxy is not what differs here), three brokers.

The primary is SIGKILLed during a storm of persistent CONNECTs through both balancers. While
no primary is known the agents decide by the HRW hash (``fallback``), as with any Redis outage;
then they follow the Sentinels to the promoted replica by themselves.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.config import Config, NodeConfig
from agent.core import Core
from agent.model import How
from agent.request import ConnectRequest
from devstack import NODES, SentinelGroup, Stack, connect_many, records, wait_until
from devstack.scenario import OpenLoopLoad, analyse, run_scenario

pytestmark = [pytest.mark.integration, pytest.mark.haproxy]

RATE, IDS, DURATION, KILL_AT = 250, 400, 14.0, 3.0


@pytest.fixture
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    g = SentinelGroup(tmp_path_factory.mktemp("sentinel"), down_after_ms=1000, failover_timeout_ms=3000).start()
    try:
        yield g
    finally:
        g.stop()


def test_primary_killed_during_a_storm(group: SentinelGroup, tmp_path_factory: pytest.TempPathFactory) -> None:
    with Stack("3.2", workdir=tmp_path_factory.mktemp("sentinel-stack"), redis_url=group.url) as stack:
        stack.start(balancers=2)
        ports = [b.port for b in stack.balancers]
        ids = [f"sent-{i:03d}" for i in range(IDS)]
        # Placed before the kill, and replicated: these records must all survive it.
        assert set(asyncio.run(connect_many(ports[0], [c.encode() for c in ids], version=4, clean=False))) == {0}
        drained = "node3"
        with stack.r as r:
            before = records.pin_first_and_drain(r, ids, drained, NODES, reason="before the kill")
        wait_until(group.replicas_in_sync, timeout=10, message="replica never caught up")
        time.sleep(1.0)  # the agents read the drain (state_refresh)

        old = group.primary()
        load = OpenLoopLoad(ports, ids, rate=RATE, duration=DURATION)
        run_scenario(load, [(KILL_AT, "SIGKILL the primary", old.kill)])
        report = analyse(load.attempts, [b.haproxy for b in stack.balancers], stack.owners)
        detail = f"{report.summary()}\n{report.examples}\n{report.failures}"
        new = group.primary()
        assert new is not old and new.running, detail

        # Every client got its CONNACK, through the whole failover.
        assert report.no_connack == 0 and report.spoe_errors == 0, detail
        # Decisions came from Redis again within down-after + failover time + 2 s.
        fallbacks = [a.scheduled for a in load.attempts
                     if report.joined.get(a.index, {}).get("how") == How.FALLBACK.value]
        assert fallbacks, "the kill was not noticed: " + detail
        bound = KILL_AT + (group.down_after_ms + group.failover_timeout_ms) / 1000 + 2.0
        assert max(fallbacks) <= bound, (max(fallbacks), bound, detail)
        print(f"\nprimary killed at {KILL_AT} s: {len(fallbacks)} fallback decisions from {min(fallbacks):.2f} s "
              f"to {max(fallbacks):.2f} s (bound {bound:.1f} s); {report.summary()}")
        # Once it is over: no id reaches two brokers, every replicated record is honoured
        # (the pin too), and the drain still applies.
        after = [a for a in load.attempts if a.scheduled > bound and a.index in report.joined]
        assert len(after) > RATE * 3
        servers: dict[str, set[str]] = {}
        for a in after:
            line = report.joined[a.index]
            servers.setdefault(a.cid, set()).add(line["server"])
            assert line["how"] in ("hit", "pinned"), line
            assert line["server"] == before[a.cid], (a.cid, line, before[a.cid])
        assert all(len(s) == 1 for s in servers.values())
        fresh = [f"after-{i}".encode() for i in range(60)]
        assert set(asyncio.run(connect_many(ports[1], fresh, version=4, clean=False))) == {0}
        with stack.r as r:
            placed = records.owners(r, fresh)
        assert drained not in placed.values() and None not in placed.values()


class _LyingSentinel:
    """Answers like a Sentinel, naming a primary that does not exist (a cut-off Sentinel)."""

    def __init__(self, dead_port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.dead_port = dead_port
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                if b"GET-MASTER-ADDR-BY-NAME" in data.upper():
                    port = str(self.dead_port).encode()
                    conn.sendall(b"*2\r\n$9\r\n127.0.0.1\r\n$%d\r\n%s\r\n" % (len(port), port))
                else:
                    conn.sendall(b"+PONG\r\n")

    def close(self) -> None:
        self.sock.close()


def test_a_sentinel_that_is_down_or_lies_is_survived(group: SentinelGroup) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]  # bound, not listening: refused
    liar = _LyingSentinel(dead_port)
    down = group.sentinels[2]
    down.kill()
    real = group.sentinels[0]
    # The liar first, a dead Sentinel, then one real one: a tie (1 vote each), the liar asked first.
    url = f"redis+sentinel://127.0.0.1:{liar.port},127.0.0.1:{down.port},127.0.0.1:{real.port}/{group.service}"
    cfg = Config(nodes=(NodeConfig("n1", "127.0.0.1", 1),), redis_url=url, redis_timeout=2.0, metrics_listen=None)

    async def go() -> Any:
        core = Core.build(cfg, lambda: frozenset({"n1"}))
        await core.start()
        try:
            return await core.engine.decide(ConnectRequest(b"liar-test", proto_ver=4, flags=0)), core.store
        finally:
            await core.stop()

    decision, store = asyncio.run(go())
    assert decision.how == How.ASSIGNED and decision.source == "redis"
    assert store.endpoint.locator().current == (group.primary().host, group.primary().port)
    liar.close()
    dead.close()
