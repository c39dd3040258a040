"""One Redis endpoint, parsed once by redis-py, used by every connection.

The agent talks to Redis three ways: the pipelined decision connection (the per-CONNECT hot
path, :mod:`agent.redis_pipe`), redis-py's asyncio client (background work) and redis-py's
synchronous client (the operator CLI). All three take their parameters from here, and here
takes them from redis-py's own URL parser (``redis.asyncio.connection.parse_url``) and its
own connection classes, so ``?db=3``, credentials, unix sockets and the TLS options
(``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``, ...) mean exactly one
thing whichever client carries a command.

Three kinds of endpoint, one URL form each:

- ``redis://``, ``rediss://``, ``unix://``: one Redis (redis-py's forms).
- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]`` (``rediss+sentinel``
  for TLS): the Sentinels are asked for the primary of ``service``; credentials and TLS options
  are the data nodes'; ``?sentinel_username=&sentinel_password=`` authenticate to Sentinels that
  require it (with TLS, the Sentinels use the same TLS options). See :mod:`agent.sentinel`.
- ``redis+cluster://[[user]:password@]host:port[,host:port...]`` (``rediss+cluster``): startup
  nodes of a Redis Cluster. See :mod:`agent.cluster`.

For the multi-host forms the host list is ours to split; everything else (credentials, query
options) goes through redis-py's parser on an equivalent single-host URL, so it is validated
exactly as for ``redis://``.

What redis-py accepts but the hot path cannot honour is refused up front
(:class:`EndpointError`, which the config turns into ``redis_url: ...`` and exit 2), and so is
a database that is not a number: redis-py would silently use database 0 for ``redis://h/abc``.
As in redis-py, ``?db=N`` wins over a database in the path.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

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

__all__ = ["EndpointError", "Kind", "PipeTarget", "RedisEndpoint", "redact_url"]

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
SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")
#: Our own query options of the Sentinel form (not redis-py's): credentials for the Sentinels.
SENTINEL_OPTIONS = frozenset({"sentinel_username", "sentinel_password"})


class Kind(StrEnum):
    SINGLE = "single"
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


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
        (f"{p.split('=', 1)[0]}=***" if p.split("=", 1)[0].lower() in ("password", "sentinel_password") else p)
        for p in parts.query.split("&")
        if p
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

    def __init__(
        self,
        url: str,
        kwargs: Mapping[str, Any],
        connection_class: type[AbstractConnection],
        *,
        kind: Kind = Kind.SINGLE,
        hosts: tuple[tuple[str, int], ...] = (),
        service: str = "",
        sentinel_auth: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url
        self._kwargs = dict(kwargs)
        self._connection_class = connection_class
        self.kind = kind
        #: Sentinels (SENTINEL) or startup nodes (CLUSTER).
        self.hosts = hosts
        #: The Sentinel service name of the primary.
        self.service = service
        self._sentinel_auth = dict(sentinel_auth or {})
        self._locator: Any = None

    @classmethod
    def parse(cls, url: str) -> RedisEndpoint:
        """Validate ``url`` with redis-py's parser; :class:`EndpointError` says what is wrong."""
        shown = redact_url(url)
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme not in SCHEMES:
            raise EndpointError(f"scheme must be one of {', '.join(s + '://' for s in SCHEMES)}, got {shown!r}")
        if "+" in scheme:
            return cls._parse_multi(url, scheme, shown)
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            # Not the parser's message: with '/', '#' or '?' in the password it quotes the password back.
            raise EndpointError("invalid URL (bad port; percent-encode '/', '#', '?' and '@' in a password)") from None
        kwargs, connection_class = _redis_py_kwargs(url)
        if parts.scheme == "unix":
            if not kwargs.get("path"):
                raise EndpointError("unix:// URL needs a socket path")
        else:
            if not parts.hostname:
                raise EndpointError(f"missing host in {shown!r}")
            path = unquote(parts.path).strip("/")
            if path and not path.isdigit():
                raise EndpointError(f"database must be a number, got {path!r} in {shown!r}")
        _check_common(kwargs, parts.scheme == "rediss", shown)
        endpoint = cls(url, kwargs, connection_class)
        endpoint._validate_tls()
        return endpoint

    @classmethod
    def _parse_multi(cls, url: str, scheme: str, shown: str) -> RedisEndpoint:
        base, _, kind_name = scheme.partition("+")
        kind = Kind(kind_name)
        rest = url.split("://", 1)[1]
        rest, _, query = rest.partition("?")
        netloc, slash, path = rest.partition("/")
        userinfo, at, hostlist = netloc.rpartition("@")
        if not hostlist:
            raise EndpointError(f"missing host in {shown!r}")
        default_port = 26379 if kind is Kind.SENTINEL else 6379
        hosts = tuple(_host_port(h, shown, default_port) for h in hostlist.split(","))
        options = parse_qsl(query, keep_blank_values=True)
        sentinel_auth = {k: v for k, v in options if k in SENTINEL_OPTIONS}
        if sentinel_auth and kind is not Kind.SENTINEL:
            raise EndpointError(f"sentinel_* options need a redis+sentinel:// URL, got {shown!r}")
        service = ""
        db = ""
        segments = [unquote(p) for p in path.split("/") if p] if slash else []
        if kind is Kind.SENTINEL:
            if not segments:
                raise EndpointError(f"a Sentinel URL names its service: {scheme}://host:port[,host:port]/service[/db]")
            service, *extra = segments
            if len(extra) > 1:
                raise EndpointError(f"unexpected path after the database in {shown!r}")
            db = extra[0] if extra else ""
        elif segments:
            if segments != ["0"]:
                raise EndpointError(f"Redis Cluster has only database 0, got /{'/'.join(segments)} in {shown!r}")
        if db and not db.isdigit():
            raise EndpointError(f"database must be a number, got {db!r} in {shown!r}")
        # Everything but the host list through redis-py's parser, on the equivalent one-host URL.
        h, p = hosts[0]
        host = f"[{h}]" if ":" in h else h
        rest_query = urlencode([(k, v) for k, v in options if k not in SENTINEL_OPTIONS])
        surrogate = f"{base}://{userinfo}{at}{host}:{p}/{db}" + (f"?{rest_query}" if rest_query else "")
        kwargs, connection_class = _redis_py_kwargs(surrogate, url)
        kwargs.pop("host", None)
        kwargs.pop("port", None)
        _check_common(kwargs, base == "rediss", shown)
        if kind is Kind.CLUSTER and kwargs.get("db"):
            raise EndpointError(f"Redis Cluster has only database 0, got ?db={kwargs['db']} in {shown!r}")
        endpoint = cls(url, kwargs, connection_class, kind=kind, hosts=hosts, service=service,
                       sentinel_auth=sentinel_auth)
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

    @property
    def kwargs(self) -> dict[str, Any]:
        """redis-py connection options (no host, port or connection class)."""
        return dict(self._kwargs)

    @property
    def sentinel_kwargs(self) -> dict[str, Any]:
        """Options for connections to the Sentinels themselves."""
        opts = {k: v for k, v in self._kwargs.items() if k.startswith(("ssl_", "socket_"))}
        if self.tls:
            opts["ssl"] = True
        opts["username"] = self._sentinel_auth.get("sentinel_username")
        opts["password"] = self._sentinel_auth.get("sentinel_password")
        return {k: v for k, v in opts.items() if v is not None}

    def _connection(self, **override: Any) -> AbstractConnection:
        """An unconnected redis-py connection: redis-py's own reading of every option."""
        return self._connection_class(**{**self._kwargs, **override})

    def pipe_target(self, host: str | None = None, port: int | None = None) -> PipeTarget:
        """Parameters for a pipelined connection, as redis-py would connect (to ``host:port``
        for a Sentinel-given primary or a Cluster node)."""
        override: dict[str, Any] = {}
        if host is not None:
            override = {"host": host, "port": port}
        conn: Any = self._connection(**override)
        ctx = conn.ssl_context.get() if isinstance(conn, SSLConnection) else None
        path = conn.path if isinstance(conn, UnixDomainSocketConnection) else None
        h = None if path else conn.host
        return PipeTarget(
            host=h,
            port=0 if path else int(conn.port),
            path=path,
            ssl=ctx,
            server_hostname=h if ctx is not None else None,
            username=conn.username,
            password=conn.password,
            db=int(conn.db or 0),
            client_name=conn.client_name,
        )

    # -- clients ---------------------------------------------------------------------------

    def locator(self) -> Any:
        """The shared finder of the current primary (Sentinel endpoints only)."""
        if self.kind is not Kind.SENTINEL:
            raise TypeError("only a Sentinel endpoint has a primary locator")
        if self._locator is None:
            from agent.sentinel import PrimaryLocator

            self._locator = PrimaryLocator(self)
        return self._locator

    def async_client(self, **options: Any) -> Any:
        """redis-py's asyncio client for background work: a pool on one Redis, a pool that
        follows the Sentinel-verified primary, or redis-py's cluster client."""
        if self.kind is Kind.CLUSTER:
            from agent.cluster import async_cluster_client

            return async_cluster_client(self, **options)
        if self.kind is Kind.SENTINEL:
            from agent.sentinel import async_primary_client

            return async_primary_client(self, **options)
        pool = aioredis.BlockingConnectionPool(connection_class=self._connection_class, **self._kwargs, **options)
        return aioredis.Redis(connection_pool=pool)

    def async_pool(self, **options: Any) -> aioredis.BlockingConnectionPool:
        """redis-py's asyncio pool on a single Redis (tests)."""
        return aioredis.BlockingConnectionPool(connection_class=self._connection_class, **self._kwargs, **options)

    def decision_connection(self, *, connect_timeout: float) -> Any:
        """The hot path's pipelined connection(s) for this kind of endpoint."""
        if self.kind is Kind.CLUSTER:
            from agent.cluster import ClusterPipe

            return ClusterPipe(self, connect_timeout=connect_timeout)
        from agent.redis_pipe import PipelinedRedis

        if self.kind is Kind.SENTINEL:
            return PipelinedRedis(self.locator().target, connect_timeout=connect_timeout)
        return PipelinedRedis(self.pipe_target(), connect_timeout=connect_timeout)

    def sync_client(self, **options: Any) -> Any:
        """redis-py's synchronous client (the operator CLI). For Sentinel, a client of the
        primary the Sentinels name now (verified): a CLI command is short-lived."""
        kwargs = dict(self._kwargs)
        if self.tls:
            kwargs["ssl"] = True
        if self.kind is Kind.CLUSTER:
            from redis.cluster import ClusterNode, RedisCluster

            kwargs.pop("db", None)
            kwargs.pop("connection_class", None)
            return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in self.hosts], **kwargs, **options)
        if self.kind is Kind.SENTINEL:
            from agent.sentinel import find_primary_sync

            host, port = find_primary_sync(self, timeout=float(options.get("socket_timeout") or 2.0))
            return redis.Redis(host=host, port=port, **kwargs, **options)
        if "path" in kwargs:
            kwargs["unix_socket_path"] = kwargs.pop("path")
        return redis.Redis(**kwargs, **options)


