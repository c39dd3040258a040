"""Config validation: every mistake an operator can make must name its key."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from agent.config import (
    Config,
    ConfigError,
    HealthConfig,
    NodeConfig,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parent.parent

MINIMAL: dict[str, Any] = {
    "nodes": [
        {"name": "node1", "address": "127.0.0.1:1883"},
        {"name": "node2", "address": "127.0.0.1:1884", "weight": 2},
    ]
}


def cfg_with(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL)
    data.update(changes)
    return data


def error_of(data: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value


def test_example_config_loads() -> None:
    cfg = load_config(REPO / "config" / "agent.yaml")
    assert [(n.name, n.host, n.port) for n in cfg.nodes] == [
        ("node1", "127.0.0.1", 1883),
        ("node2", "127.0.0.1", 1884),
        ("node3", "127.0.0.1", 1885),
    ]
    # The example documents the defaults; if they drift apart the docs lie.
    defaults = Config(nodes=cfg.nodes)
    assert cfg == defaults


def test_minimal_config_gets_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.nodes == (
        NodeConfig("node1", "127.0.0.1", 1883, 1.0),
        NodeConfig("node2", "127.0.0.1", 1884, 2.0),
    )
    assert cfg.listen == ("127.0.0.1", 12345)
    assert cfg.metrics_listen == ("127.0.0.1", 9898)
    assert cfg.health == HealthConfig()
    assert cfg.redis_timeout == 0.25
    assert cfg.log_level == "info" and cfg.log_format == "text"


def test_config_is_frozen_and_node_lookup() -> None:
    cfg = parse_config(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.session_ttl = 5  # type: ignore[misc]
    node2 = cfg.node("node2")
    assert node2 is not None and node2.port == 1884
    assert cfg.node("node9") is None
    # replace() must rebuild the lookup, not reuse a stale index.
    smaller = dataclasses.replace(cfg, nodes=cfg.nodes[:1])
    assert smaller.node("node2") is None and smaller.node("node1") is not None


def test_full_config_round_trip() -> None:
    cfg = parse_config(
        cfg_with(
            listen="[::1]:2345",
            metrics_listen={"host": "0.0.0.0", "port": 9000},
            redis_url="rediss://:s3cret@redis.example:6380/2",
            key_prefix="ma:",
            session_ttl=60,
            redis_timeout=0.1,
            redis_pool_size=4,
            state_refresh=0.25,
            evacuate_rate=5,
            max_in_flight=8,
            max_frame_size=4096,
            hello_timeout=1.5,
            drain_period=0,
            health={"check": "mqtt", "interval": 2, "timeout": 1, "rise": 3, "fall": 1},
            log_level="DEBUG",
            log_format="json",
        )
    )
    assert cfg.listen == ("::1", 2345)
    assert cfg.metrics_listen == ("0.0.0.0", 9000)
    assert cfg.health == HealthConfig("mqtt", 2.0, 1.0, 3, 1)
    assert cfg.log_level == "debug"
    assert (cfg.session_ttl, cfg.redis_pool_size, cfg.max_frame_size) == (60, 4, 4096)
    assert (cfg.hello_timeout, cfg.drain_period) == (1.5, 0.0)


def test_agent_check_and_haproxy_runtime_api_keys() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.agent_check_listen == ("127.0.0.1", 12346)
    assert cfg.haproxy_socket is None and cfg.haproxy_backend == "be_mqtt"
    cfg = parse_config(cfg_with(agent_check_listen=None, haproxy_socket="/run/haproxy/admin.sock",
                                haproxy_backend="be_brokers"))
    assert cfg.agent_check_listen is None
    assert (cfg.haproxy_socket, cfg.haproxy_backend) == ("/run/haproxy/admin.sock", "be_brokers")
    assert parse_config(cfg_with(haproxy_socket="unix:/run/h.sock")).haproxy_socket == "/run/h.sock"
    assert parse_config(cfg_with(haproxy_socket="127.0.0.1:9999")).haproxy_socket == ("127.0.0.1", 9999)
    assert parse_config(cfg_with(agent_check_listen="0.0.0.0:7000")).agent_check_listen == ("0.0.0.0", 7000)


def test_metrics_listen_null_disables() -> None:
    assert parse_config(cfg_with(metrics_listen=None)).metrics_listen is None


def test_ipv6_node_address() -> None:
    cfg = parse_config({"nodes": [{"name": "v6", "address": "[::1]:1883"}]})
    assert cfg.nodes[0].host == "::1" and cfg.nodes[0].port == 1883


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@10.0.0.1:6379/0", "redis://:***@10.0.0.1:6379/0"),
        ("redis://app:hunter2@r:6379/1", "redis://app:***@r:6379/1"),
        ("redis://r:6379/0?password=hunter2", "redis://r:6379/0?password=***"),
        ("redis://r:6379/0", "redis://r:6379/0"),
    ],
)
def test_redis_url_redacted(url: str, shown: str) -> None:
    cfg = parse_config(cfg_with(redis_url=url))
    assert cfg.redis_url == url
    assert cfg.redis_url_redacted == shown
    assert "hunter2" not in cfg.redis_url_redacted


def test_bad_redis_url_error_does_not_leak_password() -> None:
    err = error_of(cfg_with(redis_url="http://:hunter2@r:6379/0"))
    assert err.key == "redis_url"
    assert "hunter2" not in str(err)


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        (cfg_with(nodes=[{"name": "n", "adress": "h:1"}]), "nodes[0].adress", "unknown key"),
        (cfg_with(health={"intervall": 1}), "health.intervall", "unknown key"),
        (cfg_with(balancer="x"), "balancer", "unknown key"),
        (cfg_with(listen={"host": "h", "port": 1, "x": 1}), "listen.x", "unknown key"),
        ({"listen": "127.0.0.1:1"}, "nodes", "required"),
        (cfg_with(nodes=[]), "nodes", "at least one"),
        (cfg_with(nodes={"node1": "h:1"}), "nodes", "list"),
        (cfg_with(nodes=["h:1"]), "nodes[0]", "mapping"),
        (cfg_with(nodes=[{"name": "n"}]), "nodes[0].address", "required"),
        (cfg_with(nodes=[{"address": "h:1"}]), "nodes[0].name", "required"),
        (cfg_with(nodes=[{"name": "bad name", "address": "h:1"}]), "nodes[0].name", "invalid node name"),
        (cfg_with(nodes=[{"name": "x" * 65, "address": "h:1"}]), "nodes[0].name", "invalid node name"),
        (cfg_with(nodes=[{"name": 5, "address": "h:1"}]), "nodes[0].name", "string"),
        (cfg_with(nodes=[{"name": "n", "address": "h"}]), "nodes[0].address", "host:port"),
        (cfg_with(nodes=[{"name": "n", "address": "h:0"}]), "nodes[0].address", "between 1 and 65535"),
        (cfg_with(nodes=[{"name": "n", "address": "h:65536"}]), "nodes[0].address", "between 1 and 65535"),
        (cfg_with(nodes=[{"name": "n", "address": "h:http"}]), "nodes[0].address", "invalid port"),
        (cfg_with(nodes=[{"name": "n", "address": "::1:1883"}]), "nodes[0].address", "brackets"),
        (cfg_with(nodes=[{"name": "n", "address": "[10.0.0.1]:1883"}]), "nodes[0].address", "IPv6"),
        (cfg_with(nodes=[{"name": "n", "address": "bad host!:1883"}]), "nodes[0].address", "invalid host"),
        (cfg_with(nodes=[{"name": "n", "address": "0.0.0.0:1883"}]), "nodes[0].address", "wildcard"),
        (cfg_with(nodes=[{"name": "n", "address": "h:1", "weight": -1}]), "nodes[0].weight", "at least 0"),
        (cfg_with(nodes=[{"name": "n", "address": "h:1", "weight": "1"}]), "nodes[0].weight", "number"),
        (cfg_with(nodes=[{"name": "n", "address": "h:1", "weight": True}]), "nodes[0].weight", "number"),
        (cfg_with(nodes=[{"name": "n", "address": "h:1", "weight": float("nan")}]), "nodes[0].weight", "finite"),
        (cfg_with(nodes=[{"name": "n", "address": "h:1", "weight": 0}]), "nodes", "weight 0"),
        (
            cfg_with(nodes=[{"name": "a", "address": "h:1"}, {"name": "b", "address": "H:1"}]),
            "nodes[1].address",
            "same address as node 'a'",
        ),
        (cfg_with(listen="127.0.0.1"), "listen", "host:port"),
        (cfg_with(listen=12345), "listen", "string"),
        (cfg_with(listen={"host": "h"}), "listen.port", "required"),
        (cfg_with(listen={"host": "h", "port": "1"}), "listen.port", "integer"),
        (cfg_with(metrics_listen="127.0.0.1:12345"), "metrics_listen", "conflicts with listen"),
        (cfg_with(agent_check_listen="127.0.0.1:12345"), "agent_check_listen", "conflicts with listen"),
        (cfg_with(agent_check_listen="0.0.0.0:9898"), "agent_check_listen", "conflicts with metrics_listen"),
        (cfg_with(agent_check_listen="12346"), "agent_check_listen", "host:port"),
        (cfg_with(haproxy_socket="run/haproxy.sock"), "haproxy_socket", "host:port"),
        (cfg_with(haproxy_socket="unix:run/h.sock"), "haproxy_socket", "absolute"),
        (cfg_with(haproxy_socket="/" + "x" * 120), "haproxy_socket", "longer than 107"),
        (cfg_with(haproxy_socket=5), "haproxy_socket", "string"),
        (cfg_with(haproxy_backend="be mqtt"), "haproxy_backend", "invalid HAProxy backend name"),
        (cfg_with(redis_url="http://r:6379"), "redis_url", "scheme"),
        (cfg_with(redis_url="redis://r:notaport/0"), "redis_url", "invalid URL"),
        (cfg_with(redis_url="unix://"), "redis_url", "socket path"),
        (cfg_with(key_prefix=""), "key_prefix", "1-128"),
        (cfg_with(key_prefix="a b"), "key_prefix", "whitespace"),
        (cfg_with(session_ttl=0), "session_ttl", "between 1"),
        (cfg_with(session_ttl=1.5), "session_ttl", "integer"),
        (cfg_with(session_ttl=True), "session_ttl", "integer"),
        (cfg_with(redis_timeout=0), "redis_timeout", "greater than 0"),
        (cfg_with(redis_timeout=11), "redis_timeout", "at most 10"),
        (cfg_with(redis_pool_size=0), "redis_pool_size", "between 1 and 1024"),
        (cfg_with(state_refresh=0), "state_refresh", "at least"),
        (cfg_with(evacuate_rate=0), "evacuate_rate", "between 1"),
        (cfg_with(max_in_flight=1025), "max_in_flight", "between 1 and 1024"),
        (cfg_with(max_frame_size=255), "max_frame_size", "between 256"),
        (cfg_with(hello_timeout=0), "hello_timeout", "greater than 0"),
        (cfg_with(hello_timeout="5s"), "hello_timeout", "number"),
        (cfg_with(drain_period=-1), "drain_period", "at least 0"),
        (cfg_with(drain_period=601), "drain_period", "at most 600"),
        (cfg_with(workers=0), "workers", "between 1 and 64"),
        (cfg_with(workers=65), "workers", "between 1 and 64"),
        (cfg_with(workers="2"), "workers", "integer"),
        (cfg_with(workers=True), "workers", "integer"),
        (cfg_with(health="tcp"), "health", "mapping"),
        (cfg_with(health={"check": "http"}), "health.check", "'tcp' or 'mqtt'"),
        (cfg_with(health={"interval": 0}), "health.interval", "at least"),
        (cfg_with(health={"timeout": 0}), "health.timeout", "greater than 0"),
        (cfg_with(health={"interval": 1, "timeout": 2}), "health.timeout", "must not exceed"),
        (cfg_with(health={"rise": 0}), "health.rise", "between 1"),
        (cfg_with(health={"fall": 101}), "health.fall", "between 1"),
        (cfg_with(log_level="trace"), "log_level", "debug, info, warning, error"),
        (cfg_with(log_format="xml"), "log_format", "'text' or 'json'"),
        ([1, 2], "<config>", "mapping"),
        (None, "<config>", "empty"),
    ],
)
def test_invalid_values_name_their_key(data: object, key: str, fragment: str) -> None:
    err = error_of(data)
    assert err.key == key
    assert fragment in err.problem
    assert str(err) == f"{key}: {err.problem}"
    assert "\n" not in str(err)


def test_workers_defaults_to_one_and_accepts_up_to_64() -> None:
    assert parse_config(MINIMAL).workers == 1
    assert parse_config(cfg_with(workers=4)).workers == 4
    assert parse_config(cfg_with(workers=64)).workers == 64


def test_duplicate_node_name() -> None:
    err = error_of(
        cfg_with(
            nodes=[
                {"name": "node1", "address": "h:1"},
                {"name": "node2", "address": "h:2"},
                {"name": "node1", "address": "h:3"},
            ]
        )
    )
    assert str(err) == "nodes[2].name: duplicate node 'node1'"


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.key == str(missing)
    assert "No such file" in info.value.problem


def test_load_bad_yaml_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("nodes:\n  - name: node1\n    address: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.key == str(path)
    assert err.problem.startswith("invalid YAML:")
    assert "line " in err.problem
    assert "\n" not in str(err)


def test_load_rejects_duplicate_yaml_keys(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(
        "nodes:\n  - {name: node1, address: '127.0.0.1:1883'}\n"
        "session_ttl: 10\nsession_ttl: 20\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "duplicate key 'session_ttl'" in info.value.problem
    assert "line 4" in info.value.problem


def test_load_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == str(path)


def test_load_unknown_key_in_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(
        "nodes:\n  - {name: node1, address: '127.0.0.1:1883'}\n"
        "  - {name: node2, adress: '127.0.0.1:1884'}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "nodes[1].adress: unknown key"


@pytest.mark.parametrize("url", ["redis://user:pa/ss@host:6379/0", "redis://:se#cret@host/0", "redis://:x?y@h:1/0"])
def test_a_password_the_parser_misreads_never_reaches_the_error(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"redis_url": url, "nodes": [{"name": "a", "address": "127.0.0.1:1"}]})
    # A fixed text: nothing of the URL (or the parser's message quoting it) comes back.
    assert str(info.value) == (
        "redis_url: invalid URL (bad port; percent-encode '/', '#', '?' and '@' in a password)"
    )
