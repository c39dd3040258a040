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
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from agent.cache import OwnerCache, Tracker
from agent.cluster import ClusterPipe
from agent.config import Config
from agent.endpoint import Kind, PipeTarget, RedisEndpoint
from agent.logs import warn_limited
from agent.model import DEFAULT_BUCKETS, LAYOUT_VERSION, NEVER, SCRIPT_HOWS, How, Keys, OwnerRecord, lua_prelude
from agent.redis_pipe import NoScriptError, PipelinedRedis, encode_args
from agent.rules import NodeOverrides, parse_overrides

__all__ = ["Answer", "Journal", "Layout", "NodeArgs", "RedisStore", "Script", "StoreDecision", "load_script"]

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


class NodeArgs:
    """The decision arguments every CONNECT shares while config, health and overrides stay
    the same (usable, evacuating and waiting nodes), encoded once as a RESP piece, with the
    evacuation rates the budget claims need. The engine builds one per change, not per CONNECT."""

    __slots__ = ("count", "piece", "rates")

    def __init__(self, usable: Iterable[str], evacuating: Mapping[str, int], waiting: Iterable[str]) -> None:
        u, e, w = sorted(set(usable)), sorted(evacuating), sorted(set(waiting))
        args: list[bytes | str | int] = [len(u), *u, len(e), *e, len(w), *w]
        self.piece = encode_args(args)
        self.count = len(args)
        self.rates = dict(evacuating)


class Answer:
    """One decision's result, and the client's record and pin after it (what may be cached)."""

    __slots__ = ("how", "node", "owner", "owner_expiry", "pin", "pin_expiry", "pin_ignored", "previous")

    def __init__(self, node: str | None, how: How, previous: str | None, pin_ignored: str | None,
                 owner: str, owner_expiry: int, pin: str, pin_expiry: int) -> None:
        self.node = node
        self.how = how
        self.previous = previous
        self.pin_ignored = pin_ignored
        self.owner = owner
        self.owner_expiry = owner_expiry
        self.pin = pin
        self.pin_expiry = pin_expiry


_HOWS = {h.value: h for h in SCRIPT_HOWS}


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _answer(values: list[Any], at: int) -> tuple[Answer, str]:
    """The 9 values decide.lua returns for one decision, from ``at``."""
    node, how, previous, pin_ignored, flag, owner, owner_expiry, pin, pin_expiry = values[at:at + 9]
    h = _HOWS.get(_s(how))
    if h is None:
        raise ValueError(f"decide.lua returned unknown how {how!r}")
    return Answer(_s(node) or None, h, _s(previous) or None, _s(pin_ignored) or None,
                  _s(owner), int(owner_expiry), _s(pin), int(pin_expiry)), _s(flag)


class _Call:
    """One decision waiting for its batch."""

    __slots__ = ("bucket", "by", "callback", "candidate", "cid", "keys", "node_args", "now", "owners",
                 "persistent", "timeout", "token", "ttl")

    def __init__(self, cid: bytes, bucket: int, owners: bytes, keys: list[bytes], persistent: bool,
                 candidate: str, ttl: int, now: int, by: str, token: str, node_args: NodeArgs,
                 callback: Callable[[Answer | None, BaseException | None], None], timeout: float | None) -> None:
        self.cid = cid
        self.bucket = bucket
        self.owners = owners
        self.keys = keys
        self.persistent = persistent
        self.candidate = candidate
        self.ttl = ttl
        self.now = now
        self.by = by
        self.token = token
        self.node_args = node_args
        self.callback = callback
        self.timeout = timeout


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


#: Journal placements in flight at once while they are written back after a failover.
REPLAY_CHUNK = 500


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


async def _close_quietly(client: Any) -> None:
    try:
        await client.aclose()
    except Exception as exc:  # a client of a dead node
        log.debug("closing an old Redis client: %s", exc)


def _fixed(target: PipeTarget) -> Callable[[], Awaitable[PipeTarget]]:
    async def get() -> PipeTarget:
        return target

    return get


