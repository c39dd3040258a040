"""The engine against real redis-server processes: agreement, failover, fallback, recovery."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis

from agent import placement
from agent.affinity import Decision, FallbackCause
from agent.breaker import TIMEOUTS_TO_TRIP
from agent.config import Config, NodeConfig
from agent.core import Core
from agent.model import NEVER
from agent.request import NEVER_EXPIRES, ConnectRequest
from agent.rules import NodeOverrides, NodeView, eligibility
from devstack import RedisServer, free_port, records

P = "mqtt-affinity:"
NAMES = ("n1", "n2", "n3")
LOGGER = "mqtt_affinity.redis"


def nodes(weights: Iterable[float] = (1.0, 1.0, 1.0)) -> tuple[NodeConfig, ...]:
    return tuple(NodeConfig(f"n{i + 1}", "127.0.0.1", 1883 + i, w) for i, w in enumerate(weights))


def make_config(url: str, *, weights: Iterable[float] = (1.0, 1.0, 1.0), timeout: float = 2.0) -> Config:
    # A generous decision timeout: these tests check behaviour, and the 2 shared cores may be busy.
    return Config(
        nodes=nodes(weights), redis_url=url, redis_timeout=timeout, state_refresh=0.05,
        metrics_listen=None, evacuate_rate=20,
    )  # fmt: skip


class Health:
    """A mutable healthy-node set, standing in for the health monitor."""

    def __init__(self, names: Iterable[str] = NAMES) -> None:
        self.up = set(names)

    def __call__(self) -> frozenset[str]:
        return frozenset(self.up)


@asynccontextmanager
async def running(config: Config, health: Health | None = None, clock: Any = None) -> AsyncIterator[Core]:
    core = Core.build(config, health or Health())
    if clock is not None:
        core.engine._clock = clock
    await core.start()
    try:
        yield core
    finally:
        await core.stop()


def persistent(cid: bytes, balancer: str = "ha1") -> ConnectRequest:
    return ConnectRequest(client_id=cid, proto_ver=4, flags=0, balancer=balancer)


async def wait_for(predicate: Any, what: str, timeout: float = 15.0) -> None:
    """Poll an async predicate; the deadline only guards against hanging, it is not the assertion."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for: {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def r(redis_server_session: Any) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server_session.url)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def url(r: redis.Redis, redis_server_session: Any) -> str:
    return str(redis_server_session.url)


# --------------------------------------------------------------------------- pure eligibility


def test_eligibility_rules() -> None:
    ns = (*nodes((1.0, 2.0, 1.0)), NodeConfig("n4", "h", 1, 1.0), NodeConfig("n5", "h", 1, 1.0))
    ov = NodeOverrides(
        states={"n2": "drain", "n3": "evacuate", "n4": "maintenance", "ghost": "active"},
        weights={"n1": 3.0, "n5": 0.0},
        rates={"n3": 7},
    )
    e = eligibility(ns, frozenset({"n1", "n2", "n3", "n4", "n5", "ghost"}), ov, default_rate=20)
    assert e.placeable == (("n1", 3.0),)
    assert e.usable == frozenset({"n1", "n2", "n3", "n5"})
    assert e.evacuating == {"n3": 7}
    assert dict(e.fallback) == {"n1": 3.0, "n2": 2.0, "n3": 1.0, "n5": 0.0}
    # unhealthy nodes are neither placeable nor usable
    e = eligibility(ns, frozenset({"n2", "n3"}), ov, default_rate=20)
    assert e.usable == frozenset({"n2", "n3"}) and e.evacuating == {"n3": 7}
    # nothing placeable but something usable: place there rather than nowhere
    assert e.placeable == (("n2", 2.0), ("n3", 1.0))
    # ... even when all their weights are zero
    e = eligibility(ns, frozenset({"n5"}), ov, default_rate=20)
    assert e.placeable == (("n5", 1.0),) and e.fallback == (("n5", 1.0),)
    # nothing usable at all
    e = eligibility(ns, frozenset({"n4"}), ov, default_rate=20)
    assert e.placeable == () and e.usable == frozenset() and e.fallback == ()
    # default rate
    assert eligibility(ns, frozenset({"n3"}), NodeOverrides(states={"n3": "evacuate"}), 20).evacuating == {"n3": 20}


def test_no_client_id_means_no_redis_call() -> None:
    async def go() -> None:
        config = make_config(f"redis://127.0.0.1:{free_port()}/0")  # nobody listens there
        core = Core.build(config, Health())
        try:
            assert await core.engine.decide(ConnectRequest(client_id=None)) == Decision(None, "none")
            assert core.engine.redis_available  # no call was made, so nothing failed
        finally:
            await core.stop()

    asyncio.run(go())


