"""Operator commands of ``mqtt-affinity``: pins, node states and weights, inspection.

Why a CLI at all when everything is a plain Redis key: the key layout is a contract with
the agent's decide script (see :mod:`agent.store`), and a hand-typed ``HSET`` with a typo'd
node name or state is silently ignored by every agent. These commands validate against the
agent's own config, write exactly the fields the agents read, and explain in words what the
next CONNECT of a client will get.

Finding Redis: ``--config FILE`` (the agent YAML; preferred, because it also gives the node
list, addresses, weights, ``evacuate_rate`` and ``metrics_listen``), or ``--redis-url URL``
(+ ``--key-prefix``), or else the ``MQTT_AFFINITY_CONFIG`` environment variable. Given both,
``--redis-url``/``--key-prefix`` override the config's values.

With ``--redis-url`` alone there is no node list: a node is then "known" if it appears in
``P node-state``, ``P node-weight`` or as a ``P placed:<node>`` key, and node health cannot
be probed (no addresses).

Health: the agent probes brokers continuously (tcp or mqtt, with rise/fall); a one-shot CLI
cannot reproduce that state, so it does a single TCP connect to the node's configured
address with the config's ``health.timeout``. That is what "down" and "health" mean here.

Exit status: 0 success, 1 the thing asked about does not exist or Redis cannot be reached,
2 bad usage or a bad config. Every error is one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from agent.config import Config, ConfigError, load_config, redact_url

__all__ = ["add_commands"]

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2

DEFAULT_PREFIX = "mqtt-affinity:"
CONFIG_ENV = "MQTT_AFFINITY_CONFIG"
NODE_STATES = ("active", "drain", "evacuate", "maintenance")
#: Socket timeout for every Redis call: long enough for a loaded server, short enough that an
#: operator at a terminal is not left waiting on a black-holed address.
REDIS_TIMEOUT = 2.0
METRICS_TIMEOUT = 2.0
#: Probe timeout when there is no config to take ``health.timeout`` from.
DEFAULT_PROBE_TIMEOUT = 0.5
MAX_WEIGHT = 1_000_000.0
MAX_RATE = 100_000

_PROG = "mqtt-affinity"


class CommandError(Exception):
    """An expected failure: printed as one line ``mqtt-affinity: <message>``, exit ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())


# --------------------------------------------------------------------------- target


@dataclass
class Target:
    """Where the commands act: one Redis, one key prefix, and (ideally) the agent's config."""

    url: str
    prefix: str
    client: redis.Redis
    config: Config | None = None
    _known: set[str] | None = field(default=None, repr=False)

    @property
    def p(self) -> bytes:
        return self.prefix.encode("utf-8")

    def key(self, kind: str, suffix: bytes = b"") -> bytes:
        return self.p + kind.encode("utf-8") + suffix

    def node_states(self) -> dict[str, str]:
        raw = self.client.hgetall(self.key("node-state"))
        return {_text(k): _text(v).strip().lower() for k, v in raw.items()}

    def node_weights(self) -> dict[str, str]:
        raw = self.client.hgetall(self.key("node-weight"))
        return {_text(k): _text(v).strip() for k, v in raw.items()}

    def evacuate_rates(self) -> dict[str, str]:
        raw = self.client.hgetall(self.key("evacuate-rate"))
        return {_text(k): _text(v).strip() for k, v in raw.items()}

    def placed_nodes(self) -> list[str]:
        """Nodes that have a ``P placed:<node>`` ZSET (SCAN, so safe on a busy Redis)."""
        base = self.key("placed:")
        out: list[str] = []
        for key in self.client.scan_iter(match=_glob_escape(base) + b"*", count=1000):
            out.append(_text(bytes(key)[len(base):]))
        return sorted(set(out))

    def redis_nodes(self) -> list[str]:
        """Nodes that Redis knows about: named in node-state/node-weight or with placements."""
        names = set(self.node_states()) | set(self.node_weights()) | set(self.placed_nodes())
        return sorted(names)

    def known_nodes(self) -> set[str]:
        """The nodes a command may act on: the config's, else what Redis has seen."""
        if self._known is None:
            if self.config is not None:
                self._known = {n.name for n in self.config.nodes}
            else:
                self._known = set(self.redis_nodes())
        return self._known

    def require_node(self, node: str) -> None:
        if node not in self.known_nodes():
            if self.config is not None:
                where = "the config"
            else:
                where = "Redis (node-state, node-weight or placed:*; pass --config for the configured list)"
            known = ", ".join(sorted(self.known_nodes())) or "none"
            raise CommandError(EXIT_NOT_FOUND, f"unknown node {node!r}: not in {where}; known nodes: {known}")

    def address(self, node: str) -> tuple[str, int] | None:
        if self.config is None:
            return None
        nc = self.config.node(node)
        return (nc.host, nc.port) if nc is not None else None

    @property
    def probe_timeout(self) -> float:
        return self.config.health.timeout if self.config is not None else DEFAULT_PROBE_TIMEOUT

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass


