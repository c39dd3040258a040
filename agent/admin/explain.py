"""What ``show`` and ``nodes`` tell an operator, computed by the agent's own rules.

Pure: no Redis, no sockets, no printing. The inputs are what the commands read (the node
list, a one-shot probe per node, the overrides parsed by :func:`agent.rules.parse_overrides`)
and the answers come from :func:`agent.rules.eligibility`, :func:`agent.rules.node_views` and
:func:`agent.rules.predict`, the same functions the engine decides with. Nothing here
re-states a placement rule.

"Healthy" is the CLI's view: a node whose one-shot TCP probe did not fail (no probe, e.g. no
address, counts as healthy, as the agent's probes are unknown to the CLI).

Without a config (``exact=False``) the node list is a guess: the nodes Redis names, at weight
1 unless overridden. The rules still run on it, but a hash candidate is never named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from agent.model import How, NodeState
from agent.rules import NodeLike, NodeOverrides, Outcome, eligibility, node_views, predict

__all__ = [
    "Action",
    "EvacuationSample",
    "Explanation",
    "GuessedNode",
    "NodeRow",
    "explain",
    "healthy_set",
    "node_rows",
]


class Action(StrEnum):
    """``show``'s ``next.action``: what the client's next (persistent) CONNECT does."""

    #: Follows its pin.
    PINNED = "pinned"
    #: Stays on its owner, an active node.
    STICK = "stick"
    #: Stays on its owner although the owner takes no new clients (draining, or evacuating
    #: with nowhere else to go).
    STAY = "stay"
    #: Leaves its owner (down, in maintenance, unknown, or evacuating within the budget).
    MOVE = "move"
    #: Its owner is down for less than ``owner_down_grace``: the CONNECT is refused (``how=wait``)
    #: until the owner is back or the grace has passed.
    WAIT = "wait"
    #: No record: placed by hash.
    PLACE = "place"
    #: No node can take it.
    NONE = "none"


@dataclass(frozen=True, slots=True)
class GuessedNode:
    """A node only Redis names (no config): weight 1, as a config would default it."""

    name: str
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class Explanation:
    """``show``'s answer: the words, the action and the node the next CONNECT goes to."""

    why: str
    action: Action
    #: Where the next CONNECT goes; None when no node can take it, or (without a config)
    #: when it is a hash candidate the CLI cannot name.
    node: str | None
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One line of ``nodes``."""

    node: str
    #: In the config (always False without one).
    configured: bool
    address: str | None
    state: NodeState
    #: The config's weight (None without a config, or for a node not in it).
    configured_weight: float | None
    weight_override: float | None
    #: The node's share of new placements right now, exactly as the agents compute it.
    effective_weight: float
    #: The one-shot probe: True up, False down, None not probed or no address.
    health: bool | None
    sessions: int
    #: Client connections through the balancers whose agents publish them (None: none does).
    connections: int | None = None
    #: Unix time the agents' probes found it down (``P node-down``), or None.
    down_since: float | None = None
    #: Down for less than ``owner_down_grace``: its persistent clients wait instead of moving.
    in_grace: bool = False


@dataclass(frozen=True, slots=True)
class EvacuationSample:
    """One look at an evacuating node (``evacuate --wait``)."""

    node: str
    #: Seconds since the command started.
    elapsed: float
    #: Client connections through the balancers whose agents publish them (None: none does).
    connections: int | None
    #: How many balancers published connection counts.
    balancers: int
    #: Sessions placed on the node (records not yet expired).
    sessions: int

    @property
    def active(self) -> bool:
        """Agents close its connections (they publish counts, so they have ``haproxy_socket``)."""
        return self.connections is not None

    @property
    def empty(self) -> bool:
        """No client connection left; without counts, no placed session left."""
        return self.connections == 0 if self.connections is not None else self.sessions == 0


def healthy_set(nodes: Sequence[NodeLike], health: Mapping[str, bool | None]) -> frozenset[str]:
    """Nodes whose probe did not fail."""
    return frozenset(n.name for n in nodes if health.get(n.name) is not False)


def _action(outcome: Outcome, overrides: NodeOverrides) -> Action:
    if outcome.how is How.PINNED:
        return Action.PINNED
    if outcome.how is How.HIT:
        assert outcome.node is not None
        if overrides.state(outcome.node) in (NodeState.DRAIN, NodeState.EVACUATE):
            return Action.STAY
        return Action.STICK
    if outcome.how is How.MOVED:
        return Action.MOVE
    if outcome.how is How.ASSIGNED:
        return Action.PLACE
    if outcome.how is How.WAIT:
        return Action.WAIT
    return Action.NONE  # a persistent CONNECT gets "none" only when no node can take it


def explain(
    cid: bytes,
    *,
    owner: str | None,
    pin: str | None,
    nodes: Sequence[NodeLike],
    health: Mapping[str, bool | None],
    overrides: NodeOverrides,
    default_rate: int,
    exact: bool = True,
    waiting: frozenset[str] = frozenset(),
) -> Explanation:
    """What the client's next persistent CONNECT gets, and why.

    ``nodes``: the configured nodes (``exact``), or the guess without a config.
    ``default_rate``: the config's ``evacuate_rate`` (any value when not ``exact``).
    ``waiting``: nodes in their restart grace (:func:`agent.rules.grace_nodes`).
    """
    healthy = healthy_set(nodes, health)
    elig = eligibility(nodes, healthy, overrides, default_rate)
    outcome = predict(
        cid,
        owner=owner,
        pin=pin,
        elig=elig,
        overrides=overrides,
        known=frozenset(n.name for n in nodes),
        exact=exact,
        waiting=waiting,
    )
    return Explanation(outcome.why, _action(outcome, overrides), outcome.node, outcome)


def node_rows(
    nodes: Sequence[NodeLike],
    *,
    extra: Sequence[str] = (),
    health: Mapping[str, bool | None],
    overrides: NodeOverrides,
    default_rate: int,
    sessions: Mapping[str, int],
    addresses: Mapping[str, str] | None = None,
    exact: bool = True,
    connections: Mapping[str, int] | None = None,
    down_since: Mapping[str, float] | None = None,
    waiting: frozenset[str] = frozenset(),
) -> list[NodeRow]:
    """``nodes`` in order, then ``extra`` (names only Redis knows: they never get new clients).

    EFFECTIVE is :meth:`agent.rules.Eligibility.weight_for_new`: when no node takes new
    clients (all draining, say), the agents place on the usable nodes, and the column says so.
    """
    addresses = addresses or {}
    down_since = down_since or {}

    def conns(name: str) -> int | None:
        return None if connections is None else connections.get(name, 0)

    healthy = healthy_set(nodes, health)
    elig = eligibility(nodes, healthy, overrides, default_rate)
    rows = [
        NodeRow(
            node=v.name,
            configured=exact,
            address=addresses.get(v.name),
            state=v.state,
            configured_weight=v.configured_weight if exact else None,
            weight_override=v.weight_override,
            effective_weight=v.effective_weight,
            health=health.get(v.name),
            sessions=sessions.get(v.name, 0),
            connections=conns(v.name),
            down_since=down_since.get(v.name),
            in_grace=v.name in waiting and health.get(v.name) is not True,
        )
        for v in node_views(nodes, healthy, overrides, elig)
    ]
    rows += [
        NodeRow(
            node=name,
            configured=False,
            address=addresses.get(name),
            state=overrides.state(name),
            configured_weight=None,
            weight_override=overrides.weights.get(name),
            effective_weight=0.0,
            health=health.get(name),
            sessions=sessions.get(name, 0),
            connections=conns(name),
            down_since=down_since.get(name),
            in_grace=name in waiting and health.get(name) is not True,
        )
        for name in extra
    ]
    return rows
