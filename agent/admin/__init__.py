"""Operator commands of ``mqtt-affinity``: pins, node states and weights, inspection.

Why a CLI at all when everything is a plain Redis key: the key layout is a contract with
the agent's decide script, and a hand-typed ``HSET`` with a typo'd node name or state is
silently ignored by every agent. These commands validate against the agent's own config,
write exactly the fields the agents read, and explain, with the agent's own rules, what the
next CONNECT of a client will get.

The package, in the style of pip's commands:

- this module: the one table of commands (:data:`COMMANDS`) and :func:`add_commands`;
- :mod:`.commands`: each command's arguments and logic (handlers return data);
- :mod:`.context`: finding Redis and the config; :mod:`.access`: every Redis read and write;
- :mod:`.explain`: pure, the agent's rules applied to what was read;
- :mod:`.render`: text and JSON output; :mod:`.errors`: failures -> exit status.

Exit status (:class:`agent.model.ExitCode`): 0 success, 1 the thing asked about does not exist
(an unknown node, a client without record or pin, no pin to remove) or Redis cannot be
reached, 2 bad usage or a bad config, or a pin refused because its node is in maintenance or
down. Every error is one line on stderr.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from agent.admin import commands as cmd
from agent.admin import render
from agent.admin.context import CONFIG_ENV, Context, open_context
from agent.admin.errors import failure, report
from agent.admin.results import Result
from agent.model import DEFAULT_PREFIX, ExitCode

__all__ = ["COMMANDS", "Command", "add_commands"]

R = TypeVar("R", bound=Result)


@dataclass(frozen=True)
class Command(Generic[R]):
    """One operator command: its parser, its logic and how its result is shown."""

    name: str
    help: str
    #: Longer text for ``mqtt-affinity NAME --help`` (default: ``help``).
    description: str | None
    arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace, Context], R]
    text: Callable[[R], str]
    #: Given: the command takes ``--json`` and prints this document instead of the text.
    json: Callable[[R], Any] | None = None


_STATE_HELP = {
    "drain": "stop new placements on NODE; its clients stay",
    "activate": "back to normal: NODE takes new clients again",
    "maintenance": "take NODE out: nobody is sent there, its clients move on their next CONNECT",
}

#: Every operator command, in the order ``--help`` lists them.
COMMANDS: tuple[Command[Any], ...] = (
    Command(
        "pin", "send a client to a node (its session moves there for good)",
        "Pin CLIENT_ID to NODE (writes the client's entry in <prefix>{<bucket>}p). Refused with "
        "status 1 if NODE is unknown, with status 2 if it is in maintenance or down. Agents read pins "
        "on every decision.",
        cmd.pin_args, cmd.pin, render.pinned_text,
    ),
    Command(
        "unpin", "remove a client's pin (status 1 if there was none)", None,
        cmd.client_args, cmd.unpin, render.unpinned_text,
    ),
    Command(
        "show", "a client's record, pin and what its next CONNECT gets",
        "Show the owner record (node, placed_at, by, TTL), the pin, and why: what the next CONNECT "
        "would get, by the agent's own rules (health: a TCP probe of every configured node now). "
        "Status 1 if the client has neither a record nor a pin.",
        cmd.client_args, cmd.show, render.show_text, render.show_json,
    ),
    Command(
        "nodes", "per node: state, weights, health (TCP probe now), client connections, live sessions",
        "Effective weight is the node's share of new placements right now, as the agents compute it: "
        "the run-time override (or the configured weight), 0 while draining, evacuating, in maintenance "
        "or down. When no node takes new clients (all draining, say), the agents place them on every "
        "usable node, and the column shows those nodes' weights. HEALTH of a node the agents found down "
        "says for how long, and '(grace)' while its persistent clients wait for it (owner_down_grace). "
        "CONNS: client connections through every balancer whose agent has haproxy_socket set ('-': none).",
        cmd.count_arg, cmd.nodes, render.nodes_text, render.nodes_json,
    ),
    Command("drain", _STATE_HELP["drain"], None, cmd.node_arg, cmd.drain, render.state_text),
    Command("activate", _STATE_HELP["activate"], None, cmd.node_arg, cmd.activate, render.state_text),
    Command("maintenance", _STATE_HELP["maintenance"], None, cmd.node_arg, cmd.maintenance, render.state_text),
    Command(
        "evacuate", "empty NODE: close its client connections at a rate, move each client as it reconnects",
        "Like drain, and clients of NODE are re-placed on their next CONNECT, at most --rate per second "
        "across all agents. Agents with haproxy_socket set also close NODE's client connections through "
        "their HAProxy's runtime API, --rate per second in total (one budget in Redis), so the node empties "
        "in about connections/rate seconds; without it, clients move only when they reconnect on their own "
        "(the command says which). Without --rate the config's evacuate_rate applies (an earlier --rate is "
        "removed). --wait follows the node's connections until none has been left for 2 s (a closed client the moves "
        "budget sends back shows up again meanwhile).",
        cmd.evacuate_args, cmd.evacuate, render.evacuate_text,
    ),
    Command(
        "weight", "override a node's weight (W >= 0) or --reset it",
        "Set <prefix>node-weight NODE W (0 = no new placements), or delete the override with --reset.",
        cmd.weight_args, cmd.weight, render.weight_text,
    ),
    Command(
        "stats", "totals: records, pins, sessions per node, the agent's decision counters", None,
        cmd.stats_args, cmd.stats, render.stats_text, render.stats_json,
    ),
    Command(
        "migrate", "move records of the version-1 key layout into the buckets (safe while agents serve)",
        "Agents read version-1 records (<prefix>owner:<cid>, <prefix>pin:<cid>) through until this has run: "
        "it moves each into its client's bucket unless the bucket already has a newer record, removes the "
        "old <prefix>placed:<node> index, and records in <prefix>layout that nothing is left to read through. "
        "Run it once after upgrading every agent; running it again is harmless.",
        cmd.migrate_args, cmd.migrate, render.migrate_text,
    ),
)  # fmt: skip

_EPILOG = (
    "Redis is found with --config (the agent YAML: preferred, it gives the node list, "
    "addresses, weights and metrics address), else --redis-url (+ --key-prefix), else the "
    f"{CONFIG_ENV} environment variable. With --redis-url alone there is no node list: a node is "
    "known if it appears in <prefix>node-state, <prefix>node-weight or in the agents' session counts, "
    "and nodes cannot be probed. 'Down' means a single TCP connect to the node's configured "
    "address failed within health.timeout (the agent's own checks may differ: mqtt probes, rise/fall). "
    f"Exit status: {ExitCode.OK} ok, {ExitCode.NOT_FOUND} not found (unknown node, client, pin) or Redis "
    f"unreachable, {ExitCode.USAGE} bad usage or config, or a pin to a node in maintenance or down."
)


def _where_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where Redis is")
    g.add_argument("--config", metavar="FILE", help=f"agent YAML config (default: ${CONFIG_ENV})")
    g.add_argument("--redis-url", metavar="URL",
                   help="Redis URL; overrides the config's redis_url. Without --config, node names are "
                        "validated only against what Redis already names")  # fmt: skip
    g.add_argument("--key-prefix", metavar="PREFIX",
                   help=f"key prefix; overrides the config's key_prefix (default {DEFAULT_PREFIX!r})")  # fmt: skip


def run(command: Command[Any], args: argparse.Namespace) -> int:
    """Run one command: open the context, call the handler, print; failures -> status + one line."""
    ctx: Context | None = None
    try:
        ctx = open_context(args)
        result = command.handler(args, ctx)
        if command.json is not None and args.json:
            print(render.json_text(command.json(result)))
        else:
            print(command.text(result))
        return int(result.status)
    except Exception as exc:
        known = failure(exc, ctx.url if ctx is not None else args.redis_url)
        if known is None:
            raise
        return report(*known)
    finally:
        if ctx is not None:
            ctx.close()


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Register every command of :data:`COMMANDS` on the ``mqtt-affinity`` subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    _where_args(common)
    for c in COMMANDS:
        p: argparse.ArgumentParser = sub.add_parser(
            c.name, parents=[common], help=c.help, description=c.description or c.help, epilog=_EPILOG
        )
        c.arguments(p)
        if c.json is not None:
            p.add_argument("--json", action="store_true", help="print one JSON document")
        p.set_defaults(handler=functools.partial(run, c))