def _make_target(args: argparse.Namespace) -> Target:
    config: Config | None = None
    config_path: str | None = args.config
    if config_path is None and args.redis_url is None:
        config_path = os.environ.get(CONFIG_ENV) or None
        if config_path is None:
            raise CommandError(
                EXIT_USAGE, f"no Redis to talk to: pass --config FILE or --redis-url URL (or set {CONFIG_ENV})"
            )
    if config_path is not None:
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            raise CommandError(EXIT_USAGE, f"config error: {exc}") from None
    url = args.redis_url or (config.redis_url if config else None)
    assert url is not None
    prefix = args.key_prefix or (config.key_prefix if config else DEFAULT_PREFIX)
    try:
        client = redis.Redis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            # One attempt: a retry only makes an operator wait longer for the same answer.
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
    except ValueError as exc:
        raise CommandError(EXIT_USAGE, f"invalid Redis URL {redact_url(url)}: {_scrub(str(exc), url)}") from None
    return Target(url=url, prefix=prefix, client=client, config=config)


def _scrub(text: str, url: str) -> str:
    """Remove the URL's password from an error text, in case a library echoed it."""
    try:
        pw = urlsplit(url).password
    except ValueError:
        pw = None
    if pw:
        text = text.replace(pw, "***").replace(unquote(pw), "***")
    return text


Handler = Callable[[argparse.Namespace, Target], int]


def _command(fn: Handler) -> Callable[[argparse.Namespace], int]:
    """Wrap a handler: connect, map expected failures to one stderr line and an exit status."""

    def run(args: argparse.Namespace) -> int:
        target: Target | None = None
        try:
            target = _make_target(args)
            return fn(args, target)
        except CommandError as exc:
            print(f"{_PROG}: {exc.message}", file=sys.stderr)
            return exc.status
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            url = target.url if target else (args.redis_url or "?")
            print(f"{_PROG}: cannot reach Redis at {redact_url(url)}: {_one_line(_scrub(str(exc), url))}",
                  file=sys.stderr)
            return EXIT_NOT_FOUND
        except redis.RedisError as exc:
            url = target.url if target else (args.redis_url or "?")
            print(f"{_PROG}: Redis error at {redact_url(url)}: {_one_line(_scrub(str(exc), url))}", file=sys.stderr)
            return EXIT_NOT_FOUND
        finally:
            if target is not None:
                target.close()

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


# --------------------------------------------------------------------------- helpers


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _glob_escape(raw: bytes) -> bytes:
    """Escape Redis MATCH glob characters so a prefix like ``a[1]:`` matches literally."""
    out = bytearray()
    for b in raw:
        if b in b"*?[]\\":
            out.append(0x5C)
        out.append(b)
    return bytes(out)


