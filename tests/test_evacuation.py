"""Active evacuation: ``mqtt-affinity evacuate node2 --rate 100`` empties node2 at 100 closes per
second in total, across both balancers.

300 persistent paho clients (clean session 0, reconnecting 1 s after a lost connection) are on node2, half
through each balancer. Each agent closes node2's client connections on its own HAProxy through
the runtime API, taking its tokens from the one budget in Redis; each closed client reconnects
and is moved (``how=moved``), and both balancers agree on where it went. The closes are read
from both HAProxy's own logs (termination flag K = killed from the runtime API; close time =
accept time + Tt), so the rate is measured independently of the agents' counters.
"""

from __future__ import annotations

import bisect
import json
import subprocess
import time
from collections import Counter
from datetime import datetime

import pytest

from agent import placement
from agent.evacuate import burst_for
from devstack import NODES, Balancer, Stack, agent_command, raw_connect, wait_until
from devstack.paho_client import Fleet

pytestmark = pytest.mark.haproxy

CLIENTS = 300
RATE = 100
RECONNECT = 1  # the clients' reconnect delay, seconds


def _node2_connections(b: Balancer) -> int:
    return next(int(r["scur"]) for r in b.haproxy.stats() if r["pxname"] == "be_mqtt" and r["svname"] == "node2")


def _closes(b: Balancer, cids: set[str]) -> list[float]:
    """Close times (unix) of the connections of ``cids`` that HAProxy's runtime API killed."""
    out = []
    for d in b.haproxy.traffic_log():
        if d["cid"] in cids and d["termination"].startswith("K"):
            accepted = datetime.strptime(d["time"], "%d/%b/%Y:%H:%M:%S.%f").timestamp()
            out.append(accepted + int(d["timers"].split("/")[2]) / 1000)
    return out


def _metric(b: Balancer, name: str, node: str) -> float:
    want = f'{name}{{node="{node}"}} '
    line = next((ln for ln in b.agent.metrics_text().splitlines() if ln.startswith(want)), None)
    return float(line.split()[-1]) if line else 0.0


def _summary(b: Balancer) -> Counter[tuple[str, ...]]:
    return Counter((d["termination"], d["how"], d["server"]) for d in b.haproxy.traffic_log())


