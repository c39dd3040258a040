"""A local cache of owner records and pins, kept honest by Redis (client-side caching).

A cache hit answers a CONNECT without a Redis round trip. It is only as good as its
coherence, so the rules are strict:

- **Invalidation by Redis.** A tracking connection subscribes to ``__redis__:invalidate``, and
  every decision connection turns on ``CLIENT TRACKING ... REDIRECT <id> BCAST PREFIX P{``:
  whenever any client (another agent, the CLI, redis-cli) writes a record bucket, Redis
  sends its key to every agent, and the entries of that bucket are dropped. BCAST, not the
  default mode, because the records are read inside a Lua script; the price is that a write
  drops every cached client of its bucket (a few dozen), which costs those clients one round
  trip next time, never a wrong answer.
- **No stale insert.** A decision's answer is cached only if no invalidation of its bucket
  arrived while it was in flight (a per-bucket epoch, :meth:`OwnerCache.epoch`): an answer
  read before another agent's write, arriving after that write's invalidation, is not kept.
- **All or nothing.** When the tracking connection is lost, or Redis is unavailable, the whole
  cache is dropped and stays off until tracking is on again.
- **Only plain hits.** The engine serves from the cache only when the rules give a hit or a
  pin that writes nothing, on a usable owner that is not evacuating (``rules.predict`` with
  the same inputs); anything that would write (a move, an assignment, a refresh of the
  record's expiry) goes to Redis, where the script is the one authority. Expiry refreshes of
  cached hits are written behind in batches.

The window left: an invalidation travels from Redis to this agent after the write; a CONNECT
decided here in between (well under a millisecond on a LAN) gets the previous answer.
``tests/test_cache.py`` measures it against a real Redis.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import hiredis

from agent.endpoint import PipeTarget
from agent.redis_pipe import PipelinedRedis, encode_command

__all__ = ["CacheEntry", "OwnerCache", "Tracker"]


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """What Redis held for one client after its last decision here ("" = no record / no pin)."""

    owner: str
    owner_expiry: int
    pin: str
    pin_expiry: int
    bucket: int


class OwnerCache:
    """LRU map client id -> CacheEntry, with per-bucket invalidation and epochs."""

    def __init__(self, buckets: int, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self.enabled = False
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self._by_bucket: dict[int, set[bytes]] = {}
        self._epochs = [0] * buckets
        self.hits = 0
        self.misses = 0
        self.invalidations = 0
        self.drops = 0

    def __len__(self) -> int:
        return len(self._entries)

    def resize(self, buckets: int) -> None:
        """The bucket count in force changed (read from Redis): nothing cached is valid."""
        self.clear()
        self._epochs = [0] * buckets

    def epoch(self, bucket: int) -> int:
        """Take this before asking Redis; pass it to :meth:`put` with the answer."""
        return self._epochs[bucket]

    def get(self, cid: bytes) -> CacheEntry | None:
        if not self.enabled:
            return None
        entry = self._entries.get(cid)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(cid)
        self.hits += 1
        return entry

    def put(self, cid: bytes, entry: CacheEntry, epoch: int) -> bool:
        """Cache ``entry`` unless its bucket was invalidated since ``epoch`` was taken."""
        if not self.enabled or self._epochs[entry.bucket] != epoch:
            return False
        old = self._entries.get(cid)
        if old is not None and old.bucket != entry.bucket:  # pragma: no cover - same id, same bucket
            self._forget(cid, old)
        self._entries[cid] = entry
        self._entries.move_to_end(cid)
        self._by_bucket.setdefault(entry.bucket, set()).add(cid)
        while len(self._entries) > self.capacity:
            old_cid, old_entry = self._entries.popitem(last=False)
            self._unindex(old_cid, old_entry)
        return True

    def forget(self, cid: bytes) -> None:
        entry = self._entries.pop(cid, None)
        if entry is not None:
            self._unindex(cid, entry)

    def invalidate(self, bucket: int) -> None:
        """Redis says a key of ``bucket`` changed: drop its entries, move its epoch on."""
        self._epochs[bucket] += 1
        self.invalidations += 1
        for cid in self._by_bucket.pop(bucket, ()):
            self._entries.pop(cid, None)

    def clear(self) -> None:
        """Drop everything (tracking lost, Redis unavailable, a failover)."""
        if self._entries:
            self.drops += 1
        self._entries.clear()
        self._by_bucket.clear()
        self._epochs = [e + 1 for e in self._epochs]

    def _forget(self, cid: bytes, entry: CacheEntry) -> None:
        self._entries.pop(cid, None)
        self._unindex(cid, entry)

    def _unindex(self, cid: bytes, entry: CacheEntry) -> None:
        members = self._by_bucket.get(entry.bucket)
        if members is not None:
            members.discard(cid)
            if not members:
                del self._by_bucket[entry.bucket]


class _Subscriber(asyncio.Protocol):
    """The tracking connection: CLIENT ID, SUBSCRIBE __redis__:invalidate, then invalidations."""

    def __init__(self, tracker: Tracker) -> None:
        self._tracker = tracker
        self._reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.replies: deque[asyncio.Future[Any]] = deque()
        self.subscribed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (msg := self._reader.gets()) is not False:
            if self.subscribed and isinstance(msg, list) and msg and msg[0] == b"message":
                self._tracker.invalidated(msg[2])
            elif self.replies:
                fut = self.replies.popleft()
                if not fut.done():
                    fut.set_result(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in self.replies:
            if not fut.done():
                fut.set_exception(ConnectionError("tracking connection lost"))
        self._tracker.lost(self)

    def ask(self, *args: bytes | str | int) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.replies.append(fut)
        assert self.transport is not None
        self.transport.write(encode_command(args))
        return fut


class Tracker:
    """Keeps one decision connection's client-side caching honest (see the module docstring).

    ``pipe`` is the decision connection (``PipelinedRedis``) whose keys are tracked; the
    tracking connection goes to the same server. The cache is enabled only while both are up
    and ``CLIENT TRACKING`` is on; any loss drops it whole.
    """

    def __init__(self, cache: OwnerCache, pipe: PipelinedRedis, target: Callable[[], Awaitable[PipeTarget]],
                 prefix: bytes, *, on_change: Callable[[], None], timeout: float = 1.0) -> None:
        self._cache = cache
        self._on_change = on_change
        self._pipe = pipe
        self._target = target
        self._prefix = prefix
        self._timeout = timeout
        self._sub: _Subscriber | None = None
        self.active = False
        self.client_id: int | None = None
        self._pipe_generation = -1

    def invalidated(self, keys: Any) -> None:
        cache = self._cache
        if keys is None:  # FLUSHDB/FLUSHALL: everything
            cache.clear()
            return
        plen = len(self._prefix)
        for key in keys:
            # P{<bucket>}o / P{<bucket>}p: the bucket number between the braces
            end = key.find(b"}", plen)
            try:
                cache.invalidate(int(key[plen + 1:end]))
            except ValueError:
                cache.clear()  # not ours to parse: be safe

    def lost(self, sub: _Subscriber) -> None:
        if sub is self._sub:
            self._sub = None
            self._off()

    def pipe_lost(self) -> None:
        """The tracked decision connection is gone: Redis stopped tracking for it."""
        self._off()

    def _off(self) -> None:
        if self.active:
            self.active = False
            self._on_change()
        self._cache.clear()

    async def ensure(self) -> None:
        """Tracking on for the decision connection as it is now; raises if that cannot be done."""
        if self.active and self._sub is not None and self._pipe_generation == self._pipe.generation:
            return
        self._off()
        if self._sub is None or self._sub.transport is None or self._sub.transport.is_closing():
            t = await self._target()
            loop = asyncio.get_running_loop()
            sub = _Subscriber(self)
            if t.path is not None:
                await loop.create_unix_connection(lambda: sub, t.path)
            else:
                assert t.host is not None
                await loop.create_connection(lambda: sub, t.host, t.port, ssl=t.ssl, server_hostname=t.server_hostname)
            self._sub = sub
            async with asyncio.timeout(self._timeout):
                for cmd in t.setup_commands():
                    if cmd[0] == "AUTH":
                        await sub.ask(*cmd)
                self.client_id = int(await sub.ask("CLIENT", "ID"))
                await sub.ask("SUBSCRIBE", "__redis__:invalidate")
                sub.subscribed = True
        generation = self._pipe.generation
        assert self.client_id is not None
        async with asyncio.timeout(self._timeout):
            await self._pipe.execute("CLIENT", "TRACKING", "OFF")
            await self._pipe.execute("CLIENT", "TRACKING", "ON", "REDIRECT", self.client_id, "BCAST",
                                     "PREFIX", self._prefix + b"{")
        if generation != self._pipe.generation or self._sub is None:
            raise ConnectionError("the decision connection changed while tracking was turned on")
        self._pipe_generation = generation
        self.active = True
        self._on_change()

    async def close(self) -> None:
        self._off()
        sub, self._sub = self._sub, None
        if sub is not None and sub.transport is not None:
            sub.transport.close()