def _client_id(args: argparse.Namespace) -> bytes:
    raw: str = args.client_id
    if args.hex:
        text = raw[2:] if raw.lower().startswith("0x") else raw
        try:
            cid = bytes.fromhex(text)
        except ValueError:
            raise CommandError(EXIT_USAGE, f"--hex: {raw!r} is not an even number of hex digits") from None
    else:
        try:
            cid = raw.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from a non-UTF-8 terminal
            raise CommandError(EXIT_USAGE, "client id is not valid UTF-8; pass it with --hex") from None
    if not cid:
        raise CommandError(EXIT_USAGE, "empty client id")
    return cid


def _show_cid(cid: bytes, as_hex: bool) -> str:
    """A client id for a human: as typed if it is printable UTF-8, else as hex."""
    if not as_hex:
        try:
            text = cid.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            if text.isprintable():
                return text
    return f"{cid.hex()} (hex)" if not as_hex else cid.hex()


def _cid_json(cid: bytes) -> dict[str, Any]:
    try:
        text: str | None = cid.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {"client_id": text, "client_id_hex": cid.hex()}


def _fmt_ttl(ttl: int | None) -> str:
    if ttl is None:
        return "never"
    if ttl < 60:
        return f"{ttl}s"
    d, rest = divmod(ttl, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    parts = [f"{d}d" if d else "", f"{h}h" if h else "", f"{m}m" if m else "", f"{s}s" if s else ""]
    return f"{ttl}s ({''.join(parts)})"


def _fmt_time(value: str | None) -> str:
    if not value:
        return "-"
    try:
        ts = float(value)
        when = datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (ValueError, OverflowError, OSError):
        return value
    return f"{value} ({when})"


def _int_or_raw(value: str | None) -> int | str | None:
    if value is None:
        return None
    try:
        return int(float(value))
    except (ValueError, OverflowError):
        return value


def _fmt_num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:g}"


def _probe(addr: tuple[str, int] | None, timeout: float) -> bool | None:
    """One TCP connect: True up, False down, None when there is no address to try."""
    if addr is None:
        return None
    try:
        with socket.create_connection(addr, timeout=timeout):
            return True
    except OSError:
        return False


def _probe_many(target: Target, nodes: Sequence[str]) -> dict[str, bool | None]:
    """Probe in parallel, so a few dead nodes cost one timeout, not one each."""
    if not nodes:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(nodes))) as pool:
        results = pool.map(lambda n: _probe(target.address(n), target.probe_timeout), nodes)
        return dict(zip(nodes, results))


def _health_word(up: bool | None) -> str:
    return {True: "up", False: "down", None: "unknown"}[up]


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(r) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _kv(pairs: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in pairs) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {v}" for k, v in pairs)


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=False))


def _node_state(states: dict[str, str], node: str) -> str:
    s = states.get(node, "active")
    return s if s in NODE_STATES else "active"  # the agent ignores invalid states too


