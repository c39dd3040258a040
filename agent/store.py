"""The shared placement record in Redis: one atomic round trip per decision.

Every HAProxy balancer runs its own agent; Redis is where they agree. The decision itself is
the Lua script ``agent/lua/decide.lua`` (run with EVALSHA, re-loaded on NOSCRIPT), so the
read, the rules and the write happen as one step and two agents racing on the same client
converge: the second one sees the first one's write.

Key layout
==========

``P`` is ``config.key_prefix`` (default ``mqtt-affinity:``). ``<cid>`` is the client id's raw
bytes, unescaped: Redis keys are binary safe, and the fixed text between ``P`` and ``<cid>``
differs per key kind (``owner:`` vs ``pin:``), so no client id can reach another client's
key or another kind of key. Operators read and write these with redis-cli.

``P owner:<cid>``  HASH ``{node, placed_at, by}``
    Where the client's session lives. ``placed_at`` is unix seconds, ``by`` the balancer
    label (or agent id) that placed it. TTL = the record TTL (max(session_ttl, MQTT 5 session
    expiry)), refreshed on every persistent CONNECT; no TTL when the client asked for a
    session that never expires. Clean-session clients never create or refresh it.
``P pin:<cid>``  HASH ``{node, reason, created_at}``
    Operator override: the client goes to ``node`` while that node is usable. Optional
    EXPIRE set by the operator. A pin to an unusable node is ignored (and reported).
``P node-state``  HASH ``node -> active|drain|evacuate|maintenance``  (missing = active)
    drain: keeps its clients, gets no new ones. evacuate: as drain, and its clients are
    moved away as they reconnect, at most ``evacuate-rate`` per second across all agents.
    maintenance: gets nobody; its clients are moved on their next CONNECT.
``P node-weight``  HASH ``node -> weight``  (missing = configured weight; 0 = no new clients)
``P evacuate-rate``  HASH ``node -> moves per second``  (missing = config.evacuate_rate)
``P placed:<node>``  ZSET ``member <cid>, score = record expiry (unix seconds; 1e18 = never)``
    Maintained by the script on assign/refresh/move (ZREM from the old node on a move), so
    sessions per node are ``ZCOUNT P placed:<node> (<now> +inf`` and evacuation can enumerate.
    Members past their expiry are trimmed periodically by the engine (``trim_placed``).
``P evac:<node>:<unix second>``  STRING counter (INCR, EXPIRE 2); the second is Redis's own clock (TIME)
    The evacuation budget for one second, shared by every agent.

Key names are built by :class:`agent.model.Keys` only; the script gets the ``how`` values and
the infixes from the prelude :func:`agent.model.lua_prelude` generates.

The script derives ``placed:`` and ``evac:`` key names from ``P`` itself, so it needs a single
Redis (or a primary with replicas), not Redis Cluster.

Operator examples::

    redis-cli HGETALL 'mqtt-affinity:owner:sensor-17'
    redis-cli HSET mqtt-affinity:node-state broker-2 drain
    redis-cli HSET 'mqtt-affinity:pin:sensor-17' node broker-3 reason debug created_at 1700000000
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from agent.config import Config
from agent.endpoint import RedisEndpoint
from agent.model import SCRIPT_HOWS, How, Keys, lua_prelude
from agent.redis_pipe import NoScriptError, PipelinedRedis
from agent.rules import NodeOverrides, parse_overrides

__all__ = ["RedisStore", "StoreDecision", "load_script"]


def load_script(name: str = "decide.lua") -> str:
    """Lua source shipped as package data (``agent/lua/*.lua``), after the vocabulary prelude."""
    return lua_prelude() + resources.files("agent").joinpath("lua", name).read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class StoreDecision:
    node: str | None
    how: How
    previous: str | None = None
    pin_ignored: str | None = None


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


class RedisStore:
    """Async Redis access for the agent. Errors propagate: the engine owns fallback policy."""

    def __init__(
        self,
        endpoint: RedisEndpoint | str,
        *,
        key_prefix: str = "mqtt-affinity:",
        timeout: float = 0.05,
        pool_size: int = 32,
        health_check_interval: int = 5,
        connect_timeout: float | None = None,
    ) -> None:
        if isinstance(endpoint, str):
            endpoint = RedisEndpoint.parse(endpoint)
        self.endpoint = endpoint
        self.keys = Keys(key_prefix)
        self._timeout = timeout
        # Socket timeouts are a floor above the per-call budget: the caller's timeout is the
        # real limit, these only stop a wedged socket from living forever.
        sock_timeout = max(timeout * 4, 0.25)
        connect_timeout = connect_timeout if connect_timeout is not None else sock_timeout
        # BlockingConnectionPool: the plain pool raises MaxConnectionsError past its size under
        # load; here excess callers queue (bounded by the caller's timeout). No retries: a
        # retry would only spend the caller's budget; the engine falls back.
        self._pool = endpoint.async_pool(
            max_connections=pool_size,
            timeout=sock_timeout,
            socket_timeout=sock_timeout,
            socket_connect_timeout=connect_timeout,
            health_check_interval=health_check_interval,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        self._redis = Redis(connection_pool=self._pool)
        self._script = load_script("decide.lua")
        # EVALSHA first: Redis has the script unless it restarted (then NOSCRIPT loads it).
        self._sha = hashlib.sha1(self._script.encode("utf-8")).hexdigest()
        # Decisions (the per-CONNECT hot path) go over one pipelined connection instead of
        # the pool: about 2x the throughput at concurrency 64, and no pool to starve.
        self._pipe = PipelinedRedis(endpoint.pipe_target(), connect_timeout=connect_timeout)
        # A FIFO gate in front of the pool: redis-py's BlockingConnectionPool waits on an
        # asyncio.Condition, which is unfair: a task that just released a connection takes it
        # straight back, and under a sustained burst the woken waiters starve past their
        # deadline (measured: 32 of 64 tight-looping callers stalled > 1 s). With at most
        # pool_size callers inside, the pool never has to make anyone wait.
        self._gate = asyncio.Semaphore(pool_size)

    @classmethod
    def from_config(cls, config: Config) -> RedisStore:
        return cls(
            RedisEndpoint.parse(config.redis_url),
            key_prefix=config.key_prefix,
            timeout=config.redis_timeout,
            pool_size=config.redis_pool_size,
        )

    @property
    def redis(self) -> Redis:
        """The redis-py client on the same endpoint (background work, tests)."""
        return self._redis

    @property
    def script_sha(self) -> str:
        return self._sha

    async def decide(
        self,
        cid: bytes,
        *,
        persistent: bool,
        candidate: str | None,
        ttl: int | None,
        now: int,
        usable: Iterable[str],
        evacuating: Mapping[str, int] | None = None,
        waiting: Iterable[str] = (),
        by: str = "",
        timeout: float | None = None,
    ) -> StoreDecision:
        """Run decide.lua for one client. ``ttl`` None or 0 = the record never expires.

        ``timeout`` bounds the whole call (TimeoutError past it)."""
        usable_list = sorted(set(usable))
        evac = evacuating or {}
        keys = self.keys
        args: list[bytes | str | int] = [
            keys.raw,
            cid,
            "p" if persistent else "c",
            candidate or "",
            int(ttl) if ttl else 0,
            int(now),
            by,
            len(usable_list),
            *usable_list,
            len(evac),
        ]
        for node, rate in sorted(evac.items()):
            args.append(node)
            args.append(max(0, int(rate)))
        grace = sorted(waiting)
        args.append(len(grace))
        args.extend(grace)
        pipe = self._pipe
        loop = asyncio.get_running_loop()
        # One budget for the whole call, however many steps it takes.
        deadline = None if timeout is None else loop.time() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - loop.time())

        if not pipe.connected:
            # Rare (start-up, after an outage). Shielded: a caller that runs out of budget
            # must not cancel the attempt that other callers and the probe share.
            await asyncio.wait_for(asyncio.shield(pipe.connect()), left())
        owner, pin = keys.owner(cid), keys.pin(cid)
        try:
            raw = await pipe.execute("EVALSHA", self._sha, 2, owner, pin, *args, timeout=left())
        except NoScriptError:
            # Redis restarted or SCRIPT FLUSH: load it again, once.
            await self._load_script(left())
            raw = await pipe.execute("EVALSHA", self._sha, 2, owner, pin, *args, timeout=left())
        node, how, previous, pin_ignored = (_text(x) for x in raw)
        if how not in SCRIPT_HOWS:
            raise ValueError(f"decide.lua returned unknown how {how!r}")
        return StoreDecision(node or None, How(how), previous or None, pin_ignored or None)

    async def _load_script(self, timeout: float | None) -> None:
        sha = await self._pipe.execute("SCRIPT", "LOAD", self._script, timeout=timeout)
        self._sha = _text(sha)

    async def load_node_overrides(self) -> NodeOverrides:
        """node-state, node-weight and evacuate-rate in one round trip."""
        keys = self.keys
        async with self._gate, self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.node_state)
            pipe.hgetall(keys.node_weight)
            pipe.hgetall(keys.evacuate_rate)
            states, weights, rates = await pipe.execute()
        return parse_overrides(states, weights, rates)

    async def trim_placed(self, nodes: Iterable[str], now: float) -> int:
        """Drop expired members from each ``placed:<node>``; returns how many went."""
        names = sorted(set(nodes))
        if not names:
            return 0
        async with self._gate, self._redis.pipeline(transaction=False) as pipe:
            for node in names:
                pipe.zremrangebyscore(self.keys.placed(node), "-inf", f"({now}")
            removed = await pipe.execute()
        return sum(int(r) for r in removed)

    async def placed_counts(self, nodes: Iterable[str], now: float) -> dict[str, int]:
        """Sessions currently placed per node (records not yet expired), in one round trip."""
        names = sorted(set(nodes))
        if not names:
            return {}
        async with self._gate, self._redis.pipeline(transaction=False) as pipe:
            for node in names:
                pipe.zcount(self.keys.placed(node), f"({now}", "+inf")
            counts = await pipe.execute()
        return {node: int(c) for node, c in zip(names, counts)}

    async def ping(self) -> None:
        """Raises unless Redis answers; also reconnects the decision connection and makes
        sure the script is loaded after a restart."""
        await self._pipe.connect()
        # Over the decision connection itself: a stalled one fails here and is replaced.
        budget = max(self._timeout * 4, 0.25)
        await self._pipe.execute("PING", timeout=budget)
        if not (await self._pipe.execute("SCRIPT", "EXISTS", self._sha, timeout=budget))[0]:
            await self._load_script(budget)
        async with self._gate:
            await self._redis.ping()

    async def reset_connections(self) -> None:
        """Close the idle pooled connections: after an outage they are dead sockets.

        Connections in use are left alone; if they are dead too, their command fails and
        redis-py disconnects them.
        """
        await self._pool.disconnect(inuse_connections=False)

    async def close(self) -> None:
        await self._pipe.close()
        await self._redis.aclose(close_connection_pool=True)
