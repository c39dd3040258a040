"""Every Redis read and write of the operator commands, and nothing else.

A thin layer on purpose: the client comes from :class:`agent.endpoint.RedisEndpoint` and key
names from :class:`agent.model.Keys`, so another kind of endpoint (Sentinel, Cluster) or
another key layout changes this module only. For the same reason no MULTI spans keys of
different kinds (they may live in different Cluster slots): a transaction covers one key,
and reads of several keys go in a plain pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from agent.endpoint import RedisEndpoint
from agent.model import LAYOUT_VERSION, NEVER, Keys, NodeState, OwnerRecord, PinRecord
from agent.rules import NodeOverrides, parse_overrides, parse_state
from agent.store import REPLACE_HASH, Layout, load_script, parse_layout, parse_sessions

__all__ = ["CONNS_STALE", "REDIS_TIMEOUT", "ClientRecord", "Connections", "Migrated", "RedisAccess", "Totals"]

#: Socket timeout for every Redis call: long enough for a loaded server, short enough that an
#: operator at a terminal is not left waiting on a black-holed address.
REDIS_TIMEOUT = 2.0
_SCAN_COUNT = 1000
_SWEEP_BATCH = 512
#: HGET + HSET as one step on one key (a MULTI on one key is not portable to every Cluster client).
_GETSET_FIELD = (
    "local old = redis.call('HGET', KEYS[1], ARGV[1]) redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) return old"
)
#: Published connection counts older than this are ignored (agents refresh them every second).
CONNS_STALE = 10.0


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _hash(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _ttl(raw: Any) -> int | None:
    """TTL reply -> seconds; None for "no expiry" (-1) and for a key gone meanwhile (-2)."""
    ttl = int(raw)
    return ttl if ttl >= 0 else None


@dataclass(frozen=True, slots=True)
class ClientRecord:
    """What Redis holds about one client: its owner record and its pin (empty = none)."""

    owner: Mapping[str, str]
    owner_ttl: int | None
    pin: Mapping[str, str]
    pin_ttl: int | None


@dataclass(frozen=True, slots=True)
class Totals:
    """What the last record sweep counted."""

    sessions: Mapping[str, int]
    pins: int
    #: When the sweep finished (unix seconds); None: no sweep has run yet.
    at: float | None

    @property
    def records(self) -> int:
        return sum(self.sessions.values())


@dataclass(frozen=True, slots=True)
class Migrated:
    owners: int
    pins: int
    dropped: int


@dataclass(frozen=True, slots=True)
class Connections:
    """Client connections per node, summed over the HAProxy processes whose agents publish them."""

    per_node: Mapping[str, int]
    #: How many HAProxy processes (balancers) published fresh counts.
    balancers: int


def _left(expiry: int, now: float) -> int | None:
    return None if expiry == NEVER else max(0, int(expiry - now))


class RedisAccess:
    """The operator commands' Redis: one synchronous client and one key prefix."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self._keys = keys
        self._layout: Layout | None = None

    @classmethod
    def connect(cls, endpoint: RedisEndpoint, keys: Keys, *, timeout: float = REDIS_TIMEOUT) -> RedisAccess:
        """A client for ``endpoint`` (connects on first use, so this never fails on the network)."""
        client = endpoint.sync_client(
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One attempt: a retry only makes an operator wait longer for the same answer.
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        return cls(client, keys)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a dead connection must not mask the real error
            pass

    # -- layout --------------------------------------------------------------------------

    @property
    def layout(self) -> Layout:
        """``P layout`` as the agents read it (a deployment no agent has started yet: the defaults)."""
        if self._layout is None:
            self._layout = parse_layout(self.client.hgetall(self._keys.layout))
        return self._layout

    @property
    def keys(self) -> Keys:
        """Key names with the bucket count in force."""
        buckets = self.layout.buckets
        if buckets != self._keys.buckets:
            self._keys = self._keys.with_buckets(buckets)
        return self._keys

    def _script(self, name: str, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        """Run one of the agent's Lua scripts (the same text the agents load)."""
        return self.client.eval(load_script(name), len(keys), *keys, *args)

    # -- reads ---------------------------------------------------------------------------

    def overrides(self) -> NodeOverrides:
        """Node states, weight overrides and evacuation rates, parsed as the agents parse them."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.node_state)
        pipe.hgetall(self.keys.node_weight)
        pipe.hgetall(self.keys.evacuate_rate)
        states, weights, rates = pipe.execute()
        return parse_overrides(states, weights, rates)

    def named_nodes(self) -> list[str]:
        """Nodes Redis names: in ``node-state``, in ``node-weight`` or with counted sessions."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hkeys(self.keys.node_state)
        pipe.hkeys(self.keys.node_weight)
        states, weights = pipe.execute()
        names = {_text(n) for n in (*states, *weights)}
        names.update(self.totals().sessions)
        return sorted(names)

    def client_record(self, cid: bytes) -> ClientRecord:
        """The client's owner record and pin (expired ones count as none), as field mappings."""
        keys, now = self.keys, time.time()
        owners, pins = keys.client(cid)
        pipe = self.client.pipeline(transaction=False)
        pipe.hget(owners, cid)
        pipe.hget(pins, cid)
        owner_raw, pin_raw = pipe.execute()
        owner: dict[str, str] = {}
        pin: dict[str, str] = {}
        owner_ttl = pin_ttl = None
        if owner_raw is not None and (o := OwnerRecord.decode(owner_raw)).live(now):
            owner = {"node": o.node, "placed_at": str(o.placed_at), "by": o.by}
            owner_ttl = _left(o.expiry, now)
        if pin_raw is not None and (p := PinRecord.decode(pin_raw)).live(now):
            pin = {"node": p.node, "reason": p.reason, "created_at": str(p.created_at)}
            pin_ttl = _left(p.expiry, now)
        if self.layout.v1 and not (owner and pin):
            # Not migrated yet: the agents would read these through at the client's next CONNECT.
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(keys.v1_owner(cid))
            pipe.ttl(keys.v1_owner(cid))
            pipe.hgetall(keys.v1_pin(cid))
            pipe.ttl(keys.v1_pin(cid))
            v1_owner, v1_owner_ttl, v1_pin, v1_pin_ttl = pipe.execute()
            if not owner and v1_owner:
                owner, owner_ttl = _hash(v1_owner), _ttl(v1_owner_ttl)
            if not pin and v1_pin:
                pin, pin_ttl = _hash(v1_pin), _ttl(v1_pin_ttl)
        return ClientRecord(owner, owner_ttl, pin, pin_ttl)

    def totals(self) -> Totals:
        """Sessions per node and pins, as counted by the last sweep."""
        counts, at = parse_sessions(self.client.hgetall(self.keys.sessions))
        pins = self.client.hget(self.keys.sessions, "_pins")
        return Totals(counts, int(pins) if pins is not None else 0, at)

    def count_now(self) -> Totals:
        """Run a sweep pass now (as the agents do), publish and return its totals."""
        keys, now = self.keys, int(time.time())
        counts: dict[str, int] = {}
        pins = 0
        source = load_script("sweep.lua")
        sha = self.client.script_load(source)
        for start in range(0, keys.buckets, _SWEEP_BATCH):
            pipe = self.client.pipeline(transaction=False)
            for b in range(start, min(start + _SWEEP_BATCH, keys.buckets)):
                # execute_command: redis-py's cluster pipeline refuses .evalsha; the script is on every primary.
                pipe.execute_command("EVALSHA", sha, 2, keys.owners(b), keys.pins(b), now)  # type: ignore[no-untyped-call]
            for reply in pipe.execute():
                pins += int(reply[0])
                for j in range(1, len(reply), 2):
                    node = _text(reply[j])
                    counts[node] = counts.get(node, 0) + int(reply[j + 1])
        flat = [x for kv in {**counts, "_pins": pins, "_at": now}.items() for x in kv]
        self.client.eval(REPLACE_HASH, 1, keys.sessions, *flat)
        return Totals(counts, pins, float(now))

    def node_down(self) -> dict[str, float]:
        """``P node-down``: node -> unix time an agent's probes found it down (invalid entries dropped)."""
        out = {}
        for k, v in self.client.hgetall(self.keys.node_down).items():
            try:
                out[_text(k)] = float(_text(v))
            except ValueError:
                continue
        return out

    def connections(self, now: float) -> Connections | None:
        """The agents' published connection counts (``P conns:<haproxy>``), fresh ones only;
        None when no agent publishes any (none has ``haproxy_socket``)."""
        keys = list(self.client.scan_iter(match=self.keys.scan_pattern(Keys.CONNS), count=_SCAN_COUNT))
        if not keys:
            return None
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        per_node: dict[str, int] = {}
        balancers = 0
        for raw in pipe.execute():
            h = _hash(raw)
            try:
                at = float(h.pop("_at", "0"))
            except ValueError:
                continue
            if now - at > CONNS_STALE:
                continue
            balancers += 1
            for node, count in h.items():
                if count.isdigit():
                    per_node[node] = per_node.get(node, 0) + int(count)
        return Connections(per_node, balancers) if balancers else None


    # -- writes --------------------------------------------------------------------------

    def write_pin(self, cid: bytes, node: str, *, reason: str, created_at: int, ttl: int | None) -> None:
        """Replace the client's pin as a whole; ``ttl`` None: no expiry."""
        expiry = created_at + ttl if ttl else NEVER
        self.client.hset(self.keys.client(cid)[1], cid, PinRecord(node, expiry, created_at, reason).encode())
        if self.layout.v1:
            self.client.delete(self.keys.v1_pin(cid))  # else the agents would read an old pin through

    def delete_pin(self, cid: bytes) -> bool:
        removed = bool(self.client.hdel(self.keys.client(cid)[1], cid))
        if self.layout.v1:
            removed = bool(self.client.delete(self.keys.v1_pin(cid))) or removed
        return removed

    def set_state(self, node: str, state: NodeState) -> NodeState:
        """Set the node's state; the state it had (what the agents read: invalid = active)."""
        old = self.client.eval(_GETSET_FIELD, 1, self.keys.node_state, node, state.value)
        return (parse_state(old) if old is not None else None) or NodeState.ACTIVE

    def set_evacuate_rate(self, node: str, rate: int | None) -> None:
        """Set the node's evacuation rate, or remove it (None: the agents' default applies)."""
        if rate is None:
            self.client.hdel(self.keys.evacuate_rate, node)
        else:
            self.client.hset(self.keys.evacuate_rate, node, rate)

    def set_weight(self, node: str, weight: float) -> None:
        self.client.hset(self.keys.node_weight, node, f"{weight:g}")

    def reset_weight(self, node: str) -> bool:
        """Remove the override; whether there was one."""
        return bool(self.client.hdel(self.keys.node_weight, node))

    # -- migration -----------------------------------------------------------------------

    def migrate(self, *, dry_run: bool = False) -> Migrated:
        """Move every version-1 key into its bucket, drop the old index keys, record it in
        ``P layout``. Safe while agents serve: they do the same import in their decisions."""
        keys, now = self.keys, int(time.time())
        moved = {"owner": 0, "pin": 0}
        dropped = 0
        sha = "" if dry_run else str(self.client.script_load(load_script("migrate.lua")))
        for kind, infix, bucket_of in (
            ("owner", Keys.V1_OWNER, lambda c: keys.client(c)[0]),
            ("pin", Keys.V1_PIN, lambda c: keys.client(c)[1]),
        ):
            base = len(keys.raw + infix)
            for key in self.client.scan_iter(match=keys.scan_pattern(infix), count=_SCAN_COUNT):
                cid = bytes(key)[base:]
                if dry_run:
                    moved[kind] += 1
                else:
                    moved[kind] += int(self.client.evalsha(sha, 2, key, bucket_of(cid), cid, kind, now))  # type: ignore[no-untyped-call]
        for infix in (Keys.V1_PLACED, b"evac:"):
            for key in self.client.scan_iter(match=keys.scan_pattern(infix), count=_SCAN_COUNT):
                dropped += 1
                if not dry_run:
                    self.client.delete(key)
        if not dry_run:
            self.client.hset(keys.layout, mapping={"version": LAYOUT_VERSION, "buckets": keys.buckets, "v1": "gone"})
            self._layout = None
        return Migrated(moved["owner"], moved["pin"], dropped)
