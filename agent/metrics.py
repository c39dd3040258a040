"""Prometheus metrics: plain integers on the hot path, everything rendered at scrape time.

The hot path (one decision, one SPOP frame) only adds to plain integers held here; nothing
there takes a lock or builds a label tuple (prometheus-client's ``inc``/``observe`` take a
lock each: about 7% of the agent's CPU under load). :class:`CountersCollector` turns them
into metric families when Prometheus scrapes. Label values are always drawn from closed sets
(decision outcomes, frame kinds, status codes, configured node names): a client id never
becomes a label.

Metrics that reflect state (node health, state, weight, sessions; Redis up; the cache) are
not pushed by a loop either: :class:`StateCollector` and :class:`StoreCollector` read them
when Prometheus scrapes.

With ``workers`` > 1 each worker process renders its own numbers and the supervisor
(:mod:`agent.workers`) serves one ``/metrics`` that merges them (:func:`merge_expositions`):
counters and histograms (buckets, sum, count) are summed, series by series (same name, same
labels); so are the gauges in :data:`PER_PROCESS_GAUGES`, which count something each process
holds. Every other gauge describes state the workers share (a node's health, Redis, the
records in Redis, this balancer's HAProxy): it is taken from the first worker, by index, that
reports the series, never summed. A new gauge belongs in one of the two sets
(``tests/test_workers.py`` checks that every gauge the agent renders is in one).
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from agent import __version__
from agent.affinity import FallbackCause
from agent.model import How, NodeState
from agent.rules import NodeView

FRAME_KINDS = ("hello", "notify", "disconnect", "ack")
# Decisions take 0.1-2 ms normally; the tail up to HAProxy's processing timeout matters.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5)
OTHER_NODE = "_other"
AGENT_CHECK_STATES = (*(s.value for s in NodeState), "unknown")
#: SPOP status codes are 0-13; anything else is counted as 99.
_STATUS_OTHER = 99


#: Gauges that count something each agent process holds: summed over ``workers``.
PER_PROCESS_GAUGES = frozenset({
    "mqtt_affinity_spop_connections",  # each worker's own SPOP connections
    "mqtt_affinity_cache_entries",  # each worker keeps its own local cache
})
#: Gauges that describe state every worker shares (or only worker 0 reads): never summed, taken
#: from the first worker (by index) that reports the series.
SHARED_GAUGES = frozenset({
    "mqtt_affinity_build_info",
    "mqtt_affinity_node_up",
    "mqtt_affinity_node_state",
    "mqtt_affinity_node_weight",
    "mqtt_affinity_node_sessions",
    "mqtt_affinity_sessions_counted_timestamp_seconds",
    "mqtt_affinity_node_connections",
    "mqtt_affinity_redis_up",
    "mqtt_affinity_cache_enabled",
})
#: Metric types whose series are summed over workers.
SUMMED_TYPES = frozenset({"counter", "histogram", "summary"})


def merge_expositions(texts: Sequence[str]) -> list[Metric]:
    """The metric families of several processes' ``/metrics`` bodies (Prometheus text format),
    in worker order, as one set: see the module docstring for what is summed. Families and
    series keep the order in which they first appear."""
    families: dict[str, Metric] = {}
    series: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            summed = fam.type in SUMMED_TYPES or (fam.type == "gauge" and fam.name in PER_PROCESS_GAUGES)
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                series[fam.name] = {}
            known = series[fam.name]
            for sample in fam.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                first = known.get(key)
                if first is None:
                    known[key] = sample
                elif summed:
                    known[key] = first._replace(value=first.value + sample.value)
    for name, fam in families.items():
        fam.samples = list(series[name].values())
    return list(families.values())


class _Fixed(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render_families(families: Iterable[Metric]) -> bytes:
    """Prometheus text exposition of ready-made families (the supervisor's merged ``/metrics``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    return generate_latest(registry)


class Latency:
    """A histogram as plain numbers: one count per bucket (not cumulative), the sum, the count."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1  # first bound >= seconds: Prometheus' `le`
        self.sum += seconds

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, n in zip((*(repr(b) for b in self.bounds), "+Inf"), self.counts):
            cumulative += n
            buckets.append((bound, cumulative))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.sum)


class PerNode:
    """Counts per configured node; a name outside the configured set counts under ``_other``.
    A node removed by a reload keeps its series (counters never go back) but counts no more."""

    __slots__ = ("bound", "counts")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {OTHER_NODE: 0}
        self.bound: frozenset[str] = frozenset()

    def bind(self, names: Iterable[str]) -> None:
        self.bound = frozenset(names)
        for n in self.bound:
            self.counts.setdefault(n, 0)

    def add(self, node: str, n: int = 1) -> None:
        self.counts[node if node in self.bound else OTHER_NODE] += n

    def family(self, name: str, doc: str) -> CounterMetricFamily:
        f = CounterMetricFamily(name, doc, labels=["node"])
        for node, count in sorted(self.counts.items()):
            f.add_metric([node], count)
        return f


class Metrics:
    """Every counter of one agent, as plain numbers; ``registry`` renders them (and whatever
    collectors are registered beside) for ``/metrics``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        Info("mqtt_affinity_build", "Build information", registry=self.registry).info(
            {"version": __version__, "python": platform.python_version()}
        )
        self.decisions: dict[How, int] = dict.fromkeys(How, 0)
        self.decision_seconds = Latency()
        self.redis_seconds = Latency()
        self.redis_errors: dict[FallbackCause, int] = dict.fromkeys(FallbackCause, 0)
        self.moves = PerNode()
        self.pins = PerNode()
        self.pins_ignored = PerNode()
        self.routed = PerNode()
        self.evictions = PerNode()
        self.agent_checks: dict[str, int] = dict.fromkeys(AGENT_CHECK_STATES, 0)
        self.spop_connections = 0
        self.spop_connections_total = 0
        self.spop_healthchecks = 0
        self.frames_in: dict[str, int] = dict.fromkeys(FRAME_KINDS, 0)
        self.frames_out: dict[str, int] = dict.fromkeys(FRAME_KINDS, 0)
        self.disconnects: dict[tuple[str, int], int] = {}
        self.registry.register(CountersCollector(self))

    def bind_nodes(self, names: Iterable[str]) -> None:
        """The configured node names (at start-up and on reload); others count under ``_other``."""
        names = list(names)
        for per_node in (self.moves, self.pins, self.pins_ignored, self.routed, self.evictions):
            per_node.bind(names)

    def record_decision(self, how: How, node: str | None, seconds: float, pin_ignored: str | None) -> None:
        self.decisions[how] += 1
        self.decision_seconds.observe(seconds)
        if node:
            self.routed.add(node)
            if how is How.MOVED:
                self.moves.add(node)
            elif how is How.PINNED:
                self.pins.add(node)
        if pin_ignored:
            self.pins_ignored.add(pin_ignored)

    def record_redis_error(self, cause: FallbackCause) -> None:
        """A decision that did not get its answer from Redis: an error now, or an open breaker."""
        self.redis_errors[cause] += 1

    def evicted(self, node: str, count: int) -> None:
        """The evacuator's observer hook."""
        self.evictions.add(node, count)

    def agent_check(self, state: str) -> None:
        """The agent-check server's observer hook (``state``: a node state, or ``unknown``)."""
        if state in self.agent_checks:
            self.agent_checks[state] += 1

    def redis_round_trip(self, seconds: float) -> None:
        """The engine's observer hook."""
        self.redis_seconds.observe(seconds)

    def disconnect(self, side: str, status: int) -> None:
        if not (0 <= status <= 13):
            status = _STATUS_OTHER
        key = (side, status)
        self.disconnects[key] = self.disconnects.get(key, 0) + 1

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountersCollector(Collector):
    """Renders :class:`Metrics`' numbers at scrape time (names and types as Prometheus knows them)."""

    def __init__(self, m: Metrics) -> None:
        self._m = m

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        m = self._m
        f = CounterMetricFamily("mqtt_affinity_decisions", "Placement decisions by outcome", labels=["how"])
        for how, n in m.decisions.items():
            f.add_metric([how.value], n)
        yield f
        yield m.decision_seconds.family("mqtt_affinity_decision_seconds", "Time to decide one CONNECT, Redis included")
        yield m.redis_seconds.family("mqtt_affinity_redis_seconds", "Redis round trip of one decision")
        f = CounterMetricFamily("mqtt_affinity_redis_errors", "Decisions that could not use Redis, by cause",
                                labels=["cause"])
        for cause, n in m.redis_errors.items():
            f.add_metric([cause.value], n)
        yield f
        yield CounterMetricFamily("mqtt_affinity_fallbacks",
                                  "Decisions answered by local hashing because Redis was unavailable",
                                  value=m.decisions[How.FALLBACK])
        yield m.moves.family("mqtt_affinity_moves", "Clients re-placed on another node, by new node")
        yield m.pins.family("mqtt_affinity_pins_honoured", "Pins followed, by node")
        yield m.pins_ignored.family("mqtt_affinity_pins_ignored", "Pins ignored because their node was down or unknown")
        yield m.routed.family("mqtt_affinity_routed", "Decisions that named a node, by node")
        yield m.evictions.family("mqtt_affinity_evictions",
                                 "Client connections closed on this balancer's HAProxy by active evacuation, by node")
        f = CounterMetricFamily("mqtt_affinity_agent_checks", "HAProxy agent-check answers, by the node state answered",
                                labels=["state"])
        for state, n in m.agent_checks.items():
            f.add_metric([state], n)
        yield f
        yield GaugeMetricFamily("mqtt_affinity_spop_connections", "Open SPOP connections", value=m.spop_connections)
        yield CounterMetricFamily("mqtt_affinity_spop_connections_opened", "SPOP connections accepted",
                                  value=m.spop_connections_total)
        yield CounterMetricFamily("mqtt_affinity_spop_healthchecks", "HAProxy spop-check health checks answered",
                                  value=m.spop_healthchecks)
        for name, doc, counts in (("mqtt_affinity_spop_frames_received", "SPOP frames received", m.frames_in),
                                  ("mqtt_affinity_spop_frames_sent", "SPOP frames sent", m.frames_out)):
            f = CounterMetricFamily(name, doc, labels=["type"])
            for kind, n in counts.items():
                f.add_metric([kind], n)
            yield f
        f = CounterMetricFamily("mqtt_affinity_spop_disconnects", "SPOP disconnects by side and status code",
                                labels=["side", "status"])
        for (side, status), n in sorted(m.disconnects.items()):
            f.add_metric([side, str(status)], n)
        yield f


class StateCollector(Collector):
    """Node and Redis state, read when Prometheus scrapes (nothing pushes these).

    ``views`` gives every configured node as the engine sees it, ``redis_up`` the breaker's
    state, ``sessions`` the per-node session counts fetched for this scrape (None when Redis
    could not answer: the series is then absent rather than stale).
    """

    def __init__(
        self,
        views: Callable[[], list[NodeView]],
        redis_up: Callable[[], bool],
        sessions: Callable[[], tuple[Mapping[str, int], float | None] | None],
    ) -> None:
        self._views = views
        self._redis_up = redis_up
        self._sessions = sessions

    def describe(self) -> Iterable[Metric]:
        return ()  # unchecked collector: its series follow the node list

    def collect(self) -> Iterator[Metric]:
        views = self._views()
        counted = self._sessions()
        sessions = counted[0] if counted is not None else None
        up = GaugeMetricFamily("mqtt_affinity_node_up", "1 while the broker node passes health checks",
                               labels=["node"])
        state = GaugeMetricFamily("mqtt_affinity_node_state", "1 for the node's current operator state",
                                  labels=["node", "state"])
        weight = GaugeMetricFamily(
            "mqtt_affinity_node_weight", "Placement weight in force: the configured one or the operator override",
            labels=["node"])
        placed = GaugeMetricFamily(
            "mqtt_affinity_node_sessions", "Live placement records (sessions) owned by the node, as of the last sweep",
            labels=["node"])
        for v in views:
            up.add_metric([v.name], 1 if v.healthy else 0)
            for s in NodeState:
                state.add_metric([v.name, s.value], 1 if v.state == s else 0)
            weight.add_metric([v.name], v.weight_override if v.weight_override is not None else v.configured_weight)
            if sessions is not None and v.name in sessions:
                placed.add_metric([v.name], sessions[v.name])
        yield up
        yield state
        yield weight
        yield placed
        if counted is not None and counted[1] is not None:
            yield GaugeMetricFamily("mqtt_affinity_sessions_counted_timestamp_seconds",
                                    "When the record sweep last counted the sessions (unix time)", value=counted[1])
        yield GaugeMetricFamily("mqtt_affinity_redis_up", "1 while Redis answers", value=1 if self._redis_up() else 0)


class ConnectionsCollector(Collector):
    """``mqtt_affinity_node_connections``: client connections per node through this balancer's
    HAProxy, read from its runtime API for the scrape (absent without ``haproxy_socket``, or
    when HAProxy did not answer)."""

    def __init__(self, connections: Callable[[], Mapping[str, int] | None]) -> None:
        self._connections = connections

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        conns = self._connections()
        if conns is None:
            return
        family = GaugeMetricFamily(
            "mqtt_affinity_node_connections",
            "Client connections to the node through this balancer's HAProxy (its runtime API, at scrape time)",
            labels=["node"],
        )
        for node, count in sorted(conns.items()):
            family.add_metric([node], count)
        yield family


class CacheStats(Protocol):
    hits: int
    misses: int
    invalidations: int
    drops: int
    enabled: bool

    def __len__(self) -> int: ...


class StoreStats(Protocol):
    @property
    def cache(self) -> CacheStats: ...

    wait_short: int
    restored: int


class StoreCollector(Collector):
    """The Redis layer's own counts, read at scrape time: the local cache, WAIT, the journal."""

    def __init__(self, store: StoreStats) -> None:
        self._store = store

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        s = self._store
        c = s.cache
        yield GaugeMetricFamily("mqtt_affinity_cache_enabled",
                                "1 while the local record cache is in use (Redis tracking it)", value=int(c.enabled))
        yield GaugeMetricFamily("mqtt_affinity_cache_entries", "Client records in the local cache", value=len(c))
        yield CounterMetricFamily("mqtt_affinity_cache_hits", "Cache lookups that found the client's records",
                                  value=c.hits)
        yield CounterMetricFamily("mqtt_affinity_cache_misses", "Cache lookups that did not (the decision asks Redis)",
                                  value=c.misses)
        yield CounterMetricFamily("mqtt_affinity_cache_invalidations",
                                  "Record buckets invalidated by Redis (another agent or the CLI wrote)",
                                  value=c.invalidations)
        yield CounterMetricFamily("mqtt_affinity_cache_drops",
                                  "Whole-cache drops (tracking lost, Redis unavailable)", value=c.drops)
        yield CounterMetricFamily("mqtt_affinity_redis_wait_short",
                                  "Placements that reached fewer replicas than redis_wait_replicas in time",
                                  value=s.wait_short)
        yield CounterMetricFamily("mqtt_affinity_failover_restored",
                                  "Placements written back by the failover journal after Redis changed",
                                  value=s.restored)


class SpopMetricsObserver:
    """Adapts ``Metrics`` to the server's observer hooks (plain additions)."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._in = metrics.frames_in
        self._out = metrics.frames_out

    def connection_opened(self) -> None:
        self._m.spop_connections += 1
        self._m.spop_connections_total += 1

    def connection_closed(self) -> None:
        self._m.spop_connections -= 1

    def healthcheck(self) -> None:
        self._m.spop_healthchecks += 1

    def frame_received(self, kind: str) -> None:
        self._in[kind] += 1

    def frame_sent(self, kind: str) -> None:
        self._out[kind] += 1

    def disconnect(self, side: str, status: int) -> None:
        self._m.disconnect(side, status)
