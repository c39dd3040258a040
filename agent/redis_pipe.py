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
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError

from agent.endpoint import PipeTarget

__all__ = [
    "NoScriptError",
    "PipelinedRedis",
    "RedisBackpressure",
    "RedisReplyError",
    "encode_command",
    "reply_error",
]

# Outages surface as redis-py's ConnectionError, so the store raises one exception type for
# "Redis is not answering" whichever client carried the command.

#: Unsent bytes allowed to queue while Redis does not read (the transport paused our writes).
#: Past it new commands fail at once instead of growing the buffer.
MAX_UNSENT = 4 * 1024 * 1024


class RedisReplyError(Exception):
    """Redis answered with an error reply (e.g. WRONGTYPE)."""


class NoScriptError(RedisReplyError):
    """NOSCRIPT: the script is not loaded (Redis restarted, or SCRIPT FLUSH)."""


class RedisBackpressure(TimeoutError):
    """Redis has not been reading our commands: counted as a timeout, not an outage."""


_REPLY_ERRORS: dict[str, type[RedisReplyError]] = {"NOSCRIPT": NoScriptError}


def reply_error(err: RedisReplyError) -> RedisReplyError:
    """The specific class of an error reply, by its first word (hiredis gives one class for all)."""
    cls = _REPLY_ERRORS.get(str(err).split(" ", 1)[0])
    return cls(*err.args) if cls is not None else err


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
            if isinstance(reply, RedisReplyError) and str(reply).startswith("READONLY"):
                # Connected to a primary that was demoted (a failover happened): every write
                # here fails. Drop the connection; the next connect asks where the primary is.
                if not fut.done():
                    fut.set_exception(RedisConnectionError(f"Redis is no longer the primary: {reply}"))
                owner._fail(RedisConnectionError("Redis is no longer the primary (READONLY)"))
                return
            if not fut.done():
                if isinstance(reply, RedisReplyError):
                    fut.set_exception(reply_error(reply))
                else:
                    fut.set_result(reply)

    def pause_writing(self) -> None:
        if self._current():
            self._owner._write_paused = True

    def resume_writing(self) -> None:
        if self._current():
            self._owner._write_paused = False
            self._owner._flush()

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

    def __init__(
        self, target: PipeTarget | Callable[[], Awaitable[PipeTarget]], *, connect_timeout: float = 1.0
    ) -> None:
        #: Where to connect: fixed, or asked anew at every connect (a Sentinel-given primary).
        self._target = target
        #: (host, port) of the current connection.
        self.address: tuple[str, int] | None = None
        self._connect_timeout = connect_timeout
        self._proto: _Protocol | None = None
        self._ready = False
        self._waiting: deque[asyncio.Future[Any]] = deque()
        # (deadline, sent_at, future) of requests that carry a timeout, oldest first.
        self._deadlines: deque[tuple[float, float, asyncio.Future[Any]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._last_reply = 0.0
        self._out: list[bytes] = []
        self._unsent = 0
        self._write_paused = False
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
        t = self._target if isinstance(self._target, PipeTarget) else await self._target()
        self._fail(RedisConnectionError("reconnecting"))  # whatever was left of the previous one
        proto = _Protocol(self)
        self._proto = proto
        if t.path is not None:
            await loop.create_unix_connection(lambda: proto, t.path)
        else:
            assert t.host is not None
            await loop.create_connection(
                lambda: proto, t.host, t.port, ssl=t.ssl, server_hostname=t.server_hostname
            )
        # Not ready until authenticated and on the right database: decisions must
        # never run before AUTH or against database 0 by mistake.
        for command in t.setup_commands():
            await self._enqueue(command, None)
        if self._proto is proto:
            self._ready = True
            self.address = (t.host or t.path or "", t.port)

    def execute(
        self, *args: bytes | str | int | float, key: bytes = b"", timeout: float | None = None
    ) -> asyncio.Future[Any]:
        """Queue one command; the returned future resolves with its reply.

        With ``timeout``, the future fails with ``TimeoutError`` once it passes. One timer
        serves every request (a per-call ``asyncio.timeout`` costs a timer-heap push and
        cancel per decision: ~7% of the agent's CPU under load). Requests are swept in
        order, so mixing very different timeouts on one connection may let a short one
        expire late; the agent uses one value. ``key`` routes a command on a Cluster
        (:class:`agent.cluster.ClusterPipe`); one connection ignores it.
        """
        if not self.connected:
            return self._failed(RedisConnectionError("not connected to Redis"))
        if self._unsent > MAX_UNSENT:
            return self._failed(RedisBackpressure(f"Redis is not reading: {self._unsent} bytes unsent"))
        return self._enqueue(args, timeout)

    @staticmethod
    def _failed(exc: Exception) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_exception(exc)
        return fut

    def _enqueue(self, args: tuple[bytes | str | int | float, ...], timeout: float | None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._waiting.append(fut)
        data = encode_command(args)
        self._out.append(data)
        self._unsent += len(data)
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
        if not self._out or self._write_paused:
            return  # resume_writing flushes what waited
        data = b"".join(self._out)
        self._out.clear()
        self._unsent = 0
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _fail(self, exc: Exception) -> None:
        """Drop the connection and fail everything in flight: their replies can no longer be matched."""
        proto, self._proto = self._proto, None
        self._ready = False
        self._out.clear()
        self._unsent = 0
        self._write_paused = False
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
