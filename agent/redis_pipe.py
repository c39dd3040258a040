"""A pipelined Redis connection for the decision hot path.

Why not redis-py's asyncio client here: it checks a connection out of a pool
per command and pays several coroutine layers per call, which caps one agent
at a few thousand decisions per second on a small machine, and a reconnect
storm of MQTT clients arrives as exactly such a burst. Redis answers in
order, so one connection can carry every in-flight decision: requests are
written back to back (coalesced per event-loop iteration) and replies are
matched first-in first-out, parsed by hiredis. redis-py remains in use for
everything that is not per-CONNECT (node overrides, trims, the CLI).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any
from urllib.parse import unquote, urlparse

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["PipelinedRedis", "RedisReplyError", "encode_command", "parse_redis_url"]


# Outages surface as redis-py's ConnectionError, so the Store raises one exception type for
# "Redis is not answering" whichever client carried the command.


class RedisReplyError(Exception):
    """Redis answered with an error reply (e.g. NOSCRIPT, WRONGTYPE)."""


def encode_command(args: tuple[bytes | str | int | float, ...]) -> bytes:
    """RESP array of bulk strings, the only request form Redis needs."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, bytes):
            b = a
        elif isinstance(a, str):
            b = a.encode()
        else:
            b = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def parse_redis_url(url: str) -> dict[str, Any]:
    """host/port/path, db, username, password and TLS from a redis://, rediss:// or unix:// URL."""
    u = urlparse(url)
    if u.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"unsupported Redis URL scheme {u.scheme!r}")
    opts: dict[str, Any] = {
        "username": unquote(u.username) if u.username else None,
        "password": unquote(u.password) if u.password else None,
        "tls": u.scheme == "rediss",
        "db": 0,
        "path": None,
        "host": u.hostname or "127.0.0.1",
        "port": u.port or 6379,
    }
    query = dict(p.split("=", 1) for p in u.query.split("&") if "=" in p)
    if u.scheme == "unix":
        opts["path"] = u.path
        opts["db"] = int(query.get("db", 0))
    else:
        path = u.path.lstrip("/")
        opts["db"] = int(path) if path else int(query.get("db", 0))
    if "password" in query and not opts["password"]:
        opts["password"] = unquote(query["password"])
    return opts


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: PipelinedRedis) -> None:
        self._owner = owner
        self._reader = hiredis.Reader(replyError=RedisReplyError)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._owner._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self._owner._waiting
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._owner._fail(RedisConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not waiting:  # a reply nobody asked for: the stream is out of step
                self._owner._fail(RedisConnectionError("unexpected reply from Redis"))
                return
            fut = waiting.popleft()
            # A caller that timed out cancelled its future; its reply still
            # arrives in its place and is skipped, so the stream stays in step.
            if not fut.done():
                if isinstance(reply, RedisReplyError):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._fail(
            RedisConnectionError(f"Redis connection lost: {exc}" if exc else "Redis closed the connection")
        )


class PipelinedRedis:
    """One connection, any number of requests in flight, replies in order.

    ``execute`` raises redis-py's ``ConnectionError`` at once when there is no live
    connection: the engine turns that into its local fallback and reconnects
    from its own background probe (``connect``), never from the hot path.
    """

    def __init__(self, url: str, *, connect_timeout: float = 1.0) -> None:
        self._opts = parse_redis_url(url)
        self._connect_timeout = connect_timeout
        self._transport: asyncio.Transport | None = None
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._deadlines: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._connecting: asyncio.Future[None] | None = None

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    async def connect(self) -> None:
        """(Re)connect, authenticate and select the database; concurrent callers share one attempt."""
        if self.connected:
            return
        if self._connecting is not None:
            await asyncio.shield(self._connecting)  # raises the attempt's error
            return
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            await asyncio.wait_for(self._open(), self._connect_timeout)
            self._connecting.set_result(None)
        except BaseException as exc:
            err = RedisConnectionError(f"cannot connect to Redis: {exc!r}")
            self._fail(err)
            self._connecting.set_exception(err)
            self._connecting.exception()  # retrieved: no "never retrieved" warning
            if isinstance(exc, Exception):
                raise err from exc
            raise
        finally:
            self._connecting = None

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        o = self._opts
        if o["path"]:
            await loop.create_unix_connection(lambda: _Protocol(self), o["path"])
        else:
            ctx = ssl.create_default_context() if o["tls"] else None
            await loop.create_connection(lambda: _Protocol(self), o["host"], o["port"], ssl=ctx)
        if o["password"]:
            if o["username"]:
                await self.execute("AUTH", o["username"], o["password"])
            else:
                await self.execute("AUTH", o["password"])
        if o["db"]:
            await self.execute("SELECT", o["db"])

    def execute(self, *args: bytes | str | int | float, timeout: float | None = None) -> asyncio.Future[Any]:
        """Queue one command; the returned future resolves with its reply.

        With ``timeout``, the future fails with ``TimeoutError`` once it passes. One timer
        serves every request (a per-call ``asyncio.timeout`` costs a timer-heap push and
        cancel per decision: ~7% of the agent's CPU under load). Requests are swept in
        order, so mixing very different timeouts on one connection may let a short one
        expire late; the agent uses one value.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        transport = self._transport
        if transport is None or transport.is_closing():
            fut.set_exception(RedisConnectionError("not connected to Redis"))
            return fut
        self._waiting.append(fut)
        self._out.append(encode_command(args))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if timeout is not None:
            deadline = loop.time() + timeout
            self._deadlines.append((deadline, fut))
            if self._timer is None:
                self._timer = loop.call_at(deadline, self._expire)
        return fut

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending = self._deadlines
        while pending and (pending[0][1].done() or pending[0][0] <= now):
            _, fut = pending.popleft()
            if not fut.done():
                # Its reply will still arrive in its place and be skipped.
                fut.set_exception(TimeoutError("Redis reply timed out"))
        if pending:
            self._timer = loop.call_at(pending[0][0], self._expire)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _fail(self, exc: Exception) -> None:
        """Drop the connection and fail everything in flight: their replies can no longer be matched."""
        transport, self._transport = self._transport, None
        self._out.clear()
        self._deadlines.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, deque()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(exc)
        if transport is not None:
            transport.abort()

    async def close(self) -> None:
        self._fail(RedisConnectionError("closed"))
