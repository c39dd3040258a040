"""``show``'s explanation and ``nodes``' rows: pure functions over the agent's own rules.

No Redis, no sockets: the inputs are what the commands read (node list, one probe per node,
overrides as parsed from Redis). Where a hash candidate matters, the expected node is computed
with ``placement.choose`` over the nodes the agents would place on, stated by hand here.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from agent.admin.explain import Action, GuessedNode, NodeRow, explain, healthy_set, node_rows
from agent.config import NodeConfig
from agent.model import How, NodeState
from agent.placement import choose
from agent.rules import NodeOverrides, parse_overrides

NODES = (
    NodeConfig("node1", "10.0.0.1", 1883, 2.0),
    NodeConfig("node2", "10.0.0.2", 1883, 1.0),
    NodeConfig("node3", "10.0.0.3", 1883, 1.0),
)
ALL_UP: Mapping[str, bool | None] = {"node1": True, "node2": True, "node3": True}
RATE = 20


def overrides(states: Mapping[str, str] | None = None, weights: Mapping[str, str] | None = None,
              rates: Mapping[str, str] | None = None) -> NodeOverrides:
    """As read from Redis (raw values), through the agents' own parser."""
    return parse_overrides(states or {}, weights or {}, rates or {})


def why(cid: bytes = b"c1", *, owner: str | None = None, pin: str | None = None,
        health: Mapping[str, bool | None] = ALL_UP, o: NodeOverrides | None = None, exact: bool = True):
    return explain(cid, owner=owner, pin=pin, nodes=NODES, health=health, overrides=o or overrides(),
                   default_rate=RATE, exact=exact)  # fmt: skip


def rows(health: Mapping[str, bool | None] = ALL_UP, o: NodeOverrides | None = None,
         extra: tuple[str, ...] = ()) -> dict[str, NodeRow]:
    out = node_rows(NODES, extra=extra, health=health, overrides=o or overrides(), default_rate=RATE,
                    sessions={"node1": 5}, addresses={"node1": "10.0.0.1:1883"})  # fmt: skip
    return {r.node: r for r in out}


def effective(r: Mapping[str, NodeRow]) -> dict[str, float]:
    return {n: row.effective_weight for n, row in r.items()}


# --------------------------------------------------------------------------- nodes


def test_rows_follow_state_weight_and_health() -> None:
    r = rows(health={"node1": True, "node2": True, "node3": False},
             o=overrides({"node2": "drain"}, {"node1": "4"}))  # fmt: skip
    assert effective(r) == {"node1": 4.0, "node2": 0.0, "node3": 0.0}
    assert r["node1"] == NodeRow("node1", True, "10.0.0.1:1883", NodeState.ACTIVE, 2.0, 4.0, 4.0, True, 5)
    assert r["node2"].state is NodeState.DRAIN and r["node2"].weight_override is None
    assert r["node3"].health is False and r["node3"].sessions == 0


def test_all_draining_nodes_still_take_new_clients() -> None:
    """The defect this replaces: EFFECTIVE 0 everywhere while the agents keep placing there."""
    o = overrides({"node1": "drain", "node2": "drain", "node3": "drain"})
    assert effective(rows(o=o)) == {"node1": 2.0, "node2": 1.0, "node3": 1.0}
    # ... but only on the usable ones: a down or maintenance node never takes anybody
    o = overrides({"node1": "drain", "node2": "evacuate", "node3": "maintenance"})
    assert effective(rows(o=o)) == {"node1": 2.0, "node2": 1.0, "node3": 0.0}
    assert effective(rows(o=o, health={"node1": False})) == {"node1": 0.0, "node2": 1.0, "node3": 0.0}
    # a new client goes to the hash candidate among them, as the agent would send it
    e = why(b"newcomer", o=o)
    assert e.action is Action.PLACE and e.outcome.how is How.ASSIGNED
    assert e.node == choose(b"newcomer", [("node1", 2.0), ("node2", 1.0)])
    assert e.why == f"no record: will be placed on {e.node} by hash"


def test_all_weights_zero_means_uniform_not_nobody() -> None:
    o = overrides(weights={"node1": "0", "node2": "0", "node3": "0"})
    assert effective(rows(o=o)) == {"node1": 1.0, "node2": 1.0, "node3": 1.0}
    # one positive weight left: it takes every new client
    o = overrides(weights={"node1": "0", "node2": "0"})
    assert effective(rows(o=o)) == {"node1": 0.0, "node2": 0.0, "node3": 1.0}


def test_nothing_usable() -> None:
    o = overrides({"node1": "maintenance"})
    r = rows(o=o, health={"node2": False, "node3": False})
    assert effective(r) == {"node1": 0.0, "node2": 0.0, "node3": 0.0}
    e = why(o=o, health={"node2": False, "node3": False})
    assert (e.action, e.node, e.why) == (Action.NONE, None, "no record, and no node can take new clients")
    e = why(owner="node2", o=o, health={"node2": False, "node3": False})
    assert (e.action, e.node, e.why) == (Action.NONE, None, "node2 is down and no node can take it")


def test_unprobed_nodes_count_as_healthy() -> None:
    assert healthy_set(NODES, {}) == {"node1", "node2", "node3"}
    assert healthy_set(NODES, {"node1": None, "node2": False}) == {"node1", "node3"}
    assert rows(health={})["node2"].health is None


def test_nodes_only_redis_names_never_take_new_clients() -> None:
    r = rows(extra=("ghost",), o=overrides({"ghost": "drain"}, {"ghost": "3"}))
    assert r["ghost"] == NodeRow("ghost", False, None, NodeState.DRAIN, None, 3.0, 0.0, None, 0)


