"""A minimal HTTP/1.1 endpoint for /metrics, /healthz and /readyz.

prometheus-client's own server runs in a thread; ours shares the event loop so
readiness reads the live state without locks. It is deliberately small:
GET only, headers capped, one request per connection, slow peers timed out.

It listens on TCP (``host``, ``port``) or, with ``unix_path``, on a unix socket: each worker of
a multi-process agent (``workers`` > 1, :mod:`agent.workers`) serves its own there, in a
private folder, for the supervisor to scrape and ask.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger("mqtt_affinity.http")

MAX_HEADER_BYTES = 8192
READ_TIMEOUT = 5.0

#: ``(ok, why)`` for /readyz or /healthz, computed at once or awaited (the supervisor of
#: ``workers`` asks its workers).
Readiness = Callable[[], tuple[bool, str] | Awaitable[tuple[bool, str]]]


def _alive() -> tuple[bool, str]:
    return True, "ok"


class HttpEndpoint:
    """``ready`` answers /readyz; ``healthy`` /healthz (default: 200 while the process answers)."""

    def __init__(
        self, host: str, port: int, render_metrics: Callable[[], Awaitable[bytes]], ready: Readiness,
        *, unix_path: str | None = None, healthy: Readiness = _alive,
    ) -> None:
        self.host = host
        self.port = port
        self.unix_path = unix_path
        self._render = render_metrics
        self._ready = ready
        self._healthy = healthy
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        if self.unix_path is not None:
            self._server = await asyncio.start_unix_server(self._serve, self.unix_path, limit=MAX_HEADER_BYTES)
            return
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, reuse_address=True, limit=MAX_HEADER_BYTES
        )
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except asyncio.LimitOverrunError:
            await self._respond(writer, 431, b"request header too large\n")
            return
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            writer.close()
            return
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3:
            await self._respond(writer, 400, b"bad request\n")
            return
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            await self._respond(writer, 405, b"method not allowed\n", extra=b"Allow: GET, HEAD\r\n")
            return
        head_only = method == b"HEAD"
        try:
            await self._route(writer, target, head_only)
        except Exception as exc:  # a failing collector must not take the endpoint down
            log.warning("HTTP %s failed: %r", target[:64].decode("latin-1"), exc)
            await self._respond(writer, 500, b"internal error\n", head_only=head_only)

    async def _route(self, writer: asyncio.StreamWriter, target: bytes, head_only: bool) -> None:
        if target == b"/metrics":
            body = await self._render()
            await self._respond(writer, 200, body, CONTENT_TYPE_LATEST.encode(), head_only=head_only)
        elif target in (b"/healthz", b"/readyz"):
            answer = (self._healthy if target == b"/healthz" else self._ready)()
            ok, why = await answer if inspect.isawaitable(answer) else answer
            await self._respond(writer, 200 if ok else 503, (why + "\n").encode(), head_only=head_only)
        else:
            await self._respond(writer, 404, b"not found\n", head_only=head_only)

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: bytes = b"text/plain; charset=utf-8",
        *,
        extra: bytes = b"",
        head_only: bool = False,
    ) -> None:
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
                  431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
                  503: b"Service Unavailable"}[status]
        header = (
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n"
            % (status, reason, content_type, len(body), extra)
        )
        try:
            writer.write(header if head_only else header + body)
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()