def _parse_weight(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        w = float(raw)
    except ValueError:
        return None
    return w if math.isfinite(w) and w >= 0 else None


# --------------------------------------------------------------------------- pin / unpin


@_command
def cmd_pin(args: argparse.Namespace, t: Target) -> int:
    """Pin a client to a node, refusing nodes the agent would ignore the pin for."""
    cid = _client_id(args)
    node: str = args.node
    known = t.known_nodes()
    if node not in known:
        raise CommandError(EXIT_USAGE, f"refusing to pin to {node!r}: unknown node (known: {', '.join(sorted(known)) or 'none'})")
    state = _node_state(t.node_states(), node)
    if state == "maintenance":
        raise CommandError(EXIT_USAGE, f"refusing to pin to {node!r}: node is in maintenance")
    addr = t.address(node)
    if _probe(addr, t.probe_timeout) is False:
        assert addr is not None
        raise CommandError(
            EXIT_USAGE, f"refusing to pin to {node!r}: node is down (no TCP connect to {addr[0]}:{addr[1]} "
            f"within {t.probe_timeout:g}s)"
        )
    key = t.key("pin:", cid)
    pipe = t.client.pipeline(transaction=True)
    # DEL first: a re-pin must not inherit the old pin's fields or expiry.
    pipe.delete(key)
    pipe.hset(key, mapping={"node": node, "reason": args.reason, "created_at": int(time.time())})
    if args.ttl:
        pipe.expire(key, args.ttl)
    pipe.execute()
    ttl = f" for {_fmt_ttl(args.ttl)}" if args.ttl else " (no expiry)"
    print(f"pinned {_show_cid(cid, args.hex)} to {node}{ttl}")
    print(f"note: a client that keeps a session starts a new one on {node} at its next CONNECT and stays "
          "there after unpin; anything queued on its old broker stays behind")
    return EXIT_OK


@_command
def cmd_unpin(args: argparse.Namespace, t: Target) -> int:
    """Remove a pin; the client then follows its record (or the hash) on its next CONNECT."""
    cid = _client_id(args)
    if not t.client.delete(t.key("pin:", cid)):
        raise CommandError(EXIT_NOT_FOUND, f"no pin for client {_show_cid(cid, args.hex)}")
    print(f"unpinned {_show_cid(cid, args.hex)}")
    return EXIT_OK


# --------------------------------------------------------------------------- show


@dataclass
class _NodeView:
    """What the CLI can tell about one node: known at all, its state, a one-shot probe."""

    name: str
    known: bool
    state: str
    up: bool | None

    def unusable_reason(self) -> str | None:
        """Why the agent would not send anybody here (mirrors decide.lua's ``usable`` set)."""
        if not self.known:
            return "unknown"
        if self.state == "maintenance":
            return "in maintenance"
        if self.up is False:
            return "down"
        return None


def _explain(owner_node: str | None, pin_node: str | None, views: dict[str, _NodeView]) -> tuple[str, str, str | None]:
    """(why, action, node) for the next CONNECT, following decide.lua's order: pin, owner, hash."""
    prefix = ""
    if pin_node is not None:
        reason = views[pin_node].unusable_reason()
        if reason is None:
            return f"pinned to {pin_node}", "pinned", pin_node
        prefix = f"pin to {pin_node} is ignored ({pin_node} is {reason}); "
    if owner_node is None:
        return prefix + "no record: will be placed by hash", "place", None
    v = views[owner_node]
    reason = v.unusable_reason()
    if reason is not None:
        if reason in ("unknown", "in maintenance"):
            return prefix + f"{owner_node} is {reason}: will move", "move", owner_node
        return prefix + f"{owner_node} is down: will move", "move", owner_node
    if v.state == "drain":
        return prefix + f"{owner_node} is draining: stays", "stay", owner_node
    if v.state == "evacuate":
        return prefix + f"{owner_node} is evacuating: will move", "move", owner_node
    return prefix + f"sticks to owner {owner_node}", "stick", owner_node


@_command
def cmd_show(args: argparse.Namespace, t: Target) -> int:
    """Everything Redis holds about one client, and what its next CONNECT will get."""
    cid = _client_id(args)
    okey, pkey = t.key("owner:", cid), t.key("pin:", cid)
    pipe = t.client.pipeline(transaction=True)  # one consistent snapshot
    pipe.hgetall(okey)
    pipe.ttl(okey)
    pipe.hgetall(pkey)
    pipe.ttl(pkey)
    pipe.hgetall(t.key("node-state"))
    owner_raw, owner_ttl, pin_raw, pin_ttl, states_raw = pipe.execute()
    owner = {_text(k): _text(v) for k, v in owner_raw.items()}
    pin = {_text(k): _text(v) for k, v in pin_raw.items()}
    states = {_text(k): _text(v).strip().lower() for k, v in states_raw.items()}

    owner_node = owner.get("node") or None if owner else None
    pin_node = pin.get("node") or None if pin else None
    names = [n for n in {owner_node, pin_node} if n]
    known = t.known_nodes()
    probes = _probe_many(t, [n for n in names if n in known])
    views = {
        n: _NodeView(n, n in known, _node_state(states, n), probes.get(n)) for n in names
    }
    why, action, next_node = _explain(owner_node, pin_node, views)
    found = bool(owner or pin)

    def ttl_of(raw: int) -> int | None:
        return int(raw) if int(raw) >= 0 else None

    if args.json:
        doc: dict[str, Any] = _cid_json(cid)
        doc["owner"] = (
            {
                "node": owner_node,
                "placed_at": _int_or_raw(owner.get("placed_at")),
                "by": owner.get("by"),
                "ttl": ttl_of(owner_ttl),
                "node_state": views[owner_node].state if owner_node else None,
                "node_health": _health_word(views[owner_node].up) if owner_node else None,
            }
            if owner
            else None
        )
        doc["pin"] = (
            {
                "node": pin_node,
                "reason": pin.get("reason", ""),
                "created_at": _int_or_raw(pin.get("created_at")),
                "ttl": ttl_of(pin_ttl),
            }
            if pin
            else None
        )
        doc["why"] = why
        doc["next"] = {"action": action, "node": next_node}
        _print_json(doc)
        return EXIT_OK if found else EXIT_NOT_FOUND
    if not found:
        raise CommandError(EXIT_NOT_FOUND, f"client {_show_cid(cid, args.hex)}: no record and no pin")
    pairs: list[tuple[str, str]] = [("client", _show_cid(cid, args.hex))]
    if owner:
        v = views.get(owner_node or "")
        state = f" ({v.state}, {_health_word(v.up)})" if v else ""
        pairs += [
            ("owner", f"{owner_node or '-'}{state}"),
            ("placed_at", _fmt_time(owner.get("placed_at"))),
            ("by", owner.get("by") or "-"),
            ("record ttl", _fmt_ttl(ttl_of(owner_ttl))),
        ]
    else:
        pairs.append(("owner", "- (no record)"))
    if pin:
        pairs += [
            ("pin", pin_node or "-"),
            ("pin reason", pin.get("reason") or "-"),
            ("pin created", _fmt_time(pin.get("created_at"))),
            ("pin ttl", _fmt_ttl(ttl_of(pin_ttl))),
        ]
    else:
        pairs.append(("pin", "-"))
    pairs.append(("why", why))
    print(_kv(pairs))
    return EXIT_OK


# --------------------------------------------------------------------------- nodes / stats


def _node_rows(t: Target, *, probe: bool) -> list[dict[str, Any]]:
    """One dict per node: configured nodes in config order, then nodes only Redis knows."""
    now = time.time()
    states = t.node_states()
    weights = t.node_weights()
    configured = [n.name for n in t.config.nodes] if t.config else []
    extra = [n for n in t.redis_nodes() if n not in configured]
    names = configured + extra
    pipe = t.client.pipeline(transaction=False)
    for n in names:
        pipe.zcount(t.key("placed:", n.encode("utf-8")), f"({now}", "+inf")
    counts = [int(c) for c in pipe.execute()] if names else []
    health = _probe_many(t, names) if probe else {}
    rows: list[dict[str, Any]] = []
    for name, sessions in zip(names, counts):
        nc = t.config.node(name) if t.config else None
        configured_w = nc.weight if nc else None
        override = _parse_weight(weights.get(name))
        state = _node_state(states, name)
        up = health.get(name)
        base = override if override is not None else (configured_w if configured_w is not None else 1.0)
        usable_for_new = state == "active" and up is not False and (nc is not None or t.config is None)
        rows.append(
            {
                "node": name,
                "configured": nc is not None,
                "address": f"{nc.host}:{nc.port}" if nc else None,
                "state": state,
                "configured_weight": configured_w,
                "weight_override": override,
                "effective_weight": base if usable_for_new else 0.0,
                "health": _health_word(up) if probe else None,
                "sessions": sessions,
            }
        )
    return rows


@_command
def cmd_nodes(args: argparse.Namespace, t: Target) -> int:
    """Per node: state, weights, a TCP probe now, live sessions from ``placed:<node>``."""
    rows = _node_rows(t, probe=True)
    if args.json:
        _print_json({"nodes": rows})
        return EXIT_OK
    table = []
    for r in rows:
        table.append(
            [
                r["node"] + ("" if r["configured"] or t.config is None else " (not configured)"),
                r["state"],
                _fmt_num(r["configured_weight"]),
                _fmt_num(r["weight_override"]),
                _fmt_num(r["effective_weight"]),
                r["health"],
                str(r["sessions"]),
            ]
        )
    print(_table(["NODE", "STATE", "WEIGHT", "OVERRIDE", "EFFECTIVE", "HEALTH", "SESSIONS"], table))
    if t.config is None:
        print("(no --config: nodes are those named in Redis; health cannot be probed)")
    return EXIT_OK


def _count_keys(t: Target, kind: str) -> int:
    return sum(1 for _ in t.client.scan_iter(match=_glob_escape(t.key(kind)) + b"*", count=1000))


def _default_metrics_url(config: Config | None) -> str | None:
    if config is None or config.metrics_listen is None:
        return None
    host, port = config.metrics_listen
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"


def _fetch_metrics(url: str) -> dict[str, Any]:
    """The agent's decision counters; raises OSError/ValueError when they cannot be had."""
    # Imported here: only `stats` needs them, and every command pays for module imports.
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT) as resp:
        text = resp.read().decode("utf-8", "replace")
    decisions: dict[str, float] = {}
    fallbacks: float | None = None
    redis_up: float | None = None
    seen = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mqtt_affinity_decisions_total":
                how = sample.labels.get("how", "")
                decisions[how] = decisions.get(how, 0.0) + sample.value
                seen = True
            elif sample.name == "mqtt_affinity_fallbacks_total":
                fallbacks = sample.value
                seen = True
            elif sample.name == "mqtt_affinity_redis_up":
                redis_up = sample.value
                seen = True
    if not seen:
        raise ValueError("no mqtt_affinity metrics in the answer")
    return {"decisions": {k: int(v) for k, v in sorted(decisions.items())},
            "fallbacks": int(fallbacks) if fallbacks is not None else None,
            "redis_up": int(redis_up) if redis_up is not None else None}


