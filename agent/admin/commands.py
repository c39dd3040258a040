"""The operator commands: their arguments and their logic.

A handler takes the parsed arguments and a :class:`~agent.admin.context.Context`, does its
reads and writes through :mod:`agent.admin.access`, and returns a result from
:mod:`agent.admin.results`; :mod:`agent.admin.render` turns that into text or JSON. Expected
failures are :class:`~agent.admin.errors.CommandError`.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Mapping

from agent.admin import explain as ex
from agent.admin import scrape
from agent.admin.access import Totals
from agent.admin.context import Context
from agent.admin.errors import CommandError
from agent.admin.render import evacuation_progress, show_cid
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
from agent.model import ExitCode, NodeState
from agent.rules import NodeOverrides, grace_nodes

__all__ = [
    "activate",
    "drain",
    "evacuate",
    "maintenance",
    "migrate",
    "nodes",
    "pin",
    "show",
    "stats",
    "unpin",
    "weight",
]

MAX_WEIGHT = 1_000_000.0
MAX_RATE = 100_000

# --------------------------------------------------------------------------- argument types


def whole_number(what: str, lo: int, hi: int | None = None) -> Callable[[str], int]:
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


def weight_value(text: str) -> float:
    """An argparse type: a weight in [0, MAX_WEIGHT]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or not 0 <= v <= MAX_WEIGHT:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_WEIGHT:g}, got {text}")
    return v


# --------------------------------------------------------------------------- argument builders


def client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("client_id", metavar="CLIENT_ID", help="MQTT client id (UTF-8 text, or hex with --hex)")
    p.add_argument("--hex", action="store_true", help="CLIENT_ID is hex (binary ids); print ids as hex")


def node_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("node", metavar="NODE")


def pin_args(p: argparse.ArgumentParser) -> None:
    client_args(p)
    node_arg(p)
    p.add_argument("--ttl", type=whole_number("seconds", 1), metavar="SECONDS", help="the pin expires after SECONDS")
    p.add_argument("--reason", default="", metavar="TEXT", help="free text kept with the pin")


def evacuate_args(p: argparse.ArgumentParser) -> None:
    node_arg(p)
    p.add_argument("--rate", type=whole_number("per second", 1, MAX_RATE), metavar="N",
                   help="client connections closed (agents with haproxy_socket) and clients moved per second, "
                        "across all agents")  # fmt: skip
    p.add_argument("--wait", action="store_true",
                   help="follow the node's client connections (or, if no agent publishes them, its placed "
                        "sessions) until none is left; a progress line per second")  # fmt: skip
    p.add_argument("--timeout", type=whole_number("seconds", 1), metavar="SECONDS",
                   help="with --wait: give up after SECONDS (status 1 if the node is not empty by then)")


def weight_args(p: argparse.ArgumentParser) -> None:
    node_arg(p)
    p.add_argument("weight", metavar="W", type=weight_value, nargs="?")
    p.add_argument("--reset", action="store_true", help="remove the override: the configured weight applies")


def count_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--count", action="store_true",
                   help="count sessions now (a sweep of every record bucket) instead of showing the agents' "
                        "last count")  # fmt: skip


def stats_args(p: argparse.ArgumentParser) -> None:
    count_arg(p)
    p.add_argument(
        "--metrics-url", metavar="URL",
        help="agent metrics endpoint (default: http://<metrics_listen>/metrics from the config)",
    )  # fmt: skip


def migrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="count what would move, change nothing")


# --------------------------------------------------------------------------- helpers


def client_id(args: argparse.Namespace) -> bytes:
    raw: str = args.client_id
    if args.hex:
        text = raw[2:] if raw.lower().startswith("0x") else raw
        try:
            cid = bytes.fromhex(text)
        except ValueError:
            raise CommandError(ExitCode.USAGE, f"--hex: {raw!r} is not an even number of hex digits") from None
    else:
        try:
            cid = raw.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from a non-UTF-8 terminal
            raise CommandError(ExitCode.USAGE, "client id is not valid UTF-8; pass it with --hex") from None
    if not cid:
        raise CommandError(ExitCode.USAGE, "empty client id")
    return cid


def _health(ctx: Context, node_down: Mapping[str, float], *, probe: bool) -> dict[str, bool | None]:
    """The CLI's one-shot probes; a node it cannot probe (no config) is down if an agent says so."""
    health = ctx.probe_configured() if probe else {}
    for node in node_down:
        if health.get(node) is None:
            health[node] = False
    return health


def _waiting(ctx: Context, node_down: Mapping[str, float], overrides: NodeOverrides, now: float) -> frozenset[str]:
    """Nodes in their restart grace, by the agents' published down times and the config's grace."""
    return grace_nodes(node_down, overrides, ctx.grace, now) if ctx.grace > 0 else frozenset()


