"""asyncio transport for the sans-IO SPOP codec.

This module only moves bytes and tasks: every protocol decision lives in
``agent.spop``. Three guarantees matter to operators and are enforced here:

* Bounded memory. Reads go into one buffer shared by every connection, never
  more than the codec's ``room`` (one frame at most): asyncio calls
  ``get_buffer``, ``recv_into`` and ``buffer_updated`` back to back, and the
  codec copies what it keeps, so an idle connection costs no read buffer. A
  connection stops reading while its in-flight limit is reached or while
  HAProxy is not draining our writes, and at most ``max_connections`` are
  served at once.
* Whole frames. Every frame the codec produces goes to the transport in one
  ``write()``; frames finished in the same loop iteration are coalesced into
  one write (never split). HAProxy 3.2 resets connections on split frames.
* Bounded connections. At most ``max_connections`` are served; a connection
  that has not completed its HELLO within ``hello_timeout`` seconds gets an
  AGENT-DISCONNECT with status 2 (timeout) and is closed, and when
  ``max_connections`` are open a new connection takes the place of the oldest
  one still waiting for its HELLO (only when none is waiting is it refused).
* Graceful stop. ``begin_drain()`` answers HAProxy's health checks with an
  AGENT-DISCONNECT (so it marks the agent DOWN and sends its new work to
  another agent) while every connection is still served; ``shutdown()`` then
  stops accepting, lets in-flight NOTIFYs finish, and says AGENT-DISCONNECT to
  every peer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

from agent.logs import warn_limited
from agent.model import DEFAULT_MAX_FRAME_SIZE
from agent.spop import (
    Ack,
    Action,
    AgentDisconnect,
    AgentHello,
    Disconnect,
    Hello,
    LocalProtocolError,
    Message,
    Notify,
    ProtocolError,
    SpopConnection,
    State,
    Status,
)

log = logging.getLogger("mqtt_affinity.spop")

#: The answer to a health-check HELLO while draining. HAProxy's spop-check counts any
#: AGENT-DISCONNECT as a failed check: 2.6 logs the status's text ("normal"); 3.2 reads the
#: frame as a bad AGENT-HELLO ("version value not found"), a failed check all the same.
DRAIN_STATUS = Status.NORMAL
DRAIN_MESSAGE = "draining: the agent is shutting down"


Reply = Callable[[list[Action]], None]


class Dispatcher(Protocol):
    """What the server needs from the application: one answer per message.

    ``start`` is the hot path: no coroutine, no task. It calls ``reply(actions)`` exactly once,
    at once or later (from a Redis reply, say). It may return a callable that cancels the
    work (the connection went away). An application written with coroutines wraps itself in
    :class:`AsyncDispatcher`.
    """

    def start(self, message: Message, reply: Reply) -> Callable[[], None] | None: ...

    def on_error(self, message: Message, exc: BaseException) -> list[Action]:
        """Actions for a message whose handler failed: the ACK must still go out."""
        ...


class AsyncHandler(Protocol):
    async def handle(self, message: Message) -> list[Action]: ...
    def on_error(self, message: Message, exc: BaseException) -> list[Action]: ...


class AsyncDispatcher:
    """A dispatcher written as ``async def handle(message)``: each message runs as a task."""

    def __init__(self, handler: AsyncHandler) -> None:
        self.handler = handler

    def start(self, message: Message, reply: Reply) -> Callable[[], None] | None:
        async def run() -> None:
            try:
                actions = await self.handler.handle(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the ACK must go out whatever the handler did
                warn_limited(log, "handler-error", "handler for %r failed: %r", message.name, exc)
                actions = self.handler.on_error(message, exc)
            reply(actions)

        task = asyncio.get_running_loop().create_task(run())

        def cancel() -> None:
            task.cancel()

        return cancel

    def on_error(self, message: Message, exc: BaseException) -> list[Action]:
        return self.handler.on_error(message, exc)


class ServerObserver(Protocol):
    """Metric hooks, bound once by the caller; every method must be cheap."""

    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...
    def healthcheck(self) -> None: ...
    def frame_received(self, kind: str) -> None: ...
    def frame_sent(self, kind: str) -> None: ...
    def disconnect(self, side: str, status: int) -> None: ...


class NullObserver:
    def connection_opened(self) -> None: pass
    def connection_closed(self) -> None: pass
    def healthcheck(self) -> None: pass
    def frame_received(self, kind: str) -> None: pass
    def frame_sent(self, kind: str) -> None: pass
    def disconnect(self, side: str, status: int) -> None: pass


class _Work:
    """One NOTIFY being decided: its messages' actions, in order, as they arrive."""

    __slots__ = ("_actions", "_left", "_single", "conn", "notify")

    def __init__(self, conn: _SpopProtocol, notify: Notify) -> None:
        self.conn = conn
        self.notify = notify
        n = len(notify.messages)
        self._left = n
        self._single: list[Action] | None = None
        self._actions: list[list[Action] | None] | None = [None] * n if n > 1 else None

    def replier(self, i: int) -> Reply:
        if self._actions is None:
            return self._reply_single
        return lambda actions: self.reply(i, actions)

    def _reply_single(self, actions: list[Action]) -> None:
        if self._left:
            self._left = 0
            self._single = actions
            self.conn._answer(self)

    def reply(self, i: int, actions: list[Action]) -> None:
        if self._actions is None:
            self._reply_single(actions)
            return
        if self._actions[i] is None and self._left:
            self._actions[i] = actions
            self._left -= 1
            if not self._left:
                self.conn._answer(self)

    def finish(self) -> None:
        self._left = 0
        self.conn._answer(self)

    def actions(self) -> tuple[Action, ...]:
        if self._actions is None:
            return tuple(self._single or ())
        return tuple(a for acts in self._actions for a in acts or ())


