"""One Redis endpoint: redis-py's URL parsing for every client, and what the hot path refuses."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import parse_url

from agent.config import ConfigError, parse_config
from agent.endpoint import EndpointError, RedisEndpoint, redact_url


@pytest.mark.parametrize(
    ("url", "db"),
    [
        ("redis://h:6379/0?db=3", 3),  # the query wins, as in redis-py
        ("redis://h:6379?db=3", 3),
        ("redis://h:6379/5", 5),
        ("redis://h", 0),
        ("unix:///run/redis.sock?db=2", 2),
    ],
)
def test_every_client_gets_the_same_database(url: str, db: int) -> None:
    ep = RedisEndpoint.parse(url)
    assert ep.db == db
    assert ep.pipe_target().db == db  # the decision connection
    assert ep.async_pool().connection_kwargs.get("db", 0) == db  # background work
    assert ep.sync_client().connection_pool.connection_kwargs.get("db", 0) == db  # the CLI
    assert parse_url(url).get("db", 0) == db  # ... which is redis-py's own reading


def test_credentials_socket_and_name_reach_the_decision_connection() -> None:
    t = RedisEndpoint.parse("redis://app:s%40cret@h:7000/4?client_name=agent-1").pipe_target()
    assert (t.host, t.port, t.path, t.ssl) == ("h", 7000, None, None)
    assert t.setup_commands() == [("AUTH", "app", "s@cret"), ("SELECT", 4), ("CLIENT", "SETNAME", "agent-1")]
    t = RedisEndpoint.parse("redis://:pw@h").pipe_target()
    assert t.setup_commands() == [("AUTH", "pw")]
    t = RedisEndpoint.parse("unix:///run/r.sock").pipe_target()
    assert (t.host, t.path, t.setup_commands()) == (None, "/run/r.sock", [])


def test_tls_options_build_redis_py_s_own_context(tmp_path) -> None:
    import ssl

    t = RedisEndpoint.parse("rediss://h:6380/0?ssl_cert_reqs=none").pipe_target()
    assert t.ssl is not None and t.ssl.verify_mode == ssl.CERT_NONE and t.server_hostname == "h"
    t = RedisEndpoint.parse("rediss://h:6380/0").pipe_target()
    # redis-py's defaults (verification on; hostname checking as that redis-py version does it).
    from redis.asyncio.connection import SSLConnection

    assert t.ssl is not None and t.ssl.verify_mode == ssl.CERT_REQUIRED
    assert t.ssl.check_hostname == SSLConnection(host="h").ssl_context.check_hostname


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://h/abc", "database must be a number"),
        ("redis://h?db=x", "Invalid value for 'db'"),
        ("redis://h?socket_timeout=1", "URL option 'socket_timeout' is not supported"),
        ("redis://h?retry_on_timeout=yes", "URL option 'retry_on_timeout' is not supported"),
        ("redis://h?frobnicate=1", "URL option 'frobnicate' is not supported"),
        ("redis://h?ssl_cert_reqs=none", "ssl_* options need a rediss:// URL"),
        ("rediss://h?ssl_ca_certs=/nonexistent/ca.pem", "TLS options"),
        ("rediss://h?ssl_cert_reqs=maybe", "TLS options"),
        ("http://h", "scheme must be one of"),
        ("redis://:hunter2@", "missing host"),
        ("unix://", "socket path"),
    ],
)
def test_unusable_urls_are_config_errors_naming_redis_url(url: str, problem: str) -> None:
    with pytest.raises(EndpointError, match=problem.replace("*", r"\*").replace("(", r"\(")):
        RedisEndpoint.parse(url)
    with pytest.raises(ConfigError) as err:
        parse_config({"redis_url": url, "nodes": [{"name": "a", "address": "127.0.0.1:1"}]})
    assert err.value.key == "redis_url" and "\n" not in str(err.value)
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@10.0.0.1:6379/0", "redis://:***@10.0.0.1:6379/0"),
        ("rediss://app:hunter2@r:6379/1?ssl_cert_reqs=none", "rediss://app:***@r:6379/1?ssl_cert_reqs=none"),
        ("redis://r:6379/0?password=hunter2&db=1", "redis://r:6379/0?password=***&db=1"),
        ("unix:///s.sock", "unix:///s.sock"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert RedisEndpoint.parse(url).redacted == shown
