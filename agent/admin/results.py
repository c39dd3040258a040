"""What the command handlers return: plain data, turned into text or JSON by :mod:`.render`."""

from __future__ import annotations

from dataclasses import dataclass

from agent.admin.access import ClientRecord
from agent.admin.explain import EvacuationSample, Explanation, NodeRow
from agent.admin.scrape import AgentCounters
from agent.model import ExitCode, NodeState

__all__ = [
    "Evacuation",
    "NodesView",
    "Pinned",
    "Result",
    "ShowView",
    "StateChanged",
    "StatsView",
    "Unpinned",
    "WeightChanged",
]


class Result:
    """Base of every result: the exit status that goes with it (0 unless overridden)."""

    @property
    def status(self) -> ExitCode:
        return ExitCode.OK


@dataclass(frozen=True)
class Pinned(Result):
    cid: bytes
    as_hex: bool
    node: str
    ttl: int | None
    #: (owner records key, pins key): the client's field in each is its id.
    keys: tuple[bytes, bytes] = (b"", b"")


@dataclass(frozen=True)
class Unpinned(Result):
    cid: bytes
    as_hex: bool


@dataclass(frozen=True)
class StateChanged(Result):
    node: str
    state: NodeState
    was: NodeState
    #: ``evacuate --rate``; None: the agents' default.
    rate: int | None = None
    #: The config's ``evacuate_rate`` (None without a config).
    default_rate: int | None = None


@dataclass(frozen=True)
class Evacuation(Result):
    """``evacuate``: the state change, whether agents close connections, and the last look."""

    changed: StateChanged
    #: Balancers whose agents publish connection counts (so close connections); 0: passive.
    balancers: int
    sample: EvacuationSample
    #: ``--wait`` ran; ``timed_out``: ``--timeout`` passed before the node was empty.
    waited: bool = False
    timed_out: bool = False
    #: Seconds after the command started when the node was first seen empty (and stayed so).
    emptied_at: float | None = None

    @property
    def status(self) -> ExitCode:
        return ExitCode.NOT_FOUND if self.timed_out else ExitCode.OK


@dataclass(frozen=True)
class WeightChanged(Result):
    node: str
    #: The new override, or None for ``--reset``.
    weight: float | None
    #: ``--reset``: whether there was an override to remove.
    removed: bool = False
    #: The config's weight for the node (None without a config).
    configured_weight: float | None = None


@dataclass(frozen=True)
class ShowView(Result):
    cid: bytes
    as_hex: bool
    record: ClientRecord
    owner_node: str | None
    pin_node: str | None
    owner_state: NodeState | None
    owner_health: bool | None
    explanation: Explanation
    #: (owner records key, pins key): the client's field in each is its id.
    keys: tuple[bytes, bytes] = (b"", b"")
    #: Unix time the agents found the owner down (``P node-down``), or None.
    owner_down_since: float | None = None

    @property
    def found(self) -> bool:
        return bool(self.record.owner or self.record.pin)

    @property
    def status(self) -> ExitCode:
        return ExitCode.OK if self.found else ExitCode.NOT_FOUND


@dataclass(frozen=True)
class NodesView(Result):
    rows: list[NodeRow]
    #: Nodes come from a config (else: the names Redis holds, unprobed).
    exact: bool
    #: When the sessions were counted (unix seconds); None: never.
    counted_at: float | None = None


@dataclass(frozen=True)
class StatsView(Result):
    records: int
    pins: int
    rows: list[NodeRow]
    metrics_url: str | None
    counters: AgentCounters | None
    #: Why the counters are missing.
    error: str | None
    #: When the sessions were counted (unix seconds); None: never.
    counted_at: float | None = None

    @property
    def sessions_total(self) -> int:
        return sum(r.sessions for r in self.rows)


@dataclass(frozen=True)
class MigrateView(Result):
    owners: int
    pins: int
    #: Version-1 index keys (placed:<node>, evac:*) removed.
    dropped: int
    dry_run: bool