# --------------------------------------------------------------------------- two balancers


def test_two_engines_agree_on_500_new_ids(r: redis.Redis, url: str) -> None:
    """Balancer B runs a different weight config (a reload half rolled out): Redis must still make them agree."""
    ids = [f"dev-{i}".encode() for i in range(500)]

    async def go() -> list[tuple[Decision, Decision]]:
        async with running(make_config(url)) as a, running(make_config(url, weights=(1.0, 5.0, 1.0))) as b:
            calls = []
            for i, cid in enumerate(ids):  # interleaved, alternating who goes first
                pair = (a.engine.decide(persistent(cid, "ha1")), b.engine.decide(persistent(cid, "ha2")))
                calls.extend(pair if i % 2 else pair[::-1])
            flat = await asyncio.gather(*calls)
        out = []
        for i in range(len(ids)):
            x, y = flat[2 * i], flat[2 * i + 1]
            out.append((y, x) if i % 2 == 0 else (x, y))  # (a's, b's)
        return out

    results = asyncio.run(go())
    # the configs really disagree locally for many ids, so agreement below is Redis's doing
    differ = sum(
        placement.choose(c, [(n, 1.0) for n in NAMES]) != placement.choose(c, [("n1", 1.0), ("n2", 5.0), ("n3", 1.0)])
        for c in ids
    )
    assert differ > 100
    disagreements = [(cid, da, db) for cid, (da, db) in zip(ids, results) if da.node != db.node]
    assert disagreements == []
    for cid, (da, db) in zip(ids, results):
        assert {da.how, db.how} == {"assigned", "hit"}
        assert da.source == db.source == "redis"
        assert records.owner(r, cid).node == da.node  # type: ignore[union-attr]


def test_unhealthy_owner_is_moved_and_the_other_engine_follows(url: str) -> None:
    async def go() -> None:
        health_a = Health()
        async with running(make_config(url), health_a) as a, running(make_config(url)) as b:
            cid = b"mover"
            first = await a.engine.decide(persistent(cid))
            assert first.how == "assigned" and first.node
            assert await b.engine.decide(persistent(cid)) == Decision(first.node, "hit")
            health_a.up.discard(first.node)
            moved = await a.engine.decide(persistent(cid))
            assert moved.how == "moved" and moved.previous == first.node and moved.node != first.node
            # B still thinks the old owner is healthy, but follows the record
            assert await b.engine.decide(persistent(cid)) == Decision(moved.node, "hit")
            # the old owner comes back: nobody moves back (no flapping)
            health_a.up.add(first.node)
            assert await a.engine.decide(persistent(cid)) == Decision(moved.node, "hit")

    asyncio.run(go())


# --------------------------------------------------------------------------- operator states


def test_drain_maintenance_weight_and_pins(r: redis.Redis, url: str) -> None:
    ids = [f"c{i}".encode() for i in range(200)]

    async def go() -> None:
        health = Health()
        async with running(make_config(url), health) as e:
            on_n1 = [c for c in ids if (await e.engine.decide(persistent(c))).node == "n1"]
            assert on_n1
            r.hset(f"{P}node-state", "n1", "drain")
            assert await e.refresher.refresh()
            # drain: existing clients stay, new ones go elsewhere
            assert [await e.engine.decide(persistent(c)) for c in on_n1] == [Decision("n1", "hit")] * len(on_n1)
            fresh = [await e.engine.decide(persistent(b"new-" + c)) for c in ids]
            assert {d.how for d in fresh} == {"assigned"} and "n1" not in {d.node for d in fresh}
            # maintenance: its clients move on their next CONNECT
            r.hset(f"{P}node-state", "n1", "maintenance")
            await e.refresher.refresh()
            moved = [await e.engine.decide(persistent(c)) for c in on_n1]
            assert all(d.how == "moved" and d.previous == "n1" and d.node in ("n2", "n3") for d in moved)
            # moved clients went to their HRW runner-up, as a fallback-mode agent would compute
            assert [d.node for d in moved] == [placement.rank(c, [("n2", 1.0), ("n3", 1.0)])[0] for c in on_n1]
            r.hdel(f"{P}node-state", "n1")
            # weight override 0: no new placements there
            r.hset(f"{P}node-weight", "n2", "0")
            await e.refresher.refresh()
            assert {(await e.engine.decide(persistent(b"w-" + c))).node for c in ids} == {"n1", "n3"}
            # a pin to an unhealthy node is ignored and reported
            records.write_pin(r, "pinned", "n3")
            health.up.discard("n3")
            d = await e.engine.decide(persistent(b"pinned"))
            assert d.pin_ignored == "n3" and d.node in ("n1", "n2") and d.how == "assigned"
            health.up.add("n3")
            assert await e.engine.decide(persistent(b"pinned")) == Decision("n3", "pinned", previous=d.node)
            views = {v.name: v for v in e.engine.node_views()}
            assert views["n2"] == NodeView("n2", 1.0, 0.0, "active", True, 0.0)
            assert views["n1"].state == "active" and views["n3"].healthy

    asyncio.run(go())


