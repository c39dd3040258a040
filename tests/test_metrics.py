"""Metrics as plain numbers, rendered at scrape time: what Prometheus reads is what was counted."""

from __future__ import annotations

import platform

from prometheus_client.parser import text_string_to_metric_families
from pytest import approx

from agent import __version__
from agent.affinity import FallbackCause
from agent.metrics import (
    LATENCY_BUCKETS,
    OTHER_NODE,
    Latency,
    Metrics,
    SpopMetricsObserver,
    StateCollector,
    StoreCollector,
    merge_expositions,
    render_families,
)
from agent.model import How, NodeState
from agent.rules import NodeView


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_latency_buckets_are_prometheus_le_buckets() -> None:
    h = Latency((0.001, 0.01))
    for v in (0.0005, 0.001, 0.002, 0.01, 0.5, 0.5):
        h.observe(v)
    assert h.counts == [2, 2, 2]  # <= 1 ms (0.001 itself included), <= 10 ms, above
    fam = h.family("x_seconds", "doc")
    got = {(s.name, s.labels.get("le")): s.value for s in fam.samples}
    assert got[("x_seconds_bucket", "0.001")] == 2
    assert got[("x_seconds_bucket", "0.01")] == 4
    assert got[("x_seconds_bucket", "+Inf")] == 6
    assert got[("x_seconds_count", None)] == 6
    assert abs(got[("x_seconds_sum", None)] - 1.0135) < 1e-9


def test_counters_render_with_prometheus_names_and_labels() -> None:
    m = Metrics()
    m.bind_nodes(["node1", "node2"])
    m.record_decision(How.HIT, "node1", 0.0002, None)
    m.record_decision(How.MOVED, "node2", 0.003, None)
    m.record_decision(How.PINNED, "node9", 0.001, "node3")  # names outside the config: _other
    m.record_decision(How.FALLBACK, "node1", 0.0001, None)
    m.record_redis_error(FallbackCause.UNAVAILABLE)
    m.evicted("node2", 5)
    m.agent_check("drain")
    m.agent_check("nonsense")  # not a state: not counted, no new series
    m.redis_round_trip(0.0004)
    obs = SpopMetricsObserver(m)
    obs.connection_opened()
    obs.connection_opened()
    obs.connection_closed()
    obs.frame_received("notify")
    obs.frame_sent("ack")
    obs.disconnect("haproxy", 2)
    obs.disconnect("agent", 4000)  # not an SPOP status: 99
    s = samples(m)
    assert s[("mqtt_affinity_decisions_total", (("how", "hit"),))] == 1
    assert s[("mqtt_affinity_decisions_total", (("how", "wait"),))] == 0
    assert s[("mqtt_affinity_fallbacks_total", ())] == 1
    assert s[("mqtt_affinity_routed_total", (("node", "node1"),))] == 2
    assert s[("mqtt_affinity_routed_total", (("node", OTHER_NODE),))] == 1
    assert s[("mqtt_affinity_moves_total", (("node", "node2"),))] == 1
    assert s[("mqtt_affinity_pins_honoured_total", (("node", OTHER_NODE),))] == 1
    assert s[("mqtt_affinity_pins_ignored_total", (("node", OTHER_NODE),))] == 1
    assert s[("mqtt_affinity_redis_errors_total", (("cause", "unavailable"),))] == 1
    assert s[("mqtt_affinity_evictions_total", (("node", "node2"),))] == 5
    assert s[("mqtt_affinity_agent_checks_total", (("state", "drain"),))] == 1
    assert not any(k[0] == "mqtt_affinity_agent_checks_total" and ("state", "nonsense") in k[1] for k in s)
    assert s[("mqtt_affinity_decision_seconds_count", ())] == 4
    assert s[("mqtt_affinity_decision_seconds_bucket", (("le", "0.00025"),))] == 2
    assert s[("mqtt_affinity_redis_seconds_count", ())] == 1
    assert s[("mqtt_affinity_spop_connections", ())] == 1
    assert s[("mqtt_affinity_spop_connections_opened_total", ())] == 2
    assert s[("mqtt_affinity_spop_frames_received_total", (("type", "notify"),))] == 1
    assert s[("mqtt_affinity_spop_frames_sent_total", (("type", "ack"),))] == 1
    assert s[("mqtt_affinity_spop_disconnects_total", (("side", "haproxy"), ("status", "2")))] == 1
    assert s[("mqtt_affinity_spop_disconnects_total", (("side", "agent"), ("status", "99")))] == 1
    assert len(LATENCY_BUCKETS) + 1 == sum(1 for k in s if k[0] == "mqtt_affinity_decision_seconds_bucket")