def test_rows_without_config() -> None:
    guess = [GuessedNode("a"), GuessedNode("b")]
    out = node_rows(guess, health={}, overrides=overrides({"a": "drain"}, {"b": "3"}), default_rate=0,
                    sessions={}, exact=False)  # fmt: skip
    assert [(r.node, r.configured, r.configured_weight, r.effective_weight) for r in out] == [
        ("a", False, None, 0.0),
        ("b", False, None, 3.0),
    ]


# --------------------------------------------------------------------------- show


def test_owner_sticks_stays_or_moves() -> None:
    e = why(owner="node2")
    assert (e.action, e.node, e.why) == (Action.STICK, "node2", "sticks to owner node2")
    e = why(owner="node2", o=overrides({"node2": "drain"}))
    assert (e.action, e.node, e.why) == (Action.STAY, "node2", "node2 is draining: stays")


def test_owner_in_maintenance_moves_to_the_hash_candidate() -> None:
    e = why(b"m1", owner="node1", o=overrides({"node1": "maintenance"}))
    target = choose(b"m1", [("node2", 1.0), ("node3", 1.0)])
    assert (e.action, e.node) == (Action.MOVE, target)
    assert e.why == f"node1 is in maintenance: moves to {target}"
    assert e.outcome.how is How.MOVED and e.outcome.previous == "node1"


def test_owner_down_or_unknown_moves() -> None:
    e = why(b"d1", owner="node3", health={"node1": True, "node2": True, "node3": False})
    target = choose(b"d1", [("node1", 2.0), ("node2", 1.0)])
    assert (e.action, e.node, e.why) == (Action.MOVE, target, f"node3 is down: moves to {target}")
    e = why(b"d1", owner="retired")
    assert e.why == f"retired is unknown: moves to {choose(b'd1', [(n.name, n.weight) for n in NODES])}"


def test_evacuating_owner_moves_within_the_budget() -> None:
    cid = b"evac-1"
    target = choose(cid, [("node2", 1.0), ("node3", 1.0)])
    e = why(cid, owner="node1", o=overrides({"node1": "evacuate"}))
    assert (e.action, e.node) == (Action.MOVE, target)
    assert e.why == (f"node1 is evacuating: moves to {target} "
                     f"(within the shared budget of {RATE}/s, else stays this time)")
    assert e.outcome.budgeted
    e = why(cid, owner="node1", o=overrides({"node1": "evacuate"}, rates={"node1": "7"}))
    assert "shared budget of 7/s" in e.why


def test_evacuating_owner_with_nowhere_to_go_stays() -> None:
    o = overrides({"node1": "evacuate", "node2": "maintenance", "node3": "maintenance"})
    e = why(owner="node1", o=o)
    assert (e.action, e.node) == (Action.STAY, "node1")
    assert e.why == "node1 is evacuating, but no node takes new clients and the hash picks node1: stays"


def test_pin_followed_or_ignored() -> None:
    e = why(owner="node1", pin="node2")
    assert (e.action, e.node, e.why) == (Action.PINNED, "node2", "pinned to node2")
    assert e.outcome.previous == "node1"
    # a pin to a draining node is followed: drain only stops new placements
    assert why(pin="node2", o=overrides({"node2": "drain"})).action is Action.PINNED


@pytest.mark.parametrize(
    ("health", "o", "reason"),
    [
        ({"node1": True, "node2": True, "node3": False}, None, "down"),
        (ALL_UP, overrides({"node3": "maintenance"}), "in maintenance"),
    ],
)
def test_pin_to_an_unusable_node_is_ignored(health, o, reason) -> None:
    e = why(b"p1", owner="node1", pin="node3", health=health, o=o)
    assert (e.action, e.node) == (Action.STICK, "node1")
    assert e.why == f"pin to node3 is ignored (node3 is {reason}); sticks to owner node1"
    assert e.outcome.pin_ignored == "node3"
    e = why(b"p1", pin="node3", health=health, o=o)
    target = choose(b"p1", [("node1", 2.0), ("node2", 1.0)])
    assert (e.action, e.node) == (Action.PLACE, target)
    assert e.why == f"pin to node3 is ignored (node3 is {reason}); no record: will be placed on {target} by hash"
    e = why(pin="node9")
    assert e.why.startswith("pin to node9 is ignored (node9 is unknown); ")


def test_without_config_no_candidate_is_named() -> None:
    guess = [GuessedNode("a"), GuessedNode("b")]

    def guessed(**kw):
        return explain(b"c", nodes=guess, health={}, overrides=kw.pop("o", overrides()), default_rate=0,
                       exact=False, **kw)  # fmt: skip

    e = guessed(owner=None, pin=None)
    assert (e.action, e.node, e.why) == (Action.PLACE, None, "no record: will be placed by hash")
    e = guessed(owner="gone", pin=None)
    assert (e.action, e.node, e.why) == (Action.MOVE, None, "gone is unknown: moves to a node chosen by hash")
    e = guessed(owner="a", pin=None, o=overrides({"a": "evacuate"}))
    assert (e.action, e.node) == (Action.MOVE, None)
    assert e.why == "a is evacuating: moves to a node chosen by hash (within the shared budget, else stays this time)"
    # what does not depend on the hash is still exact
    assert guessed(owner="a", pin="b").node == "b"
    assert guessed(owner="a", pin=None).why == "sticks to owner a"