def _field(info: str, name: str) -> str:
    for line in info.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return ""


#: Seconds between write-behind flushes of the expiry refreshes of cached hits.
REFRESH_EVERY = 1.0


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
        batch: int = 16,
        cache_size: int = 0,
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
        #: Decisions per EVALSHA at most (1: every decision its own call, all pipelined).
        self.batch = max(1, batch)
        self._cluster = endpoint.kind is Kind.CLUSTER
        self._pending: dict[tuple[NodeArgs, int, int], list[_Call]] = {}
        self._flush_scheduled = False
        self._reconnecting: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        #: The local cache of records, kept honest by CLIENT TRACKING (size 0: none).
        self.cache = OwnerCache(self.keys.buckets, cache_size)
        self._trackers: dict[object, Tracker] = {}
        self._refreshes: dict[int, list[tuple[bytes, str, int]]] = {}
        self._refresh_ids: set[bytes] = set()
        self._refresh_timer: asyncio.TimerHandle | None = None
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
        #: The new identity whose write-back is under way, and what is left to write back.
        self._replaying_for: object = None
        self._to_replay: list[tuple[bytes, bytes, bytes]] = []
        # Socket timeouts are a floor above the per-call budget: the caller's timeout is the
        # real limit, these only stop a wedged socket from living forever.
        sock_timeout = max(timeout * 4, 0.25)
        connect_timeout = connect_timeout if connect_timeout is not None else sock_timeout
        # BlockingConnectionPool: the plain pool raises MaxConnectionsError past its size under
        # load; here excess callers queue (bounded by the caller's timeout). No retries: a
        # retry would only spend the caller's budget; the engine falls back.
        self._client_options: dict[str, Any] = dict(
            max_connections=pool_size,
            timeout=sock_timeout,
            socket_timeout=sock_timeout,
            socket_connect_timeout=connect_timeout,
            health_check_interval=health_check_interval,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        self._redis: Any = endpoint.async_client(**self._client_options)
        self.decide_script = Script("decide.lua")
        self.claim_script = Script("claim.lua")
        self.sweep_script = Script("sweep.lua")
        self.restore_script = Script("restore.lua")
        self.refresh_script = Script("refresh.lua")
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
            batch=config.decision_batch,
            cache_size=config.cache_size,
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
            self.cache.resize(layout.buckets)
        self.layout = layout
        return layout

    # -- the decision ----------------------------------------------------------------------

    def submit(
        self,
        cid: bytes,
        *,
        persistent: bool,
        candidate: str | None,
        ttl: int,
        now: int,
        node_args: NodeArgs,
        by: str,
        callback: Callable[[Answer | None, BaseException | None], None],
        timeout: float | None,
        token: str = "",
        bucket: int | None = None,
    ) -> None:
        """Queue one decision; ``callback(answer, None)`` or ``callback(None, error)`` later.

        Decisions queued in the same turn of the event loop leave together, at the end of the
        turn: up to ``batch`` of them per ``EVALSHA`` (decide.lua loops over them; on a Cluster
        only decisions of one slot share a call), every call in one write. Never raises.
        """
        layout = self.layout
        if layout is None:
            callback(None, RedisConnectionError("the key layout has not been read from Redis yet"))
            return
        if not self._pipe.connected:
            self._reconnect_soon()
            callback(None, RedisConnectionError("not connected to Redis"))
            return
        keys = self.keys
        if bucket is None:
            bucket = keys.bucket(cid)
        owners, pins = keys.owners(bucket), keys.pins(bucket)
        key_list = [owners, pins, keys.v1_owner(cid), keys.v1_pin(cid)] if layout.v1 else [owners, pins]
        call = _Call(cid, bucket, owners, key_list, persistent, candidate or "", ttl, now, by[:32], token,
                     node_args, callback, timeout)
        group = (node_args, now, key_slot(owners) if self._cluster else 0)
        pending = self._pending.get(group)
        if pending is None:
            pending = self._pending[group] = []
        pending.append(call)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """The rare multi-step decisions (evacuation, WAIT, a script reload) run as tasks."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reconnect_soon(self) -> None:
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        try:
            await self._pipe.connect()
        except Exception as exc:  # the breaker's probe tries again
            log.debug("decision connection: %s", exc)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for (node_args, now, _), calls in pending.items():
            for start in range(0, len(calls), self.batch):
                self._send(calls[start:start + self.batch], node_args, now)

    def _send(self, calls: list[_Call], node_args: NodeArgs, now: int, retried: bool = False) -> None:
        stride = len(calls[0].keys)
        nkeys = stride * len(calls)
        head: list[bytes | str | int] = [b"EVALSHA", self.decide_script.sha, nkeys]
        pieces = [encode_args(head)]
        pieces += [encode_args(c.keys) for c in calls]
        pieces.append(encode_args([len(calls), stride, now]))
        pieces.append(node_args.piece)
        for c in calls:
            pieces.append(encode_args([c.cid, "p" if c.persistent else "c", c.candidate, c.ttl,
                                       refresh_step(c.ttl), c.by, c.token]))
        nargs = len(head) + nkeys + 3 + node_args.count + 7 * len(calls)
        data = b"*%d\r\n" % nargs + b"".join(pieces)

        def reply(value: Any, exc: BaseException | None) -> None:
            if exc is not None:
                if isinstance(exc, NoScriptError) and not retried:
                    # Redis restarted or SCRIPT FLUSH (on a Cluster: this primary): load it, once.
                    self._spawn(self._reload_and_resend(calls, node_args, now))
                    return
                for c in calls:
                    c.callback(None, exc)
                return
            for n, c in enumerate(calls):
                try:
                    answer, flag = _answer(value, 9 * n)
                except Exception as bad:  # a script of another version, say
                    c.callback(None, bad)
                    continue
                self._answered(c, answer, flag)

        self._pipe.submit(data, reply, calls[0].timeout, key=calls[0].owners)

    async def _reload_and_resend(self, calls: list[_Call], node_args: NodeArgs, now: int) -> None:
        try:
            await self._pipe.execute("SCRIPT", "LOAD", self.decide_script.source, key=calls[0].owners,
                                     timeout=calls[0].timeout)
        except Exception as exc:
            for c in calls:
                c.callback(None, exc)
            return
        self._send(calls, node_args, now, retried=True)

    def _answered(self, call: _Call, answer: Answer, flag: str) -> None:
        if flag == "e" and answer.node in call.node_args.rates:
            # The owner is evacuating: move only within the budget every agent shares.
            self._spawn(self._evacuate(call, answer))
            return
        if flag == "w" and answer.node:
            record = OwnerRecord(answer.node, call.now + call.ttl if call.ttl else NEVER, call.now, call.by)
            self.journal.add(call.cid, call.owners, record.encode())
            if self._wait_replicas:
                self._spawn(self._wait_then(call, answer))
                return
        call.callback(answer, None)

    async def _evacuate(self, call: _Call, answer: Answer) -> None:
        node = answer.node
        assert node is not None
        try:
            rate = max(0, int(call.node_args.rates[node]))
            second = await self._eval(self.claim_script, [self.keys.evac_budget(node)], [rate],
                                      lambda: call.timeout)
        except Exception as exc:
            call.callback(None, exc)
            return
        if not second:
            call.callback(answer, None)  # no move left this second: it stays, this time
            return
        # Asked again with the token, as of the Redis second whose budget the move used.
        self.submit(call.cid, persistent=call.persistent, candidate=call.candidate, ttl=call.ttl, now=int(second),
                    node_args=call.node_args, by=call.by, callback=call.callback, timeout=call.timeout, token=node)

    async def _wait_then(self, call: _Call, answer: Answer) -> None:
        """WAIT for the replicas to have this placement (and every earlier write on this connection)."""
        ms = max(1, int(self._wait_timeout * 1000))
        try:
            acked = int(await self._pipe.execute("WAIT", self._wait_replicas, ms, key=call.owners,
                                                 timeout=self._wait_timeout + (call.timeout or 0)))
        except Exception as exc:
            call.callback(None, exc)
            return
        if acked < self._wait_replicas:
            self.wait_short += 1
            warn_limited(log, "wait-short", "a placement reached %d of %d replicas within %d ms (answered anyway)",
                         acked, self._wait_replicas, ms)
        call.callback(answer, None)

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
        """One decision, awaited (tests and tools; the agent's hot path uses :meth:`submit`).
        ``ttl`` None or 0 = the record never expires; ``timeout`` bounds the whole call."""
        if not self._pipe.connected:
            await asyncio.wait_for(asyncio.shield(self._pipe.connect()), timeout)
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()

        def done(answer: Answer | None, exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                assert answer is not None
                fut.set_result(answer)

        self.submit(cid, persistent=persistent, candidate=candidate, ttl=int(ttl) if ttl else 0, now=int(now),
                    node_args=NodeArgs(usable, evacuating or {}, waiting), by=by, callback=done, timeout=timeout)
        a = await fut
        return StoreDecision(a.node, a.how, a.previous, a.pin_ignored)

    # -- client-side caching ---------------------------------------------------------------

    def bucket(self, cid: bytes) -> int:
        return self.keys.bucket(cid)

    def prepare(self, usable: Iterable[str], evacuating: Mapping[str, int], waiting: Iterable[str]) -> NodeArgs:
        return NodeArgs(usable, evacuating, waiting)

    def queue_refresh(self, cid: bytes, bucket: int, node: str, expiry: int) -> None:
        """Write behind (a cached hit): collected, then written per bucket once a second."""
        if cid in self._refresh_ids:
            return
        self._refresh_ids.add(cid)
        self._refreshes.setdefault(bucket, []).append((cid, node, expiry))
        if self._refresh_timer is None:
            loop = asyncio.get_running_loop()
            self._refresh_timer = loop.call_later(REFRESH_EVERY, self._flush_refreshes)

    def _flush_refreshes(self) -> None:
        self._refresh_timer = None
        refreshes, self._refreshes = self._refreshes, {}
        self._refresh_ids.clear()
        if refreshes and self._pipe.connected:
            self.refresh_records(refreshes, int(time.time()))

    def _tracking_changed(self) -> None:
        trackers = self._trackers
        self.cache.enabled = bool(trackers) and all(t.active for t in trackers.values())

    async def keep_tracking(self) -> None:
        """Turn CLIENT TRACKING on wherever it is off (each primary's decision connection);
        the cache is used only while it is on everywhere. Cheap when nothing changed."""
        if self.cache.capacity <= 0 or self.layout is None:
            return
        pipes: dict[object, PipelinedRedis]
        targets: dict[object, Callable[[], Awaitable[PipeTarget]]]
        if isinstance(self._pipe, ClusterPipe):
            pipes = {addr: self._pipe.node_pipe(addr) for addr in self._pipe.primaries}
            targets = {addr: _fixed(self.endpoint.pipe_target(*addr)) for addr in self._pipe.primaries}
        else:
            pipes = {"": self._pipe}
            targets = {"": self._target_now}
        for gone in [k for k in self._trackers if k not in pipes]:
            await self._trackers.pop(gone).close()
        for k, pipe in pipes.items():
            tracker = self._trackers.get(k)
            if tracker is None:
                tracker = self._trackers[k] = Tracker(self.cache, pipe, targets[k], self.keys.raw,
                                                      on_change=self._tracking_changed, timeout=self._timeout * 4)
                pipe.on_lost = tracker.pipe_lost
            if not pipe.connected:
                continue
            try:
                await tracker.ensure()
            except Exception as exc:
                log.debug("client-side caching off: %s", exc)
        self._tracking_changed()

    async def _target_now(self) -> PipeTarget:
        if self.endpoint.kind is Kind.SENTINEL:
            target: PipeTarget = await self.endpoint.locator().target()
            return target
        return self.endpoint.pipe_target()

    def refresh_records(self, refreshes: Mapping[int, list[tuple[bytes, str, int]]], now: int) -> None:
        """Write behind: extend the expiry of records answered from the cache (``refresh.lua``,
        one call per bucket, all in one write; failures only cost the records some TTL)."""
        for bucket, items in refreshes.items():
            args: list[bytes | str | int] = [now]
            for cid, node, expiry in items:
                args += [cid, node, expiry]
            key = self.keys.owners(bucket)
            self._spawn(self._refresh_bucket(key, args))

    async def _refresh_bucket(self, key: bytes, args: list[bytes | str | int]) -> None:
        try:
            await self._eval(self.refresh_script, [key], args, lambda: self._timeout * 4)
        except Exception as exc:  # only costs the records some TTL; the next hit queues them again
            log.debug("write-behind refresh failed: %s", exc)

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
        changed = self._identity is not None and identity != self._identity
        if changed and identity != self._replaying_for:
            # Another primary (a failover) or a restarted Redis: the last acknowledged writes
            # may be gone. Ours go back before decisions use Redis again.
            self._replaying_for = identity
            self._to_replay = self.journal.entries()
            log.warning("redis changed under us (failover or restart): writing back %d recent placements",
                        len(self._to_replay))
            if self._cluster:
                # redis-py's cluster client keeps asking a dead primary for its slots (it never
                # re-reads the topology on a refused connection): a new one reads it afresh.
                old, self._redis = self._redis, self.endpoint.async_client(**self._client_options)
                self._spawn(_close_quietly(old))
        await self.load_layout()
        if changed:
            await self.replay(budget)
        self._identity = identity
        self._replaying_for = None

    async def replay(self, timeout: float) -> None:
        """Write back the journal's placements that are still to go back (newer records win).

        Batched and pipelined: one ``restore.lua`` call per bucket, up to ``REPLAY_CHUNK``
        placements in flight. Progress is kept: when a probe's time runs out, the next probe
        goes on where this one stopped, so a journal of any size goes back in finitely many
        probes (sent one by one, 400 placements outlasted the 0.5 s probe on a busy machine,
        and every probe then started over: decisions never came back to Redis).
        """
        pending = self._to_replay
        if pending:
            await self._load_everywhere(self.restore_script, timeout)
        while pending:
            chunk = pending[-REPLAY_CHUNK:]
            groups: dict[bytes, list[bytes | str | int]] = {}
            for cid, key, record in chunk:
                groups.setdefault(key, []).extend((cid, record))
            await asyncio.gather(*(self._restore(key, args, timeout) for key, args in groups.items()))
            del pending[-len(chunk):]

    async def _restore(self, key: bytes, args: list[bytes | str | int], timeout: float) -> None:
        n = int(await self._eval(self.restore_script, [key], args, lambda: timeout))
        self.restored += n  # after the await: ``self.restored += await ...`` reads it before

    async def _load_everywhere(self, script: Script, timeout: float) -> None:
        """SCRIPT LOAD on every primary (a promoted replica has no scripts): saves a NOSCRIPT
        round trip per call when many calls go at once."""
        pipe = self._pipe
        pipes = ([pipe.node_pipe(a) for a in pipe.primaries] if isinstance(pipe, ClusterPipe) else [pipe])
        await asyncio.gather(*(p.execute("SCRIPT", "LOAD", script.source, timeout=timeout) for p in pipes))

    async def reset_connections(self) -> None:
        """Close the idle pooled connections: after an outage they are dead sockets.

        Connections in use are left alone; if they are dead too, their command fails and
        redis-py disconnects them.
        """
        pool = getattr(self._redis, "connection_pool", None)
        if pool is not None:  # a Cluster client manages its nodes' connections itself
            await pool.disconnect(inuse_connections=False)

    async def close(self) -> None:
        if self._refresh_timer is not None:
            self._refresh_timer.cancel()
            self._flush_refreshes()
        for tracker in self._trackers.values():
            await tracker.close()
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
