"""Redis Sentinel: finding the primary, and following it through a failover.

redis-py's Sentinel support serves for talking to the Sentinels (:class:`redis.asyncio.sentinel.Sentinel`)
and for a connection pool that re-asks them when a connection fails
(:class:`~redis.asyncio.sentinel.SentinelConnectionPool`). What it lacks, written here:

- **Verification.** ``discover_master`` returns the first Sentinel's answer that looks sane.
  A Sentinel that is cut off, or still believes in a primary that died, answers with a dead
  or demoted address, and every connection then fails until that Sentinel changes its mind.
  :class:`PrimaryLocator` asks every Sentinel, tries the addresses most Sentinels agree on
  first, and takes the first one whose ``ROLE`` says ``master``.
- **The hot path.** The decision connection is our own pipelined connection
  (:mod:`agent.redis_pipe`); it asks the locator for its target at every (re)connect, so after
  a failover the breaker's probe reconnects it to the new primary. A primary that was demoted
  while we were connected answers writes with ``READONLY``: the pipe drops that connection.
- **One answer for everyone.** The decision connection, the background pool and the probe
  share one locator.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError

from agent.endpoint import PipeTarget

if TYPE_CHECKING:
    from agent.endpoint import RedisEndpoint

__all__ = ["PrimaryLocator", "async_primary_client", "find_primary_sync"]

log = logging.getLogger("mqtt_affinity.redis")

#: Per Sentinel and per candidate: how long one question may take.
ASK_TIMEOUT = 0.5


class MasterNotFoundError(RedisConnectionError):
    """No Sentinel named a primary that answers as one."""


def _ranked(answers: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Distinct addresses, the one most Sentinels gave first (ties: the order they were asked)."""
    votes = Counter(answers)
    order = {a: i for i, a in reversed(list(enumerate(answers)))}
    return sorted(votes, key=lambda a: (-votes[a], order[a]))


def _addr(reply: Any) -> tuple[str, int] | None:
    if not reply:
        return None
    host, port = reply[0], reply[1]
    host = host.decode() if isinstance(host, bytes) else str(host)
    return host, int(port)


def _is_master(role: Any) -> bool:
    first = role[0] if role else b""
    return (first.decode() if isinstance(first, bytes) else str(first)) == "master"


class PrimaryLocator:
    """Asks the Sentinels for the primary and verifies it; shared by every client of one endpoint."""

    def __init__(self, endpoint: RedisEndpoint) -> None:
        self._endpoint = endpoint
        self.service = endpoint.service
        kwargs = {"socket_timeout": ASK_TIMEOUT, "socket_connect_timeout": ASK_TIMEOUT, **endpoint.sentinel_kwargs}
        self.sentinel = Sentinel(list(endpoint.hosts), sentinel_kwargs=kwargs)
        #: The last verified primary.
        self.current: tuple[str, int] | None = None
        self._finding: asyncio.Future[tuple[str, int]] | None = None

    async def find(self) -> tuple[str, int]:
        """The primary now (concurrent callers share one search)."""
        if self._finding is not None:
            return await asyncio.shield(self._finding)
        fut: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        self._finding = fut
        try:
            addr = await self._search()
            fut.set_result(addr)
            return addr
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning
            raise
        finally:
            self._finding = None

    async def _search(self) -> tuple[str, int]:
        async def ask(s: aioredis.Redis) -> tuple[str, int] | None:
            try:
                async with asyncio.timeout(ASK_TIMEOUT):
                    return _addr(await s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service))
            except Exception:  # a Sentinel that is down or slow is skipped
                return None

        answers = [a for a in await asyncio.gather(*(ask(s) for s in self.sentinel.sentinels)) if a]
        for addr in _ranked(answers):
            if await self._verify(addr):
                if addr != self.current:
                    if self.current is not None:
                        log.info("redis primary of %s is now %s:%d (was %s:%d)", self.service, *addr, *self.current)
                    self.current = addr
                return addr
        raise MasterNotFoundError(
            f"no primary for {self.service!r}: {len(answers)} of {len(self.sentinel.sentinels)} Sentinels answered"
            + (f", none of {_ranked(answers)} answers as a primary" if answers else "")
        )

    async def _verify(self, addr: tuple[str, int]) -> bool:
        client = aioredis.Redis(connection_pool=aioredis.ConnectionPool(
            connection_class=self._endpoint._connection_class, **{
                **self._endpoint.kwargs, "host": addr[0], "port": addr[1],
                "socket_timeout": ASK_TIMEOUT, "socket_connect_timeout": ASK_TIMEOUT,
            }))  # fmt: skip
        try:
            async with asyncio.timeout(ASK_TIMEOUT * 2):
                return _is_master(await client.execute_command("ROLE"))
        except Exception:
            return False
        finally:
            await client.aclose(close_connection_pool=True)

    async def target(self) -> PipeTarget:
        """Where the decision connection connects now."""
        host, port = await self.find()
        return self._endpoint.pipe_target(host, port)


class VerifiedSentinelPool(SentinelConnectionPool):
    """redis-py's Sentinel pool, asking the shared locator instead of the first Sentinel."""

    def __init__(self, locator: PrimaryLocator, **kwargs: Any) -> None:
        super().__init__(locator.service, locator.sentinel, **kwargs)
        self._locator = locator

    async def get_master_address(self) -> tuple[str, int]:
        address = await self._locator.find()
        if self.master_address != address:
            self.master_address = address
            # Idle connections to the old primary reconnect to the new one when next used.
            await self.disconnect(inuse_connections=False)
        return address


def async_primary_client(endpoint: RedisEndpoint, **options: Any) -> aioredis.Redis:
    """redis-py's asyncio client on the verified primary (background work)."""
    kwargs = {**endpoint.kwargs, **options}
    kwargs.pop("timeout", None)  # a BlockingConnectionPool option; this pool does not block
    max_connections = kwargs.pop("max_connections", None)
    if endpoint.tls:
        kwargs["ssl"] = True
    pool = VerifiedSentinelPool(endpoint.locator(), max_connections=max_connections, **kwargs)
    return aioredis.Redis(connection_pool=pool)


def find_primary_sync(endpoint: RedisEndpoint, *, timeout: float = 2.0) -> tuple[str, int]:
    """The verified primary, for the CLI (synchronous, short-lived)."""
    from redis.sentinel import Sentinel as SyncSentinel

    kwargs = {"socket_timeout": timeout, "socket_connect_timeout": timeout, **endpoint.sentinel_kwargs}
    sentinel = SyncSentinel(list(endpoint.hosts), sentinel_kwargs=kwargs)
    answers: list[tuple[str, int]] = []
    for s in sentinel.sentinels:
        try:
            addr = _addr(s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", endpoint.service))
        except redis.RedisError:
            continue
        if addr:
            answers.append(addr)
    data_kwargs = {**endpoint.kwargs, "socket_timeout": timeout, "socket_connect_timeout": timeout}
    if endpoint.tls:
        data_kwargs["ssl"] = True
    for host, port in _ranked(answers):
        client = redis.Redis(host=host, port=port, **data_kwargs)
        try:
            if _is_master(client.execute_command("ROLE")):
                return host, port
        except redis.RedisError:
            continue
        finally:
            client.close()
    raise MasterNotFoundError(f"no primary for {endpoint.service!r} ({len(answers)} Sentinels answered)")