def _host_port(text: str, shown: str, default_port: int) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        port = port.lstrip(":") or str(default_port)
    else:
        host, _, port = text.rpartition(":")
        if not host:
            host, port = text, str(default_port)
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise EndpointError(f"bad host:port {text!r} in {shown!r}")
    return host, int(port)


def _redis_py_kwargs(url: str, shown_url: str | None = None) -> tuple[dict[str, Any], type[AbstractConnection]]:
    try:
        kwargs: dict[str, Any] = dict(redis_parse_url(url))
    except ValueError as exc:
        raise EndpointError(_scrub(str(exc), shown_url or url)) from None
    connection_class = kwargs.pop("connection_class", None) or aioredis.Connection
    unknown = sorted(set(kwargs) - SUPPORTED_OPTIONS - {"host", "port", "path", "username", "password"})
    if unknown:
        raise EndpointError(
            f"URL option {unknown[0]!r} is not supported (timeouts come from redis_timeout; "
            f"supported: {', '.join(sorted(SUPPORTED_OPTIONS))})"
        )
    return kwargs, connection_class


def _check_common(kwargs: Mapping[str, Any], tls: bool, shown: str) -> None:
    if kwargs.get("db", 0) < 0:
        raise EndpointError(f"database must be >= 0 in {shown!r}")
    if not tls and any(k.startswith("ssl_") for k in kwargs):
        raise EndpointError(f"ssl_* options need a rediss:// URL, got {shown!r}")


def _scrub(text: str, url: str) -> str:
    """Remove the URL's password from an error text, in case a library echoed it."""
    secrets = []
    try:
        netloc = url.split("://", 1)[1].split("/", 1)[0]
        userinfo = netloc.rpartition("@")[0]
        if ":" in userinfo:
            secrets.append(userinfo.split(":", 1)[1])
    except IndexError:
        pass
    secrets += [v for k, v in parse_qsl(urlsplit(url).query) if "password" in k.lower()]
    for pw in secrets:
        if pw:
            text = text.replace(pw, "***").replace(unquote(pw), "***")
    return " ".join(text.split())
