"""One Redis endpoint, parsed once by redis-py, used by every connection.

The agent talks to Redis three ways: the pipelined decision connection (the per-CONNECT hot
path, :mod:`agent.redis_pipe`), redis-py's asyncio pool (background work) and redis-py's
synchronous client (the operator CLI). All three take their parameters from here, and here
takes them from redis-py's own URL parser (``redis.asyncio.connection.parse_url``) and its
own connection classes, so ``?db=3``, credentials, unix sockets and the TLS options
(``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``, ...) mean exactly one
thing whichever client carries a command.

What redis-py accepts but the hot path cannot honour is refused up front
(:class:`EndpointError`, which the config turns into ``redis_url: ...`` and exit 2), and so is
a database that is not a number: redis-py would silently use database 0 for ``redis://h/abc``.
As in redis-py, ``?db=N`` wins over a database in the path.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import (
    AbstractConnection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.connection import (
    parse_url as redis_parse_url,
)

__all__ = ["EndpointError", "PipeTarget", "RedisEndpoint", "redact_url"]

#: URL query options every client honours. Anything else redis-py knows is a config error:
#: timeouts and retries come from ``redis_timeout`` and the agent's own breaker, not the URL.
SUPPORTED_OPTIONS = frozenset(
    {
        "db",
        "client_name",
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_check_hostname",
        "ssl_min_version",
        "ssl_ciphers",
        "ssl_password",
    }
)
SCHEMES = ("redis", "rediss", "unix")


class EndpointError(ValueError):
    """A Redis URL that cannot be used; the message is one line and never holds a password."""


def redact_url(url: str) -> str:
    """The URL with any password (``user:pw@`` or ``?password=``) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    query = "&".join(
        ("password=***" if p.split("=", 1)[0].lower() == "password" else p) for p in parts.query.split("&") if p
    )
    out = f"{parts.scheme}://{netloc}{parts.path}"
    return out + (f"?{query}" if query else "")


@dataclass(frozen=True, slots=True)
class PipeTarget:
    """Everything the pipelined decision connection needs to open and prepare a connection."""

    host: str | None
    port: int
    path: str | None
    ssl: ssl.SSLContext | None
    server_hostname: str | None
    username: str | None
    password: str | None
    db: int
    client_name: str | None

    def setup_commands(self) -> list[tuple[str | int, ...]]:
        """Commands that make a fresh connection ready, in order (AUTH, SELECT, SETNAME)."""
        cmds: list[tuple[str | int, ...]] = []
        if self.password is not None:
            cmds.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        if self.db:
            cmds.append(("SELECT", self.db))
        if self.client_name:
            cmds.append(("CLIENT", "SETNAME", self.client_name))
        return cmds


class RedisEndpoint:
    """A validated Redis URL and the clients built from it."""

    def __init__(self, url: str, kwargs: Mapping[str, Any], connection_class: type[AbstractConnection]) -> None:
        self.url = url
        self._kwargs = dict(kwargs)
        self._connection_class = connection_class

    @classmethod
    def parse(cls, url: str) -> RedisEndpoint:
        """Validate ``url`` with redis-py's parser; :class:`EndpointError` says what is wrong."""
        shown = redact_url(url)
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            # Not the parser's message: with '/', '#' or '?' in the password it quotes the password back.
            raise EndpointError("invalid URL (bad port; percent-encode '/', '#', '?' and '@' in a password)") from None
        if parts.scheme not in SCHEMES:
            raise EndpointError(f"scheme must be one of {', '.join(s + '://' for s in SCHEMES)}, got {shown!r}")
        try:
            kwargs: dict[str, Any] = dict(redis_parse_url(url))
        except ValueError as exc:
            raise EndpointError(_scrub(str(exc), url)) from None
        connection_class = kwargs.pop("connection_class", None) or aioredis.Connection
        unknown = sorted(set(kwargs) - SUPPORTED_OPTIONS - {"host", "port", "path", "username", "password"})
        if unknown:
            raise EndpointError(
                f"URL option {unknown[0]!r} is not supported (timeouts come from redis_timeout; "
                f"supported: {', '.join(sorted(SUPPORTED_OPTIONS))})"
            )
        if parts.scheme == "unix":
            if not kwargs.get("path"):
                raise EndpointError("unix:// URL needs a socket path")
        else:
            if not parts.hostname:
                raise EndpointError(f"missing host in {shown!r}")
            path = unquote(parts.path).strip("/")
            if path and not path.isdigit():
                raise EndpointError(f"database must be a number, got {path!r} in {shown!r}")
        if kwargs.get("db", 0) < 0:
            raise EndpointError(f"database must be >= 0 in {shown!r}")
        if parts.scheme != "rediss" and any(k.startswith("ssl_") for k in kwargs):
            raise EndpointError(f"ssl_* options need a rediss:// URL, got {shown!r}")
        endpoint = cls(url, kwargs, connection_class)
        endpoint._validate_tls()
        return endpoint

    def _validate_tls(self) -> None:
        if self._connection_class is not SSLConnection:
            return
        try:
            self._connection().ssl_context.get()  # type: ignore[attr-defined]
        except (OSError, ssl.SSLError, redis.RedisError, ValueError, TypeError) as exc:
            raise EndpointError(f"TLS options: {_scrub(str(exc), self.url)}") from None

    # -- facts ---------------------------------------------------------------------------

    @property
    def redacted(self) -> str:
        return redact_url(self.url)

    @property
    def db(self) -> int:
        return int(self._kwargs.get("db", 0))

    @property
    def tls(self) -> bool:
        return self._connection_class is SSLConnection

    def _connection(self) -> AbstractConnection:
        """An unconnected redis-py connection: redis-py's own reading of every option."""
        return self._connection_class(**self._kwargs)

    def pipe_target(self) -> PipeTarget:
        """Parameters for the pipelined decision connection, as redis-py would connect."""
        conn: Any = self._connection()
        ctx = conn.ssl_context.get() if isinstance(conn, SSLConnection) else None
        path = conn.path if isinstance(conn, UnixDomainSocketConnection) else None
        host = None if path else conn.host
        return PipeTarget(
            host=host,
            port=0 if path else int(conn.port),
            path=path,
            ssl=ctx,
            server_hostname=host if ctx is not None else None,
            username=conn.username,
            password=conn.password,
            db=int(conn.db or 0),
            client_name=conn.client_name,
        )

    # -- clients ---------------------------------------------------------------------------

    def async_pool(self, **options: Any) -> aioredis.BlockingConnectionPool:
        """redis-py's asyncio pool on this endpoint; ``options`` are pool/connection settings."""
        return aioredis.BlockingConnectionPool(connection_class=self._connection_class, **self._kwargs, **options)

    def sync_client(self, **options: Any) -> redis.Redis:
        """redis-py's synchronous client (the operator CLI)."""
        kwargs = dict(self._kwargs)
        if self.tls:
            kwargs["ssl"] = True
        elif "path" in kwargs:
            kwargs["unix_socket_path"] = kwargs.pop("path")
        return redis.Redis(**kwargs, **options)


def _scrub(text: str, url: str) -> str:
    """Remove the URL's password from an error text, in case a library echoed it."""
    try:
        pw = urlsplit(url).password
    except ValueError:
        pw = None
    if pw:
        text = text.replace(pw, "***").replace(unquote(pw), "***")
    return " ".join(text.split())
