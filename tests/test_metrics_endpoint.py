"""The agent's HTTP endpoint, scraped like Prometheus would: /metrics, /healthz, /readyz.

One balancer (HAProxy + its agent) in front of three brokers and a real Redis: decisions are
made by real CONNECTs, the exposition text is parsed with prometheus-client's own parser, and
readiness follows a real Redis being killed and restarted.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from agent import __version__
from devstack import NODES, Stack, mqtt_connect, raw_connect, wait_until

pytestmark = pytest.mark.haproxy

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def http_get(port: int, path: str, *, data: bytes | None = None) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers) of one request; HTTP errors are answers too, not exceptions."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(), dict(exc.headers)


def scrape(port: int) -> Samples:
    """Every sample of /metrics, parsed by prometheus-client: {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body, headers = http_get(port, "/metrics")
    assert status == 200, (status, body[:200])
    assert headers.get("Content-Type", "").startswith("text/plain"), headers
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples: Samples, name: str) -> float:
    """Sum over every label combination of ``name``."""
    return sum(v for (n, _), v in samples.items() if n == name)


@pytest.fixture
def one_balancer(stack_factory) -> Stack:
    # Its agent counts the sessions every second (the sweep): node_sessions follows within the test.
    return stack_factory(1, agent_overrides={"sweep_interval": 1})


