"""Agent configuration: one YAML file, validated strictly.

Why strict: the agent sits in the CONNECT path of every MQTT client. A typo
(``adress``, ``intervall``) that silently falls back to a default would only
show up as odd placements in production, so every unknown key, wrong type and
out-of-range number is a :class:`ConfigError` naming the exact key path
(``nodes[1].address``, ``health.interval``; list indexes are 0-based).
The CLI prints ``mqtt-affinity: config error: <key>: <problem>`` and exits 2.

YAML shape (see ``config/agent.yaml`` for an annotated example)::

    nodes:                       # required, non-empty
      - name: node1              # the HAProxy server name
        address: 127.0.0.1:1883  # host:port, IPv6 as [::1]:1883
        weight: 1                # optional, >= 0 (0 = no new placements)
    listen: 127.0.0.1:12345      # or {host: ..., port: ...}
    metrics_listen: 127.0.0.1:9898   # null disables the HTTP endpoint
    agent_check_listen: 127.0.0.1:12346   # HAProxy agent-check; null disables it
    haproxy_socket: /run/haproxy/mqtt-affinity.sock   # runtime API (or host:port); null: passive evacuation
    health: {check: tcp, interval: 1.0, timeout: 0.5, rise: 2, fall: 2}
    ...                          # the other scalar fields of Config
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import yaml

from agent.endpoint import EndpointError, RedisEndpoint, redact_url
from agent.model import DEFAULT_MAX_FRAME_SIZE, DEFAULT_PREFIX

__all__ = [
    "Config",
    "ConfigError",
    "HealthConfig",
    "NodeConfig",
    "load_config",
    "parse_config",
    "redact_url",
]


class ConfigError(Exception):
    """A configuration problem, always attributable to one key path.

    ``str()`` is a single line so it can be printed after a prefix and grepped
    in service logs; multi-line parser messages are folded.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = " ".join(str(problem).split())
        super().__init__(key, self.problem)

    def __str__(self) -> str:
        return f"{self.key}: {self.problem}"


@dataclass(frozen=True)
class NodeConfig:
    """One MQTT broker; ``name`` must equal its HAProxy ``server`` name."""

    name: str
    host: str
    port: int
    weight: float = 1.0


@dataclass(frozen=True)
class HealthConfig:
    """Probe settings; rise/fall count consecutive rounds, as in HAProxy."""

    check: Literal["tcp", "mqtt"] = "tcp"
    interval: float = 1.0
    timeout: float = 0.5
    rise: int = 2
    fall: int = 2