@_command
def cmd_stats(args: argparse.Namespace, t: Target) -> int:
    """Totals from Redis, plus the agent's own counters when its metrics endpoint answers."""
    import http.client
    records = _count_keys(t, "owner:")
    pins = _count_keys(t, "pin:")
    rows = _node_rows(t, probe=False)
    url = args.metrics_url or _default_metrics_url(t.config)
    metrics: dict[str, Any] = {"url": url, "reachable": False}
    error: str | None = None
    if url is None:
        error = "no metrics URL (pass --metrics-url or --config)"
    else:
        try:
            metrics.update(_fetch_metrics(url))
            metrics["reachable"] = True
        except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError is an OSError
            error = _one_line(str(getattr(exc, "reason", None) or exc))
    if error:
        metrics["error"] = error
    if args.json:
        _print_json(
            {
                "records": records,
                "pins": pins,
                "nodes": {r["node"]: {"state": r["state"], "sessions": r["sessions"]} for r in rows},
                "sessions_total": sum(r["sessions"] for r in rows),
                "agent_metrics": metrics,
            }
        )
        return EXIT_OK
    print(_kv([("records", str(records)), ("pins", str(pins)),
               ("sessions", str(sum(r["sessions"] for r in rows)))]))
    print()
    print(_table(["NODE", "STATE", "SESSIONS"], [[r["node"], r["state"], str(r["sessions"])] for r in rows]))
    print()
    if not metrics["reachable"]:
        print(f"agent metrics: unreachable ({url or '-'}: {error})")
    else:
        print(f"agent metrics ({url}):")
        pairs = [(f"decisions {how}", str(n)) for how, n in metrics["decisions"].items()]
        pairs.append(("fallbacks", _fmt_num(metrics["fallbacks"])))
        pairs.append(("redis up", _fmt_num(metrics["redis_up"])))
        print("\n".join("  " + line for line in _kv(pairs).splitlines()))
    return EXIT_OK