def _node_rows(ctx: Context, totals: Totals, *, probe: bool) -> list[ex.NodeRow]:
    """Configured nodes in config order (or the names Redis holds), then nodes only Redis knows."""
    now = time.time()
    overrides = ctx.redis.overrides()
    nodes = ctx.rule_nodes()
    names = [n.name for n in nodes]
    extra = [n for n in ctx.redis.named_nodes() if n not in names] if ctx.exact else []
    sessions = {n: totals.sessions.get(n, 0) for n in names + extra}
    addresses = {n: f"{a[0]}:{a[1]}" for n in names if (a := ctx.address(n)) is not None}
    node_down = ctx.redis.node_down()
    conns = ctx.redis.connections(now)
    return ex.node_rows(
        nodes,
        extra=extra,
        health=_health(ctx, node_down, probe=probe),
        overrides=overrides,
        default_rate=ctx.default_rate or 0,
        sessions=sessions,
        addresses=addresses,
        exact=ctx.exact,
        connections=conns.per_node if conns is not None else None,
        down_since=node_down,
        waiting=_waiting(ctx, node_down, overrides, now),
    )


# --------------------------------------------------------------------------- pin / unpin / show


def pin(args: argparse.Namespace, ctx: Context) -> Pinned:
    """Pin a client to a node, refusing nodes the agent would ignore the pin for."""
    cid = client_id(args)
    node: str = args.node
    ctx.require_node(node)
    if ctx.redis.overrides().state(node) == NodeState.MAINTENANCE:
        raise CommandError(ExitCode.USAGE, f"refusing to pin to {node!r}: node is in maintenance")
    if ctx.probe(node) is False:
        host, port = ctx.address(node) or ("?", 0)
        raise CommandError(
            ExitCode.USAGE,
            f"refusing to pin to {node!r}: node is down (no TCP connect to {host}:{port} "
            f"within {ctx.probe_timeout:g}s)",
        )
    ctx.redis.write_pin(cid, node, reason=args.reason, created_at=int(time.time()), ttl=args.ttl)
    return Pinned(cid, args.hex, node, args.ttl, keys=ctx.redis.keys.client(cid))


def unpin(args: argparse.Namespace, ctx: Context) -> Unpinned:
    """Remove a pin; the client then follows its record (or the hash) on its next CONNECT."""
    cid = client_id(args)
    if not ctx.redis.delete_pin(cid):
        raise CommandError(ExitCode.NOT_FOUND, f"no pin for client {show_cid(cid, args.hex)}")
    return Unpinned(cid, args.hex)


def show(args: argparse.Namespace, ctx: Context) -> ShowView:
    """Everything Redis holds about one client, and what its next CONNECT will get."""
    cid = client_id(args)
    record = ctx.redis.client_record(cid)
    overrides = ctx.redis.overrides()
    if not (record.owner or record.pin) and not args.json:
        raise CommandError(ExitCode.NOT_FOUND, f"client {show_cid(cid, args.hex)}: no record and no pin")
    owner = record.owner.get("node") or None
    pinned = record.pin.get("node") or None
    node_down = ctx.redis.node_down()
    health = _health(ctx, node_down, probe=True)
    explanation = ex.explain(
        cid,
        owner=owner,
        pin=pinned,
        nodes=ctx.rule_nodes(),
        health=health,
        overrides=overrides,
        default_rate=ctx.default_rate or 0,
        exact=ctx.exact,
        waiting=_waiting(ctx, node_down, overrides, time.time()),
    )
    return ShowView(
        cid=cid,
        as_hex=args.hex,
        record=record,
        owner_node=owner,
        pin_node=pinned,
        owner_state=overrides.state(owner) if owner else None,
        owner_health=health.get(owner) if owner else None,
        explanation=explanation,
        keys=ctx.redis.keys.client(cid),
        owner_down_since=node_down.get(owner) if owner else None,
    )


# --------------------------------------------------------------------------- nodes / stats


def _totals(args: argparse.Namespace, ctx: Context) -> Totals:
    return ctx.redis.count_now() if args.count else ctx.redis.totals()


def nodes(args: argparse.Namespace, ctx: Context) -> NodesView:
    """Per node: state, weights, a TCP probe now, sessions (the last sweep's count, or --count)."""
    totals = _totals(args, ctx)
    return NodesView(_node_rows(ctx, totals, probe=True), exact=ctx.exact, counted_at=totals.at)


def stats(args: argparse.Namespace, ctx: Context) -> StatsView:
    """Totals from Redis, plus the agent's own counters when its metrics endpoint answers."""
    totals = _totals(args, ctx)
    records, pins = totals.records, totals.pins
    rows = _node_rows(ctx, totals, probe=False)
    url: str | None = args.metrics_url or scrape.default_metrics_url(ctx.config)
    counters: scrape.AgentCounters | None = None
    error: str | None = None
    if url is None:
        error = "no metrics URL (pass --metrics-url or --config)"
    else:
        try:
            counters = scrape.fetch(url)
        except scrape.ScrapeError as exc:
            error = str(exc)
    return StatsView(records, pins, rows, url, counters, error, counted_at=totals.at)