@dataclass(frozen=True)
class Config:
    """The whole agent configuration (immutable: a SIGHUP reload builds a new one)."""

    nodes: tuple[NodeConfig, ...]
    listen: tuple[str, int] = ("127.0.0.1", 12345)
    metrics_listen: tuple[str, int] | None = ("127.0.0.1", 9898)
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = DEFAULT_PREFIX
    session_ttl: int = 86400
    redis_timeout: float = 0.25
    redis_pool_size: int = 32
    state_refresh: float = 0.5
    evacuate_rate: int = 20
    max_in_flight: int = 64
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    #: Seconds a persistent client waits (its CONNECT refused, ``how=wait``) while its owner
    #: is down, before it is moved to another broker and starts a new session there. 0 = move
    #: at once.
    owner_down_grace: float = 30.0
    #: Decisions per Redis script call at most: those that queue within one turn of the event
    #: loop go together (1: one call each, all in one pipelined write).
    decision_batch: int = 16
    #: Client records kept in the local cache (0: no cache; every decision asks Redis).
    cache_size: int = 100_000
    #: Placements wait for this many replicas (WAIT) before the ACK; 0 = no wait. See README.
    redis_wait_replicas: int = 0
    #: How long a placement waits for its replicas (seconds); past it the ACK goes out anyway.
    redis_wait_timeout: float = 0.1
    #: Seconds of recent placements each agent keeps to write back after a Redis failover.
    failover_journal: float = 30.0
    #: Seconds between record sweeps (expired records out, sessions per node counted); one
    #: agent sweeps at a time.
    sweep_interval: float = 300.0
    #: HAProxy ``agent-check`` listener (node state and weight for each broker server); None: off.
    agent_check_listen: tuple[str, int] | None = ("127.0.0.1", 12346)
    #: This balancer's HAProxy runtime API: a unix socket path, or (host, port) of a TCP stats
    #: socket. None: no active evacuation and no connection counts (evacuate is passive).
    haproxy_socket: str | tuple[str, int] | None = None
    #: The HAProxy backend whose servers are the brokers (the shipped haproxy.cfg's ``be_mqtt``).
    haproxy_backend: str = "be_mqtt"
    #: SPOP connections served at once; past it new ones are closed at once (HAProxy opens
    #: ~70 per balancer under load, so the default leaves room for a dozen balancers).
    max_connections: int = 1024
    #: Seconds a new SPOP connection may take to send its HELLO; then AGENT-DISCONNECT
    #: (status 2, timeout) and close. HAProxy sends it at once (its own `timeout hello`).
    hello_timeout: float = 5.0
    #: On SIGTERM/SIGINT: seconds of failing HAProxy's health checks while still serving,
    #: so every HAProxy marks this agent DOWN and moves to another agent before it
    #: disconnects. 0 = no drain. See drain_period in README.md for how to size it.
    drain_period: float = 3.0
    #: Agent processes sharing the SPOP and agent-check ports (SO_REUSEPORT), for balancer hosts
    #: with spare cores; above 1 a supervisor runs them (agent/workers.py). Restart-only.
    workers: int = 1
    health: HealthConfig = HealthConfig()
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"

    @cached_property
    def _by_name(self) -> dict[str, NodeConfig]:
        # node() sits on the decision path, so index once. cached_property
        # writes the instance __dict__ directly, which a frozen dataclass allows,
        # and unlike an extra field it stays out of fields()/asdict()/replace().
        return {n.name: n for n in self.nodes}

    def node(self, name: str) -> NodeConfig | None:
        """The configured node called ``name``, or None if HAProxy names an unknown server."""
        return self._by_name.get(name)

    @property
    def redis_url_redacted(self) -> str:
        """The Redis URL safe to log: any password (userinfo or query) is ``***``."""
        return redact_url(self.redis_url)


# --------------------------------------------------------------------------
# helpers

_NODE_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$"
)
_LOG_LEVELS = ("debug", "info", "warning", "error")
# HAProxy proxy names: letters, digits, '-', '_', '.', ':'.
_PROXY_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

_TOP_KEYS = frozenset(
    {
        "nodes",
        "listen",
        "metrics_listen",
        "redis_url",
        "key_prefix",
        "session_ttl",
        "redis_timeout",
        "redis_pool_size",
        "state_refresh",
        "evacuate_rate",
        "max_in_flight",
        "max_frame_size",
        "max_connections",
        "owner_down_grace",
        "sweep_interval",
        "redis_wait_replicas",
        "redis_wait_timeout",
        "decision_batch",
        "cache_size",
        "failover_journal",
        "hello_timeout",
        "drain_period",
        "workers",
        "agent_check_listen",
        "haproxy_socket",
        "haproxy_backend",
        "health",
        "log_level",
        "log_format",
    }
)
_NODE_KEYS = frozenset({"name", "address", "weight"})
_HEALTH_KEYS = frozenset({"check", "interval", "timeout", "rise", "fall"})
_ADDR_KEYS = frozenset({"host", "port"})


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            list: "list", dict: "mapping"}.get(type(value), type(value).__name__)


def _check_keys(data: Mapping[Any, Any], allowed: frozenset[str], path: str) -> None:
    for key in data:
        if not isinstance(key, str) or key not in allowed:
            shown = key if isinstance(key, str) else repr(key)
            raise ConfigError(f"{path}.{shown}" if path else str(shown), "unknown key")


def _get_int(value: object, key: str, lo: int, hi: int) -> int:
    # bool is an int subclass: "port: yes" must not become port 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"expected an integer, got {_type_name(value)}")
    if not lo <= value <= hi:
        raise ConfigError(key, f"must be between {lo} and {hi}, got {value}")
    return value


