"""Redis Cluster: one pipelined connection per primary on the hot path, redis-py for the rest.

redis-py's asyncio ``RedisCluster`` serves for background work (node states, the sweep, the
layout) and the CLI: it discovers slots and follows ``MOVED``/``ASK`` by itself. What it lacks
for the per-CONNECT path is what :mod:`agent.redis_pipe` exists for: its client checks a
connection out per command and pays several coroutine layers each time. :class:`ClusterPipe`
keeps one :class:`~agent.redis_pipe.PipelinedRedis` per primary, routes each command by the
slot of its key (every key of one decision is in the client's slot, so a decision is one
command to one primary), and follows redirections:

- ``MOVED slot host:port``: the slot lives elsewhere now. The map entry is fixed at once, the
  command is sent there, and a full slot refresh follows.
- ``ASK slot host:port``: one command to that node, preceded by ``ASKING`` on the same
  connection (both queued back to back, so nothing can come between them).
- A primary that fails: its connection errors; the engine falls back and its breaker's probe
  (:meth:`ClusterPipe.ping`) re-reads the slots until the promoted replica serves them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from agent.redis_pipe import PipelinedRedis, RedisReplyError, Reply, encode_command

if TYPE_CHECKING:
    from agent.endpoint import RedisEndpoint

__all__ = ["ClusterPipe", "async_cluster_client", "parse_slots"]

log = logging.getLogger("mqtt_affinity.redis")

SLOTS = 16384
MAX_REDIRECTS = 3

Address = tuple[str, int]


def parse_slots(reply: Any) -> list[tuple[int, int, Address]]:
    """``CLUSTER SLOTS`` -> (first slot, last slot, primary address)."""
    out = []
    for entry in reply:
        first, last, primary = int(entry[0]), int(entry[1]), entry[2]
        host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
        out.append((first, last, (host, int(primary[1]))))
    return out


def _ignore(value: Any, exc: BaseException | None) -> None:
    pass


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return host, int(port)


class ClusterPipe:
    """The decision connection on a Redis Cluster: same interface as ``PipelinedRedis``."""

    def __init__(self, endpoint: RedisEndpoint, *, connect_timeout: float = 1.0) -> None:
        self._endpoint = endpoint
        self._connect_timeout = connect_timeout
        self._slots: list[Address | None] = [None] * SLOTS
        #: The primaries serving every slot (None until the map is complete).
        self._primaries: frozenset[Address] | None = None
        self._pipes: dict[Address, PipelinedRedis] = {}
        self._refreshing: asyncio.Task[None] | None = None

    # -- state -------------------------------------------------------------------------------

    @property
    def primaries(self) -> frozenset[Address]:
        return self._primaries or frozenset()

    @property
    def connected(self) -> bool:
        """Every slot has a primary and every primary a ready connection (checked per decision: cheap)."""
        primaries = self._primaries
        return primaries is not None and all(self._pipe(a).connected for a in primaries)

    def node_pipe(self, addr: Address) -> PipelinedRedis:
        """The decision connection to one primary."""
        return self._pipe(addr)

    def _pipe(self, addr: Address) -> PipelinedRedis:
        pipe = self._pipes.get(addr)
        if pipe is None:
            pipe = self._pipes[addr] = PipelinedRedis(self._endpoint.pipe_target(*addr),
                                                      connect_timeout=self._connect_timeout)
        return pipe

    # -- slots ----------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the slot map from a node that answers: a known primary first, then the startup nodes."""
        candidates = [*sorted(self.primaries), *(a for a in self._endpoint.hosts if a not in self.primaries)]
        errors = []
        for addr in candidates:
            pipe = self._pipe(addr)
            try:
                if not pipe.connected:
                    await pipe.connect()
                reply = await pipe.execute("CLUSTER", "SLOTS", timeout=self._connect_timeout)
            except Exception as exc:
                errors.append(f"{addr[0]}:{addr[1]}: {exc}")
                continue
            slots: list[Address | None] = [None] * SLOTS
            for first, last, primary in parse_slots(reply):
                for s in range(first, last + 1):
                    slots[s] = primary
            if any(a is None for a in slots):
                errors.append(f"{addr[0]}:{addr[1]}: not every slot is served")
                continue
            self._slots = slots
            primaries = self._primaries = frozenset(a for a in slots if a is not None)
            for old in [a for a in self._pipes if a not in primaries and a not in self._endpoint.hosts]:
                await self._pipes.pop(old).close()
            return
        raise RedisConnectionError("cannot read the cluster's slots: " + "; ".join(errors[:4]))

    def _refresh_soon(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # the breaker's probe tries again
            log.debug("cluster slot refresh failed: %s", exc)

    def _moved(self, rest: str) -> Address:
        """``MOVED <slot> <host:port>``: the slot lives there now (fixed at once, a full slot
        refresh follows); the new address."""
        moved_slot, target = rest.split()
        addr = self._slots[int(moved_slot)] = _address(target)
        if self._primaries is not None and addr not in self._primaries:
            self._primaries = self._primaries | {addr}
        self._refresh_soon()
        return addr

    # -- the PipelinedRedis interface ------------------------------------------------------

    async def connect(self) -> None:
        """Read the slots, then connect to every primary."""
        if self.connected:
            return
        await self.refresh()
        await asyncio.gather(*(self._pipe(a).connect() for a in self.primaries))

    async def ping(self, timeout: float) -> None:
        """Every primary answers (what the breaker's probe needs before decisions use Redis)."""
        await self.refresh()
        await self.connect()
        await asyncio.gather(*(self._pipe(a).execute("PING", timeout=timeout) for a in self.primaries))

    async def execute(self, *args: bytes | str | int | float, key: bytes = b"", timeout: float | None = None) -> Any:
        """One command, to the primary of ``key``'s slot (a random one without a key)."""
        slot = key_slot(key) if key else 0
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - loop.time())

        addr = self._slots[slot]
        for _ in range(MAX_REDIRECTS + 1):
            if addr is None:
                self._refresh_soon()
                raise RedisConnectionError(f"no primary known for slot {slot}")
            pipe = self._pipe(addr)
            if not pipe.connected:
                await asyncio.wait_for(asyncio.shield(pipe.connect()), left())
            try:
                return await pipe.execute(*args, timeout=left())
            except RedisReplyError as exc:
                word, _, rest = str(exc).partition(" ")
                if word == "MOVED":
                    addr = self._moved(rest)
                    continue
                if word == "ASK":
                    target_pipe = self._pipe(_address(rest.split()[1]))
                    if not target_pipe.connected:
                        await asyncio.wait_for(asyncio.shield(target_pipe.connect()), left())
                    asking = target_pipe.execute("ASKING", timeout=left())
                    reply = target_pipe.execute(*args, timeout=left())
                    await asking
                    return await reply
                if word in ("TRYAGAIN", "CLUSTERDOWN"):
                    raise RedisConnectionError(str(exc)) from None
                raise
            except RedisConnectionError:
                self._refresh_soon()
                raise
        raise RedisConnectionError(f"slot {slot}: too many redirections")

    def submit(self, data: bytes, callback: Reply, timeout: float | None = None, key: bytes = b"",
               redirects: int = 0) -> None:
        """The hot path's send (see ``PipelinedRedis.submit``), to the primary of ``key``'s slot;
        MOVED and ASK are followed from the reply callback, without a task."""
        slot = key_slot(key) if key else 0
        addr = self._slots[slot]
        if addr is None:
            self._refresh_soon()
            callback(None, RedisConnectionError(f"no primary known for slot {slot}"))
            return
        pipe = self._pipe(addr)
        if not pipe.connected:
            self._refresh_soon()
            callback(None, RedisConnectionError(f"no connection to {addr[0]}:{addr[1]}"))
            return

        def reply(value: Any, exc: BaseException | None) -> None:
            if isinstance(exc, RedisReplyError) and redirects < MAX_REDIRECTS:
                word, _, rest = str(exc).partition(" ")
                if word == "MOVED":
                    self._moved(rest)
                    self.submit(data, callback, timeout, key, redirects + 1)
                    return
                if word == "ASK":
                    target_pipe = self._pipe(_address(rest.split()[1]))
                    if target_pipe.connected:
                        # Back to back on one connection: nothing can come between the two.
                        target_pipe.submit(encode_command((b"ASKING",)), _ignore, timeout)
                        target_pipe.submit(data, callback, timeout)
                        return
                if word in ("TRYAGAIN", "CLUSTERDOWN"):
                    exc = RedisConnectionError(str(exc))
            elif isinstance(exc, RedisConnectionError):
                self._refresh_soon()
            callback(value, exc)

        pipe.submit(data, reply, timeout)

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        for pipe in self._pipes.values():
            await pipe.close()
        self._pipes.clear()


#: Pool options of a single Redis that RedisCluster does not take.
_NOT_FOR_CLUSTER = ("timeout", "db", "connection_class")


def async_cluster_client(endpoint: RedisEndpoint, **options: Any) -> RedisCluster:
    """redis-py's asyncio cluster client (background work)."""
    kwargs = {**endpoint.kwargs, **options}
    for k in _NOT_FOR_CLUSTER:
        kwargs.pop(k, None)
    if endpoint.tls:
        kwargs["ssl"] = True
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in endpoint.hosts], **kwargs)
