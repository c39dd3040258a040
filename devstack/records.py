"""Read and write the agents' Redis records the way the agents do (tests, benchmarks, demo).

Key names and record formats come from ``agent.model`` (the one definition); the bucket count
in force is read from ``P layout``, as the agents read it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis as redis_py

from agent.model import DEFAULT_PREFIX, NEVER, Keys, OwnerRecord, PinRecord
from agent.store import parse_layout

__all__ = ["delete_pin", "keys", "owner", "owners", "pin", "pin_first_and_drain", "write_owner", "write_pin"]


def _b(cid: bytes | str) -> bytes:
    return cid if isinstance(cid, bytes) else cid.encode()


def keys(r: redis_py.Redis, prefix: str = DEFAULT_PREFIX) -> Keys:
    """Key names with the bucket count Redis holds (the default before any agent ran)."""
    return Keys(prefix, parse_layout(r.hgetall(prefix.encode() + Keys.LAYOUT)).buckets)


def owner(r: redis_py.Redis, cid: bytes | str, prefix: str = DEFAULT_PREFIX) -> OwnerRecord | None:
    """The client's live owner record, or None."""
    c = _b(cid)
    raw = r.hget(keys(r, prefix).client(c)[0], c)
    rec = OwnerRecord.decode(raw) if raw is not None else None
    return rec if rec is not None and rec.live(time.time()) else None


def owners(r: redis_py.Redis, cids: Iterable[bytes | str], prefix: str = DEFAULT_PREFIX) -> dict[str, str | None]:
    """The owner node of many clients in one round trip, keyed by the id as str."""
    k, now = keys(r, prefix), time.time()
    ids = [_b(c) for c in cids]
    pipe = r.pipeline(transaction=False)
    for c in ids:
        pipe.hget(k.client(c)[0], c)
    out: dict[str, str | None] = {}
    for c, raw in zip(ids, pipe.execute()):
        rec = OwnerRecord.decode(raw) if raw is not None else None
        out[c.decode(errors="replace")] = rec.node if rec is not None and rec.live(now) else None
    return out


def pin(r: redis_py.Redis, cid: bytes | str, prefix: str = DEFAULT_PREFIX) -> PinRecord | None:
    c = _b(cid)
    raw = r.hget(keys(r, prefix).client(c)[1], c)
    return PinRecord.decode(raw) if raw is not None else None


def write_pin(r: redis_py.Redis, cid: bytes | str, node: str, *, reason: str = "", ttl: int | None = None,
              prefix: str = DEFAULT_PREFIX) -> None:
    """What ``mqtt-affinity pin`` writes."""
    c, now = _b(cid), int(time.time())
    r.hset(keys(r, prefix).client(c)[1], c, PinRecord(node, now + ttl if ttl else NEVER, now, reason).encode())


def delete_pin(r: redis_py.Redis, cid: bytes | str, prefix: str = DEFAULT_PREFIX) -> bool:
    c = _b(cid)
    return bool(r.hdel(keys(r, prefix).client(c)[1], c))


def write_owner(r: redis_py.Redis, cid: bytes | str, node: str, *, placed_at: int | None = None, by: str = "test",
                ttl: int | None = None, prefix: str = DEFAULT_PREFIX) -> None:
    """An owner record as an agent would have placed it (``ttl`` None: never expires)."""
    c, now = _b(cid), int(time.time())
    rec = OwnerRecord(node, now + ttl if ttl else NEVER, placed_at if placed_at is not None else now, by)
    r.hset(keys(r, prefix).client(c)[0], c, rec.encode())


def pin_first_and_drain(r: redis_py.Redis, ids: list[str], drained: str, nodes: Iterable[str], *,
                        reason: str = "") -> dict[str, str | None]:
    """Operator changes to check across a failover: the first of ``ids`` pinned to a node that is
    neither its owner nor ``drained``, and ``drained`` set to drain. Returns where each id must
    land from now on (its owner, the first one its pin)."""
    expected = owners(r, ids)
    target = next(n for n in nodes if n not in (expected[ids[0]], drained))
    write_pin(r, ids[0], target, reason=reason)
    r.hset(keys(r).node_state, drained, "drain")
    expected[ids[0]] = target
    return expected