def test_evacuate_closes_connections_at_the_shared_rate(stack: Stack, haproxy_version):
    ha1, ha2 = stack.balancers
    v = haproxy_version
    weights = [(n, 1.0) for n in NODES]  # the devstack agents' nodes and weights
    cids = [c for c in (f"evac-{v}-{i:04d}" for i in range(3000)) if placement.choose(c.encode(), weights) == "node2"]
    cids = cids[:CLIENTS]
    assert len(cids) == CLIENTS
    via = {c: (ha1, ha2)[i % 2] for i, c in enumerate(cids)}
    fleet = Fleet()
    subs = [fleet.add(c, via[c].port, reconnect=(RECONNECT, RECONNECT)) for c in cids]
    try:
        wait_until(lambda: all(s.connected for s in subs), timeout=30,
                   message=lambda: f"{sum(not s.connected for s in subs)} clients not connected; "
                   f"HAProxy: {_summary(ha1)} {_summary(ha2)}" + "\n".join(ha1.haproxy.log_lines()[:10]
                                                                          + ha1.haproxy.log_lines()[-10:]))
        assert set(stack.owners(cids).values()) == {"node2"}, (_summary(ha1), _summary(ha2))
        wait_until(lambda: [_node2_connections(b) for b in (ha1, ha2)] == [CLIENTS // 2] * 2, timeout=10)

        t0 = time.monotonic()
        cli = subprocess.Popen(
            [agent_command(), "evacuate", "node2", "--rate", str(RATE), "--wait", "--timeout", "60",
             "--config", str(ha1.agent.config_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Watch node2 in both HAProxy's own stats meanwhile: when was it seen holding a client last?
        last_busy = 0.0
        while cli.poll() is None:
            if any(_node2_connections(b) for b in (ha1, ha2)):
                last_busy = time.monotonic() - t0
            time.sleep(0.05)
        out, err = cli.communicate()
        assert cli.returncode == 0, (out, err)
        assert "active: the agents of 2 balancer(s) close its client connections, at most 100/s" in out, out
        assert [_node2_connections(b) for b in (ha1, ha2)] == [0, 0]
        # The issue's bound: about clients/rate (3 s) plus the clients' reconnect delay; margin 3 s
        # for the agents' state refresh and the few clients sent back once by the moves budget.
        assert last_busy < CLIENTS / RATE + RECONNECT + 3, (last_busy, out)

        # Every client came back, moved off node2, and through its balancer to its new owner.
        wait_until(lambda: all(s.connected >= 2 for s in subs), timeout=30,
                   message=lambda: f"{sum(s.connected < 2 for s in subs)} clients did not reconnect")
        owners = stack.owners(cids)
        assert "node2" not in owners.values() and None not in owners.values(), Counter(owners.values())
        # The rate, measured from both HAProxy's logs: at most RATE a second plus the bucket's
        # burst in any one-second window, and all of them at about RATE.
        set_cids = set(cids)
        closes = sorted(_closes(ha1, set_cids) + _closes(ha2, set_cids))
        burst = burst_for(RATE)
        window = max(bisect.bisect_right(closes, t + 1.0) - i for i, t in enumerate(closes))
        span = closes[-1] - closes[0]
        assert len(closes) >= CLIENTS
        assert window <= RATE + burst, (window, span)
        assert len(closes) <= RATE * span + burst, (len(closes), span)
        per_balancer = [len(_closes(b, set_cids)) for b in (ha1, ha2)]
        counted = [_metric(b, "mqtt_affinity_evictions_total", "node2") for b in (ha1, ha2)]
        assert counted == per_balancer, (counted, per_balancer)
        bounced = len(closes) - CLIENTS  # closed again: sent back once by a spent moves budget
        print(f"\nHAProxy {v}: {len(closes)} closes ({per_balancer} per balancer, {bounced} of clients sent back "
              f"once) in {span:.2f}s = {len(closes) / span:.1f}/s, at most {window} in any 1 s (rate {RATE}, "
              f"burst {burst}); node2 last held a client {last_busy:.1f}s after the command; new owners "
              f"{dict(Counter(owners.values()))}\n{out}")
    finally:
        fleet.close()

    # Each client's node2 connection was closed by the runtime API, and it was moved exactly
    # once, to its new owner (HAProxy logs a connection when it ends: the clients are stopped).
    for c in cids:
        lines = wait_until(lambda c=c: (ls := via[c].lines(c)) and not ls[-1]["termination"].startswith("K") and ls,
                           timeout=10, message=lambda c=c: f"{c}: {via[c].lines(c)}")
        assert lines[0]["termination"].startswith("K") and lines[0]["server"] == "node2", lines
        moved = [d for d in lines if d["how"] == "moved"]
        assert len(moved) == 1 and moved[0]["server"] == owners[c], lines

    # Both balancers route each moved client the same way: through the OTHER balancer now.
    for c in cids:
        other = ha2 if via[c] is ha1 else ha1
        seen = len(other.lines(c))
        assert raw_connect(other.port, c.encode(), version=4, clean=False) == 0
        d = other.wait_line(c, seen)
        assert (d["how"], d["node"], d["server"]) == ("hit", owners[c], owners[c]), d
    doc = json.loads(subprocess.run([agent_command(), "nodes", "--json", "--config", str(ha2.agent.config_path)],
                                    capture_output=True, text=True, timeout=30).stdout)
    node2 = next(r for r in doc["nodes"] if r["node"] == "node2")
    assert (node2["state"], node2["connections"], node2["sessions"]) == ("evacuate", 0, 0), node2
