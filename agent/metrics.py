"""Prometheus metrics: counters bound once, state read at scrape time.

prometheus-client's ``labels()`` takes a lock and a dict lookup per call, so
every label combination the hot path touches is resolved here, at start-up
(or on a SIGHUP reload for per-node series). Label values are always drawn
from closed sets (decision outcomes, frame kinds, status codes, configured
node names): a client id never becomes a label.

Metrics that reflect state (node health, state, weight, sessions; Redis up) are
not pushed by a loop: :class:`StateCollector` reads them when Prometheus scrapes.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent import __version__
from agent.affinity import FallbackCause
from agent.model import How, NodeState
from agent.rules import NodeView

FRAME_KINDS = ("hello", "notify", "disconnect", "ack")
# Decisions take 0.1-2 ms normally; the tail up to HAProxy's processing timeout matters.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5)
OTHER_NODE = "_other"
AGENT_CHECK_STATES = (*(s.value for s in NodeState), "unknown")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        Info("mqtt_affinity_build", "Build information", registry=r).info(
            {"version": __version__, "python": platform.python_version()}
        )
        self._decisions = Counter("mqtt_affinity_decisions", "Placement decisions by outcome", ["how"], registry=r)
        self.decisions = {how: self._decisions.labels(how.value) for how in How}
        self.decision_seconds = Histogram(
            "mqtt_affinity_decision_seconds", "Time to decide one CONNECT, Redis included",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.redis_seconds = Histogram(
            "mqtt_affinity_redis_seconds", "Redis round trip of one decision", buckets=LATENCY_BUCKETS, registry=r
        )
        self._redis_errors = Counter(
            "mqtt_affinity_redis_errors", "Decisions that could not use Redis, by cause", ["cause"], registry=r
        )
        self.redis_errors = {c: self._redis_errors.labels(c.value) for c in FallbackCause}
        self.fallbacks = Counter(
            "mqtt_affinity_fallbacks", "Decisions answered by local hashing because Redis was unavailable", registry=r
        )
        self._moves = Counter(
            "mqtt_affinity_moves", "Clients re-placed on another node, by new node", ["node"], registry=r
        )
        self._pins = Counter("mqtt_affinity_pins_honoured", "Pins followed, by node", ["node"], registry=r)
        self._pins_ignored = Counter(
            "mqtt_affinity_pins_ignored", "Pins ignored because their node was down or unknown", ["node"], registry=r
        )
        self._routed = Counter("mqtt_affinity_routed", "Decisions that named a node, by node", ["node"], registry=r)
        self._evictions = Counter(
            "mqtt_affinity_evictions",
            "Client connections closed on this balancer's HAProxy by active evacuation, by node", ["node"], registry=r,
        )
        self._agent_checks = Counter(
            "mqtt_affinity_agent_checks", "HAProxy agent-check answers, by the node state answered", ["state"],
            registry=r,
        )
        self.agent_checks = {k: self._agent_checks.labels(k) for k in AGENT_CHECK_STATES}
        self.spop_connections = Gauge("mqtt_affinity_spop_connections", "Open SPOP connections", registry=r)
        self.spop_connections_total = Counter(
            "mqtt_affinity_spop_connections_opened", "SPOP connections accepted", registry=r
        )
        self.spop_healthchecks = Counter(
            "mqtt_affinity_spop_healthchecks", "HAProxy spop-check health checks answered", registry=r
        )
        self._frames_in = Counter("mqtt_affinity_spop_frames_received", "SPOP frames received", ["type"], registry=r)
        self._frames_out = Counter("mqtt_affinity_spop_frames_sent", "SPOP frames sent", ["type"], registry=r)
        self.frames_in = {k: self._frames_in.labels(k) for k in FRAME_KINDS}
        self.frames_out = {k: self._frames_out.labels(k) for k in FRAME_KINDS}
        self._disconnects = Counter(
            "mqtt_affinity_spop_disconnects", "SPOP disconnects by side and status code", ["side", "status"], registry=r
        )
        self.moves: dict[str, Counter] = {}
        self.pins: dict[str, Counter] = {}
        self.pins_ignored: dict[str, Counter] = {}
        self.routed: dict[str, Counter] = {}
        self.evictions: dict[str, Counter] = {}
        self.bind_nodes(())

    def bind_nodes(self, names: Iterable[str]) -> None:
        """(Re)bind the per-node children; unknown names count under ``_other``."""
        names = [*names, OTHER_NODE]
        self.moves = {n: self._moves.labels(n) for n in names}
        self.pins = {n: self._pins.labels(n) for n in names}
        self.pins_ignored = {n: self._pins_ignored.labels(n) for n in names}
        self.routed = {n: self._routed.labels(n) for n in names}
        self.evictions = {n: self._evictions.labels(n) for n in names}

    @staticmethod
    def _pick(children: dict[str, Counter], node: str) -> Counter:
        return children.get(node) or children[OTHER_NODE]

    def record_decision(self, how: How, node: str | None, seconds: float, pin_ignored: str | None) -> None:
        self.decisions[how].inc()
        self.decision_seconds.observe(seconds)
        if node:
            self._pick(self.routed, node).inc()
            if how is How.MOVED:
                self._pick(self.moves, node).inc()
            elif how is How.PINNED:
                self._pick(self.pins, node).inc()
        if pin_ignored:
            self._pick(self.pins_ignored, pin_ignored).inc()
        if how is How.FALLBACK:
            self.fallbacks.inc()

    def record_redis_error(self, cause: FallbackCause) -> None:
        """A decision that did not get its answer from Redis: an error now, or an open breaker."""
        self.redis_errors[cause].inc()

    def evicted(self, node: str, count: int) -> None:
        """The evacuator's observer hook."""
        self._pick(self.evictions, node).inc(count)

    def agent_check(self, state: str) -> None:
        """The agent-check server's observer hook (``state``: a node state, or ``unknown``)."""
        child = self.agent_checks.get(state)
        if child is not None:
            child.inc()

    def redis_round_trip(self, seconds: float) -> None:
        """The engine's observer hook."""
        self.redis_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


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


class SpopMetricsObserver:
    """Adapts ``Metrics`` to the server's observer hooks."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._disconnect_children: dict[tuple[str, int], Counter] = {}

    def connection_opened(self) -> None:
        self._m.spop_connections.inc()
        self._m.spop_connections_total.inc()

    def connection_closed(self) -> None:
        self._m.spop_connections.dec()

    def healthcheck(self) -> None:
        self._m.spop_healthchecks.inc()

    def frame_received(self, kind: str) -> None:
        self._m.frames_in[kind].inc()

    def frame_sent(self, kind: str) -> None:
        self._m.frames_out[kind].inc()

    def disconnect(self, side: str, status: int) -> None:
        # Status codes form a small closed set (0-13, 99); anything else is folded into 99.
        if not (0 <= status <= 13):
            status = 99
        key = (side, status)
        child = self._disconnect_children.get(key)
        if child is None:
            child = self._disconnect_children[key] = self._m._disconnects.labels(side, str(status))
        child.inc()