def test_metrics_follow_decisions_and_readiness_follows_redis(one_balancer: Stack, haproxy_version):
    stack = one_balancer
    (bal,) = stack.balancers
    port = bal.metrics_port
    cids = [f"metrics-{haproxy_version}-{i:02d}" for i in range(12)]

    # -- plain endpoints --------------------------------------------------------------------
    assert http_get(port, "/healthz")[0] == 200
    assert http_get(port, "/nope")[0] == 404
    assert http_get(port, "/metrics/extra")[0] == 404
    status, _, headers = http_get(port, "/metrics", data=b"x=1")  # urllib sends a POST
    assert status == 405 and "GET" in headers.get("Allow", ""), (status, headers)
    status, body, _ = http_get(port, "/readyz")
    assert status == 200, body

    # node_up is set by the periodic refresh (every 2 s); the stack is a second or two old.
    before = wait_until(lambda: (m := scrape(port)) and
                        all(value(m, "mqtt_affinity_node_up", node=n) == 1.0 for n in NODES) and m,
                        timeout=5, message="node_up never 1 for every node")
    info = [dict(labels) for (n, labels), v in before.items() if n == "mqtt_affinity_build_info" and v == 1.0]
    assert len(info) == 1 and info[0]["version"] == __version__ and info[0]["python"], info
    a0 = value(before, "mqtt_affinity_decisions_total", how="assigned")
    h0 = value(before, "mqtt_affinity_decisions_total", how="hit")
    c0 = value(before, "mqtt_affinity_decision_seconds_count")
    assert None not in (a0, h0, c0), sorted(k for k in before if k[0].startswith("mqtt_affinity_decision"))

    # -- a new persistent client: assigned --------------------------------------------------
    first = cids[0]
    assert raw_connect(bal.port, first.encode(), version=4, clean=False) == 0
    s = wait_until(lambda: (m := scrape(port)) and
                   value(m, "mqtt_affinity_decisions_total", how="assigned") == a0 + 1 and m,
                   timeout=5, message="decisions_total{how=assigned} never moved")
    assert value(s, "mqtt_affinity_decisions_total", how="hit") == h0
    assert value(s, "mqtt_affinity_decision_seconds_count") == c0 + 1
    owner = stack.owner(first)
    assert owner in NODES
    assert value(s, "mqtt_affinity_routed_total", node=owner) >= 1

    # -- the same client again: hit -----------------------------------------------------------
    assert raw_connect(bal.port, first.encode(), version=4, clean=False) == 0
    s = wait_until(lambda: (m := scrape(port)) and
                   value(m, "mqtt_affinity_decisions_total", how="hit") == h0 + 1 and m,
                   timeout=5, message="decisions_total{how=hit} never moved")
    assert value(s, "mqtt_affinity_decisions_total", how="assigned") == a0 + 1
    assert value(s, "mqtt_affinity_decision_seconds_count") == c0 + 2
    # HAProxy keeps its SPOP connection to the agent open between decisions.
    assert value(s, "mqtt_affinity_spop_connections") >= 1, value(s, "mqtt_affinity_spop_connections")
    assert value(s, "mqtt_affinity_spop_connections_opened_total") >= 1

    # -- more clients: sessions per node after the periodic refresh ---------------------------
    for cid in cids[1:]:
        assert raw_connect(bal.port, cid.encode(), version=4, clean=False) == 0
    owners = {cid: stack.owner(cid) for cid in cids}
    assert all(o in NODES for o in owners.values()), owners
    want = {node: sum(1 for o in owners.values() if o == node) for node in NODES}

    def sessions_match() -> Samples | None:
        m = scrape(port)
        got = {node: value(m, "mqtt_affinity_node_sessions", node=node) for node in NODES}
        return m if got == want else None

    s = wait_until(sessions_match, timeout=8, interval=0.2,
                   message=lambda: f"node_sessions never became {want}")
    assert value(s, "mqtt_affinity_decisions_total", how="assigned") == a0 + len(cids)
    assert value(s, "mqtt_affinity_decision_seconds_count") == c0 + len(cids) + 1
    assert value(s, "mqtt_affinity_redis_up") == 1.0

    # -- this balancer's client connections per node, read from HAProxy at scrape time; and the
    # agent-check answers HAProxy asked for (one per broker server per second) --------------------
    held = mqtt_connect("127.0.0.1", bal.port, first.encode(), clean=False)
    try:
        s = wait_until(lambda: (m := scrape(port)) and
                       value(m, "mqtt_affinity_node_connections", node=owners[first]) == 1.0 and m,
                       timeout=5, message="node_connections never showed the held connection")
        assert sum(value(s, "mqtt_affinity_node_connections", node=n) or 0 for n in NODES) == 1.0
    finally:
        held.close()
    wait_until(lambda: (value(scrape(port), "mqtt_affinity_agent_checks_total", state="active") or 0) >= 3,
               timeout=5, message="HAProxy's agent-checks were not answered")
    assert value(s, "mqtt_affinity_evictions_total", node="node1") == 0.0

    # -- no client id is ever a label value -----------------------------------------------------
    label_values = {v for (_, labels) in s for _, v in labels}
    assert label_values, "no labelled samples at all?"
    assert not label_values & set(cids), label_values & set(cids)
    assert not any(cid in v for v in label_values for cid in cids)

    # -- readiness follows Redis --------------------------------------------------------------------
    stack.redis.kill()
    wait_until(lambda: http_get(port, "/readyz")[0] == 503, timeout=5,
               message="/readyz still 200 with Redis dead")
    status, body, _ = http_get(port, "/readyz")
    assert status == 503 and b"redis" in body, (status, body)
    assert http_get(port, "/healthz")[0] == 200  # alive, just not ready
    # Clients still get a broker meanwhile (local fallback hashing).
    f0 = value(scrape(port), "mqtt_affinity_fallbacks_total")
    assert raw_connect(bal.port, cids[0].encode(), version=4, clean=False) == 0
    assert value(scrape(port), "mqtt_affinity_fallbacks_total") == f0 + 1

    stack.redis.start()
    wait_until(lambda: http_get(port, "/readyz")[0] == 200, timeout=10,
               message="/readyz never came back to 200 after Redis restarted")
    s = scrape(port)
    label_values = {v for (_, labels) in s for _, v in labels}
    assert not any(cid in v for v in label_values for cid in cids)


def test_a_failing_collector_gives_500_not_a_dead_endpoint():
    import asyncio
    import urllib.error
    import urllib.request

    from agent.http import HttpEndpoint

    async def broken() -> bytes:
        raise RuntimeError("collector bug")

    async def go():
        ep = HttpEndpoint("127.0.0.1", 0, broken, lambda: (True, "ready"))
        await ep.start()
        loop = asyncio.get_running_loop()

        def fetch(path: str) -> int:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{ep.port}{path}", timeout=5).status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert await loop.run_in_executor(None, fetch, "/metrics") == 500
        assert await loop.run_in_executor(None, fetch, "/healthz") == 200
        await ep.stop()

    asyncio.run(go())