# --------------------------------------------------------------------------- node state / weight


def _set_state(t: Target, node: str, state: str) -> str:
    t.require_node(node)
    pipe = t.client.pipeline(transaction=True)
    pipe.hget(t.key("node-state"), node)
    pipe.hset(t.key("node-state"), node, state)
    old, _ = pipe.execute()
    return _node_state({node: _text(old).strip().lower()} if old is not None else {}, node)


def _state_command(state: str, blurb: str) -> Callable[[argparse.Namespace], int]:
    """One handler per state command; ``state`` is the value agents read (``activate`` -> ``active``)."""
    assert state in NODE_STATES, state

    def handler(args: argparse.Namespace, t: Target) -> int:
        old = _set_state(t, args.node, state)
        print(f"{args.node}: {state} (was {old}); {blurb}")
        return EXIT_OK

    handler.__name__ = f"cmd_{state}"
    return _command(handler)


@_command
def cmd_evacuate(args: argparse.Namespace, t: Target) -> int:
    """Evacuate; the rate is exactly what this command says, so a stale --rate never lingers."""
    t.require_node(args.node)
    pipe = t.client.pipeline(transaction=True)
    pipe.hget(t.key("node-state"), args.node)
    pipe.hset(t.key("node-state"), args.node, "evacuate")
    if args.rate is not None:
        pipe.hset(t.key("evacuate-rate"), args.node, args.rate)
    else:
        pipe.hdel(t.key("evacuate-rate"), args.node)
    old = pipe.execute()[0]
    was = _node_state({args.node: _text(old).strip().lower()} if old is not None else {}, args.node)
    if args.rate is not None:
        rate = f"{args.rate}/s"
    elif t.config is not None:
        rate = f"{t.config.evacuate_rate}/s (config default)"
    else:
        rate = "the agents' configured evacuate_rate"
    print(f"{args.node}: evacuate (was {was}); clients move away as they reconnect, at most {rate}")
    return EXIT_OK