def test_evacuation_rate_limited(r: redis.Redis, url: str) -> None:
    ids = [f"e{i}".encode() for i in range(300)]
    frozen = 1_800_000_000.0

    async def go() -> None:
        async with running(make_config(url), clock=lambda: frozen) as a, running(
            make_config(url), clock=lambda: frozen
        ) as b:
            on_n1 = [c for c in ids if (await a.engine.decide(persistent(c))).node == "n1"]
            assert len(on_n1) > 10
            r.hset(f"{P}node-state", "n1", "evacuate")
            r.hset(f"{P}evacuate-rate", "n1", "4")
            await a.refresher.refresh()
            await b.refresher.refresh()
            results = await asyncio.gather(
                *[(a if i % 2 else b).engine.decide(persistent(c)) for i, c in enumerate(on_n1)]
            )
            assert [d.how for d in results].count("moved") == 4
            assert all(d.node == "n1" for d in results if d.how == "hit")

    asyncio.run(go())


def test_session_ttls_and_clean_sessions(r: redis.Redis, url: str) -> None:
    async def go() -> None:
        async with running(make_config(url)) as e:
            await e.engine.decide(ConnectRequest(b"forever", proto_ver=5, sess_expiry=NEVER_EXPIRES))
            await e.engine.decide(ConnectRequest(b"long", proto_ver=5, sess_expiry=10 * 86400))
            await e.engine.decide(ConnectRequest(b"v3", proto_ver=4, flags=0))
            d = await e.engine.decide(ConnectRequest(b"clean", proto_ver=4, flags=2))
            assert d.how == "none" and d.node in NAMES

    now = time.time()
    asyncio.run(go())
    assert records.owner(r, "forever").expiry == NEVER  # type: ignore[union-attr]
    assert 86400 < records.owner(r, "long").expiry - now <= 10 * 86400 + 1  # type: ignore[union-attr]
    assert 0 < records.owner(r, "v3").expiry - now <= 86400 + 1  # type: ignore[union-attr]
    assert records.owner(r, "clean") is None


def test_reload_removes_a_node(url: str) -> None:
    async def go() -> None:
        config = make_config(url)
        async with running(config) as e:
            placed = {c: (await e.engine.decide(persistent(c))).node for c in (f"k{i}".encode() for i in range(60))}
            e.reload(Config(nodes=nodes()[:2], redis_url=url, redis_timeout=2.0, metrics_listen=None))
            for c, node in placed.items():
                d = await e.engine.decide(persistent(c))
                assert d == (Decision(node, "hit") if node != "n3" else Decision(d.node, "moved", previous="n3"))
                assert d.node in ("n1", "n2")
            assert [v.name for v in e.engine.node_views()] == ["n1", "n2"]

    asyncio.run(go())


# --------------------------------------------------------------------------- outages


def test_redis_killed_then_restarted(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    ids = [f"o{i}".encode() for i in range(100)]

    async def go() -> None:
        config = make_config(redis_server.url)
        async with running(config) as a, running(config) as b:
            before = {c: (await a.engine.decide(persistent(c))).node for c in ids}
            redis_server.kill()
            results = []
            for c in ids:  # the first failure trips each breaker; no exception may escape
                results.append((c, await a.engine.decide(persistent(c)), await b.engine.decide(persistent(c))))
            assert not a.engine.redis_available and not b.engine.redis_available
            for c, da, db in results:
                assert da.how == db.how == "fallback" and da.source == "local" and da.error
                assert da.node == db.node == before[c]  # same HRW as the record while nothing else changed
            # a client whose owner is down is still routed, to a live node
            assert (await a.engine.decide(persistent(b"anything"))).node in NAMES
            warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING and rec.name == LOGGER]
            assert len(warnings) == 2, [w.getMessage() for w in warnings]  # one per engine

            redis_server.start()  # same port, empty database

            async def back() -> bool:
                return (await a.engine.decide(persistent(b"probe"))).how != "fallback" and (
                    await b.engine.decide(persistent(b"probe"))
                ).how != "fallback"

            await wait_for(back, "decisions from redis again")
            assert a.engine.redis_available and b.engine.redis_available
            d = await a.engine.decide(persistent(b"after"))
            assert d.how == "assigned" and d.source == "redis"
            assert await b.engine.decide(persistent(b"after")) == Decision(d.node, "hit")
            infos = [rec for rec in caplog.records if rec.name == LOGGER and rec.levelno == logging.INFO]
            assert len(infos) == 2
            # the refresh loop kept running through the outage
            assert a.refresher._task is not None and not a.refresher._task.done()

    asyncio.run(go())


