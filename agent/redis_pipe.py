"""A pipelined Redis connection for the decision hot path.

Why not redis-py's asyncio client here: it checks a connection out of a pool
per command and pays several coroutine layers per call, which caps one agent
at a few thousand decisions per second on a small machine, and a reconnect
storm of MQTT clients arrives as exactly such a burst. Redis answers in
order, so one connection can carry every in-flight decision: requests are
written back to back (coalesced per event-loop iteration) and replies are
matched first-in first-out, parsed by hiredis. redis-py remains in use for
everything that is not per-CONNECT (node overrides, the sweep, the CLI).

Two ways to send a command: ``execute`` (a future, for everything that can afford one) and
``submit`` (a callback, called from the read path as soon as the reply is parsed: the hot
path pays no future, no task and no extra turn of the event loop per decision).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError

from agent.endpoint import PipeTarget

__all__ = [
    "NoScriptError",
    "PipelinedRedis",
    "RedisBackpressure",
    "RedisReplyError",
    "Reply",
    "encode_command",
    "reply_error",
]

log = logging.getLogger("mqtt_affinity.redis")

# Outages surface as redis-py's ConnectionError, so the store raises one exception type for
# "Redis is not answering" whichever client carried the command.

#: Unsent bytes allowed to queue while Redis does not read (the transport paused our writes).
#: Past it new commands fail at once instead of growing the buffer.
MAX_UNSENT = 4 * 1024 * 1024

#: A reply callback: (reply, None) or (None, the error).
Reply = Callable[[Any, BaseException | None], None]


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


def _bulk(a: bytes | str | int | float) -> bytes:
    b = a if isinstance(a, bytes) else (a.encode() if isinstance(a, str) else str(a).encode())
    return b"$%d\r\n%s\r\n" % (len(b), b)


def encode_command(args: tuple[bytes | str | int | float, ...]) -> bytes:
    """RESP array of bulk strings, the only request form Redis needs."""
    return b"*%d\r\n" % len(args) + b"".join(map(_bulk, args))


def encode_args(args: Iterable[bytes | str | int | float]) -> bytes:
    """The bulk strings of some arguments, without the array header: a piece that can be
    encoded once and reused in many commands (``PipelinedRedis.submit`` takes pieces)."""
    return b"".join(map(_bulk, args))


class _Request:
    """One command in flight: who wants the reply, and by when."""

    __slots__ = ("callback", "deadline", "done", "sent_at")

    def __init__(self, callback: Reply, sent_at: float, deadline: float | None) -> None:
        self.callback = callback
        self.sent_at = sent_at
        self.deadline = deadline
        self.done = False

    def finish(self, reply: Any, exc: BaseException | None) -> None:
        if self.done:
            return
        self.done = True
        try:
            self.callback(reply, exc)
        except Exception:  # a caller's bug must not break the reply stream of everybody else
            log.exception("a Redis reply callback failed")


class _Protocol(asyncio.Protocol):
    """One TCP connection's bytes; it reports to its owner only while it is the owner's current one."""

    def __init__(self, owner: PipelinedRedis) -> None:
        self._owner = owner
        self._reader = hiredis.Reader(replyError=RedisReplyError)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()

    def _current(self) -> bool:
        return self._owner._proto is self

    def data_received(self, data: bytes) -> None:
        owner = self._owner
        if owner._proto is not self:
            return
        owner._last_reply = self._loop.time()
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
            request = waiting.popleft()
            # A request that timed out was answered already; its reply still arrives in its
            # place and is skipped, so the stream stays in step.
            if type(reply) is RedisReplyError or isinstance(reply, RedisReplyError):
                if str(reply).startswith("READONLY"):
                    # Connected to a primary that was demoted (a failover happened): every write
                    # here fails. Drop the connection; the next connect asks where the primary is.
                    request.finish(None, RedisConnectionError(f"Redis is no longer the primary: {reply}"))
                    owner._fail(RedisConnectionError("Redis is no longer the primary (READONLY)"))
                    return
                request.finish(None, reply_error(reply))
            else:
                request.finish(reply, None)

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

    A command sent without a ready connection (connected, authenticated, database selected)
    fails at once with redis-py's ``ConnectionError``: the engine turns that into its local
    fallback and reconnects from its background probe. A connection that stops answering (a
    request times out and no reply at all arrived since it was sent) is dropped, so the next
    ``connect`` opens a fresh one instead of feeding a dead socket.
    """

    def __init__(
        self, target: PipeTarget | Callable[[], Awaitable[PipeTarget]], *, connect_timeout: float = 1.0
    ) -> None:
        #: Where to connect: fixed, or asked anew at every connect (a Sentinel-given primary).
        self._target = target
        #: (host, port) of the current connection.
        self.address: tuple[str, int] | None = None
        self._connect_timeout = connect_timeout
        #: The running loop, held from the first connect (the hot path does not look it up).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proto: _Protocol | None = None
        self._ready = False
        self._waiting: deque[_Request] = deque()
        # Requests that carry a timeout, oldest first (one timer serves them all).
        self._deadlines: deque[_Request] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._last_reply = 0.0
        self._out: list[bytes] = []
        self._unsent = 0
        self._write_paused = False
        self._flush_scheduled = False
        self._connecting: asyncio.Future[None] | None = None
        #: Commands sent on every new connection after AUTH/SELECT; a callable, so that it can
        #: name what is true at connect time.
        self.on_connect: Callable[[], list[tuple[bytes | str | int | float, ...]]] | None = None
        #: Called when a ready connection is lost (e.g. client-side caching must stop).
        self.on_lost: Callable[[], None] | None = None
        #: Counts the connections made: tells a caller whether it is still the same one.
        self.generation = 0

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
        self._loop = loop
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
        for command in [*t.setup_commands(), *(self.on_connect() if self.on_connect else ())]:
            await self._enqueue_future(encode_command(command), None)
        if self._proto is proto:
            self._ready = True
            self.generation += 1
            self.address = (t.host or t.path or "", t.port)

    # -- sending -------------------------------------------------------------------------------

    def submit(self, data: bytes, callback: Reply, timeout: float | None = None, key: bytes = b"") -> None:
        """Queue one encoded command (``encode_command``, or a header and pieces joined); call
        ``callback(reply, None)`` or ``callback(None, error)`` from the read path. Never raises:
        without a ready connection, or past ``MAX_UNSENT``, the callback gets the error at once.

        One timer serves every request's ``timeout`` (a per-call timer costs a heap push and
        cancel per decision). Requests are swept in order, so very different timeouts on one
        connection may let a short one expire late; the agent uses one value. ``key`` routes on
        a Cluster; one connection ignores it.
        """
        if not self.connected:
            callback(None, RedisConnectionError("not connected to Redis"))
            return
        if self._unsent > MAX_UNSENT:
            callback(None, RedisBackpressure(f"Redis is not reading: {self._unsent} bytes unsent"))
            return
        self._enqueue(data, callback, timeout)

    def execute(
        self, *args: bytes | str | int | float, key: bytes = b"", timeout: float | None = None
    ) -> asyncio.Future[Any]:
        """Queue one command; the returned future resolves with its reply (or its error).

        ``key`` routes a command on a Cluster (:class:`agent.cluster.ClusterPipe`); one
        connection ignores it.
        """
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.submit(encode_command(args), _resolver(fut), timeout)
        return fut

    def _enqueue_future(self, data: bytes, timeout: float | None) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue(data, _resolver(fut), timeout)
        return fut

    def _enqueue(self, data: bytes, callback: Reply, timeout: float | None) -> None:
        loop = self._loop or asyncio.get_running_loop()
        now = loop.time()
        request = _Request(callback, now, None if timeout is None else now + timeout)
        self._waiting.append(request)
        self._out.append(data)
        self._unsent += len(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if request.deadline is not None:
            self._deadlines.append(request)
            if self._timer is None:
                self._timer = loop.call_at(request.deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        loop = self._loop or asyncio.get_running_loop()
        now = loop.time()
        pending = self._deadlines
        stalled = False
        while pending and (pending[0].done or pending[0].deadline <= now):  # type: ignore[operator]
            request = pending.popleft()
            if not request.done:
                # Its reply will still arrive in its place and be skipped.
                request.finish(None, TimeoutError("Redis reply timed out"))
                if self._last_reply < request.sent_at:
                    stalled = True  # not a single reply since this request went out
        if stalled:
            self._fail(RedisConnectionError("Redis stopped answering"))
            return
        if pending:
            self._timer = loop.call_at(pending[0].deadline, self._expire)  # type: ignore[arg-type]

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._out or self._write_paused:
            return  # resume_writing flushes what waited
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        self._unsent = 0
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _fail(self, exc: Exception) -> None:
        """Drop the connection and fail everything in flight: their replies can no longer be matched."""
        proto, self._proto = self._proto, None
        was_ready, self._ready = self._ready, False
        self._out.clear()
        self._unsent = 0
        self._write_paused = False
        self._deadlines.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, deque()
        for request in waiting:
            request.finish(None, exc)
        if proto is not None and proto.transport is not None:
            proto.transport.abort()
        if was_ready and self.on_lost is not None:
            self.on_lost()

    async def close(self) -> None:
        self._fail(RedisConnectionError("closed"))


def _resolver(fut: asyncio.Future[Any]) -> Reply:
    def resolve(reply: Any, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(reply)

    return resolve
