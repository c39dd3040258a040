"""``rules.predict`` (what the CLI explains) and decide.lua (what Redis does) are the same rules.

Random scenarios (record, pin, node states, health, weights, session type) run through both,
against a real redis-server; any difference is a drift between the explanation and the truth.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import redis

from agent import placement
from agent.config import NodeConfig
from agent.model import NodeState
from agent.rules import NodeOverrides, eligibility, predict
from agent.store import RedisStore
from devstack import records

NAMES = ("n1", "n2", "n3", "n4")
NODES = tuple(NodeConfig(n, "h", i + 1) for i, n in enumerate(NAMES))


def test_predict_matches_decide_lua(redis_server_session: Any) -> None:
    rng = random.Random(7)
    r = redis.Redis.from_url(redis_server_session.url)
    r.flushall()
    cases = []
    for i in range(400):
        cid = f"case-{i}".encode()
        owner = rng.choice((None, *NAMES, "gone"))
        pin = rng.choice((None, None, *NAMES, "gone"))
        states = {n: rng.choice(list(NodeState)) for n in NAMES if rng.random() < 0.4}
        weights = {n: rng.choice((0.0, 1.0, 3.0)) for n in NAMES if rng.random() < 0.2}
        healthy = frozenset(n for n in NAMES if rng.random() < 0.8)
        persistent = rng.random() < 0.7
        ov = NodeOverrides(states, weights, {n: 1000 for n in NAMES})
        waiting = frozenset(n for n in NAMES if n not in healthy and rng.random() < 0.5)
        if owner:
            records.write_owner(r, cid, owner)
        if pin:
            records.write_pin(r, cid, pin)
        cases.append((cid, owner, pin, ov, healthy, persistent, waiting))

    async def go() -> list[tuple[Any, Any]]:
        store = RedisStore(redis_server_session.url, timeout=2.0, pool_size=2)
        out = []
        try:
            await store.load_layout()
            for cid, owner, pin, ov, healthy, persistent, waiting in cases:
                elig = eligibility(NODES, healthy, ov, 20)
                expected = predict(cid, owner=owner, pin=pin, elig=elig, overrides=ov, persistent=persistent,
                                   waiting=waiting)
                got = await store.decide(
                    cid, persistent=persistent, candidate=placement.choose(cid, elig.placeable), ttl=100,
                    now=int(time.time()), usable=elig.usable, evacuating=elig.evacuating, waiting=waiting, by="t",
                )
                out.append((expected, got))
        finally:
            await store.close()
        return out

    results = asyncio.run(go())
    mismatches = [
        (e, g) for e, g in results
        if (e.node, e.how, e.previous, e.pin_ignored) != (g.node, g.how, g.previous, g.pin_ignored)
    ]
    assert mismatches == []
    assert {e.how for e, _ in results} >= {"hit", "moved", "pinned", "assigned", "none", "wait"}
    r.close()
