"""Operations: override placement, drain nodes, watch every decision.

Everything an operator does goes through the real ``mqtt-affinity`` CLI or plain Redis
commands (redis-py, and the real ``redis-cli`` binary once), against the whole product: two
HAProxy balancers, each with its own agent, sharing one Redis. What clients get is read from
both HAProxy traffic logs (``server``/``node``/``how``) and from the Redis record.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence

import pytest

from devstack import NODES, PREFIX, Balancer, Stack, agent_command, raw_connect, records, wait_until

pytestmark = pytest.mark.haproxy

P = PREFIX.encode()
CLI = agent_command()
# Operator changes reach every agent within one state_refresh (0.2 s in the stack): allow 1.5 s.
APPLY_DEADLINE = 1.5


@pytest.fixture
def stack(stack_factory) -> Stack:
    """Two balancers; a broker killed here moves its clients at once (owner_down_grace 0): the
    restart grace has its own tests (test_broker_failure.py, test_rolling_restart.py)."""
    return stack_factory(2, agent_overrides={"owner_down_grace": 0})


# --------------------------------------------------------------------------- helpers


def cli(*args: str, config: os.PathLike | str) -> subprocess.CompletedProcess[str]:
    """Run ``mqtt-affinity ARGS --config FILE`` as an operator would."""
    return subprocess.run([CLI, *args, "--config", str(config)], capture_output=True, text=True, timeout=30)


def cli_ok(*args: str, config: os.PathLike | str) -> str:
    res = cli(*args, config=config)
    assert res.returncode == 0, (args, res.returncode, res.stdout, res.stderr)
    return res.stdout


def show(cid: str, config: os.PathLike | str) -> dict:
    res = cli("show", cid, "--json", config=config)
    assert res.returncode in (0, 1), (res.returncode, res.stderr)
    return json.loads(res.stdout)


def routes(b: Balancer, cids: Sequence[str], *, clean: bool = False) -> dict[str, dict[str, str]]:
    """CONNECT each client through ``b`` (one after the other); the new log line of each."""
    before = Counter(d["cid"] for d in b.haproxy.traffic_log())
    for cid in cids:
        assert raw_connect(b.port, cid.encode(), version=4, clean=clean) == 0, (b.name, cid)
    want = Counter(cids)

    def logged() -> dict[str, dict[str, str]] | None:
        seen: dict[str, list[dict[str, str]]] = {}
        for d in b.haproxy.traffic_log():
            if d["cid"] in want:
                seen.setdefault(d["cid"], []).append(d)
        if all(len(seen.get(c, ())) >= before[c] + want[c] for c in want):
            return {c: lines[-1] for c, lines in seen.items()}
        return None

    return wait_until(logged, timeout=10, message=lambda: f"{b.name}: not every CONNECT of {list(cids)[:5]} logged")


def route(b: Balancer, cid: str, *, clean: bool = False) -> dict[str, str]:
    return routes(b, [cid], clean=clean)[cid]


def scrape(b: Balancer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{b.metrics_port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def metric(b: Balancer, name: str, **labels: str) -> float:
    m = scrape(b)
    if labels:
        return m[(name, tuple(sorted(labels.items())))]
    return sum(v for (n, _), v in m.items() if n == name)


def owners(stack: Stack, cids: Iterable[str]) -> dict[str, str | None]:
    """``stack.owner`` for many clients in one round trip."""
    return stack.owners(cids)


def placed_at(stack: Stack, cid: str) -> int:
    with stack.r as r:
        return records.owner(r, cid).placed_at  # type: ignore[union-attr]


def check_routed(d: dict[str, str], how: str, node: str) -> None:
    assert (d["how"], d["node"], d["server"], d["err"]) == (how, node, node, "-"), d


# --------------------------------------------------------------------------- 1 + 2: pins


def test_pins_from_cli_and_redis_are_followed_by_both_balancers(stack: Stack, haproxy_version):
    ha1, ha2 = stack.balancers
    bals = (ha1, ha2)
    cfg1, cfg2 = ha1.agent.config_path, ha2.agent.config_path
    r = stack.r
    v = haproxy_version

    # -- pin with the CLI: the very next CONNECT follows it, through either balancer ----------
    cid = f"pin-cli-{v}"
    first = route(ha1, cid)
    assert first["how"] == "assigned", first
    target = next(n for n in NODES if n != first["node"])
    out = cli_ok("pin", cid, target, "--reason", "debugging ticket 42", config=cfg1)
    assert target in out
    for b in bals:
        check_routed(route(b, cid), "pinned", target)
    assert stack.owner(cid) == target  # a pinned persistent client's record follows the pin
    doc = show(cid, cfg2)
    assert doc["pin"]["node"] == target and doc["pin"]["reason"] == "debugging ticket 42", doc
    assert doc["next"] == {"action": "pinned", "node": target}, doc

    cli_ok("unpin", cid, config=cfg2)
    doc = show(cid, cfg1)
    assert doc["pin"] is None and doc["owner"]["node"] == target, doc
    assert doc["next"] == {"action": "stick", "node": target}, doc
    assert records.pin(r, cid) is None
    check_routed(route(ha2, cid), "hit", target)
    assert cli("unpin", cid, config=cfg1).returncode == 1  # nothing left to remove

    # -- pin written with plain redis commands (what `redis-cli HSET` does) -------------------
    cid2 = f"pin-redis-{v}"
    was = route(ha2, cid2)["node"]
    target2 = next(n for n in reversed(NODES) if n != was)
    records.write_pin(r, cid2, target2, reason="redis-py")
    wait_until(lambda: route(ha1, cid2)["how"] == "pinned", timeout=1.0,
               message=f"{cid2}: pin written in Redis not followed within 1 s")
    for b in bals:
        check_routed(route(b, cid2), "pinned", target2)

    # -- and once with the real redis-cli binary -------------------------------------------------
    redis_cli = shutil.which("redis-cli")
    assert redis_cli, "redis-cli is not installed"
    cid3 = f"pin-redis-cli-{v}"
    was = route(ha1, cid3)["node"]
    target3 = next(n for n in NODES if n != was)
    pins_key = records.keys(r).client(cid3.encode())[1].decode()  # what `mqtt-affinity show` prints
    res = subprocess.run(
        [redis_cli, "-h", "127.0.0.1", "-p", str(stack.redis.port),
         "HSET", pins_key, cid3, f"{target3}|0|{int(time.time())}|redis-cli"],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip().endswith("1"), (res.stdout, res.stderr)
    wait_until(lambda: route(ha2, cid3)["how"] == "pinned", timeout=1.0,
               message=f"{cid3}: pin written with redis-cli not followed within 1 s")
    for b in bals:
        check_routed(route(b, cid3), "pinned", target3)

    # -- a pin to a node whose broker is down -------------------------------------------------------
    dead = "node3"
    # One client pinned to it (so its record is there) while it is alive ...
    cid4 = f"pin-dead-owner-{v}"
    cli_ok("pin", cid4, dead, "--reason", "before the crash", config=cfg1)
    check_routed(route(ha1, cid4), "pinned", dead)
    assert stack.owner(cid4) == dead

    stack.broker(dead).kill()
    stack.wait_agents_see(dead, up=False)
    ignored0 = [metric(b, "mqtt_affinity_pins_ignored_total", node=dead) for b in bals]

    # ... the CLI refuses a new pin to it ...
    cid5 = f"pin-dead-new-{v}"
    res = cli("pin", cid5, dead, config=cfg2)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "down" in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert records.pin(r, cid5) is None

    # ... and a pin written straight into Redis is ignored by the agents.
    records.write_pin(r, cid5, dead, reason="by hand")
    new5 = route(ha2, cid5)
    assert new5["how"] == "assigned" and new5["node"] != dead and new5["server"] == new5["node"], new5
    check_routed(route(ha1, cid5), "hit", new5["node"])
    assert stack.owner(cid5) == new5["node"]

    # The client whose pinned node died moves (once) and both balancers follow it.
    moved = route(ha2, cid4)
    assert moved["how"] == "moved" and moved["node"] not in (dead, "-") and moved["server"] == moved["node"], moved
    check_routed(route(ha1, cid4), "hit", moved["node"])
    assert stack.owner(cid4) == moved["node"]
    assert "ignored" in show(cid4, cfg1)["why"]

    # Each agent counted the two ignored pins it saw (cid5 and cid4, one CONNECT of each).
    ignored1 = [metric(b, "mqtt_affinity_pins_ignored_total", node=dead) for b in bals]
    assert [b - a for a, b in zip(ignored0, ignored1)] == [2, 2], (ignored0, ignored1)
    # Nobody was ever sent to the dead broker after it died.
    for b in bals:
        assert not [d for d in b.haproxy.traffic_log() if d["cid"] == cid5 and dead in (d["node"], d["server"])]


# --------------------------------------------------------------------------- 3, 4, 5: node states


def test_drain_evacuate_maintenance_and_weight(stack: Stack, haproxy_version):
    ha1, ha2 = stack.balancers
    bals = (ha1, ha2)
    cfg = ha1.agent.config_path
    v = haproxy_version

    # Persistent clients spread over the three nodes, through both balancers.
    clients = [f"ops-{v}-{i:02d}" for i in range(45)]
    for i, c in enumerate(clients):
        assert raw_connect(bals[i % 2].port, c.encode(), version=4, clean=False) == 0
    # Clean-session probes never write a record, so each CONNECT shows the agent's current
    # placement choice for that id: how operator changes reach the agents, without side effects.
    probes = [f"probe-{v}-{i:02d}" for i in range(30)]
    home = {p: d["node"] for p, d in routes(ha1, probes, clean=True).items()}
    assert set(home.values()) == set(NODES), home
    probes_of = {n: [p for p in probes if home[p] == n] for n in NODES}

    def probes_avoid(node: str) -> bool:
        return all(d["node"] != node for b in bals for d in routes(b, probes_of[node], clean=True).values())

    def probes_back(node: str) -> bool:
        return all(d["node"] == node for b in bals for d in routes(b, probes_of[node], clean=True).values())

    def of_node(node: str) -> list[str]:
        return sorted(c for c, o in owners(stack, clients).items() if o == node)

    # -- 3. drain: its clients stay, no new ones; activate restores placement ------------------
    drained = "node1"
    old = of_node(drained)
    assert len(old) >= 3, old
    cli_ok("drain", drained, config=cfg)
    wait_until(lambda: probes_avoid(drained), timeout=APPLY_DEADLINE, message="drain not applied in 1.5 s")
    for b in bals:
        for d in routes(b, old).values():
            check_routed(d, "hit", drained)
    newcomers = [f"ops-new-{v}-{i:02d}" for i in range(20)]
    for i, c in enumerate(newcomers):
        d = route(bals[i % 2], c)
        assert d["how"] == "assigned" and d["node"] != drained and d["server"] == d["node"], d
    clients += newcomers
    cli_ok("activate", drained, config=cfg)
    wait_until(lambda: probes_back(drained), timeout=APPLY_DEADLINE, message="activate not applied in 1.5 s")
    assert of_node(drained) == old  # nobody left the drained node

    # -- 4. evacuate at 2 moves/s across both agents ---------------------------------------------
    rate = 2
    counts = {n: len(of_node(n)) for n in NODES}
    evac = max(counts, key=counts.get)
    victims = of_node(evac)[:10]
    assert len(victims) == 10, counts
    moves0 = sum(metric(b, "mqtt_affinity_moves_total") for b in bals)
    cli_ok("evacuate", evac, "--rate", str(rate), config=cfg)
    assert stack.r.hget(P + b"node-state", evac) == b"evacuate"
    assert stack.r.hget(P + b"evacuate-rate", evac) == str(rate).encode()
    wait_until(lambda: probes_avoid(evac), timeout=APPLY_DEADLINE, message="evacuate not applied in 1.5 s")

    # Ten reconnects back to back, alternating balancers.
    via = {c: bals[i % 2] for i, c in enumerate(victims)}
    seen = {c: len(via[c].lines(c)) for c in victims}
    start = time.time()
    for c in victims:
        assert raw_connect(via[c].port, c.encode(), version=4, clean=False) == 0
    end = time.time()
    burst = {c: wait_until(lambda c=c: len(via[c].lines(c)) > seen[c] and via[c].lines(c)[seen[c]]) for c in victims}
    moved = [c for c in victims if burst[c]["how"] == "moved"]
    stayed = [c for c in victims if burst[c]["how"] == "hit"]
    assert len(moved) + len(stayed) == 10, burst
    for c in stayed:
        check_routed(burst[c], "hit", evac)
        assert stack.owner(c) == evac
    for c in moved:
        d = burst[c]
        assert d["node"] != evac and d["server"] == d["node"] and stack.owner(c) == d["node"], d
    # The budget is per unix second (P evac:<node>:<second>): the decisions of the burst fell
    # in the seconds [start, end], so at most `rate` moves in each of those.
    seconds = int(end) - int(start) + 1
    assert 1 <= len(moved) <= rate * seconds, (len(moved), seconds, burst)
    assert len(stayed) >= 10 - rate * seconds
    # Each move wrote placed_at = the second whose budget it used.
    per_second = Counter(placed_at(stack, c) for c in moved)
    assert max(per_second.values()) <= rate, per_second

    # Later reconnects: eventually every victim has moved, never more than `rate` per second.
    def everyone_moved() -> bool:
        rest = [c for c, o in owners(stack, victims).items() if o == evac]
        for i, c in enumerate(rest):
            assert raw_connect(bals[i % 2].port, c.encode(), version=4, clean=False) == 0
        return evac not in owners(stack, victims).values()

    wait_until(everyone_moved, timeout=20, interval=0.2, message="evacuation never finished")
    new_home = owners(stack, victims)
    assert evac not in new_home.values() and None not in new_home.values(), new_home
    per_second = Counter(placed_at(stack, c) for c in victims)
    assert max(per_second.values()) <= rate, per_second
    # Both balancers agree on every new owner; each victim moved exactly once.
    for b in bals:
        for c, d in routes(b, victims).items():
            check_routed(d, "hit", new_home[c])
    move_lines = [d for b in bals for d in b.haproxy.traffic_log() if d["cid"] in victims and d["how"] == "moved"]
    assert sorted(d["cid"] for d in move_lines) == sorted(victims), move_lines
    assert sum(metric(b, "mqtt_affinity_moves_total") for b in bals) - moves0 == 10
    cli_ok("activate", evac, config=cfg)
    wait_until(lambda: probes_back(evac), timeout=APPLY_DEADLINE, message="activate not applied in 1.5 s")

    # -- 5a. maintenance: treated as down, its clients move on their next CONNECT -----------------
    maint = next(n for n in NODES if n != evac and len(of_node(n)) >= 3)
    theirs = of_node(maint)
    cli_ok("maintenance", maint, config=cfg)
    # Each agent refreshes on its own clock: poll both, one of the node's clients through each.
    pending = {0: theirs[0], 1: theirs[1]}
    rest = theirs[2:]

    def both_moved() -> bool:
        for i, c in list(pending.items()):
            d = route(bals[i], c)
            if d["how"] == "moved":
                assert d["node"] != maint and d["server"] == d["node"], d
                del pending[i]
            else:
                check_routed(d, "hit", maint)
        return not pending

    wait_until(both_moved, timeout=APPLY_DEADLINE,
               message=lambda: f"maintenance of {maint} not applied within {APPLY_DEADLINE}s: {pending}")
    for i, c in enumerate(theirs[:2]):
        moved_to = stack.owner(c)
        assert moved_to not in (None, maint)
        check_routed(route(bals[1 - i], c), "hit", moved_to)
    for c, d in routes(ha2, rest).items():
        assert d["how"] == "moved" and d["node"] != maint and d["server"] == d["node"], d
        assert stack.owner(c) == d["node"]
    for c, d in routes(ha1, rest).items():
        check_routed(d, "hit", stack.owner(c))
    assert probes_avoid(maint)
    res = cli("pin", "someone", maint, config=cfg)
    assert res.returncode == 2 and "maintenance" in res.stderr, (res.returncode, res.stderr)
    cli_ok("activate", maint, config=cfg)
    wait_until(lambda: probes_back(maint), timeout=APPLY_DEADLINE, message="activate not applied in 1.5 s")

    # -- 5b. weight 0: no new placements, existing clients stay ------------------------------------
    light = next(n for n in NODES if of_node(n))
    keep = of_node(light)[0]
    cli_ok("weight", light, "0", config=cfg)
    assert stack.r.hget(P + b"node-weight", light) == b"0"
    wait_until(lambda: probes_avoid(light), timeout=APPLY_DEADLINE,
               message=f"weight 0 on {light} not applied within {APPLY_DEADLINE}s")
    for b in bals:
        check_routed(route(b, keep), "hit", light)
    for i in range(15):
        d = route(bals[i % 2], f"ops-light-{v}-{i:02d}")
        assert d["how"] == "assigned" and d["node"] != light, d
    cli_ok("weight", light, "--reset", config=cfg)
    wait_until(lambda: probes_back(light), timeout=APPLY_DEADLINE, message="weight --reset not applied in 1.5 s")

    # Every decision above was counted, and no client id ever became a label value.
    used = set(clients) | set(probes) | {f"ops-light-{v}-{i:02d}" for i in range(15)}
    for b in bals:
        labels = {value for (_, pairs) in scrape(b) for _, value in pairs}
        assert not labels & used, labels & used


# --------------------------------------------------------------------------- 6: SIGHUP


def test_sighup_reload_keeps_spop_connections_and_survives_a_broken_yaml(stack: Stack, haproxy_version):
    ha1, ha2 = stack.balancers
    agent = ha1.agent
    v = haproxy_version

    def traffic_opened() -> float:
        """SPOP connections HAProxy opened for traffic (health checks open one each)."""
        m = scrape(ha1)
        return m[("mqtt_affinity_spop_connections_opened_total", ())] - m[("mqtt_affinity_spop_healthchecks_total", ())]

    def stable_traffic_opened() -> float:
        # A health check being answered right at the scrape counts as opened but not yet as a
        # check: read until two scrapes in a row agree.
        reads = [traffic_opened()]
        wait_until(lambda: reads.append(traffic_opened()) or reads[-1] == reads[-2], timeout=5)
        return reads[-1]

    def spoa_checks() -> tuple[str, str]:
        row = next(r for r in ha1.haproxy.stats() if r["pxname"] == "be_spoa" and r["svname"] == "spoa1")
        return row["status"], row["chkdown"]

    # Warm up: HAProxy 2.6 opens a second SPOE applet on the second CONNECT, then reuses them.
    for i in range(5):
        d = route(ha1, f"hup-before-{v}-{i}")
        assert d["how"] == "assigned" and d["err"] == "-", d
    wait_until(lambda: scrape(ha1)[("mqtt_affinity_spop_connections", ())] >= 1, timeout=5)
    opened0 = stable_traffic_opened()
    disconnects0 = metric(ha1, "mqtt_affinity_spop_disconnects_total")
    status0, chkdown0 = spoa_checks()
    assert status0 == "UP"
    assert metric(ha1, "mqtt_affinity_node_weight", node="node3") == 1.0
    pid = agent.pid
    # Clean-session probes (no record): each CONNECT shows the agent's placement choice now.
    probes = [f"hup-probe-{v}-{i:02d}" for i in range(15)]
    to_node3 = [p for p, d in routes(ha1, probes, clean=True).items() if d["node"] == "node3"]
    assert to_node3, "no probe id hashes to node3"

    # -- a valid change: node3 gets weight 0 --------------------------------------------------------
    text = agent.config_path.read_text()
    node3_line = next(line for line in text.splitlines() if "name: node3" in line)
    assert "weight: 1}" in node3_line
    agent.config_path.write_text(text.replace(node3_line, node3_line.replace("weight: 1}", "weight: 0}")))
    os.kill(pid, signal.SIGHUP)
    wait_until(lambda: "reloaded" in agent.log_text(), timeout=5, message=lambda: agent.log_text()[-3000:])
    wait_until(lambda: metric(ha1, "mqtt_affinity_node_weight", node="node3") == 0.0, timeout=5,
               message="node3's new weight never showed in /metrics")
    for d in routes(ha1, to_node3, clean=True).values():
        assert d["how"] == "none" and d["err"] == "-" and d["node"] not in ("node3", "-"), d
    for d in routes(ha2, to_node3, clean=True).values():  # the other agent was not reloaded
        check_routed(d, "none", "node3")
    for i in range(5):
        d = route(ha1, f"hup-after-{v}-{i}")
        assert d["how"] == "assigned" and d["err"] == "-" and d["node"] != "node3", d
    assert agent.running and agent.pid == pid
    assert spoa_checks() == (status0, chkdown0), "HAProxy saw the agent go down"
    assert metric(ha1, "mqtt_affinity_spop_disconnects_total") == disconnects0
    assert stable_traffic_opened() == opened0, "the reload cost HAProxy its SPOP connection"
    assert scrape(ha1)[("mqtt_affinity_spop_connections", ())] >= 1

    # -- a broken file: the running config stays, the agent keeps answering ---------------------------
    agent.config_path.write_text("nodes: [\n  {name: node1, address: \n")
    failures = agent.log_text().count("reload failed")
    os.kill(pid, signal.SIGHUP)
    wait_until(lambda: agent.log_text().count("reload failed") > failures, timeout=5,
               message=lambda: agent.log_text()[-3000:])
    assert agent.running and agent.pid == pid
    # Still the reloaded config (node3 at weight 0), still answering every CONNECT.
    for d in routes(ha1, to_node3, clean=True).values():
        assert d["how"] == "none" and d["err"] == "-" and d["node"] not in ("node3", "-"), d
    for i in range(5):
        d = route(ha1, f"hup-broken-{v}-{i}")
        assert d["how"] == "assigned" and d["err"] == "-" and d["node"] != "node3", d
    check_routed(route(ha1, f"hup-broken-{v}-0"), "hit", stack.owner(f"hup-broken-{v}-0"))
    assert metric(ha1, "mqtt_affinity_node_weight", node="node3") == 0.0
    assert spoa_checks() == (status0, chkdown0)
    assert metric(ha1, "mqtt_affinity_spop_disconnects_total") == disconnects0
