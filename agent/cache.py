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

from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["CacheEntry", "OwnerCache"]


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