class _SpopProtocol(asyncio.BufferedProtocol):
    """One HAProxy connection: codec + in-flight task bookkeeping."""

    def __init__(self, server: SpopServer) -> None:
        self._server = server
        self._conn = SpopConnection(max_frame_size=server.max_frame_size)
        self._transport: asyncio.Transport | None = None
        self._view = server._read_view
        self._pending: deque[Notify] = deque()
        #: NOTIFYs being decided -> how to cancel their work (None: nothing to cancel).
        self._in_flight: dict[_Work, Callable[[], None] | None] = {}
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._reading_paused = False
        self._write_paused = False
        self._closing = False
        self._loop = loop = asyncio.get_running_loop()
        self._drained = loop.create_future()
        self._hello_timer: asyncio.TimerHandle | None = None
        self.peer = "?"

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        server = self._server
        if len(server._connections) >= server.max_connections and not server._evict_one_awaiting_hello():
            server.refused += 1
            warn_limited(log, "max-connections",
                         "max_connections (%d) reached: closing the new SPOP connection from %s",
                         server.max_connections, self.peer)
            self._conn.receive_data(b"")  # nothing will be read from it
            self._transport.abort()
            return
        server._connections.add(self)
        server.observer.connection_opened()
        if server.stopping:
            self._disconnect(Status.NORMAL, "agent is shutting down")
            return
        server._awaiting_hello[self] = None
        if server.hello_timeout is not None:
            self._hello_timer = self._loop.call_later(server.hello_timeout, self._hello_expired)

    def get_buffer(self, sizehint: int) -> memoryview:
        # Never more than the codec can hold: a peer cannot make us buffer
        # more than one frame, whatever it sends.
        return self._view[: max(1, self._conn.room)]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            events = self._conn.receive_data(self._view[:nbytes])
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        for event in events:
            self._on_event(event)
        self._update_reading()

    def eof_received(self) -> bool | None:
        self._conn.receive_data(b"")
        self._abort_work()
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn.state is not State.CLOSED:
            self._conn.receive_data(b"")  # EOF never raises
        self._hello_done()
        self._abort_work()
        if self in self._server._connections:
            self._server._connections.discard(self)
            self._server.observer.connection_closed()
        if not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        # HAProxy is not reading our ACKs: stop taking new work from it.
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    # -- events -------------------------------------------------------------

    def _on_event(self, event: object) -> None:
        obs = self._server.observer
        if type(event) is Notify:
            obs.frame_received("notify")
            if len(self._in_flight) < self._server.max_in_flight:
                self._start(event)
            else:
                self._pending.append(event)
        elif isinstance(event, Hello):
            obs.frame_received("hello")
            self._hello_done()
            if event.healthcheck:
                obs.healthcheck()
                if self._server.draining:
                    # HAProxy counts an AGENT-DISCONNECT answer as a failed check: after
                    # `fall` of them it marks this agent DOWN and asks another one.
                    self._disconnect(DRAIN_STATUS, DRAIN_MESSAGE)
                    return
            self._write(self._conn.send(AgentHello()), "hello")
            if event.healthcheck or self._conn.state is State.CLOSED:
                self._close_transport()
        elif isinstance(event, Disconnect):
            obs.frame_received("disconnect")
            obs.disconnect("haproxy", int(event.status))
            if event.status == Status.TIMEOUT:
                # HAProxy 2.6 closes connections idle past `timeout idle` with this status:
                # routine, not worth a warning.
                log.debug("HAProxy %s closed an idle connection (%s)", self.peer, event.message)
            elif event.status != Status.NORMAL:
                warn_limited(log, f"haproxy-disconnect-{event.status}",
                             "HAProxy %s disconnected: status %s (%s)", self.peer, event.status, event.message)
            self._abort_work()
            self._write(self._conn.send(AgentDisconnect(Status.NORMAL, "")), "disconnect")
            self._close_transport()

    def _start(self, notify: Notify) -> None:
        work = _Work(self, notify)
        self._in_flight[work] = None
        dispatcher = self._server.dispatcher
        messages = notify.messages
        for i, message in enumerate(messages):
            try:
                cancel = dispatcher.start(message, work.replier(i))
            except Exception as exc:  # the ACK must go out whatever the handler did
                warn_limited(log, "handler-error", "handler for %r failed: %r", message.name, exc)
                work.reply(i, dispatcher.on_error(message, exc))
                continue
            if cancel is not None and work in self._in_flight:
                self._in_flight[work] = cancel
        if not messages:
            work.finish()

    def _start_pending(self) -> None:
        # Queued NOTIFYs are in flight for HAProxy, also while closing: each gets its ACK.
        while self._pending and len(self._in_flight) < self._server.max_in_flight:
            self._start(self._pending.popleft())

    def _answer(self, work: _Work) -> None:
        """Every message of ``work`` has its actions: ACK, then take the next queued NOTIFY."""
        if self._in_flight.pop(work, False) is False:
            return  # aborted meanwhile
        notify = work.notify
        if self._conn.state is State.READY:  # else: peer gone or disconnecting, nobody to answer
            actions = work.actions()
            try:
                frame = self._conn.send(Ack(notify.stream_id, notify.frame_id, actions))
            except LocalProtocolError as exc:
                # Larger than the negotiated frame size: the stream must still be answered, or
                # HAProxy waits out `timeout processing`. Fall back to the error answer, then to none.
                warn_limited(log, "ack-error", "cannot encode ACK for stream %d: %s", notify.stream_id, exc)
                dispatcher = self._server.dispatcher
                fallback = tuple(dispatcher.on_error(notify.messages[0], exc)) if notify.messages else ()
                try:
                    frame = self._conn.send(Ack(notify.stream_id, notify.frame_id, fallback))
                except LocalProtocolError:
                    frame = self._conn.send(Ack(notify.stream_id, notify.frame_id, ()))
            self._write(frame, "ack")
        if self._pending:
            self._start_pending()
        if self._reading_paused:
            self._update_reading()
        if self._closing and not self._in_flight and not self._pending:
            self._finish_shutdown()

    # -- output -------------------------------------------------------------

    def _write(self, frame: bytes, kind: str) -> None:
        self._server.observer.frame_sent(kind)
        self._out.append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._out:
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _close_transport(self) -> None:
        # Flush what is queued first so the AGENT-HELLO/DISCONNECT reaches HAProxy.
        self._flush()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    # -- flow control -------------------------------------------------------

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        busy = bool(self._pending) or self._write_paused or self._closing
        if busy and not self._reading_paused:
            transport.pause_reading()
            self._reading_paused = True
        elif not busy and self._reading_paused:
            transport.resume_reading()
            self._reading_paused = False

    # -- HELLO deadline ---------------------------------------------------------

    def _hello_done(self) -> None:
        """The HELLO arrived (or the connection is gone): no deadline, not evictable."""
        self._server._awaiting_hello.pop(self, None)
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None

    def _hello_expired(self) -> None:
        self._hello_timer = None
        if self._conn.state is not State.AWAIT_HELLO:
            return
        self._server.hello_timeouts += 1
        warn_limited(log, "hello-timeout", "SPOP connection from %s sent no HELLO within %gs: closing it",
                     self.peer, self._server.hello_timeout)
        self._disconnect(Status.TIMEOUT, "no HAPROXY-HELLO in time")

    def evict(self) -> None:
        """Make room for a new connection (this one is still waiting for its HELLO)."""
        self._server.evicted += 1
        warn_limited(log, "hello-evicted", "max_connections (%d) reached: closing %s, the oldest connection "
                     "still without a HELLO", self._server.max_connections, self.peer)
        self._disconnect(Status.RESOURCE_ALLOCATION, "max_connections reached")

    # -- errors and shutdown --------------------------------------------------

    def _protocol_error(self, exc: ProtocolError) -> None:
        warn_limited(log, f"protocol-error-{int(exc.status)}",
                     "SPOP protocol error from %s: %s (%s)", self.peer, exc.status.name, exc.reason)
        self._disconnect(exc.status, exc.reason)

    def _disconnect(self, status: Status, reason: str) -> None:
        self._server.observer.disconnect("agent", int(status))
        self._hello_done()
        self._abort_work()
        try:
            self._write(self._conn.send(AgentDisconnect(status, reason)), "disconnect")
        except LocalProtocolError:
            pass
        self._close_transport()
        # Out of the count at once: a closing connection no longer holds a slot.
        if self in self._server._connections:
            self._server._connections.discard(self)
            self._server.observer.connection_closed()

    def _abort_work(self) -> None:
        self._pending.clear()
        in_flight, self._in_flight = self._in_flight, {}
        for cancel in in_flight.values():
            if cancel is not None:
                cancel()

    def begin_shutdown(self) -> None:
        """Finish what HAProxy already sent us, then say goodbye."""
        self._closing = True
        self._update_reading()
        if self._conn.state is not State.READY:
            # Not past HELLO (or already closing): nothing in flight to finish.
            self._close_transport()
            return
        self._start_pending()
        if not self._in_flight and not self._pending:
            self._finish_shutdown()

    def _finish_shutdown(self) -> None:
        if self._conn.state is State.READY:
            self._server.observer.disconnect("agent", int(Status.NORMAL))
            self._write(self._conn.send(AgentDisconnect(Status.NORMAL, "agent is shutting down")), "disconnect")
        self._close_transport()

    def force_close(self) -> None:
        self._abort_work()
        if self._transport is not None:
            self._transport.abort()

    async def wait_closed(self) -> None:
        await self._drained


