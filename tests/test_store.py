"""decide.lua against a real redis-server: every branch, key layout and key safety."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis

from agent.model import NO_EXPIRY_SCORE
from agent.rules import NodeOverrides, parse_overrides
from agent.store import RedisStore, StoreDecision

P = "mqtt-affinity:"
NOW = 1_700_000_000
USABLE = ("n1", "n2", "n3")
T = TypeVar("T")


@pytest.fixture
def r(redis_server_session: Any) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server_session.url)
    client.flushall()
    client.script_flush()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def url(r: redis.Redis, redis_server_session: Any) -> str:
    return str(redis_server_session.url)


def with_stores(url: str, fn: Callable[..., Awaitable[T]], n: int = 1, prefix: str = P) -> T:
    """Run ``fn(*stores)`` in a fresh loop; the timeout is generous: these tests check logic, not speed."""

    async def main() -> T:
        stores = [RedisStore(url, key_prefix=prefix, timeout=2.0, pool_size=4) for _ in range(n)]
        try:
            return await fn(*stores)
        finally:
            for s in stores:
                await s.close()

    return asyncio.run(main())


async def decide(store: RedisStore, cid: bytes, candidate: str | None = "n1", **kw: Any) -> StoreDecision:
    args: dict[str, Any] = dict(persistent=True, ttl=100, now=NOW, usable=USABLE, evacuating={}, by="ha1")
    args.update(kw)
    return await store.decide(cid, candidate=candidate, **args)


def owner(r: redis.Redis, cid: bytes, prefix: str = P) -> dict[bytes, bytes]:
    return r.hgetall(prefix.encode() + b"owner:" + cid)


def placed(r: redis.Redis, node: str) -> dict[bytes, float]:
    return dict(r.zrange(f"{P}placed:{node}", 0, -1, withscores=True))


# --------------------------------------------------------------------------- new records


def test_assigned_sets_record_ttl_and_placed_set(r: redis.Redis, url: str) -> None:
    d = with_stores(url, lambda s: decide(s, b"c1", "n2", ttl=300))
    assert d == StoreDecision("n2", "assigned")
    assert owner(r, b"c1") == {b"node": b"n2", b"placed_at": str(NOW).encode(), b"by": b"ha1"}
    assert 0 < r.ttl(f"{P}owner:c1") <= 300
    assert placed(r, "n2") == {b"c1": NOW + 300}


def test_never_expiring_session(r: redis.Redis, url: str) -> None:
    async def go(s: RedisStore) -> None:
        assert (await decide(s, b"c1", "n1", ttl=0)).how == "assigned"
        assert r.ttl(f"{P}owner:c1") == -1
        assert placed(r, "n1") == {b"c1": NO_EXPIRY_SCORE}
        # the client reconnects with a finite expiry: the record gets one
        assert (await decide(s, b"c1", "n1", ttl=50)).how == "hit"
        assert 0 < r.ttl(f"{P}owner:c1") <= 50
        assert placed(r, "n1") == {b"c1": NOW + 50}
        # and back to never expiring: PERSIST
        assert (await decide(s, b"c1", "n1", ttl=0)).how == "hit"
        assert r.ttl(f"{P}owner:c1") == -1

    with_stores(url, go)


def test_hit_refreshes_ttl_and_ignores_candidate(r: redis.Redis, url: str) -> None:
    async def go(s: RedisStore) -> None:
        await decide(s, b"c1", "n1")
        r.expire(f"{P}owner:c1", 5)
        d = await decide(s, b"c1", "n3", ttl=1000, now=NOW + 10)
        assert d == StoreDecision("n1", "hit")
        assert r.ttl(f"{P}owner:c1") > 5
        assert owner(r, b"c1")[b"placed_at"] == str(NOW).encode()  # placement time, not refresh time
        assert placed(r, "n1") == {b"c1": NOW + 10 + 1000}

    with_stores(url, go)


def test_clean_session_writes_nothing(r: redis.Redis, url: str) -> None:
    async def go(s: RedisStore) -> None:
        d = await decide(s, b"c1", "n2", persistent=False)
        assert d == StoreDecision("n2", "none")
        assert r.dbsize() == 0
        # follows an existing usable owner without refreshing it
        await decide(s, b"c1", "n1")
        r.expire(f"{P}owner:c1", 7)
        before = owner(r, b"c1")
        assert await decide(s, b"c1", "n3", persistent=False, ttl=1000) == StoreDecision("n1", "hit")
        assert owner(r, b"c1") == before and r.ttl(f"{P}owner:c1") <= 7
        # owner unusable: routed to the candidate, record untouched
        d = await decide(s, b"c1", "n2", persistent=False, usable=("n2", "n3"))
        assert d == StoreDecision("n2", "moved", previous="n1")
        assert owner(r, b"c1") == before and placed(r, "n1").keys() == {b"c1"} and placed(r, "n2") == {}
        # follows a pin, writes nothing
        r.hset(f"{P}pin:c1", mapping={"node": "n3", "reason": "t", "created_at": NOW})
        assert await decide(s, b"c1", "n2", persistent=False) == StoreDecision("n3", "pinned", previous="n1")
        assert owner(r, b"c1") == before

    with_stores(url, go)


# --------------------------------------------------------------------------- pins


def test_pin_honoured_and_kept_after_unpin(r: redis.Redis, url: str) -> None:
    async def go(s: RedisStore) -> None:
        await decide(s, b"c1", "n1")
        r.hset(f"{P}pin:c1", mapping={"node": "n3", "reason": "debug", "created_at": NOW})
        assert await decide(s, b"c1", "n1") == StoreDecision("n3", "pinned", previous="n1")
        assert owner(r, b"c1")[b"node"] == b"n3"
        assert placed(r, "n1") == {} and b"c1" in placed(r, "n3")
        assert await decide(s, b"c1", "n1") == StoreDecision("n3", "pinned")  # already there
        r.delete(f"{P}pin:c1")
        assert await decide(s, b"c1", "n1") == StoreDecision("n3", "hit")
        # a pin for a client with no record creates one on the pin node
        r.hset(f"{P}pin:c2", "node", "n2")
        assert await decide(s, b"c2", "n1") == StoreDecision("n2", "pinned")
        assert owner(r, b"c2")[b"node"] == b"n2"

    with_stores(url, go)


def test_pin_to_unusable_node_is_ignored(r: redis.Redis, url: str) -> None:
    async def go(s: RedisStore) -> None:
        r.hset(f"{P}pin:c1", "node", "n9")  # unknown / down / maintenance
        assert await decide(s, b"c1", "n2") == StoreDecision("n2", "assigned", pin_ignored="n9")
        assert await decide(s, b"c1", "n1") == StoreDecision("n2", "hit", pin_ignored="n9")
        r.hset(f"{P}pin:c1", "node", "n3")
        d = await decide(s, b"c1", "n1", usable=("n1", "n2"))  # n3 down
        assert d == StoreDecision("n2", "hit", pin_ignored="n3")

    with_stores(url, go)


# --------------------------------------------------------------------------- moves


def test_moved_when_owner_unusable(r: redis.Redis, url: str) -> None:
    async def go(s: RedisStore) -> None:
        await decide(s, b"c1", "n1")
        d = await decide(s, b"c1", "n2", usable=("n2", "n3"), now=NOW + 5, by="ha2")
        assert d == StoreDecision("n2", "moved", previous="n1")
        assert owner(r, b"c1") == {b"node": b"n2", b"placed_at": str(NOW + 5).encode(), b"by": b"ha2"}
        assert placed(r, "n1") == {} and placed(r, "n2") == {b"c1": NOW + 5 + 100}
        # a node that is no longer configured counts as unusable too
        r.hset(f"{P}owner:c2", "node", "removed-node")
        assert (await decide(s, b"c2", "n3")) == StoreDecision("n3", "moved", previous="removed-node")
        # no candidate at all: nothing usable, record left alone
        assert await decide(s, b"c1", None, usable=()) == StoreDecision(None, "none", previous="n2")
        assert owner(r, b"c1")[b"node"] == b"n2"

    with_stores(url, go)


def test_racing_agents_converge(r: redis.Redis, url: str) -> None:
    """Two balancers with different candidates (e.g. mid-reload weights): the first write wins."""

    async def go(a: RedisStore, b: RedisStore) -> None:
        results = await asyncio.gather(
            *[decide(st, f"c{i}".encode(), cand) for i in range(50) for st, cand in ((a, "n1"), (b, "n2"))]
        )
        for i in range(50):
            first, second = results[2 * i], results[2 * i + 1]
            assert first.node == second.node == owner(r, f"c{i}".encode())[b"node"].decode()
            assert {first.how, second.how} == {"assigned", "hit"}

    with_stores(url, go, n=2)


def _start_of_a_redis_second(r: redis.Redis) -> int:
    """Wait until Redis's clock has just entered a new second (the budget's bucket); return it."""
    sec, usec = r.time()
    if usec > 500_000:  # not enough of this second left for a burst: take the next one
        time.sleep((1_000_000 - usec) / 1e6 + 0.01)
        sec, _ = r.time()
    return sec


def test_evacuation_budget_is_shared_between_agents(r: redis.Redis, url: str) -> None:
    async def go(a: RedisStore, b: RedisStore) -> None:
        cids = [f"e{i}".encode() for i in range(10)]
        for c in cids:
            await decide(a, c, "n1")
        evac = {"n1": 3}
        results = []
        second = _start_of_a_redis_second(r)
        # Alternate agents whose clocks disagree by a second: the budget follows Redis's clock.
        for i, c in enumerate(cids):
            agent_now = NOW + 1 if i % 2 else NOW + 2
            results.append(await decide(a if i % 2 else b, c, "n2", evacuating=evac, now=agent_now))
        assert [d.how for d in results].count("moved") == 3
        assert all(d.node == "n1" for d in results if d.how == "hit")
        assert all(d == StoreDecision("n2", "moved", "n1") for d in results if d.how == "moved")
        assert len(placed(r, "n1")) == 7 and len(placed(r, "n2")) == 3
        bucket = f"{P}evac:n1:{second}"
        assert int(r.get(bucket)) == 10 and 0 < r.ttl(bucket) <= 2
        # a clean client on the evacuating node leaves without spending the budget
        stayed = [c for c in cids if owner(r, c)[b"node"] == b"n1"]
        d = await decide(b, stayed[0], "n2", evacuating=evac, now=NOW + 1, persistent=False)
        assert d == StoreDecision("n2", "moved", "n1")
        assert owner(r, stayed[0])[b"node"] == b"n1"
        # next second: a fresh budget
        while r.time()[0] == second:
            await asyncio.sleep(0.02)
        _start_of_a_redis_second(r)
        moved = [await decide(a, c, "n2", evacuating=evac, now=NOW + 2) for c in stayed]
        assert [d.how for d in moved].count("moved") == 3
        # rate 0 = evacuation paused: everybody stays
        assert (await decide(a, stayed[-1], "n2", evacuating={"n1": 0}, now=NOW + 3)).how == "hit"

    with_stores(url, go, n=2)


def test_drain_keeps_existing_clients(r: redis.Redis, url: str) -> None:
    """A drain node is usable but not a candidate (the engine excludes it): existing clients stay."""

    async def go(s: RedisStore) -> None:
        await decide(s, b"c1", "n1")
        assert await decide(s, b"c1", "n2", usable=USABLE) == StoreDecision("n1", "hit")
        assert await decide(s, b"new", "n2", usable=USABLE) == StoreDecision("n2", "assigned")

    with_stores(url, go)


# --------------------------------------------------------------------------- key safety

HOSTILE = [
    b"",
    b"*",
    b"?",
    b"[a]",
    b"a:b",
    b"owner:x",
    b"pin:x",
    b"x",
    b"placed:n1",
    b"\x00",
    b"\x00\x00",
    b"a\x00b",
    b"\r\n",
    b"PING\r\nFLUSHALL\r\n",
    b"\xff\xfe\xc3(",
    "ü".encode(),
    b" ",
    os.urandom(65535),
    os.urandom(65535),
]


@pytest.mark.parametrize("prefix", [P, "tenant{1}:"])
def test_hostile_ids_get_their_own_records(r: redis.Redis, url: str, prefix: str) -> None:
    nodes = [f"n{i}" for i in range(len(HOSTILE))]

    async def go(s: RedisStore) -> None:
        for cid, node in zip(HOSTILE, nodes):
            d = await s.decide(cid, persistent=True, candidate=node, ttl=100, now=NOW, usable=nodes, by="ha1")
            assert d == StoreDecision(node, "assigned"), cid[:20]
        # every one is found again, on its own node, whatever the others did
        for cid, node in zip(HOSTILE, nodes):
            d = await s.decide(cid, persistent=True, candidate="n0", ttl=100, now=NOW, usable=nodes, by="ha1")
            assert d == StoreDecision(node, "hit"), cid[:20]
        # a pin on one hostile id affects that one only
        r.hset(prefix.encode() + b"pin:" + b"x", "node", "n0")
        for cid, node in zip(HOSTILE, nodes):
            d = await s.decide(cid, persistent=False, candidate="n0", ttl=100, now=NOW, usable=nodes, by="ha1")
            assert d.node == ("n0" if cid == b"x" else node), cid[:20]

    with_stores(url, go, prefix=prefix)
    keys = set(r.keys(b"*"))
    owners = {k for k in keys if k.startswith(prefix.encode() + b"owner:")}
    assert owners == {prefix.encode() + b"owner:" + c for c in HOSTILE}
    for cid, node in zip(HOSTILE, nodes):
        assert owner(r, cid, prefix)[b"node"] == node.encode()
        assert r.zscore(prefix + "placed:" + node, cid) == NOW + 100


# --------------------------------------------------------------------------- overrides, trim, plumbing


def test_load_node_overrides(r: redis.Redis, url: str) -> None:
    r.hset(f"{P}node-state", mapping={"n1": "drain", "n2": "EVACUATE", "n3": "bogus", "n4": "maintenance"})
    r.hset(f"{P}node-weight", mapping={"n1": "0", "n2": "2.5", "n3": "-1", "n4": "nan", "n5": "x"})
    r.hset(f"{P}evacuate-rate", mapping={"n2": "5", "n3": "-2", "n4": "many"})
    ov = with_stores(url, lambda s: s.load_node_overrides())
    assert ov == NodeOverrides(
        states={"n1": "drain", "n2": "evacuate", "n4": "maintenance"},
        weights={"n1": 0.0, "n2": 2.5},
        rates={"n2": 5},
    )
    assert with_stores(url, lambda s: s.load_node_overrides(), prefix="other:") == NodeOverrides()
    assert parse_overrides({b"n\xff": b"drain"}, {}, {}).states == {"n\ufffd": "drain"}


def test_trim_and_count_placed(r: redis.Redis, url: str) -> None:
    async def go(s: RedisStore) -> tuple[int, dict[str, int], dict[str, int]]:
        await decide(s, b"short", "n1", ttl=10)
        await decide(s, b"long", "n1", ttl=1000)
        await decide(s, b"forever", "n1", ttl=0)
        await decide(s, b"other", "n2", ttl=10)
        later = NOW + 500
        before = await s.placed_counts(["n1", "n2", "n3"], later)
        removed = await s.trim_placed(["n1", "n2", "n3"], later)
        return removed, before, await s.placed_counts(["n1", "n2"], later)

    removed, before, after = with_stores(url, go)
    assert before == {"n1": 2, "n2": 0, "n3": 0}
    assert removed == 2
    assert after == {"n1": 2, "n2": 0}
    assert set(placed(r, "n1")) == {b"long", b"forever"}


def test_script_reloaded_after_flush(r: redis.Redis, url: str) -> None:
    async def go(s: RedisStore) -> None:
        await s.ping()
        assert (await decide(s, b"c1")).how == "assigned"
        r.script_flush()  # as after a Redis restart
        assert (await decide(s, b"c1")).how == "hit"
        r.script_flush()
        await s.ping()  # ping re-loads it too
        assert r.script_exists(s.script_sha) == [True]

    with_stores(url, go)


def test_errors_propagate_from_store() -> None:
    """The RedisStore never hides an outage: the engine needs the exception to fall back."""
    from devstack import free_port

    async def go() -> None:
        s = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
        try:
            with pytest.raises(redis.exceptions.ConnectionError):
                await decide(s, b"c1")
            with pytest.raises(redis.exceptions.ConnectionError):
                await s.ping()
        finally:
            await s.close()

    asyncio.run(go())
