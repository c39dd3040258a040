"""Every Redis read and write of the operator commands, and nothing else.

A thin layer on purpose: the client comes from :class:`agent.endpoint.RedisEndpoint` and key
names from :class:`agent.model.Keys`, so another kind of endpoint (Sentinel, Cluster) or
another key layout changes this module only. For the same reason no MULTI spans keys of
different kinds (they may live in different Cluster slots): a transaction covers one key,
and reads of several keys go in a plain pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from agent.endpoint import RedisEndpoint
from agent.model import Keys, NodeState
from agent.rules import NodeOverrides, parse_overrides, parse_state

__all__ = ["CONNS_STALE", "REDIS_TIMEOUT", "ClientRecord", "Connections", "RedisAccess"]

#: Socket timeout for every Redis call: long enough for a loaded server, short enough that an
#: operator at a terminal is not left waiting on a black-holed address.
REDIS_TIMEOUT = 2.0
_SCAN_COUNT = 1000
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
class Connections:
    """Client connections per node, summed over the HAProxy processes whose agents publish them."""

    per_node: Mapping[str, int]
    #: How many HAProxy processes (balancers) published fresh counts.
    balancers: int


class RedisAccess:
    """The operator commands' Redis: one synchronous client and one key prefix."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

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
        """Nodes Redis names: in ``node-state``, in ``node-weight`` or with a ``placed:<node>`` key."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hkeys(self.keys.node_state)
        pipe.hkeys(self.keys.node_weight)
        states, weights = pipe.execute()
        names = {_text(n) for n in (*states, *weights)}
        base = self.keys.raw + Keys.PLACED
        for key in self.client.scan_iter(match=self.keys.scan_pattern(Keys.PLACED), count=_SCAN_COUNT):
            names.add(_text(bytes(key)[len(base):]))
        return sorted(names)

    def client_record(self, cid: bytes) -> ClientRecord:
        owner_key, pin_key = self.keys.owner(cid), self.keys.pin(cid)
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(owner_key)
        pipe.ttl(owner_key)
        pipe.hgetall(pin_key)
        pipe.ttl(pin_key)
        owner, owner_ttl, pin, pin_ttl = pipe.execute()
        return ClientRecord(_hash(owner), _ttl(owner_ttl), _hash(pin), _ttl(pin_ttl))

    def live_sessions(self, nodes: Sequence[str], now: float) -> dict[str, int]:
        """Per node, the ``placed:<node>`` members whose record has not expired at ``now``."""
        if not nodes:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for node in nodes:
            pipe.zcount(self.keys.placed(node), f"({now}", "+inf")
        return {node: int(n) for node, n in zip(nodes, pipe.execute())}

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

    def count(self, infix: bytes) -> int:
        """Keys of one kind (``Keys.OWNER``, ``Keys.PIN``), counted with SCAN: safe on a busy Redis."""
        return sum(1 for _ in self.client.scan_iter(match=self.keys.scan_pattern(infix), count=_SCAN_COUNT))

    # -- writes --------------------------------------------------------------------------

    def write_pin(self, cid: bytes, node: str, *, reason: str, created_at: int, ttl: int | None) -> None:
        """Replace the client's pin as a whole (one key, one transaction); ``ttl`` None: no expiry."""
        key = self.keys.pin(cid)
        pipe = self.client.pipeline(transaction=True)
        # DEL first: a re-pin must not inherit the old pin's fields or expiry.
        pipe.delete(key)
        pipe.hset(key, mapping={"node": node, "reason": reason, "created_at": created_at})
        if ttl:
            pipe.expire(key, ttl)
        pipe.execute()

    def delete_pin(self, cid: bytes) -> bool:
        return bool(self.client.delete(self.keys.pin(cid)))

    def set_state(self, node: str, state: NodeState) -> NodeState:
        """Set the node's state; the state it had (what the agents read: invalid = active)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hget(self.keys.node_state, node)
        pipe.hset(self.keys.node_state, node, state.value)
        old, _ = pipe.execute()
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
