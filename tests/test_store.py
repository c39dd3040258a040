"""decide.lua (and the store around it) against a real redis-server: every branch, the key
layout, key safety, the version-1 read-through and migration, the sweep."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis
from redis.crc import key_slot

from agent.admin.access import RedisAccess
from agent.endpoint import RedisEndpoint
from agent.model import NEVER, Keys, OwnerRecord, PinRecord
from agent.rules import NodeOverrides, parse_overrides
from agent.store import RedisStore, StoreDecision, refresh_step
from agent.sweeper import Sweeper
from devstack import records as records_mod

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


def with_stores(url: str, fn: Callable[..., Awaitable[T]], n: int = 1, prefix: str = P, **kw: Any) -> T:
    """Run ``fn(*stores)`` in a fresh loop; the timeout is generous: these tests check logic, not speed."""

    async def main() -> T:
        stores = [RedisStore(url, key_prefix=prefix, timeout=2.0, pool_size=4, **kw) for _ in range(n)]
        try:
            for s in stores:
                await s.load_layout()
            return await fn(*stores)
        finally:
            for s in stores:
                await s.close()

    return asyncio.run(main())


async def decide(store: RedisStore, cid: bytes, candidate: str | None = "n1", **kw: Any) -> StoreDecision:
    args: dict[str, Any] = dict(persistent=True, ttl=100, now=NOW, usable=USABLE, evacuating={}, by="ha1")
    args.update(kw)
    return await store.decide(cid, candidate=candidate, **args)


def keys(r: redis.Redis, prefix: str = P) -> Keys:
    layout = r.hgetall(prefix + "layout")
    return Keys(prefix, int(layout[b"buckets"])) if layout else Keys(prefix)


def owner(r: redis.Redis, cid: bytes, prefix: str = P) -> OwnerRecord | None:
    raw = r.hget(keys(r, prefix).client(cid)[0], cid)
    return OwnerRecord.decode(raw) if raw is not None else None


def pin(r: redis.Redis, cid: bytes, node: str, *, expiry: int = NEVER, prefix: str = P) -> None:
    r.hset(keys(r, prefix).client(cid)[1], cid, PinRecord(node, expiry, NOW, "test").encode())


def unpin(r: redis.Redis, cid: bytes) -> None:
    r.hdel(keys(r).client(cid)[1], cid)


# --------------------------------------------------------------------------- new records


def test_assigned_writes_the_record_in_the_clients_bucket(r: redis.Redis, url: str) -> None:
    d = with_stores(url, lambda s: decide(s, b"c1", "n2", ttl=300))
    assert d == StoreDecision("n2", "assigned")
    assert owner(r, b"c1") == OwnerRecord("n2", NOW + 300, NOW, "ha1")
    # One layout, created by the first agent; the record is a field of its bucket.
    assert r.hgetall(P + "layout") == {b"version": b"2", b"buckets": b"16384"}
    owners_key = Keys().client(b"c1")[0]
    assert r.hkeys(owners_key) == [b"c1"] and r.ttl(owners_key) == -1  # records expire in the value


def test_never_expiring_session_and_ttl_changes(r: redis.Redis, url: str) -> None:
    async def go(s: RedisStore) -> None:
        assert (await decide(s, b"c1", "n1", ttl=0)).how == "assigned"
        assert owner(r, b"c1") == OwnerRecord("n1", NEVER, NOW, "ha1")
        # the client reconnects with a finite expiry: the record gets one
        assert (await decide(s, b"c1", "n1", ttl=50)).how == "hit"
        assert owner(r, b"c1").expiry == NOW + 50  # type: ignore[union-attr]
        # and back to never expiring
        assert (await decide(s, b"c1", "n1", ttl=0)).how == "hit"
        assert owner(r, b"c1").expiry == NEVER  # type: ignore[union-attr]

    with_stores(url, go)


def test_a_hit_rewrites_the_record_only_when_the_expiry_moves_by_a_step(r: redis.Redis, url: str) -> None:
    ttl = 2400
    step = refresh_step(ttl)
    assert step == 100

    async def go(s: RedisStore) -> None:
        await decide(s, b"c1", "n1", ttl=ttl)
        d = await decide(s, b"c1", "n3", ttl=ttl, now=NOW + step - 1)
        assert d == StoreDecision("n1", "hit")  # the candidate is ignored on a hit
        assert owner(r, b"c1") == OwnerRecord("n1", NOW + ttl, NOW, "ha1")  # not rewritten: a read
        await decide(s, b"c1", "n3", ttl=ttl, now=NOW + step, by="ha2")
        # rewritten: a new expiry, the placement time and balancer of the placement kept
        assert owner(r, b"c1") == OwnerRecord("n1", NOW + step + ttl, NOW, "ha1")

    with_stores(url, go)


def test_an_expired_record_is_no_record(r: redis.Redis, url: str) -> None:
    async def go(s: RedisStore) -> None:
        await decide(s, b"c1", "n1", ttl=10)
        d = await decide(s, b"c1", "n2", ttl=10, now=NOW + 10)  # expiry reached
        assert d == StoreDecision("n2", "assigned")
        assert owner(r, b"c1") == OwnerRecord("n2", NOW + 20, NOW + 10, "ha1")

    with_stores(url, go)


def test_clean_session_writes_nothing(r: redis.Redis, url: str) -> None:
    async def go(s: RedisStore) -> None:
        d = await decide(s, b"c1", "n2", persistent=False)
        assert d == StoreDecision("n2", "none")
        assert r.keys(P + "{*") == []
        # follows an existing usable owner without refreshing it
        await decide(s, b"c1", "n1")
        before = owner(r, b"c1")
        assert await decide(s, b"c1", "n3", persistent=False, ttl=1000, now=NOW + 50) == StoreDecision("n1", "hit")
        assert owner(r, b"c1") == before
        # owner unusable: routed to the candidate, record untouched
        d = await decide(s, b"c1", "n2", persistent=False, usable=("n2", "n3"))
        assert d == StoreDecision("n2", "moved", previous="n1")
        assert owner(r, b"c1") == before
        # follows a pin, writes nothing
        pin(r, b"c1", "n3")
        assert await decide(s, b"c1", "n2", persistent=False) == StoreDecision("n3", "pinned", previous="n1")
        assert owner(r, b"c1") == before

    with_stores(url, go)


# --------------------------------------------------------------------------- pins


def test_pin_honoured_and_kept_after_unpin(r: redis.Redis, url: str) -> None:
    async def go(s: RedisStore) -> None:
        await decide(s, b"c1", "n1")
        pin(r, b"c1", "n3")
        assert await decide(s, b"c1", "n1") == StoreDecision("n3", "pinned", previous="n1")
        assert owner(r, b"c1").node == "n3"  # type: ignore[union-attr]
        assert await decide(s, b"c1", "n1") == StoreDecision("n3", "pinned")  # already there
        unpin(r, b"c1")
        assert await decide(s, b"c1", "n1") == StoreDecision("n3", "hit")
        # a pin for a client with no record creates one on the pin node
        pin(r, b"c2", "n2")
        assert await decide(s, b"c2", "n1") == StoreDecision("n2", "pinned")
        assert owner(r, b"c2").node == "n2"  # type: ignore[union-attr]
        # an expired pin is no pin
        pin(r, b"c3", "n3", expiry=NOW - 1)
        assert await decide(s, b"c3", "n1") == StoreDecision("n1", "assigned")

    with_stores(url, go)


def test_pin_to_unusable_node_is_ignored(r: redis.Redis, url: str) -> None:
    async def go(s: RedisStore) -> None:
        pin(r, b"c1", "n9")  # unknown / down / maintenance
        assert await decide(s, b"c1", "n2") == StoreDecision("n2", "assigned", pin_ignored="n9")
        assert await decide(s, b"c1", "n1") == StoreDecision("n2", "hit", pin_ignored="n9")
        pin(r, b"c1", "n3")
        d = await decide(s, b"c1", "n1", usable=("n1", "n2"))  # n3 down
        assert d == StoreDecision("n2", "hit", pin_ignored="n3")

    with_stores(url, go)


# --------------------------------------------------------------------------- moves


def test_moved_when_owner_unusable(r: redis.Redis, url: str) -> None:
    async def go(s: RedisStore) -> None:
        await decide(s, b"c1", "n1")
        d = await decide(s, b"c1", "n2", usable=("n2", "n3"), now=NOW + 5, by="ha2")
        assert d == StoreDecision("n2", "moved", previous="n1")
        assert owner(r, b"c1") == OwnerRecord("n2", NOW + 5 + 100, NOW + 5, "ha2")
        # a node that is no longer configured counts as unusable too
        r.hset(Keys().client(b"c2")[0], b"c2", OwnerRecord("removed-node", NEVER, NOW, "x").encode())
        assert (await decide(s, b"c2", "n3")) == StoreDecision("n3", "moved", previous="removed-node")
        # no candidate at all: nothing usable, record left alone
        assert await decide(s, b"c1", None, usable=()) == StoreDecision(None, "none", previous="n2")
        assert owner(r, b"c1").node == "n2"  # type: ignore[union-attr]
        # in restart grace: a persistent client waits, its record untouched
        d = await decide(s, b"c1", "n3", usable=("n1", "n3"), waiting=("n2",))
        assert d == StoreDecision(None, "wait", previous="n2")
        assert owner(r, b"c1").node == "n2"  # type: ignore[union-attr]

    with_stores(url, go)


def test_racing_agents_converge(r: redis.Redis, url: str) -> None:
    """Two balancers with different candidates (e.g. mid-reload weights): the first write wins."""

    async def go(a: RedisStore, b: RedisStore) -> None:
        results = await asyncio.gather(
            *[decide(st, f"c{i}".encode(), cand) for i in range(50) for st, cand in ((a, "n1"), (b, "n2"))]
        )
        for i in range(50):
            first, second = results[2 * i], results[2 * i + 1]
            assert first.node == second.node == owner(r, f"c{i}".encode()).node  # type: ignore[union-attr]
            assert {first.how, second.how} == {"assigned", "hit"}

    with_stores(url, go, n=2)


def _start_of_a_redis_second(r: redis.Redis) -> int:
    """Wait until Redis's clock has just entered a new second (the budget's second); return it."""
    sec, usec = r.time()
    if usec > 500_000:  # not enough of this second left for a burst: take the next one
        time.sleep((1_000_000 - usec) / 1e6 + 0.01)
        sec, _ = r.time()
    return sec


def test_evacuation_budget_is_shared_between_agents(r: redis.Redis, url: str) -> None:
    # Real time here: a move granted by the budget is made as of Redis's second (placed_at).
    now = int(r.time()[0])

    async def go(a: RedisStore, b: RedisStore) -> None:
        cids = [f"e{i}".encode() for i in range(10)]
        for c in cids:
            await decide(a, c, "n1", now=now)
        evac = {"n1": 3}
        results = []
        second = _start_of_a_redis_second(r)
        # Alternate agents whose clocks disagree by a second: the budget follows Redis's clock.
        for i, c in enumerate(cids):
            agent_now = now + 1 if i % 2 else now + 2
            results.append(await decide(a if i % 2 else b, c, "n2", evacuating=evac, now=agent_now))
        assert [d.how for d in results].count("moved") == 3
        assert all(d.node == "n1" for d in results if d.how == "hit")
        assert all(d == StoreDecision("n2", "moved", "n1") for d in results if d.how == "moved")
        # each move was made as of the Redis second whose budget it used
        assert {owner(r, c).placed_at for c in cids if owner(r, c).node == "n2"} == {second}  # type: ignore[union-attr]
        assert sorted(owner(r, c).node for c in cids) == ["n1"] * 7 + ["n2"] * 3  # type: ignore[union-attr]
        budget = Keys().evac_budget("n1")
        assert r.get(budget) == f"{second} 3".encode() and 0 < r.ttl(budget) <= 2
        # a clean client on the evacuating node leaves without spending the budget
        stayed = [c for c in cids if owner(r, c).node == "n1"]  # type: ignore[union-attr]
        d = await decide(b, stayed[0], "n2", evacuating=evac, now=now + 1, persistent=False)
        assert d == StoreDecision("n2", "moved", "n1")
        assert owner(r, stayed[0]).node == "n1"  # type: ignore[union-attr]
        # next second: a fresh budget
        while r.time()[0] == second:
            await asyncio.sleep(0.02)
        _start_of_a_redis_second(r)
        moved = [await decide(a, c, "n2", evacuating=evac, now=now + 2) for c in stayed]
        assert [d.how for d in moved].count("moved") == 3
        # rate 0 = evacuation paused: everybody stays
        assert (await decide(a, stayed[-1], "n2", evacuating={"n1": 0}, now=now + 3)).how == "hit"

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
    b"*",
    b"?",
    b"[a]",
    b"a:b",
    b"owner:x",
    b"pin:x",
    b"x",
    b"{x}",
    b"}",
    b"{",
    b"}{",
    b"{}",
    b"a{b}c",
    b"|",
    b"n1|0|0|by",
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


@pytest.mark.parametrize("prefix", [P, "tenant:1:"])
def test_hostile_ids_get_their_own_records_in_one_slot(r: redis.Redis, url: str, prefix: str) -> None:
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
        pin(r, b"x", "n0", prefix=prefix)
        for cid, node in zip(HOSTILE, nodes):
            d = await s.decide(cid, persistent=False, candidate="n0", ttl=100, now=NOW, usable=nodes, by="ha1")
            assert d.node == ("n0" if cid == b"x" else node), cid[:20]

    with_stores(url, go, prefix=prefix)
    k = keys(r, prefix)
    for cid, node in zip(HOSTILE, nodes):
        assert owner(r, cid, prefix) == OwnerRecord(node, NOW + 100, NOW, "ha1")
        owners_key, pins_key = k.client(cid)
        # Whatever braces the id holds, both keys of a client hash to the same Cluster slot.
        assert key_slot(owners_key) == key_slot(pins_key)
    # Nothing but buckets and the layout was written.
    assert {x for x in r.keys(b"*")} <= {k.layout} | {k.owners(b) for b in range(k.buckets)} | {
        k.pins(b) for b in range(k.buckets)
    }


def test_the_bucket_count_in_redis_wins(r: redis.Redis, url: str) -> None:
    """An agent configured for another bucket count reads the one in force: both find every record."""

    async def go(a: RedisStore) -> None:
        for i in range(100):
            await decide(a, f"b{i}".encode(), "n2")

    with_stores(url, go, buckets=64)
    assert r.hget(P + "layout", "buckets") == b"64"

    async def again(b: RedisStore) -> None:
        assert b.keys.buckets == 64
        for i in range(100):
            assert await decide(b, f"b{i}".encode(), "n1") == StoreDecision("n2", "hit")

    with_stores(url, again)  # configured with the default, 16384


# --------------------------------------------------------------------------- version 1


def _v1_records(r: redis.Redis) -> None:
    """What version 1 of the agent left: one HASH per client with a TTL, pins, placed sets."""
    r.hset(f"{P}owner:old-1", mapping={"node": "n3", "placed_at": NOW - 50, "by": "ha9"})
    r.expire(f"{P}owner:old-1", 1000)
    r.hset(f"{P}owner:old-2", mapping={"node": "n2", "placed_at": NOW - 60, "by": "ha9"})
    r.hset(f"{P}pin:old-2", mapping={"node": "n1", "reason": "kept", "created_at": NOW - 70})
    r.zadd(f"{P}placed:n3", {"old-1": NOW + 1000})
    r.zadd(f"{P}placed:n2", {"old-2": 1e18})


def test_version1_records_are_read_through(r: redis.Redis, url: str) -> None:
    _v1_records(r)

    async def go(s: RedisStore) -> None:
        # An upgraded agent honours the old record (the HRW candidate says otherwise) ...
        assert await decide(s, b"old-1", "n1") == StoreDecision("n3", "hit")
        # ... and an old pin.
        assert await decide(s, b"old-2", "n3") == StoreDecision("n1", "pinned", previous="n2")

    with_stores(url, go)
    rec = owner(r, b"old-1")
    assert rec is not None and rec.node == "n3" and rec.placed_at == NOW - 50 and rec.by == "ha9"
    assert NOW + 990 <= rec.expiry <= NOW + 1000
    assert not r.exists(f"{P}owner:old-1", f"{P}owner:old-2", f"{P}pin:old-2")  # moved in


def test_migrate_moves_everything_while_agents_serve(r: redis.Redis, url: str) -> None:
    _v1_records(r)
    r.hset(f"{P}owner:old-3", mapping={"node": "n1", "placed_at": NOW, "by": "x"})

    async def serve(s: RedisStore) -> None:
        # One client already went through an upgraded agent (and moved since): that is newer.
        assert await decide(s, b"old-3", "n2", usable=("n2", "n3")) == StoreDecision("n2", "moved", previous="n1")

    with_stores(url, serve)
    access = RedisAccess.connect(RedisEndpoint.parse(url), Keys(P))
    dry = access.migrate(dry_run=True)
    assert (dry.owners, dry.pins, dry.dropped) == (2, 1, 2)
    done = access.migrate()
    assert (done.owners, done.pins, done.dropped) == (2, 1, 2)
    assert r.keys(f"{P}owner:*") == r.keys(f"{P}pin:*") == r.keys(f"{P}placed:*") == []
    assert r.hget(P + "layout", "v1") == b"gone"
    assert owner(r, b"old-3").node == "n2"  # type: ignore[union-attr]

    async def after(s: RedisStore) -> None:
        assert s.layout is not None and not s.layout.v1  # no more read-through
        assert await decide(s, b"old-1", "n1") == StoreDecision("n3", "hit")
        assert await decide(s, b"old-2", "n3") == StoreDecision("n1", "pinned", previous="n2")

    with_stores(url, after)
    assert access.migrate().owners == 0  # again: harmless
    access.close()


# --------------------------------------------------------------------------- sweep, overrides, plumbing


def test_sweep_removes_expired_records_and_counts_sessions(r: redis.Redis, url: str) -> None:
    async def go(a: RedisStore, b: RedisStore) -> tuple[Any, Any, Any]:
        await decide(a, b"short", "n1", ttl=10)
        await decide(a, b"long", "n1", ttl=1000)
        await decide(a, b"forever", "n1", ttl=0)
        await decide(a, b"other", "n2", ttl=10)
        pin(r, b"gone-pin", "n3", expiry=NOW + 5)
        pin(r, b"kept-pin", "n3")
        clock = lambda: NOW + 500.0  # noqa: E731
        first = Sweeper(a, None, holder="agent-a", interval=lambda: 60.0, clock=clock, pause=0)
        second = Sweeper(b, None, holder="agent-b", interval=lambda: 60.0, clock=clock, pause=0)
        counted = await first.sweep_once()
        blocked = await second.sweep_once()  # one sweeper at a time
        return counted, blocked, await b.session_counts()

    counted, blocked, published = with_stores(url, go, n=2)
    assert counted == ({"n1": 2}, 1)
    assert blocked is None
    assert published == ({"n1": 2}, NOW + 500.0)
    assert owner(r, b"short") is None and owner(r, b"other") is None and owner(r, b"long") is not None
    assert r.hget(Keys().client(b"gone-pin")[1], b"gone-pin") is None


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


def test_script_reloaded_after_flush(r: redis.Redis, url: str) -> None:
    async def go(s: RedisStore) -> None:
        await s.ping()
        assert (await decide(s, b"c1")).how == "assigned"
        r.script_flush()  # as after a Redis restart
        assert (await decide(s, b"c1")).how == "hit"
        r.script_flush()
        await s.ping()  # ping re-loads it too
        assert r.script_exists(s.decide_script.sha) == [True]

    with_stores(url, go)


def test_errors_propagate_from_store() -> None:
    """The RedisStore never hides an outage: the engine needs the exception to fall back."""
    from devstack import free_port

    async def go() -> None:
        s = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
        try:
            with pytest.raises(redis.exceptions.ConnectionError):
                await decide(s, b"c1")  # layout unknown: no decision without Redis
            with pytest.raises(redis.exceptions.ConnectionError):
                await s.ping()
        finally:
            await s.close()

    asyncio.run(go())


def test_a_restarted_redis_gets_the_recent_placements_back(redis_server: Any) -> None:
    """What a failover can lose (the last acknowledged writes), each agent writes back from its
    journal before its decisions use Redis again; a newer placement made meanwhile wins."""
    url = redis_server.url
    now = int(time.time())

    async def go() -> None:
        s = RedisStore(url, timeout=2.0, pool_size=2)
        try:
            await s.ping()
            await decide(s, b"moved-client", "n1", now=now)
            await decide(s, b"moved-client", "n2", usable=("n2", "n3"), now=now + 1)  # its owner died: moved
            await decide(s, b"newer-elsewhere", "n1", now=now)
            assert len(s.journal) == 2  # the last placement of each client
            redis_server.kill()  # lost everything (no persistence): like a failover to an empty replica
            redis_server.start()
            r = redis.Redis.from_url(url)
            # Meanwhile another agent placed one of them anew, later: that one must stay.
            records_mod.write_owner(r, b"newer-elsewhere", "n3", placed_at=now + 100)
            for _ in range(50):  # what the breaker's probe does before decisions use Redis again
                try:
                    await s.ping()
                    break
                except redis.exceptions.ConnectionError:  # the old connection, dead
                    await asyncio.sleep(0.1)
            assert s.restored == 1
            assert s._to_replay == []
            assert owner(r, b"moved-client") == OwnerRecord("n2", now + 1 + 100, now + 1, "ha1")
            assert owner(r, b"newer-elsewhere").node == "n3"  # type: ignore[union-attr]
            assert await decide(s, b"moved-client", "n1", now=now + 2) == StoreDecision("n2", "hit")
            r.close()
        finally:
            await s.close()

    asyncio.run(go())


def test_a_large_journal_goes_back_across_short_probes(redis_server: Any) -> None:
    """Thousands of journal entries are written back even when each probe has little time:
    progress is kept between probes, so decisions come back to Redis in finitely many."""
    url = redis_server.url
    now = int(time.time())
    ids = [f"j-{i:05d}".encode() for i in range(6000)]

    async def go() -> None:
        s = RedisStore(url, timeout=2.0, pool_size=2)
        try:
            await s.ping()
            keys = s.keys
            for cid in ids:
                s.journal.add(cid, keys.client(cid)[0], OwnerRecord("n2", now + 100, now, "ha1").encode())
            redis_server.kill()
            redis_server.start()
            probes = 0
            while True:  # what the breaker does: a bounded probe, again and again
                probes += 1
                assert probes < 200, s.restored
                try:
                    async with asyncio.timeout(0.03):
                        await s.ping()
                    break
                except (TimeoutError, redis.exceptions.ConnectionError):
                    await asyncio.sleep(0.01)
            # Every one is back (a call cut short by a probe's end may have landed uncounted).
            r = redis.Redis.from_url(url)
            assert {owner(r, c).node for c in ids} == {"n2"}  # type: ignore[union-attr]
            r.close()
            assert 0 < s.restored <= len(ids)
            # Once back, the next probe has nothing to write back.
            restored = s.restored
            await s.ping()
            assert s.restored == restored and s._to_replay == []
        finally:
            await s.close()

    asyncio.run(go())
