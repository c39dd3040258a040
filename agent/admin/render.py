"""Output of the operator commands: tables, key/value blocks and JSON documents.

Pure string (and JSON-document) functions of the results in :mod:`agent.admin.results`;
nothing here reads Redis or prints.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from agent.admin.explain import EvacuationSample, NodeRow
from agent.admin.results import (
    Evacuation,
    MigrateView,
    NodesView,
    Pinned,
    ShowView,
    StateChanged,
    StatsView,
    Unpinned,
    WeightChanged,
)
from agent.model import NodeState

__all__ = [
    "evacuate_text",
    "evacuation_progress",
    "health_word",
    "json_text",
    "kv",
    "nodes_json",
    "nodes_text",
    "pinned_text",
    "show_cid",
    "show_json",
    "show_text",
    "state_text",
    "stats_json",
    "stats_text",
    "table",
    "unpinned_text",
    "weight_text",
]

JSON = dict[str, Any]

# --------------------------------------------------------------------------- building blocks


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, no trailing blanks."""
    body = [list(r) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
    return "\n".join(lines)


def kv(pairs: Sequence[tuple[str, str]]) -> str:
    """``key: value`` lines, the values aligned."""
    width = max(len(k) for k, _ in pairs) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {v}" for k, v in pairs)


def json_text(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=False)


def show_cid(cid: bytes, as_hex: bool) -> str:
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


def cid_json(cid: bytes) -> JSON:
    try:
        text: str | None = cid.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {"client_id": text, "client_id_hex": cid.hex()}


def fmt_ttl(ttl: int | None) -> str:
    if ttl is None:
        return "never"
    if ttl < 60:
        return f"{ttl}s"
    d, rest = divmod(ttl, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    parts = [f"{d}d" if d else "", f"{h}h" if h else "", f"{m}m" if m else "", f"{s}s" if s else ""]
    return f"{ttl}s ({''.join(parts)})"


def fmt_time(value: str | None) -> str:
    if not value:
        return "-"
    try:
        when = datetime.fromtimestamp(float(value), tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (ValueError, OverflowError, OSError):
        return value
    return f"{value} ({when})"


def fmt_num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def int_or_raw(value: str | None) -> int | str | None:
    """A stored timestamp as a number when it is one, else as stored."""
    if value is None:
        return None
    try:
        return int(float(value))
    except (ValueError, OverflowError):
        return value


def health_word(up: bool | None) -> str:
    return {True: "up", False: "down", None: "unknown"}[up]


# --------------------------------------------------------------------------- pins


def pinned_text(r: Pinned) -> str:
    ttl = f" for {fmt_ttl(r.ttl)}" if r.ttl else " (no expiry)"
    return (
        f"pinned {show_cid(r.cid, r.as_hex)} to {r.node}{ttl}\n"
        f"note: a client that keeps a session starts a new one on {r.node} at its next CONNECT and stays "
        "there after unpin; anything queued on its old broker stays behind\n"
        f"keys: {_keys(r.keys, r.cid, r.as_hex)}"
    )


def _keys(keys: tuple[bytes, bytes], cid: bytes, as_hex: bool) -> str:
    """Where the client's records live (the bucket hashes; its field is its id)."""
    owners, pins = (k.decode("utf-8", "replace") for k in keys)
    return f"{owners} (record), {pins} (pin); field {show_cid(cid, as_hex)}"


def unpinned_text(r: Unpinned) -> str:
    return f"unpinned {show_cid(r.cid, r.as_hex)}"


# --------------------------------------------------------------------------- node state / weight

_STATE_BLURB = {
    NodeState.DRAIN: "keeps its clients, gets no new ones",
    NodeState.ACTIVE: "takes new clients again",
    NodeState.MAINTENANCE: "gets nobody; its clients move on their next CONNECT",
}


def state_text(r: StateChanged) -> str:
    head = f"{r.node}: {r.state} (was {r.was}); "
    if r.state is not NodeState.EVACUATE:
        return head + _STATE_BLURB[r.state]
    if r.rate is not None:
        rate = f"{r.rate}/s"
    elif r.default_rate is not None:
        rate = f"{r.default_rate}/s (config default)"
    else:
        rate = "the agents' configured evacuate_rate"
    return head + f"clients move away as they reconnect, at most {rate}"


def evacuation_progress(s: EvacuationSample) -> str:
    """One ``evacuate --wait`` line."""
    conns = "connections unknown" if s.connections is None else f"{s.connections} client connections"
    return f"{s.elapsed:5.1f}s  {s.node}: {conns}, {s.sessions} sessions placed"


def evacuate_text(r: Evacuation) -> str:
    lines = [state_text(r.changed)]
    s = r.sample
    if r.balancers:
        rate = r.changed.rate if r.changed.rate is not None else r.changed.default_rate
        shown = f"{rate}/s" if rate is not None else "the configured evacuate_rate"
        lines.append(f"active: the agents of {r.balancers} balancer(s) close its client connections, at most "
                     f"{shown} in total; each closed client reconnects and is moved")
    else:
        lines.append("passive: no agent publishes connection counts (none has haproxy_socket set), so nothing "
                     "closes its connections: its clients move only when they reconnect on their own")
    if r.timed_out:
        lines.append(f"not empty after {s.elapsed:.0f}s: " + evacuation_progress(s).split(": ", 1)[1])
    elif r.waited:
        what = "no client connection" if s.active else "no placed session"
        since = r.emptied_at if r.emptied_at is not None else s.elapsed
        lines.append(f"{s.node} has {what} left: empty after {since:.1f}s, and still at {s.elapsed:.1f}s")
    return "\n".join(lines)


def weight_text(r: WeightChanged) -> str:
    if r.weight is None:
        back = "the configured weight" if r.configured_weight is None else f"configured weight {r.configured_weight:g}"
        return f"{r.node}: weight override {'removed' if r.removed else 'was not set'}; {back} applies"
    return f"{r.node}: weight {r.weight:g}" + (" (no new placements)" if r.weight == 0 else "")


# --------------------------------------------------------------------------- show


def show_json(v: ShowView) -> JSON:
    owner, pin = v.record.owner, v.record.pin
    doc = cid_json(v.cid)
    doc["owner"] = (
        {
            "node": v.owner_node,
            "placed_at": int_or_raw(owner.get("placed_at")),
            "by": owner.get("by"),
            "ttl": v.record.owner_ttl,
            "node_state": v.owner_state.value if v.owner_state is not None else None,
            "node_health": health_word(v.owner_health) if v.owner_node else None,
            "node_down_since": v.owner_down_since,
        }
        if owner
        else None
    )
    doc["pin"] = (
        {
            "node": v.pin_node,
            "reason": pin.get("reason", ""),
            "created_at": int_or_raw(pin.get("created_at")),
            "ttl": v.record.pin_ttl,
        }
        if pin
        else None
    )
    doc["why"] = v.explanation.why
    doc["next"] = {"action": v.explanation.action.value, "node": v.explanation.node}
    doc["keys"] = {"record": v.keys[0].decode("utf-8", "replace"), "pin": v.keys[1].decode("utf-8", "replace")}
    return doc


def show_text(v: ShowView) -> str:
    owner, pin = v.record.owner, v.record.pin
    pairs: list[tuple[str, str]] = [("client", show_cid(v.cid, v.as_hex))]
    if owner:
        health = health_word(v.owner_health)
        if v.owner_health is not True and v.owner_down_since is not None:
            health = f"down for {max(0, int(time.time() - v.owner_down_since))}s"
        where = f" ({v.owner_state}, {health})" if v.owner_node else ""
        pairs += [
            ("owner", f"{v.owner_node or '-'}{where}"),
            ("placed_at", fmt_time(owner.get("placed_at"))),
            ("by", owner.get("by") or "-"),
            ("record ttl", fmt_ttl(v.record.owner_ttl)),
        ]
    else:
        pairs.append(("owner", "- (no record)"))
    if pin:
        pairs += [
            ("pin", v.pin_node or "-"),
            ("pin reason", pin.get("reason") or "-"),
            ("pin created", fmt_time(pin.get("created_at"))),
            ("pin ttl", fmt_ttl(v.record.pin_ttl)),
        ]
    else:
        pairs.append(("pin", "-"))
    pairs.append(("why", v.explanation.why))
    pairs.append(("keys", _keys(v.keys, v.cid, v.as_hex)))
    return kv(pairs)


# --------------------------------------------------------------------------- nodes / stats


def _row_json(r: NodeRow) -> JSON:
    return {
        "node": r.node,
        "configured": r.configured,
        "address": r.address,
        "state": r.state.value,
        "configured_weight": r.configured_weight,
        "weight_override": r.weight_override,
        "effective_weight": r.effective_weight,
        "health": health_word(r.health),
        "down_since": r.down_since,
        "in_grace": r.in_grace,
        "connections": r.connections,
        "sessions": r.sessions,
    }


def counted(at: float | None, now: float | None = None) -> str:
    """When the sessions shown were counted (the agents' record sweep, or --count)."""
    if at is None:
        return "sessions: not counted yet (the agents count them every sweep_interval; --count counts now)"
    age = max(0, int((now if now is not None else time.time()) - at))
    return f"sessions as counted {age}s ago ({fmt_time(str(int(at)))}); --count counts now"
def health_cell(r: NodeRow, now: float) -> str:
    """``up``/``down``/``unknown``; a down node the agents saw go down: for how long, and whether
    its persistent clients are still in their restart grace (refused, not moved)."""
    word = health_word(r.health)
    if r.health is True or r.down_since is None:
        return word
    return f"down {max(0, int(now - r.down_since))}s" + (" (grace)" if r.in_grace else "")


def nodes_json(v: NodesView) -> JSON:
    return {"nodes": [_row_json(r) for r in v.rows], "sessions_counted_at": v.counted_at}


def nodes_text(v: NodesView) -> str:
    now = time.time()
    cells = [
        [
            r.node + ("" if r.configured or not v.exact else " (not configured)"),
            r.state.value,
            fmt_num(r.configured_weight),
            fmt_num(r.weight_override),
            fmt_num(r.effective_weight),
            health_cell(r, now),
            "-" if r.connections is None else str(r.connections),
            str(r.sessions),
        ]
        for r in v.rows
    ]
    out = table(["NODE", "STATE", "WEIGHT", "OVERRIDE", "EFFECTIVE", "HEALTH", "CONNS", "SESSIONS"], cells)
    out += "\n" + counted(v.counted_at)
    if all(r.connections is None for r in v.rows):
        out += "\n(CONNS: no agent publishes connection counts; set haproxy_socket in the agents' config)"
    if not v.exact:
        out += "\n(no --config: nodes are those named in Redis; health cannot be probed)"
    return out


def _metrics_json(v: StatsView) -> JSON:
    doc: JSON = {"url": v.metrics_url, "reachable": v.counters is not None}
    if v.counters is not None:
        doc.update(decisions=v.counters.decisions, fallbacks=v.counters.fallbacks, redis_up=v.counters.redis_up)
    if v.error:
        doc["error"] = v.error
    return doc


def stats_json(v: StatsView) -> JSON:
    return {
        "records": v.records,
        "pins": v.pins,
        "nodes": {r.node: {"state": r.state.value, "sessions": r.sessions} for r in v.rows},
        "sessions_total": v.sessions_total,
        "sessions_counted_at": v.counted_at,
        "agent_metrics": _metrics_json(v),
    }


def stats_text(v: StatsView) -> str:
    parts = [
        kv([("records", str(v.records)), ("pins", str(v.pins)), ("sessions", str(v.sessions_total))]),
        table(["NODE", "STATE", "SESSIONS"], [[r.node, r.state.value, str(r.sessions)] for r in v.rows])
        + "\n" + counted(v.counted_at),
    ]
    if v.counters is None:
        parts.append(f"agent metrics: unreachable ({v.metrics_url or '-'}: {v.error})")
    else:
        pairs = [(f"decisions {how}", str(n)) for how, n in v.counters.decisions.items()]
        pairs.append(("fallbacks", fmt_num(v.counters.fallbacks)))
        pairs.append(("redis up", fmt_num(v.counters.redis_up)))
        block = "\n".join("  " + line for line in kv(pairs).splitlines())
        parts.append(f"agent metrics ({v.metrics_url}):\n{block}")
    return "\n\n".join(parts)


def migrate_text(v: MigrateView) -> str:
    verb = "would move" if v.dry_run else "moved"
    text = (f"{verb} {v.owners} owner records and {v.pins} pins into their buckets; "
            f"{'would remove' if v.dry_run else 'removed'} {v.dropped} version-1 index keys")
    if not v.dry_run:
        text += "\nlayout: version-1 keys are no longer read through"
    return text