def test_a_node_removed_by_a_reload_keeps_its_series_and_counts_no_more() -> None:
    m = Metrics()
    m.bind_nodes(["node1", "node2"])
    m.record_decision(How.HIT, "node2", 0.001, None)
    m.bind_nodes(["node1"])
    m.record_decision(How.HIT, "node2", 0.001, None)
    s = samples(m)
    assert s[("mqtt_affinity_routed_total", (("node", "node2"),))] == 1
    assert s[("mqtt_affinity_routed_total", (("node", OTHER_NODE),))] == 1


class _Cache:
    def __init__(self) -> None:
        self.hits, self.misses, self.invalidations, self.drops, self.enabled = 7, 3, 2, 1, True

    def __len__(self) -> int:
        return 42


class _Store:
    def __init__(self) -> None:
        self.cache = _Cache()
        self.wait_short = 4
        self.restored = 9


def test_store_collector_reads_the_store_at_scrape_time() -> None:
    m = Metrics()
    store = _Store()
    m.registry.register(StoreCollector(store))
    s = samples(m)
    assert s[("mqtt_affinity_cache_hits_total", ())] == 7
    assert s[("mqtt_affinity_cache_entries", ())] == 42
    assert s[("mqtt_affinity_cache_enabled", ())] == 1
    assert s[("mqtt_affinity_redis_wait_short_total", ())] == 4
    assert s[("mqtt_affinity_failover_restored_total", ())] == 9
    store.cache.hits = 8
    store.cache.enabled = False
    s = samples(m)
    assert s[("mqtt_affinity_cache_hits_total", ())] == 8
    assert s[("mqtt_affinity_cache_enabled", ())] == 0


def _parsed(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def test_merged_workers_sum_counters_histograms_and_per_process_gauges_only() -> None:
    """``workers`` > 1: the supervisor's /metrics adds the workers' own numbers up, except the
    gauges of shared state, which are the first worker's."""

    workers = []
    for i, (up, sessions) in enumerate(((True, 5), (False, 9))):
        m = Metrics()
        m.bind_nodes(["n1"])
        view = NodeView(name="n1", configured_weight=1.0, weight_override=None, state=NodeState.ACTIVE,
                        healthy=up, effective_weight=1.0)
        m.registry.register(StateCollector(lambda v=view: [v], lambda: True, lambda s=sessions: ({"n1": s}, None)))
        obs = SpopMetricsObserver(m)
        for _ in range(i + 1):
            obs.connection_opened()
            m.record_decision(How.PINNED, "n1", 0.001 * (i + 1), None)
        m.disconnect("agent", 3 + i)  # a label set only one worker has
        workers.append(m.render().decode())
    merged = _parsed(render_families(merge_expositions(workers)))
    assert merged[("mqtt_affinity_decisions_total", (("how", "pinned"),))] == 3
    assert merged[("mqtt_affinity_spop_connections", ())] == 3  # per process: summed
    assert merged[("mqtt_affinity_decision_seconds_count", ())] == 3
    assert merged[("mqtt_affinity_decision_seconds_bucket", (("le", "+Inf"),))] == 3
    assert merged[("mqtt_affinity_decision_seconds_sum", ())] == approx(0.001 + 2 * 0.002)
    assert merged[("mqtt_affinity_spop_disconnects_total", (("side", "agent"), ("status", "3")))] == 1
    assert merged[("mqtt_affinity_spop_disconnects_total", (("side", "agent"), ("status", "4")))] == 1
    # Shared state: worker 0's, not a sum.
    assert merged[("mqtt_affinity_node_up", (("node", "n1"),))] == 1
    assert merged[("mqtt_affinity_node_sessions", (("node", "n1"),))] == 5
    assert merged[("mqtt_affinity_redis_up", ())] == 1
    assert merged[("mqtt_affinity_build_info", (("python", platform.python_version()), ("version", __version__)))] == 1