def test_stalled_redis_times_out(redis_server: RedisServer) -> None:
    """SIGSTOP: the socket is open but nothing answers (a black hole): the decision's timeout
    fires, and since not one reply came back on the connection it is dropped and the breaker
    opens (a lone timeout while Redis answers others does not: see test_breaker.py)."""

    async def go() -> None:
        # No background refresh during the stall: its own timeouts would count towards the breaker.
        config = dataclasses.replace(make_config(redis_server.url, timeout=0.1), state_refresh=30.0)
        async with running(config) as e:
            assert (await e.engine.decide(persistent(b"x"))).how == "assigned"
            assert redis_server.pid is not None
            os.kill(redis_server.pid, signal.SIGSTOP)
            try:
                d = await e.engine.decide(persistent(b"x"))
                assert d.how == "fallback" and d.error is not None and "Timeout" in d.error
                for _i in range(TIMEOUTS_TO_TRIP):
                    if not e.engine.redis_available:
                        break
                    assert (await e.engine.decide(persistent(b"x"))).how == "fallback"
                assert not e.engine.redis_available
                # breaker open: answered locally without touching Redis
                assert (await e.engine.decide(persistent(b"y"))).cause is FallbackCause.UNAVAILABLE
            finally:
                os.kill(redis_server.pid, signal.SIGCONT)

            async def back() -> bool:
                return (await e.engine.decide(persistent(b"x"))).how == "hit"

            await wait_for(back, "redis answering again")

    asyncio.run(go())


def test_start_with_redis_down(tmp_path: Any) -> None:
    server = RedisServer(port=free_port(), workdir=tmp_path)

    async def go() -> None:
        async with running(make_config(server.url)) as e:  # must not raise
            assert not e.engine.redis_available
            d = await e.engine.decide(persistent(b"c"))
            assert d.how == "fallback" and d.node == placement.choose(b"c", [(n, 1.0) for n in NAMES])
            assert await e.refresher.session_counts() is None
            server.start()

            async def up() -> bool:
                return (await e.engine.decide(persistent(b"c"))).source == "redis"

            await wait_for(up, "redis after a late start")
            assert await e.sweeper.sweep_once() == ({d.node: 1}, 0)
            assert await e.refresher.session_counts() == ({d.node: 1}, pytest.approx(time.time(), abs=5))

    try:
        asyncio.run(go())
    finally:
        server.kill()


def test_restart_grace_waits_then_moves(url: str) -> None:
    """Owner down for less than owner_down_grace: persistent clients wait (no node); clean ones
    and a node in maintenance move at once; past the grace the client moves, and both agents
    answer alike while they agree the owner is down."""
    now = [1_800_000_000.0]
    down: dict[str, float] = {}

    async def go() -> None:
        cfg = dataclasses.replace(make_config(url), owner_down_grace=30.0)
        health = Health()
        cores = [Core.build(cfg, health, down_since=lambda: down) for _ in range(2)]
        for c in cores:
            c.engine._clock = lambda: now[0]
            await c.start()
        a, b = (c.engine for c in cores)
        try:
            first = await a.decide(persistent(b"sess"))
            owner = first.node
            assert first.how == "assigned" and owner
            health.up.discard(owner)
            down[owner] = now[0]
            now[0] += 10
            for e in (a, b):
                d = await e.decide(persistent(b"sess"))
                assert (d.node, d.how, d.previous) == (None, "wait", owner)
            clean = await a.decide(ConnectRequest(b"sess", proto_ver=4, flags=2))
            assert clean.how == "moved" and clean.node != owner  # nothing to keep: goes elsewhere
            assert (await b.decide(persistent(b"sess"))).how == "wait"  # ... and wrote nothing
            now[0] += 25  # 35 s down: past the grace
            moved = await b.decide(persistent(b"sess"))
            assert moved.how == "moved" and moved.previous == owner and moved.node != owner
            assert await a.decide(persistent(b"sess")) == Decision(moved.node, "hit")
            # An operator's maintenance is not a restart: no grace.
            other = await a.decide(persistent(b"other"))
            down[other.node] = now[0]  # type: ignore[index]
            health.up.discard(other.node)  # type: ignore[arg-type]
            r = redis.Redis.from_url(url)
            r.hset(f"{P}node-state", other.node, "maintenance")  # type: ignore[arg-type]
            await cores[0].refresher.refresh()
            assert (await a.decide(persistent(b"other"))).how in ("moved", "none")
            r.close()
        finally:
            for c in cores:
                await c.stop()

    asyncio.run(go())
