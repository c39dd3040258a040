"""The local owner cache: its rules (unit), and its coherence against a real Redis.

The window it opens is measured here: another writer pins or moves a client while this agent
answers that client from its cache; how long (and how many CONNECTs) until this agent follows.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis

from agent import placement
from agent.cache import CacheEntry, OwnerCache
from agent.config import Config, NodeConfig
from agent.core import Core
from agent.model import How, NodeState
from agent.request import ConnectRequest
from agent.rules import NodeOverrides, cached_outcome, eligibility, predict
from devstack import records

NAMES = ("n1", "n2", "n3")
NODES = tuple(NodeConfig(n, "127.0.0.1", 1 + i) for i, n in enumerate(NAMES))


# --------------------------------------------------------------------------- the cache itself


def test_epochs_keep_an_answer_read_before_a_write_out() -> None:
    c = OwnerCache(buckets=8, capacity=3)
    c.enabled = True
    e = CacheEntry("n1", 0, "", 0, bucket=5)
    before = c.epoch(5)
    c.invalidate(5)  # another agent wrote bucket 5 while our answer was in flight
    assert not c.put(b"a", e, before) and c.get(b"a") is None
    assert c.put(b"a", e, c.epoch(5)) and c.get(b"a") == e
    c.invalidate(5)
    assert c.get(b"a") is None  # the bucket's entries are dropped


def test_lru_bound_and_clear() -> None:
    c = OwnerCache(buckets=4, capacity=2)
    c.enabled = True
    for i, cid in enumerate((b"a", b"b", b"c")):
        c.put(cid, CacheEntry("n1", 0, "", 0, bucket=i), c.epoch(i))
    assert len(c) == 2 and c.get(b"a") is None  # the least recently used went
    c.clear()
    assert len(c) == 0 and c.get(b"b") is None
    c.enabled = False
    assert c.get(b"c") is None and not c.put(b"c", CacheEntry("n1", 0, "", 0, 0), c.epoch(0))


def test_cached_outcome_is_predict_wherever_it_answers() -> None:
    """Random records, pins, states and health: whenever the cache path answers, it answers
    exactly what the rules (and so decide.lua, see test_rules_lua.py) would."""
    rng = random.Random(11)
    now = 1_800_000_000
    answered = 0
    for i in range(3000):
        cid = f"c{i}".encode()
        owner = rng.choice(("", *NAMES, "gone"))
        pin = rng.choice(("", "", *NAMES))
        owner_exp = rng.choice((0, now - 5, now + 500))
        pin_exp = rng.choice((0, now - 5, now + 500))
        states = {n: rng.choice(list(NodeState)) for n in NAMES if rng.random() < 0.3}
        healthy = frozenset(n for n in NAMES if rng.random() < 0.85)
        ov = NodeOverrides(states, {}, {})
        elig = eligibility(NODES, healthy, ov, 20)
        persistent = rng.random() < 0.6
        expiry = rng.choice((0, now + 1000))
        out = cached_outcome(cid, owner, owner_exp, pin, pin_exp, persistent=persistent, expiry=expiry, now=now,
                             elig=elig)
        if out is None:
            continue
        answered += 1
        live_owner = owner if owner and (owner_exp == 0 or owner_exp > now) else None
        live_pin = pin if pin and (pin_exp == 0 or pin_exp > now) else None
        expected = predict(cid, owner=live_owner, pin=live_pin, elig=elig, overrides=ov, persistent=persistent)
        assert out == (expected.node, expected.how, expected.previous, expected.pin_ignored), (i, out, expected)
        assert out[1] in (How.HIT, How.PINNED, How.NONE)
    assert answered > 500


# --------------------------------------------------------------------------- against Redis


def config(url: str) -> Config:
    return Config(nodes=NODES, redis_url=url, redis_timeout=2.0, metrics_listen=None, state_refresh=0.1,
                  session_ttl=240)


@asynccontextmanager
async def agent(url: str) -> AsyncIterator[Core]:
    core = Core.build(config(url), lambda: frozenset(NAMES))
    await core.start()
    try:
        yield core
    finally:
        await core.stop()


def persistent(cid: bytes) -> ConnectRequest:
    return ConnectRequest(cid, proto_ver=4, flags=0)


async def until_cached(core: Core, cid: bytes) -> Any:
    for _ in range(10):
        d = await core.engine.decide(persistent(cid))
        if d.cached:
            return d
    raise AssertionError("never answered from the cache")


def test_another_writer_is_followed_within_one_invalidation(redis_server: Any) -> None:
    r = redis.Redis(port=redis_server.port)
    windows: list[float] = []

    async def go() -> None:
        async with agent(redis_server.url) as a:
            assert a.store.cache.enabled
            for n in range(20):
                cid = f"dev-{n}".encode()
                first = await until_cached(a, cid)
                target = next(x for x in NAMES if x != first.node)
                # Another writer (the CLI, another agent) pins it while this agent serves hits.
                written = time.perf_counter()
                await asyncio.to_thread(records.write_pin, r, cid, target)
                stale = 0
                while True:
                    d = await a.engine.decide(persistent(cid))
                    if d.node == target:
                        break
                    stale += 1
                    assert stale < 10_000, "never followed the pin"
                    await asyncio.sleep(0)
                windows.append(time.perf_counter() - written)
                assert d.how == How.PINNED and not d.cached  # the record moved: Redis decided
                assert a.store.cache.invalidations > 0

    asyncio.run(go())
    windows.sort()
    print(f"\ncache window after another writer: median {windows[len(windows) // 2] * 1e3:.2f} ms, "
          f"max {windows[-1] * 1e3:.2f} ms over {len(windows)} pins")
    # Bound, not a benchmark: one invalidation message on a local socket.
    assert windows[-1] < 1.0
    r.close()


def test_tracking_lost_drops_the_cache_and_redis_gone_too(redis_server: Any) -> None:
    r = redis.Redis(port=redis_server.port)

    async def go() -> None:
        async with agent(redis_server.url) as a:
            await until_cached(a, b"x")
            tracker = next(iter(a.store._trackers.values()))
            r.client_kill_filter(_id=tracker.client_id)  # the tracking connection dies
            for _ in range(100):
                if not a.store.cache.enabled:
                    break
                await asyncio.sleep(0.01)
            assert not a.store.cache.enabled and len(a.store.cache) == 0
            assert not (await a.engine.decide(persistent(b"x"))).cached
            await a.store.keep_tracking()  # what the refresher does every state_refresh
            assert a.store.cache.enabled
            await until_cached(a, b"x")
            a.breaker.trip(ConnectionError("test"))  # Redis unavailable: dropped too
            assert len(a.store.cache) == 0

    asyncio.run(go())
    r.close()


def test_cached_hits_keep_the_record_alive(redis_server: Any) -> None:
    """A client answered from the cache still has its record's expiry follow its CONNECTs."""
    r = redis.Redis(port=redis_server.port)

    async def go() -> None:
        async with agent(redis_server.url) as a:
            now = [time.time()]
            a.engine._clock = lambda: now[0]
            await until_cached(a, b"alive")
            before = records.owner(r, b"alive").expiry  # type: ignore[union-attr]
            now[0] += 30  # more than 240/24 s later: the record's expiry must move
            d = await a.engine.decide(persistent(b"alive"))
            assert d.cached
            for _ in range(50):
                await asyncio.sleep(0.05)
                if records.owner(r, b"alive").expiry > before:  # type: ignore[union-attr]
                    break
            assert records.owner(r, b"alive").expiry == int(now[0]) + 240  # type: ignore[union-attr]

    asyncio.run(go())
    r.close()


def test_clean_sessions_of_unknown_clients_are_answered_locally(redis_server: Any) -> None:
    async def go() -> None:
        async with agent(redis_server.url) as a:
            clean = ConnectRequest(b"clean-one", proto_ver=4, flags=2)
            first = await a.engine.decide(clean)
            assert first.how == How.NONE and not first.cached
            again = await a.engine.decide(clean)  # the negative answer was cached
            assert again.cached
            assert again.node == first.node == placement.choose(b"clean-one", [(n, 1.0) for n in NAMES])

    asyncio.run(go())


pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