def _get_number(
    value: object, key: str, lo: float, hi: float, *, lo_open: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"expected a number, got {_type_name(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(key, f"must be a finite number, got {value}")
    too_low = v <= lo if lo_open else v < lo
    if too_low or v > hi:
        lo_s = f"greater than {lo:g}" if lo_open else f"at least {lo:g}"
        raise ConfigError(key, f"must be {lo_s} and at most {hi:g}, got {value}")
    return v


def _get_str(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {_type_name(value)}")
    return value


def _check_host(host: str, key: str, *, allow_wildcard: bool) -> str:
    if not host:
        raise ConfigError(key, "empty host")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME_RE.match(host):
            raise ConfigError(key, f"invalid host {host!r}") from None
        return host
    if ip.is_unspecified and not allow_wildcard:
        raise ConfigError(key, f"{host} is a wildcard address, not a host to connect to")
    return host


def _parse_address(value: object, key: str, *, allow_wildcard: bool) -> tuple[str, int]:
    """Parse ``host:port`` / ``[v6]:port`` or a ``{host, port}`` mapping."""
    if isinstance(value, Mapping):
        _check_keys(value, _ADDR_KEYS, key)
        for k in ("host", "port"):
            if k not in value:
                raise ConfigError(f"{key}.{k}", "required")
        host = _get_str(value["host"], f"{key}.host").strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        port = _get_int(value["port"], f"{key}.port", 1, 65535)
        return _check_host(host, f"{key}.host", allow_wildcard=allow_wildcard), port
    text = _get_str(value, key).strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ConfigError(key, f"expected [ipv6]:port, got {text!r}")
        host, port_s = text[1:end], text[end + 2 :]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ConfigError(key, f"{host!r} in brackets is not an IPv6 address") from None
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep:
            raise ConfigError(key, f"expected host:port, got {text!r}")
        if ":" in host:
            raise ConfigError(key, f"IPv6 addresses need brackets, e.g. [{host}]:{port_s}")
    if not (port_s.isascii() and port_s.isdigit()):
        raise ConfigError(key, f"invalid port {port_s!r}")
    port = int(port_s)
    if not 1 <= port <= 65535:
        raise ConfigError(key, f"port must be between 1 and 65535, got {port}")
    return _check_host(host, key, allow_wildcard=allow_wildcard), port


def _parse_node(value: object, path: str) -> NodeConfig:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected a mapping with name and address, got {_type_name(value)}")
    _check_keys(value, _NODE_KEYS, path)
    for k in ("name", "address"):
        if k not in value:
            raise ConfigError(f"{path}.{k}", "required")
    name = _get_str(value["name"], f"{path}.name")
    if not _NODE_NAME_RE.match(name):
        raise ConfigError(
            f"{path}.name",
            f"invalid node name {name!r}: 1-64 characters of A-Z a-z 0-9 _ . : -",
        )
    host, port = _parse_address(value["address"], f"{path}.address", allow_wildcard=False)
    weight = 1.0
    if "weight" in value:
        weight = _get_number(value["weight"], f"{path}.weight", 0.0, 1_000_000.0)
    return NodeConfig(name=name, host=host, port=port, weight=weight)


def _parse_health(value: object) -> HealthConfig:
    if value is None:
        return HealthConfig()
    if not isinstance(value, Mapping):
        raise ConfigError("health", f"expected a mapping, got {_type_name(value)}")
    _check_keys(value, _HEALTH_KEYS, "health")
    d = HealthConfig()
    check = value.get("check", d.check)
    if check not in ("tcp", "mqtt"):
        raise ConfigError("health.check", f"must be 'tcp' or 'mqtt', got {check!r}")
    interval = _get_number(value.get("interval", d.interval), "health.interval", 0.01, 3600.0)
    timeout = _get_number(value.get("timeout", d.timeout), "health.timeout", 0.0, 60.0, lo_open=True)
    if timeout > interval:
        # A round waits for its slowest probe; a timeout longer than the
        # interval would silently stretch every round past the interval.
        raise ConfigError(
            "health.timeout", f"must not exceed health.interval ({interval:g}), got {timeout:g}"
        )
    rise = _get_int(value.get("rise", d.rise), "health.rise", 1, 100)
    fall = _get_int(value.get("fall", d.fall), "health.fall", 1, 100)
    return HealthConfig(check=check, interval=interval, timeout=timeout, rise=rise, fall=fall)


def _parse_nodes(value: object) -> tuple[NodeConfig, ...]:
    if not isinstance(value, list):
        raise ConfigError("nodes", f"expected a list of nodes, got {_type_name(value)}")
    if not value:
        raise ConfigError("nodes", "at least one node is required")
    nodes: list[NodeConfig] = []
    names: dict[str, int] = {}
    addrs: dict[tuple[str, int], str] = {}
    for i, item in enumerate(value):
        node = _parse_node(item, f"nodes[{i}]")
        if node.name in names:
            raise ConfigError(f"nodes[{i}].name", f"duplicate node {node.name!r}")
        addr = (node.host.lower(), node.port)
        if addr in addrs:
            # Two names for one broker would split its sessions' affinity.
            raise ConfigError(f"nodes[{i}].address", f"same address as node {addrs[addr]!r}")
        names[node.name] = i
        addrs[addr] = node.name
        nodes.append(node)
    if all(n.weight == 0 for n in nodes):
        raise ConfigError("nodes", "every node has weight 0, so no client could ever be placed")
    return tuple(nodes)


def _parse_redis_url(value: object) -> str:
    url = _get_str(value, "redis_url").strip()
    try:
        RedisEndpoint.parse(url)  # redis-py's own reading, and what the hot path can honour
    except EndpointError as exc:
        raise ConfigError("redis_url", str(exc)) from None
    return url


def _same_port(a: tuple[str, int] | None, b: tuple[str, int] | None) -> bool:
    """Two listeners that would collide: same port on the same or a wildcard address."""
    if a is None or b is None or a[1] != b[1]:
        return False
    return a[0] == b[0] or "0.0.0.0" in (a[0], b[0]) or "::" in (a[0], b[0])


def _parse_haproxy_socket(value: object) -> str | tuple[str, int] | None:
    """An absolute unix socket path (``/run/haproxy/admin.sock``, ``unix:`` optional) or host:port."""
    if value is None:
        return None
    text = _get_str(value, "haproxy_socket").strip()
    path = text[len("unix:"):] if text.startswith("unix:") else text
    if path.startswith("/"):
        if len(path.encode()) > 107:
            raise ConfigError("haproxy_socket", "unix socket path longer than 107 bytes")
        return path
    if text.startswith("unix:"):
        raise ConfigError("haproxy_socket", f"unix socket path must be absolute, got {path!r}")
    return _parse_address(text, "haproxy_socket", allow_wildcard=False)


def parse_config(data: object, source: str = "<config>") -> Config:
    """Validate an already-parsed YAML document and build a :class:`Config`.

    ``source`` names the document in errors that cannot be pinned to a key
    (an empty file, a top level that is not a mapping).
    """
    if data is None:
        raise ConfigError(source, "empty configuration; at least 'nodes' is required")
    if not isinstance(data, Mapping):
        raise ConfigError(source, f"top level must be a mapping, got {_type_name(data)}")
    _check_keys(data, _TOP_KEYS, "")
    if "nodes" not in data:
        raise ConfigError("nodes", "required")
    d = Config(nodes=())
    kw: dict[str, Any] = {"nodes": _parse_nodes(data["nodes"])}

    if "listen" in data:
        kw["listen"] = _parse_address(data["listen"], "listen", allow_wildcard=True)
    if "metrics_listen" in data:
        ml = data["metrics_listen"]
        kw["metrics_listen"] = (
            None if ml is None else _parse_address(ml, "metrics_listen", allow_wildcard=True)
        )
    if "agent_check_listen" in data:
        ac = data["agent_check_listen"]
        kw["agent_check_listen"] = (
            None if ac is None else _parse_address(ac, "agent_check_listen", allow_wildcard=True)
        )
    listen = kw.get("listen", d.listen)
    metrics = kw.get("metrics_listen", d.metrics_listen)
    if _same_port(metrics, listen):
        raise ConfigError("metrics_listen", f"conflicts with listen (port {listen[1]})")
    agent_check = kw.get("agent_check_listen", d.agent_check_listen)
    for other, name in ((listen, "listen"), (metrics, "metrics_listen")):
        if _same_port(agent_check, other):
            assert other is not None
            raise ConfigError("agent_check_listen", f"conflicts with {name} (port {other[1]})")
    if "haproxy_socket" in data:
        kw["haproxy_socket"] = _parse_haproxy_socket(data["haproxy_socket"])
    if "haproxy_backend" in data:
        backend = _get_str(data["haproxy_backend"], "haproxy_backend")
        if not _PROXY_NAME_RE.match(backend):
            raise ConfigError("haproxy_backend", f"invalid HAProxy backend name {backend!r}")
        kw["haproxy_backend"] = backend

    if "redis_url" in data:
        kw["redis_url"] = _parse_redis_url(data["redis_url"])
    if "key_prefix" in data:
        prefix = _get_str(data["key_prefix"], "key_prefix")
        if "{" in prefix or "}" in prefix:
            raise ConfigError("key_prefix", "may not contain braces (they would change the keys' hash tag)")
        if not 1 <= len(prefix) <= 128 or any(c.isspace() or not c.isprintable() for c in prefix):
            raise ConfigError("key_prefix", "must be 1-128 printable characters without whitespace")
        kw["key_prefix"] = prefix

    int_fields: dict[str, tuple[int, int]] = {
        "session_ttl": (1, 2**31 - 1),
        "redis_pool_size": (1, 1024),
        "evacuate_rate": (1, 100_000),
        "max_in_flight": (1, 1024),
        "max_frame_size": (256, 16_777_216),
        "max_connections": (1, 1_000_000),
        "redis_wait_replicas": (0, 16),
        "decision_batch": (1, 256),
        "cache_size": (0, 10_000_000),
        "workers": (1, 64),
    }
    for key, (lo, hi) in int_fields.items():
        if key in data:
            kw[key] = _get_int(data[key], key, lo, hi)
    if "redis_timeout" in data:
        kw["redis_timeout"] = _get_number(data["redis_timeout"], "redis_timeout", 0.0, 10.0, lo_open=True)
    if "redis_wait_timeout" in data:
        kw["redis_wait_timeout"] = _get_number(data["redis_wait_timeout"], "redis_wait_timeout", 0.001, 10.0)
    if "failover_journal" in data:
        kw["failover_journal"] = _get_number(data["failover_journal"], "failover_journal", 0.0, 3600.0)
    if "sweep_interval" in data:
        kw["sweep_interval"] = _get_number(data["sweep_interval"], "sweep_interval", 1.0, 86400.0)
    if "owner_down_grace" in data:
        kw["owner_down_grace"] = _get_number(data["owner_down_grace"], "owner_down_grace", 0.0, 86400.0)
    if "state_refresh" in data:
        kw["state_refresh"] = _get_number(data["state_refresh"], "state_refresh", 0.01, 60.0)
    if "hello_timeout" in data:
        kw["hello_timeout"] = _get_number(data["hello_timeout"], "hello_timeout", 0.0, 300.0, lo_open=True)
    if "drain_period" in data:
        kw["drain_period"] = _get_number(data["drain_period"], "drain_period", 0.0, 600.0)

    if "health" in data:
        kw["health"] = _parse_health(data["health"])
    if "log_level" in data:
        level = _get_str(data["log_level"], "log_level").lower()
        if level not in _LOG_LEVELS:
            raise ConfigError("log_level", f"must be one of {', '.join(_LOG_LEVELS)}, got {data['log_level']!r}")
        kw["log_level"] = level
    if "log_format" in data:
        fmt = data["log_format"]
        if fmt not in ("text", "json"):
            raise ConfigError("log_format", f"must be 'text' or 'json', got {fmt!r}")
        kw["log_format"] = fmt
    return Config(**kw)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys.

    PyYAML keeps the last of two equal keys; in a config that means an
    operator's edit can be silently overridden by a forgotten line below it.
    """


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            continue  # unhashable keys are rejected later as unknown keys
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        what = exc.problem or exc.context or "syntax error"
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        ctx = f" ({exc.context})" if exc.context and exc.problem else ""
        return f"invalid YAML: {what}{ctx}{where}"
    return f"invalid YAML: {exc}"


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the YAML file at ``path``.

    Every failure, including an unreadable file or broken YAML, is a
    :class:`ConfigError` so the CLI has exactly one error path (exit 2).
    """
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(source, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(source, _yaml_problem(exc)) from None
    return parse_config(data, source)
