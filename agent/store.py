"""The shared placement record in Redis: one atomic round trip per decision.

Every HAProxy balancer runs its own agent; Redis is where they agree. The decision itself is
the Lua script ``agent/lua/decide.lua`` (run with EVALSHA, re-loaded on NOSCRIPT), so the
read, the rules and the write happen as one step and two agents racing on the same client
converge: the second one sees the first one's write.

The key layout (:class:`agent.model.Keys`) puts everything one decision touches in the
client's record bucket, so the script runs on Redis Cluster as well as on one Redis or a
Sentinel-managed primary: one layout for all three. What the script cannot touch (it would
be another slot) happens in calls of their own:

- the evacuation budget: when the owner is evacuating, the script answers ``hit`` with a flag;
  the store claims one move from the node's shared budget (``claim.lua``, one key) and, if
  granted, asks again with the token. Two more round trips, only for clients of an
  evacuating node.
- session counts per node: the agent holding the sweep lease sweeps every bucket
  (``sweep.lua``: drop expired records, count live ones per node) and publishes the counts in
  ``P sessions``. Counts are as fresh as the last sweep (``sweep_interval``).

Records written by version 1 of the layout (``P owner:<cid>`` HASH with a TTL, ``P pin:<cid>``)
are read through: the script moves a client's old keys into its bucket the first time it sees
it, until ``mqtt-affinity migrate`` has moved the rest and recorded it in ``P layout``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from agent.cluster import ClusterPipe
from agent.config import Config
from agent.endpoint import Kind, RedisEndpoint
from agent.logs import warn_limited
from agent.model import DEFAULT_BUCKETS, LAYOUT_VERSION, NEVER, SCRIPT_HOWS, How, Keys, OwnerRecord, lua_prelude
from agent.redis_pipe import NoScriptError
from agent.rules import NodeOverrides, parse_overrides

__all__ = ["Journal", "Layout", "RedisStore", "Script", "StoreDecision", "load_script"]

log = logging.getLogger("mqtt_affinity.redis")


#: Lua files each script needs before its own text (after the vocabulary prelude).
_INCLUDES = {"decide.lua": ("v1.lua",), "migrate.lua": ("v1.lua",)}


def load_script(name: str) -> str:
    """Lua source shipped as package data (``agent/lua/*.lua``): the vocabulary prelude, the
    shared pieces it includes, then the script itself."""
    files = resources.files("agent").joinpath("lua")
    parts = [lua_prelude()]
    parts += [files.joinpath(inc).read_text(encoding="utf-8") for inc in _INCLUDES.get(name, ())]
    parts.append(files.joinpath(name).read_text(encoding="utf-8"))
    return "\n".join(parts)


class Script:
    """A Lua script and its SHA1 (EVALSHA first: Redis has it unless it restarted)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = load_script(name)
        self.sha = hashlib.sha1(self.source.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class StoreDecision:
    node: str | None
    how: How
    previous: str | None = None
    pin_ignored: str | None = None


@dataclass(frozen=True, slots=True)
class Layout:
    """``P layout``: what every agent and the CLI must agree on."""

    version: int
    buckets: int
    #: Version-1 keys may still exist: decisions read them through.
    v1: bool


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


#: DEL + HSET as one step on one key (a MULTI on one key is not portable to every Cluster client).
REPLACE_HASH = "redis.call('DEL', KEYS[1]) if #ARGV > 0 then redis.call('HSET', KEYS[1], unpack(ARGV)) end return 1"


class Journal:
    """The placements this agent wrote in the last ``seconds`` (and at most ``limit`` of them).

    Why: Redis replicates asynchronously, so a failover can lose writes the old primary had
    acknowledged. A lost *assigned* record costs nothing (the HRW candidate is deterministic
    and re-derives the same node), but a lost move (evacuation, a dead owner) or pin would
    send the client back where its session no longer is. After a failover every agent writes
    back its recent placements (``restore.lua``: unless a newer one is there), before its
    decisions use Redis again.
    """

    def __init__(self, seconds: float, limit: int = 100_000) -> None:
        self.seconds = seconds
        self._entries: deque[tuple[float, bytes, bytes, bytes]] = deque(maxlen=limit)

    def add(self, cid: bytes, key: bytes, record: bytes) -> None:
        if self.seconds > 0:
            self._entries.append((time.monotonic(), cid, key, record))

    def entries(self) -> list[tuple[bytes, bytes, bytes]]:
        """(cid, key, record) of the last placement of each client still in the window."""
        horizon = time.monotonic() - self.seconds
        while self._entries and self._entries[0][0] < horizon:
            self._entries.popleft()
        latest = {cid: (cid, key, record) for _, cid, key, record in self._entries}
        return list(latest.values())

    def __len__(self) -> int:
        return len(self.entries())


def _field(info: str, name: str) -> str:
    for line in info.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return ""


def refresh_step(ttl: int) -> int:
    """A hit rewrites its record only when the expiry would move by this much (1/24 of the TTL):
    most reconnects then cost a read, and a record still lives at least 23/24 of its TTL
    after the client's last CONNECT."""
    return max(1, ttl // 24)


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
        buckets: int = DEFAULT_BUCKETS,
        wait_replicas: int = 0,
        wait_timeout: float = 0.1,
        journal_seconds: float = 30.0,
    ) -> None:
        if isinstance(endpoint, str):
            endpoint = RedisEndpoint.parse(endpoint)
        self.endpoint = endpoint
        #: Bucket count used when this store creates ``P layout``; the one in Redis wins.
        self._new_buckets = buckets
        self.keys = Keys(key_prefix, buckets)
        self.layout: Layout | None = None
        self._timeout = timeout
        self._wait_replicas = wait_replicas
        self._wait_timeout = wait_timeout
        #: Placements that reached fewer replicas than asked within the WAIT timeout.
        self.wait_short = 0
        #: Recent placements, written back after a failover (see :class:`Journal`).
        self.journal = Journal(journal_seconds)
        #: Who served the decisions last: a change means a failover or a restart.
        self._identity: object = None
        #: Placements written back by the journal (for tests and metrics).
        self.restored = 0
        # Socket timeouts are a floor above the per-call budget: the caller's timeout is the
        # real limit, these only stop a wedged socket from living forever.
        sock_timeout = max(timeout * 4, 0.25)
        connect_timeout = connect_timeout if connect_timeout is not None else sock_timeout
        # BlockingConnectionPool: the plain pool raises MaxConnectionsError past its size under
        # load; here excess callers queue (bounded by the caller's timeout). No retries: a
        # retry would only spend the caller's budget; the engine falls back.
        self._redis: Any = endpoint.async_client(
            max_connections=pool_size,
            timeout=sock_timeout,
            socket_timeout=sock_timeout,
            socket_connect_timeout=connect_timeout,
            health_check_interval=health_check_interval,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        self.decide_script = Script("decide.lua")
        self.claim_script = Script("claim.lua")
        self.sweep_script = Script("sweep.lua")
        self.restore_script = Script("restore.lua")
        # Decisions (the per-CONNECT hot path) go over one pipelined connection instead of
        # the pool: about 2x the throughput at concurrency 64, and no pool to starve.
        self._pipe: Any = endpoint.decision_connection(connect_timeout=connect_timeout)
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
            wait_replicas=config.redis_wait_replicas,
            wait_timeout=config.redis_wait_timeout,
            journal_seconds=config.failover_journal,
        )

    @property
    def buckets(self) -> int:
        return self.keys.buckets

    @property
    def redis(self) -> Any:
        """The redis-py client on the same endpoint (background work, tests)."""
        return self._redis

    # -- layout ----------------------------------------------------------------------------

    async def load_layout(self) -> Layout:
        """Read ``P layout``, creating it for a new deployment (first writer wins)."""
        async with self._gate:
            raw = await self._redis.hgetall(self.keys.layout)
            if not raw:
                await self._redis.hsetnx(self.keys.layout, "version", LAYOUT_VERSION)
                await self._redis.hsetnx(self.keys.layout, "buckets", self._new_buckets)
                raw = await self._redis.hgetall(self.keys.layout)
        layout = parse_layout(raw)
        if self.endpoint.kind is Kind.CLUSTER:
            # Version 1 never ran on a Cluster (its script was not single-slot): nothing to read through.
            layout = Layout(layout.version, layout.buckets, v1=False)
        if layout.version > LAYOUT_VERSION:
            raise RuntimeError(f"Redis holds layout version {layout.version}; this agent knows {LAYOUT_VERSION}")
        if self.layout is None or layout.buckets != self.layout.buckets:
            self.keys = self.keys.with_buckets(layout.buckets)
        self.layout = layout
        return layout

    # -- the decision ----------------------------------------------------------------------

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
        layout = self.layout
        if layout is None:
            raise RedisConnectionError("the key layout has not been read from Redis yet")
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
        keys = self.keys
        owners, pins = keys.client(cid)
        key_args: list[bytes] = [owners, pins]
        if layout.v1:
            key_args += [keys.v1_owner(cid), keys.v1_pin(cid)]
        ttl = int(ttl) if ttl else 0
        evac = evacuating or {}
        tail: list[bytes | str | int] = [
            "p" if persistent else "c", candidate or "", ttl, int(now), by[:32],
        ]
        usable_list = sorted(set(usable))
        grace = sorted(waiting)
        rest: list[bytes | str | int] = [
            refresh_step(ttl), len(usable_list), *usable_list, len(evac), *sorted(evac), len(grace), *grace,
        ]
        raw = await self._eval(self.decide_script, key_args, [cid, *tail, "", *rest], left)
        node, how, previous, pin_ignored, flag = (_text(x) for x in raw)
        if flag == "e" and node in evac:
            # The owner is evacuating: move only within the budget every agent shares.
            second = await self._eval(self.claim_script, [keys.evac_budget(node)], [max(0, int(evac[node]))], left)
            if second:
                tail[3] = int(second)  # now = the Redis second whose budget the move used
                raw = await self._eval(self.decide_script, key_args, [cid, *tail, node, *rest], left)
                node, how, previous, pin_ignored, flag = (_text(x) for x in raw)
        if how not in SCRIPT_HOWS:
            raise ValueError(f"decide.lua returned unknown how {how!r}")
        if flag == "w" and node:
            record = OwnerRecord(node, int(tail[3]) + ttl if ttl else NEVER, int(tail[3]), by[:32]).encode()
            self.journal.add(cid, owners, record)
            if self._wait_replicas:
                await self._wait(owners, left)
        return StoreDecision(node or None, How(how), previous or None, pin_ignored or None)

    async def _wait(self, key: bytes, left: Any) -> None:
        """WAIT for the replicas to have this placement (and every earlier write on this connection)."""
        budget = left()
        ms = int(self._wait_timeout * 1000) if budget is None else max(1, int(min(self._wait_timeout, budget) * 1000))
        acked = int(await self._pipe.execute("WAIT", self._wait_replicas, ms, key=key, timeout=left()))
        if acked < self._wait_replicas:
            self.wait_short += 1
            warn_limited(log, "wait-short", "a placement reached %d of %d replicas within %d ms (answered anyway)",
                         acked, self._wait_replicas, ms)

    async def _eval(self, script: Script, keys: list[bytes], args: list[Any], left: Any) -> Any:
        pipe, key = self._pipe, keys[0]  # every key of one call shares a slot: the first routes it
        try:
            return await pipe.execute("EVALSHA", script.sha, len(keys), *keys, *args, key=key, timeout=left())
        except NoScriptError:
            # Redis restarted or SCRIPT FLUSH (on a Cluster: this primary): load it again, once.
            await pipe.execute("SCRIPT", "LOAD", script.source, key=key, timeout=left())
            return await pipe.execute("EVALSHA", script.sha, len(keys), *keys, *args, key=key, timeout=left())

    # -- background ------------------------------------------------------------------------

    async def load_node_overrides(self) -> NodeOverrides:
        """node-state, node-weight and evacuate-rate in one round trip."""
        keys = self.keys
        async with self._gate, self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.node_state)
            pipe.hgetall(keys.node_weight)
            pipe.hgetall(keys.evacuate_rate)
            states, weights, rates = await pipe.execute()
        return parse_overrides(states, weights, rates)

    async def session_counts(self) -> tuple[dict[str, int], float | None]:
        """Sessions per node as counted by the last sweep, and when that sweep finished."""
        async with self._gate:
            raw = await self._redis.hgetall(self.keys.sessions)
        return parse_sessions(raw)

    async def take_sweep_lease(self, holder: str, seconds: float) -> bool:
        """Hold (or extend) the sweep lease: one agent sweeps at a time."""
        ms = max(1, int(seconds * 1000))
        async with self._gate:
            if await self._redis.set(self.keys.sweep_lease, holder, nx=True, px=ms):
                return True
            if _text(await self._redis.get(self.keys.sweep_lease)) == holder:
                await self._redis.pexpire(self.keys.sweep_lease, ms)
                return True
        return False

    async def prepare_sweep(self) -> None:
        """Load sweep.lua (once per pass: after a Redis restart it is gone)."""
        async with self._gate:
            await self._redis.script_load(self.sweep_script.source)

    async def sweep(self, buckets: Iterable[int], now: float) -> tuple[dict[str, int], int]:
        """Sweep some buckets (one pipeline): live sessions per node, and pins left."""
        keys = self.keys
        counts: dict[str, int] = {}
        pins = 0
        async with self._gate, self._redis.pipeline(transaction=False) as pipe:
            for b in buckets:
                # execute_command, not .evalsha: redis-py's cluster pipeline refuses the method
                # (a script may be missing on some node); prepare_sweep loaded it on every primary.
                pipe.execute_command("EVALSHA", self.sweep_script.sha, 2, keys.owners(b), keys.pins(b), int(now))
            replies = await pipe.execute()
        for reply in replies:
            pins += int(reply[0])
            for j in range(1, len(reply), 2):
                node = _text(reply[j])
                counts[node] = counts.get(node, 0) + int(reply[j + 1])
        return counts, pins

    async def publish_sessions(self, counts: Mapping[str, int], pins: int, at: float) -> None:
        """Replace ``P sessions`` with one sweep's totals (one key, one transaction)."""
        flat: list[Any] = [x for kv in {**counts, "_pins": pins, "_at": int(at)}.items() for x in kv]
        async with self._gate:
            await self._redis.eval(REPLACE_HASH, 1, self.keys.sessions, *flat)

    async def ping(self) -> None:
        """Raises unless Redis answers; also reconnects the decision connection, makes sure
        the scripts are loaded after a restart and reads the layout."""
        budget = max(self._timeout * 4, 0.25)
        if isinstance(self._pipe, ClusterPipe):
            await self._pipe.ping(budget)  # every primary; scripts load per primary on NOSCRIPT
            identity: object = frozenset(self._pipe.primaries)
        else:
            await self._pipe.connect()
            # Over the decision connection itself: a stalled one fails here and is replaced.
            await self._pipe.execute("PING", timeout=budget)
            scripts = (self.decide_script, self.claim_script)
            loaded = await self._pipe.execute("SCRIPT", "EXISTS", *(s.sha for s in scripts), timeout=budget)
            for script, present in zip(scripts, loaded):
                if not present:
                    await self._pipe.execute("SCRIPT", "LOAD", script.source, timeout=budget)
            info = _text(await self._pipe.execute("INFO", "server", timeout=budget))
            identity = (self._pipe.address, _field(info, "run_id"))
        await self.load_layout()
        if self._identity is not None and identity != self._identity:
            # Another primary (a failover) or a restarted Redis: the last acknowledged writes
            # may be gone. Put ours back before decisions use Redis again.
            log.warning("redis changed under us (failover or restart): writing back %d recent placements",
                        len(self.journal))
            self.restored += await self.replay(budget)
        self._identity = identity

    async def replay(self, timeout: float) -> int:
        """Write back the journal's placements (newer records win); how many were put back."""
        restored = 0
        for cid, key, record in self.journal.entries():
            restored += int(await self._eval(self.restore_script, [key], [cid, record], lambda: timeout))
        return restored

    async def reset_connections(self) -> None:
        """Close the idle pooled connections: after an outage they are dead sockets.

        Connections in use are left alone; if they are dead too, their command fails and
        redis-py disconnects them.
        """
        pool = getattr(self._redis, "connection_pool", None)
        if pool is not None:  # a Cluster client manages its nodes' connections itself
            await pool.disconnect(inuse_connections=False)

    async def close(self) -> None:
        await self._pipe.close()
        await self._redis.aclose()


def parse_layout(raw: Mapping[Any, Any]) -> Layout:
    """``P layout`` HGETALL -> Layout (a missing bucket count is the default)."""
    fields = {_text(k): _text(v) for k, v in raw.items()}
    try:
        version = int(fields.get("version", LAYOUT_VERSION))
        buckets = int(fields.get("buckets", DEFAULT_BUCKETS))
    except ValueError:
        raise ValueError(f"unreadable layout in Redis: {fields!r}") from None
    if buckets < 1:
        raise ValueError(f"unreadable layout in Redis: {fields!r}")
    return Layout(version, buckets, v1=fields.get("v1") != "gone")


def parse_sessions(raw: Mapping[Any, Any]) -> tuple[dict[str, int], float | None]:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    at = fields.pop("_at", None)
    fields.pop("_pins", None)
    counts: dict[str, int] = {}
    for node, n in fields.items():
        try:
            counts[node] = int(n)
        except ValueError:
            continue
    try:
        when = float(at) if at is not None else None
    except ValueError:
        when = None
    return counts, when
