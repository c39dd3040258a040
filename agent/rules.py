"""Pure placement rules: which nodes may take clients, and what a CONNECT will get.

No I/O here. The agent's engine, the operator CLI (``show``, ``nodes``) and the tests all call
these same functions, so an explanation printed by the CLI is computed, never re-derived.

``predict`` is the Python statement of ``agent/lua/decide.lua``'s rules (pin, then owner,
then the HRW candidate); ``tests/test_rules_lua.py`` runs both on the same inputs against a
real Redis so that the two cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent import placement
from agent.model import How, NodeState

__all__ = [
    "Eligibility",
    "NodeOverrides",
    "NodeView",
    "Outcome",
    "eligibility",
    "node_views",
    "parse_overrides",
    "predict",
]


class NodeLike(Protocol):
    """What the rules need of a configured node (``agent.config.NodeConfig`` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def weight(self) -> float: ...


@dataclass(frozen=True, slots=True)
class NodeOverrides:
    """Operator overrides read from Redis; invalid entries are dropped, not fatal."""

    states: Mapping[str, NodeState] = field(default_factory=dict)
    weights: Mapping[str, float] = field(default_factory=dict)
    rates: Mapping[str, int] = field(default_factory=dict)

    def state(self, node: str) -> NodeState:
        return self.states.get(node, NodeState.ACTIVE)


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def parse_state(value: Any) -> NodeState | None:
    """A raw ``node-state`` value -> NodeState; None when it is not one (the agent ignores it)."""
    try:
        return NodeState(_text(value).strip().lower())
    except ValueError:
        return None


def parse_weight(value: Any) -> float | None:
    """A raw ``node-weight`` value -> weight >= 0; None when it is not a usable number."""
    try:
        w = float(_text(value).strip())
    except ValueError:
        return None
    return w if math.isfinite(w) and w >= 0 else None


def parse_rate(value: Any) -> int | None:
    """A raw ``evacuate-rate`` value -> moves per second >= 0; None when invalid."""
    try:
        r = int(float(_text(value).strip()))
    except (ValueError, OverflowError):
        return None
    return r if r >= 0 else None


def parse_overrides(
    states: Mapping[Any, Any], weights: Mapping[Any, Any], rates: Mapping[Any, Any]
) -> NodeOverrides:
    """Raw HGETALL replies -> NodeOverrides."""
    out_states = {_text(k): s for k, v in states.items() if (s := parse_state(v)) is not None}
    out_weights = {_text(k): w for k, v in weights.items() if (w := parse_weight(v)) is not None}
    out_rates = {_text(k): r for k, v in rates.items() if (r := parse_rate(v)) is not None}
    return NodeOverrides(out_states, out_weights, out_rates)


@dataclass(frozen=True, slots=True)
class Eligibility:
    """Node sets for one view of (config, health, overrides)."""

    #: HRW input for new placements: (name, effective weight).
    placeable: tuple[tuple[str, float], ...]
    #: Nodes a client may be sent to: configured, healthy, not in maintenance.
    usable: frozenset[str]
    #: Usable nodes in ``evacuate`` state -> moves per second.
    evacuating: Mapping[str, int] = field(default_factory=dict)
    #: HRW input when Redis is unavailable: the usable nodes.
    fallback: tuple[tuple[str, float], ...] = ()

    def weight_for_new(self, node: str) -> float:
        """The node's share of new placements right now (0 when it takes none)."""
        return next((w for n, w in self.placeable if n == node), 0.0)


def _weighted(pairs: Sequence[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
    """Keep the weights, unless they are all zero: then uniform, since some node beats none."""
    if any(w > 0 for _, w in pairs):
        return tuple(pairs)
    return tuple((name, 1.0) for name, _ in pairs)


def eligibility(
    nodes: Iterable[NodeLike],
    healthy: frozenset[str] | set[str],
    overrides: NodeOverrides,
    default_rate: int,
) -> Eligibility:
    """placeable = configured ∩ healthy ∩ active ∩ weight > 0; usable = configured ∩ healthy ∩ not maintenance.

    When nothing is placeable but something is usable, new clients go to the usable nodes
    (better a draining broker than no broker).
    """
    placeable: list[tuple[str, float]] = []
    usable_pairs: list[tuple[str, float]] = []
    evacuating: dict[str, int] = {}
    for node in nodes:
        if node.name not in healthy:
            continue
        state = overrides.state(node.name)
        if state == NodeState.MAINTENANCE:
            continue
        weight = overrides.weights.get(node.name, node.weight)
        usable_pairs.append((node.name, weight))
        if state == NodeState.ACTIVE and weight > 0:
            placeable.append((node.name, weight))
        elif state == NodeState.EVACUATE:
            evacuating[node.name] = overrides.rates.get(node.name, default_rate)
    fallback = _weighted(usable_pairs)
    return Eligibility(
        placeable=tuple(placeable) if placeable else fallback,
        usable=frozenset(name for name, _ in usable_pairs),
        evacuating=evacuating,
        fallback=fallback,
    )


def grace_nodes(down_since: Mapping[str, float], overrides: NodeOverrides, grace: float, now: float) -> frozenset[str]:
    """Nodes down for less than ``grace`` seconds: their persistent clients wait, not move.

    A node in maintenance is not waited for: the operator took it out on purpose."""
    return frozenset(
        n for n, since in down_since.items()
        if now - since < grace and overrides.state(n) != NodeState.MAINTENANCE
    )


@dataclass(frozen=True, slots=True)
class NodeView:
    """One configured node as the rules see it."""

    name: str
    configured_weight: float
    #: The run-time override, or None.
    weight_override: float | None
    state: NodeState
    healthy: bool
    #: Share of new placements right now (0 = takes no new clients).
    effective_weight: float


def node_views(
    nodes: Iterable[NodeLike], healthy: frozenset[str] | set[str], overrides: NodeOverrides, elig: Eligibility
) -> list[NodeView]:
    return [
        NodeView(
            name=n.name,
            configured_weight=n.weight,
            weight_override=overrides.weights.get(n.name),
            state=overrides.state(n.name),
            healthy=n.name in healthy,
            effective_weight=elig.weight_for_new(n.name),
        )
        for n in nodes
    ]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What decide.lua will answer for one CONNECT, and why, in words."""

    node: str | None
    how: How
    why: str
    #: The record's node when the client leaves it.
    previous: str | None = None
    #: A pin that is not followed (its node is not usable).
    pin_ignored: str | None = None
    #: For an evacuating owner: the move happens only within the shared per-second budget.
    budgeted: bool = False


def _unusable_reason(node: str, elig: Eligibility, known: frozenset[str] | None,
                     overrides: NodeOverrides) -> str:
    if known is not None and node not in known:
        return "unknown"
    if overrides.state(node) == NodeState.MAINTENANCE:
        return "in maintenance"
    return "down"


def predict(
    cid: bytes,
    *,
    owner: str | None,
    pin: str | None,
    elig: Eligibility,
    overrides: NodeOverrides,
    persistent: bool = True,
    known: frozenset[str] | None = None,
    exact: bool = True,
    waiting: frozenset[str] = frozenset(),
) -> Outcome:
    """decide.lua's rules in Python: pin, then owner, then the HRW candidate.

    ``known`` (configured node names) only sharpens the words of ``why``.

    ``exact=False`` says that ``elig`` was built from a guess, not from the agents' config
    (the CLI without ``--config``: node list, weights and default evacuation rate unknown):
    the HRW candidate and the evacuation rate are then not named, and ``Outcome.node`` is
    None wherever it would be the candidate.

    ``waiting``: nodes in restart grace (:func:`grace_nodes`); their persistent clients wait.
    """
    candidate = placement.choose(cid, elig.placeable)
    dest = candidate if exact else None
    to = f"moves to {candidate}" if exact else "moves to a node chosen by hash"
    prefix = ""
    pin_ignored = None
    if pin:
        if pin in elig.usable:
            return Outcome(pin, How.PINNED, f"pinned to {pin}",
                           previous=owner if owner and owner != pin else None)
        pin_ignored = pin
        prefix = f"pin to {pin} is ignored ({pin} is {_unusable_reason(pin, elig, known, overrides)}); "
    if owner:
        if owner in elig.usable:
            if owner in elig.evacuating and candidate and (candidate != owner or not exact):
                budget = f"the shared budget of {elig.evacuating[owner]}/s" if exact else "the shared budget"
                return Outcome(dest, How.MOVED,
                               prefix + f"{owner} is evacuating: {to} (within {budget}, else stays this time)",
                               previous=owner, pin_ignored=pin_ignored, budgeted=persistent)
            if owner in elig.evacuating:
                # The candidate is the owner itself: only when no node takes new clients
                # (the evacuating owner is then in the fallback set that replaced placeable).
                return Outcome(owner, How.HIT,
                               prefix + f"{owner} is evacuating, but no node takes new clients and the hash "
                               f"picks {owner}: stays", pin_ignored=pin_ignored)
            if overrides.state(owner) == NodeState.DRAIN:
                return Outcome(owner, How.HIT, prefix + f"{owner} is draining: stays", pin_ignored=pin_ignored)
            return Outcome(owner, How.HIT, prefix + f"sticks to owner {owner}", pin_ignored=pin_ignored)
        reason = _unusable_reason(owner, elig, known, overrides)
        if persistent and owner in waiting:
            return Outcome(None, How.WAIT,
                           prefix + f"{owner} is {reason} for less than owner_down_grace: the CONNECT is refused "
                           "so the client retries and keeps its session there",
                           previous=owner, pin_ignored=pin_ignored)
        if candidate and candidate != owner:
            return Outcome(dest, How.MOVED, prefix + f"{owner} is {reason}: {to}",
                           previous=owner, pin_ignored=pin_ignored)
        return Outcome(None, How.NONE, prefix + f"{owner} is {reason} and no node can take it",
                       previous=owner, pin_ignored=pin_ignored)
    if candidate is None:
        return Outcome(None, How.NONE, prefix + "no record, and no node can take new clients",
                       pin_ignored=pin_ignored)
    on = f" on {candidate}" if exact else ""
    if persistent:
        return Outcome(dest, How.ASSIGNED, prefix + f"no record: will be placed{on} by hash",
                       pin_ignored=pin_ignored)
    return Outcome(dest, How.NONE, prefix + f"clean session, no record: {candidate if exact else 'a node'} by hash",
                   pin_ignored=pin_ignored)


def cached_outcome(
    cid: bytes,
    owner: str,
    owner_expiry: int,
    pin: str,
    pin_expiry: int,
    *,
    persistent: bool,
    expiry: int,
    now: int,
    elig: Eligibility,
) -> tuple[str, How, str | None, str | None] | None:
    """decide.lua's answer from a cached record, when that answer writes nothing but (perhaps)
    a later expiry; None when only Redis may decide (a move, an assignment, an evacuation, a
    wait, a pin that moves the record). ``expiry``: the record expiry this CONNECT asks for
    (0 = never). Returns (node, how, previous, pin_ignored). ``tests/test_rules.py`` checks it
    against :func:`predict` on every state it answers for."""
    o = owner if owner and (owner_expiry == 0 or owner_expiry > now) else ""
    if persistent and o and (owner_expiry == 0) != (expiry == 0):
        return None  # the session's expiry kind changes: a rewrite, which the script does
    pin_ignored = None
    if pin and (pin_expiry == 0 or pin_expiry > now):
        if pin in elig.usable:
            if persistent and o != pin:
                return None  # the record moves to the pin
            return pin, How.PINNED, (o or None) if o != pin else None, None
        pin_ignored = pin
    if o:
        if o in elig.usable and o not in elig.evacuating:
            return o, How.HIT, None, pin_ignored
        return None
    if persistent:
        return None
    candidate = placement.choose(cid, elig.placeable)
    return (candidate, How.NONE, None, pin_ignored) if candidate is not None else None