def migrate(args: argparse.Namespace, ctx: Context) -> MigrateView:
    """Move version-1 records into the buckets (safe while agents serve)."""
    done = ctx.redis.migrate(dry_run=args.dry_run)
    return MigrateView(done.owners, done.pins, done.dropped, dry_run=args.dry_run)


# --------------------------------------------------------------------------- node state / weight


def _set_state(args: argparse.Namespace, ctx: Context, state: NodeState) -> StateChanged:
    ctx.require_node(args.node)
    was = ctx.redis.set_state(args.node, state)
    return StateChanged(args.node, state, was)


def drain(args: argparse.Namespace, ctx: Context) -> StateChanged:
    return _set_state(args, ctx, NodeState.DRAIN)


def activate(args: argparse.Namespace, ctx: Context) -> StateChanged:
    return _set_state(args, ctx, NodeState.ACTIVE)


def maintenance(args: argparse.Namespace, ctx: Context) -> StateChanged:
    return _set_state(args, ctx, NodeState.MAINTENANCE)


#: Seconds between two progress lines of ``evacuate --wait``.
WAIT_EVERY = 1.0
#: The same when no agent publishes connection counts (passive): each look counts the records
#: of every bucket (a sweep pass), too heavy for Redis once a second.
WAIT_EVERY_PASSIVE = 5.0
#: ``evacuate --wait`` ends when the node has stayed empty this long: a closed client that
#: reconnects within it and is sent back (the moves budget was spent) shows up again meanwhile.
SETTLE = 2.0


def evacuate(args: argparse.Namespace, ctx: Context) -> Evacuation:
    """Evacuate; the rate is exactly what this command says, so a stale --rate never lingers.

    Active when agents publish connection counts (they have ``haproxy_socket``): they close the
    node's client connections at the rate. Else passive: clients move when they reconnect."""
    if args.timeout is not None and not args.wait:
        raise CommandError(ExitCode.USAGE, "--timeout goes with --wait")
    node: str = args.node
    ctx.require_node(node)
    # The rate first: an agent that sees the new state must already see its rate.
    ctx.redis.set_evacuate_rate(node, args.rate)
    was = ctx.redis.set_state(node, NodeState.EVACUATE)
    changed = StateChanged(node, NodeState.EVACUATE, was, rate=args.rate, default_rate=ctx.default_rate)
    started = time.monotonic()
    sample = _evacuation_sample(ctx, node, started)
    result = Evacuation(changed, sample.balancers, sample)
    if not args.wait:
        return result
    # Progress lines as it goes: this command's only output before the result.
    print(evacuation_progress(sample), flush=True)
    deadline = None if args.timeout is None else started + args.timeout
    emptied: float | None = sample.elapsed if sample.empty else None
    while emptied is None or sample.elapsed - emptied < SETTLE:
        if deadline is not None and time.monotonic() >= deadline:
            return Evacuation(changed, result.balancers, sample, waited=True, timed_out=True)
        every = WAIT_EVERY if sample.active else WAIT_EVERY_PASSIVE
        if emptied is not None:  # the next look that matters is when the node has settled
            every = min(every, max(0.0, SETTLE - (sample.elapsed - emptied)) + 0.05)
        time.sleep(every if deadline is None else max(0.0, min(every, deadline - time.monotonic())))
        sample = _evacuation_sample(ctx, node, started)
        print(evacuation_progress(sample), flush=True)
        if not sample.empty:
            emptied = None
        elif emptied is None:
            emptied = sample.elapsed
    return Evacuation(changed, result.balancers, sample, waited=True, emptied_at=emptied)


def _evacuation_sample(ctx: Context, node: str, started: float) -> ex.EvacuationSample:
    now = time.time()
    conns = ctx.redis.connections(now)
    # Active: the connections say when the node is empty; the sessions are the last sweep's count.
    # Passive: only the records can say it, so they are counted now.
    totals = ctx.redis.totals() if conns is not None else ctx.redis.count_now()
    sessions = totals.sessions.get(node, 0)
    return ex.EvacuationSample(
        node=node,
        elapsed=time.monotonic() - started,
        connections=conns.per_node.get(node, 0) if conns is not None else None,
        balancers=conns.balancers if conns is not None else 0,
        sessions=sessions,
    )


def weight(args: argparse.Namespace, ctx: Context) -> WeightChanged:
    """Override (or reset) a node's share of new placements at run time."""
    if (args.weight is None) == (not args.reset):
        raise CommandError(ExitCode.USAGE, "give either a weight W or --reset")
    ctx.require_node(args.node)
    if args.reset:
        conf = ctx.config.node(args.node) if ctx.config is not None else None
        removed = ctx.redis.reset_weight(args.node)
        return WeightChanged(args.node, None, removed, conf.weight if conf is not None else None)
    ctx.redis.set_weight(args.node, args.weight)
    return WeightChanged(args.node, args.weight)
