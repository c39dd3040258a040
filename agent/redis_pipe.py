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
    """One TCP connection's bytes; it reports to its owner only while it is the owner's current one."""

    def __init__(self, owner: PipelinedRedis) -> None:
        self._owner = owner
        self._reader = hiredis.Reader(replyError=RedisReplyError)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _current(self) -> bool:
        return self._owner._proto is self

    def data_received(self, data: bytes) -> None:
        if not self._current():
            return
        owner = self._owner
        owner._last_reply = asyncio.get_running_loop().time()
        reader = self._reader
        reader.feed(data)
        waiting = owner._waiting
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                owner._fail(RedisConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not waiting:  # a reply nobody asked for: the stream is out of step
                owner._fail(RedisConnectionError("unexpected reply from Redis"))
                return
            fut = waiting.popleft()
            # A caller that timed out gave up on its future; its reply still
            # arrives in its place and is skipped, so the stream stays in step.
            if not fut.done():
                if isinstance(reply, RedisReplyError):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        # A connection replaced since (after a stall) must not fail its successor.
        if self._current():
            self._owner._fail(
                RedisConnectionError(f"Redis connection lost: {exc}" if exc else "Redis closed the connection")
            )


class PipelinedRedis:
    """One connection, any number of requests in flight, replies in order.

    ``execute`` raises redis-py's ``ConnectionError`` at once when there is no
    ready connection (connected, authenticated, database selected): the engine
    turns that into its local fallback and reconnects from its background probe.
    A connection that stops answering (a request times out and no reply at all
    arrived since it was sent) is dropped, so the next ``connect`` opens a fresh one
    instead of feeding a dead socket.
    """

    def __init__(self, url: str, *, connect_timeout: float = 1.0) -> None:
        self._opts = parse_redis_url(url)
        self._connect_timeout = connect_timeout
        self._proto: _Protocol | None = None
        self._ready = False
        self._waiting: deque[asyncio.Future[Any]] = deque()
        # (deadline, sent_at, future) of requests that carry a timeout, oldest first.
        self._deadlines: deque[tuple[float, float, asyncio.Future[Any]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._last_reply = 0.0
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._connecting: asyncio.Future[None] | None = None

    @property
    def _transport(self) -> asyncio.Transport | None:
        return self._proto.transport if self._proto is not None else None

    @property
    def connected(self) -> bool:
        t = self._transport
        return self._ready and t is not None and not t.is_closing()

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
        self._fail(RedisConnectionError("reconnecting"))  # whatever was left of the previous one
        proto = _Protocol(self)
        self._proto = proto
        if o["path"]:
            await loop.create_unix_connection(lambda: proto, o["path"])
        else:
            ctx = ssl.create_default_context() if o["tls"] else None
            await loop.create_connection(lambda: proto, o["host"], o["port"], ssl=ctx)
        # Not ready until authenticated and on the right database: decisions must
        # never run before AUTH or against database 0 by mistake.
        if o["password"]:
            if o["username"]:
                await self._enqueue(("AUTH", o["username"], o["password"]), None)
            else:
                await self._enqueue(("AUTH", o["password"]), None)
        if o["db"]:
            await self._enqueue(("SELECT", o["db"]), None)
        if self._proto is proto:
            self._ready = True

    def execute(self, *args: bytes | str | int | float, timeout: float | None = None) -> asyncio.Future[Any]:
        """Queue one command; the returned future resolves with its reply.

        With ``timeout``, the future fails with ``TimeoutError`` once it passes. One timer
        serves every request (a per-call ``asyncio.timeout`` costs a timer-heap push and
        cancel per decision: ~7% of the agent's CPU under load). Requests are swept in
        order, so mixing very different timeouts on one connection may let a short one
        expire late; the agent uses one value.
        """
        if not self.connected:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            fut.set_exception(RedisConnectionError("not connected to Redis"))
            return fut
        return self._enqueue(args, timeout)

    def _enqueue(self, args: tuple[bytes | str | int | float, ...], timeout: float | None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._waiting.append(fut)
        self._out.append(encode_command(args))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if timeout is not None:
            now = loop.time()
            self._deadlines.append((now + timeout, now, fut))
            if self._timer is None:
                self._timer = loop.call_at(now + timeout, self._expire)
        return fut

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending = self._deadlines
        stalled = False
        while pending and (pending[0][2].done() or pending[0][0] <= now):
            _, sent_at, fut = pending.popleft()
            if not fut.done():
                # Its reply will still arrive in its place and be skipped.
                fut.set_exception(TimeoutError("Redis reply timed out"))
                if self._last_reply < sent_at:
                    stalled = True  # not a single reply since this request went out
        if stalled:
            self._fail(RedisConnectionError("Redis stopped answering"))
            return
        if pending:
            self._timer = loop.call_at(pending[0][0], self._expire)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _fail(self, exc: Exception) -> None:
        """Drop the connection and fail everything in flight: their replies can no longer be matched."""
        proto, self._proto = self._proto, None
        self._ready = False
        self._out.clear()
        self._deadlines.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, deque()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(exc)
        if proto is not None and proto.transport is not None:
            proto.transport.abort()

    async def close(self) -> None:
        self._fail(RedisConnectionError("closed"))