class SpopServer:
    """Accepts HAProxy's SPOE connections and serves them with ``dispatcher``."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        host: str,
        port: int,
        *,
        max_in_flight: int = 64,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_connections: int = 1024,
        hello_timeout: float | None = 5.0,
        observer: ServerObserver | None = None,
        backlog: int = 1024,
        reuse_port: bool = False,
    ) -> None:
        self.dispatcher = dispatcher
        #: SO_REUSEPORT: several agent processes (``workers``) listen on one port, and the
        #: kernel spreads new connections over them.
        self.reuse_port = reuse_port
        self.host = host
        self.port = port
        self.max_in_flight = max_in_flight
        self.max_frame_size = max_frame_size
        self.max_connections = max_connections
        #: Seconds a new connection may take to send its HAPROXY-HELLO (None: no limit).
        self.hello_timeout = hello_timeout
        #: Connections closed at once because max_connections were open.
        self.refused = 0
        #: Connections closed because their HELLO did not arrive within hello_timeout.
        self.hello_timeouts = 0
        #: Connections without a HELLO closed to make room for a new one at max_connections.
        self.evicted = 0
        # The one read buffer (see the module docstring): 4-byte length prefix + one frame.
        self._read_view = memoryview(bytearray(4 + max_frame_size))
        self.observer: ServerObserver = observer or NullObserver()
        self.backlog = backlog
        self.stopping = False
        #: Health checks are failed (see begin_drain); everything else is served.
        self.draining = False
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[_SpopProtocol] = set()
        # Connections still waiting for their HELLO, oldest first (a dict keeps insertion order).
        self._awaiting_hello: dict[_SpopProtocol, None] = {}

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def sockets(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _SpopProtocol(self), self.host, self.port, reuse_address=True, backlog=self.backlog,
            reuse_port=self.reuse_port,
        )
        if self.port == 0:
            self.port = self.sockets[0][1]

    def _evict_one_awaiting_hello(self) -> bool:
        """Close the oldest connection still without a HELLO; False if there is none."""
        oldest = next(iter(self._awaiting_hello), None)
        if oldest is None:
            return False
        oldest.evict()
        return True

    def begin_drain(self) -> None:
        """Fail HAProxy's health checks from now on, keep serving every connection.

        HAProxy marks the agent DOWN after `fall` failed checks and opens its new SPOE
        connections (3.1+: sends its new NOTIFY streams) to another agent of the backend.
        """
        self.draining = True

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting, finish in-flight work for up to ``grace`` seconds, disconnect everyone."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        conns = list(self._connections)
        for conn in conns:
            conn.begin_shutdown()
        if conns:
            await asyncio.wait([asyncio.ensure_future(c.wait_closed()) for c in conns], timeout=grace)
            for conn in conns:
                if not conn._drained.done():
                    log.warning("SPOP connection %s did not finish within %.1fs; closing it", conn.peer, grace)
                    conn.force_close()
        if self._server is not None:
            await self._server.wait_closed()