@_command
def cmd_weight(args: argparse.Namespace, t: Target) -> int:
    """Override (or reset) a node's share of new placements at run time."""
    if (args.weight is None) == (not args.reset):
        args._parser.error("give either a weight W or --reset")
    t.require_node(args.node)
    if args.reset:
        removed = t.client.hdel(t.key("node-weight"), args.node)
        conf = t.config.node(args.node) if t.config else None
        back = f"configured weight {conf.weight:g}" if conf else "the configured weight"
        print(f"{args.node}: weight override {'removed' if removed else 'was not set'}; {back} applies")
        return EXIT_OK
    t.client.hset(t.key("node-weight"), args.node, f"{args.weight:g}")
    print(f"{args.node}: weight {args.weight:g}" + (" (no new placements)" if args.weight == 0 else ""))
    return EXIT_OK


# --------------------------------------------------------------------------- argparse


def _whole_number(what: str, lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number of ``what`` in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number of {what}, got {text!r}") from None
        if hi is None and v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {v}")
        if hi is not None and not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {v}")
        return v

    return parse


_positive_int = _whole_number("seconds", 1)
_rate = _whole_number("moves per second", 1, MAX_RATE)


def _weight(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or not 0 <= v <= MAX_WEIGHT:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_WEIGHT:g}, got {text}")
    return v


_TARGET_EPILOG = (
    "Redis is found with --config (the agent YAML: preferred, it gives the node list, "
    "addresses, weights and metrics address), else --redis-url (+ --key-prefix), else the "
    f"{CONFIG_ENV} environment variable. With --redis-url alone there is no node list: a node is "
    "known if it appears in <prefix>node-state, <prefix>node-weight or as a <prefix>placed:<node> key, "
    "and nodes cannot be probed. 'Down' means a single TCP connect to the node's configured "
    "address failed within health.timeout (the agent's own checks may differ: mqtt probes, rise/fall). "
    "Exit status: 0 ok, 1 not found or Redis unreachable, 2 bad usage."
)


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("where Redis is")
    g.add_argument("--config", metavar="FILE", help=f"agent YAML config (default: ${CONFIG_ENV})")
    g.add_argument("--redis-url", metavar="URL",
                   help="Redis URL; overrides the config's redis_url. Without --config, node names are "
                        "validated only against what Redis already names")
    g.add_argument("--key-prefix", metavar="PREFIX",
                   help=f"key prefix; overrides the config's key_prefix (default {DEFAULT_PREFIX!r})")
    return common


def _cid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("client_id", metavar="CLIENT_ID", help="MQTT client id (UTF-8 text, or hex with --hex)")
    p.add_argument("--hex", action="store_true", help="CLIENT_ID is hex (binary ids); print ids as hex")


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the operator commands on the ``mqtt-affinity`` subparsers."""
    common = _common()

    def add(name: str, help_text: str, handler: Callable[[argparse.Namespace], int],
            description: str | None = None) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, parents=[common], help=help_text, description=description or help_text,
            epilog=_TARGET_EPILOG,
        )
        p.set_defaults(handler=handler, _parser=p)
        return p

    p = add("pin", "send a client to a node (its session moves there for good)", cmd_pin,
            "Pin CLIENT_ID to NODE (writes <prefix>pin:<cid> {node, reason, created_at}). Refused with "
            "status 2 if NODE is unknown, in maintenance or down. Agents read pins on every decision.")
    _cid_args(p)
    p.add_argument("node", metavar="NODE")
    p.add_argument("--ttl", type=_positive_int, metavar="SECONDS", help="the pin expires after SECONDS")
    p.add_argument("--reason", default="", metavar="TEXT", help="free text kept with the pin")

    p = add("unpin", "remove a client's pin (status 1 if there was none)", cmd_unpin)
    _cid_args(p)

    p = add("show", "a client's record, pin and what its next CONNECT gets", cmd_show,
            "Show the owner record (node, placed_at, by, TTL), the pin, and why: what the next CONNECT "
            "would get. Status 1 if the client has neither a record nor a pin.")
    _cid_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = add("nodes", "per node: state, weights, health (TCP probe now), live sessions", cmd_nodes,
            "Effective weight is the node's share of new placements right now: the run-time override "
            "(or the configured weight), 0 while draining, evacuating, in maintenance or down.")
    p.add_argument("--json", action="store_true", help="print one JSON document")

    for name, state, blurb, text in (
        ("drain", "drain", "keeps its clients, gets no new ones", "stop new placements on NODE; its clients stay"),
        ("activate", "active", "takes new clients again", "back to normal: NODE takes new clients again"),
        ("maintenance", "maintenance", "gets nobody; its clients move on their next CONNECT",
         "take NODE out: nobody is sent there, its clients move on their next CONNECT"),
    ):
        p = add(name, text, _state_command(state, blurb))
        p.add_argument("node", metavar="NODE")

    p = add("evacuate", "move NODE's clients away as they reconnect, rate-limited", cmd_evacuate,
            "Like drain, and clients of NODE are re-placed on their next CONNECT, at most --rate per second "
            "across all agents. Without --rate the config's evacuate_rate applies (an earlier --rate is removed).")
    p.add_argument("node", metavar="NODE")
    p.add_argument("--rate", type=_rate, metavar="N", help="moves per second")

    p = add("weight", "override a node's weight (W >= 0) or --reset it", cmd_weight,
            "Set <prefix>node-weight NODE W (0 = no new placements), or delete the override with --reset.")
    p.add_argument("node", metavar="NODE")
    p.add_argument("weight", metavar="W", type=_weight, nargs="?")
    p.add_argument("--reset", action="store_true", help="remove the override: the configured weight applies")

    p = add("stats", "totals: records, pins, sessions per node, the agent's decision counters", cmd_stats)
    p.add_argument("--metrics-url", metavar="URL",
                   help="agent metrics endpoint (default: http://<metrics_listen>/metrics from the config)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
