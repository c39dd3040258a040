"""Redis Cluster, real: three primaries and three replicas made with ``redis-cli --cluster
create``; two agents behind two HAProxy (3.2: HAProxy is not what differs here), three brokers.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from redis.crc import key_slot

from devstack import NODES, RedisClusterGroup, Stack, connect_many, records, wait_until
from devstack.agents import agent_command

pytestmark = [pytest.mark.integration, pytest.mark.haproxy]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterGroup]:
    group = RedisClusterGroup(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture(scope="module")
def stack(cluster: RedisClusterGroup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack("3.2", workdir=tmp_path_factory.mktemp("cluster-stack"), redis_url=cluster.url) as s:
        s.start(balancers=2)
        yield s


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    cfg = next(iter(stack.agents.values())).config_path
    return subprocess.run([agent_command(), *args, "--config", str(cfg)], capture_output=True, text=True, timeout=60)


def brokers_of(stack: Stack, ids: set[str]) -> dict[str, set[str]]:
    """Which brokers really accepted each client id (from the brokers' own logs)."""
    out: dict[str, set[str]] = {}
    for node in NODES:
        for cid in stack.broker(node).connected_client_ids():
            if cid in ids:
                out.setdefault(cid, set()).add(node)
    return out


def test_10000_ids_through_both_balancers_agree_and_spread_over_every_primary(
    stack: Stack, cluster: RedisClusterGroup
) -> None:
    ha1, ha2 = stack.balancers
    ids = [f"cl-{i:05d}".encode() for i in range(10_000)]
    assert set(asyncio.run(connect_many(ha1.port, ids, version=4, clean=False))) == {0}
    assert set(asyncio.run(connect_many(ha2.port, ids, version=4, clean=False))) == {0}
    wanted = {c.decode() for c in ids}
    seen = wait_until(lambda: (b := brokers_of(stack, wanted)) and sum(len(s) >= 1 for s in b.values()) == len(ids)
                      and b, timeout=30)
    # Every id reached one broker, whichever balancer it came through ...
    assert [c for c, nodes in seen.items() if len(nodes) != 1] == []
    # ... the one its record names, and the records spread over every node.
    with stack.r as r:
        owners = records.owners(r, ids)
    assert all(owners[c] == next(iter(seen[c])) for c in wanted)
    assert set(Counter(owners.values())) == set(NODES)
    # The buckets, and so the records, live on every primary.
    with stack.r as r:
        keys = records.keys(r)
    slots = {key_slot(keys.client(c)[0]) for c in ids}
    assert len(slots) > 3000
    assert sum(n.client().dbsize() > 0 for n in cluster.primaries()) == 3


def test_every_cli_command_works_on_a_cluster(stack: Stack) -> None:
    ha1, ha2 = stack.balancers
    cid = "cluster-cli-client"
    assert asyncio.run(connect_many(ha1.port, [cid.encode()], version=4, clean=False)) == [0]
    owner = stack.owner(cid)
    target = next(n for n in NODES if n != owner)
    assert cli(stack, "pin", cid, target, "--reason", "on a cluster").returncode == 0
    doc = json.loads(cli(stack, "show", cid, "--json").stdout)
    assert doc["pin"]["node"] == target and doc["next"] == {"action": "pinned", "node": target}
    seen = len(ha2.lines(cid))
    assert asyncio.run(connect_many(ha2.port, [cid.encode()], version=4, clean=False)) == [0]
    assert ha2.wait_line(cid, seen)["server"] == target  # the agents follow a pin the CLI wrote
    assert cli(stack, "unpin", cid).returncode == 0
    for args in (["drain", "node1"], ["evacuate", "node1", "--rate", "5"], ["maintenance", "node1"],
                 ["activate", "node1"], ["weight", "node2", "2"], ["weight", "node2", "--reset"]):
        res = cli(stack, *args)
        assert res.returncode == 0, (args, res.stderr)
    doc = json.loads(cli(stack, "nodes", "--json", "--count").stdout)
    assert sum(n["sessions"] for n in doc["nodes"]) >= 1 and doc["sessions_counted_at"] is not None
    doc = json.loads(cli(stack, "stats", "--json").stdout)
    assert doc["records"] >= 1
    res = cli(stack, "migrate")
    assert res.returncode == 0 and "moved 0 owner records" in res.stdout, res.stdout


def test_moved_is_followed_by_the_decision_connection(cluster: RedisClusterGroup) -> None:
    """A slot map that names the wrong primary (as after a resharding): MOVED is followed, on the
    awaited path and on the hot path's callbacks, and the map is fixed at once."""
    from agent.cluster import ClusterPipe
    from agent.endpoint import RedisEndpoint
    from agent.redis_pipe import encode_command

    async def go() -> None:
        pipe = ClusterPipe(RedisEndpoint.parse(cluster.url))
        try:
            await pipe.connect()
            key = b"moved-test"
            slot = key_slot(key)
            right = pipe._slots[slot]
            wrong = next(a for a in pipe.primaries if a != right)
            pipe._slots[slot] = wrong
            assert await pipe.execute("SET", key, "v1", key=key, timeout=2) == b"OK"
            assert pipe._slots[slot] == right
            pipe._slots[slot] = wrong
            got: asyncio.Future[tuple[object, object]] = asyncio.get_running_loop().create_future()
            pipe.submit(encode_command((b"GET", key)), lambda v, e: got.set_result((v, e)), 2, key=key)
            assert await got == (b"v1", None)
            assert pipe._slots[slot] == right
        finally:
            await pipe.close()

    asyncio.run(go())


def test_a_primary_killed_under_load(cluster: RedisClusterGroup, stack: Stack) -> None:
    """Its replica is promoted; meanwhile decisions fall back (the same hash on both balancers),
    then come from Redis again, the promoted replica's records honoured, pins and drains too.
    The last test of the module: the cluster is left with one primary less."""
    from devstack.scenario import OpenLoopLoad, analyse, run_scenario

    ports = [b.port for b in stack.balancers]
    ids = [f"clk-{i:03d}" for i in range(400)]
    assert set(asyncio.run(connect_many(ports[0], [c.encode() for c in ids], version=4, clean=False))) == {0}
    pinned, drained = ids[0], "node3"
    with stack.r as r:
        before = records.pin_first_and_drain(r, ids, drained, NODES, reason="before the kill")
    time.sleep(1.5)  # replicated, and read by the agents (state_refresh)
    # The primary serving the pinned client's slot, so the kill matters to a record we check.
    with stack.r as r:
        slot = key_slot(records.keys(r).client(pinned.encode())[0])
    victim = next(n for n in cluster.primaries()
                  if any(int(a) <= slot <= int(b) for a, b in _slot_ranges(n)))
    load = OpenLoopLoad(ports, ids, rate=250, duration=12.0)
    kill_at = 2.5
    promoted: list[float] = []

    def kill() -> None:
        victim.kill()
        watch = threading.Thread(target=_watch_promotion, args=(cluster, victim, load, promoted), daemon=True)
        watch.start()

    run_scenario(load, [(kill_at, "SIGKILL a primary", kill)])
    report = analyse(load.attempts, [b.haproxy for b in stack.balancers], stack.owners)
    detail = f"{report.summary()}\n{report.examples}\n{report.failures}"
    assert report.no_connack == 0 and report.spoe_errors == 0, detail
    fallbacks = [a.scheduled for a in load.attempts if report.joined.get(a.index, {}).get("how") == "fallback"]
    assert promoted, "the replica was never promoted"
    # Decisions from Redis again within node timeout + failover (when the cluster served the
    # slots again, as watched from outside) + 2 s.
    bound = promoted[0] + 2.0
    assert fallbacks and max(fallbacks) <= bound, (fallbacks[-5:], promoted, bound, detail)
    print(f"\nprimary killed at {kill_at} s, replica serving at {promoted[0]:.2f} s: {len(fallbacks)} fallback "
          f"decisions from {min(fallbacks):.2f} s to {max(fallbacks):.2f} s (bound {bound:.2f} s); {report.summary()}")
    after = [a for a in load.attempts if a.scheduled > bound and a.index in report.joined]
    assert len(after) > 250 * 3
    servers: dict[str, set[str]] = {}
    for a in after:
        line = report.joined[a.index]
        servers.setdefault(a.cid, set()).add(line["server"])
        assert line["server"] == before[a.cid], (a.cid, line, before[a.cid])
    assert all(len(s) == 1 for s in servers.values())
    fresh = [f"clk-after-{i}".encode() for i in range(60)]
    assert set(asyncio.run(connect_many(ports[1], fresh, version=4, clean=False))) == {0}
    with stack.r as r:
        placed = records.owners(r, fresh)
    assert drained not in placed.values() and None not in placed.values()


def _watch_promotion(cluster: RedisClusterGroup, victim: object, load: object, out: list[float]) -> None:
    """Record when (seconds into the load) another node serves the victim's slots."""
    others = [n for n in cluster.nodes if n is not victim and n.running]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            slots = others[0].client().execute_command("CLUSTER", "SLOTS")
            state = others[0].client().cluster("info")["cluster_state"]
        except Exception:
            time.sleep(0.05)
            continue
        if state == "ok" and all(int(e[2][1]) != victim.port for e in slots):  # type: ignore[attr-defined]
            out.append(load.elapsed())  # type: ignore[attr-defined]
            return
        time.sleep(0.05)


def _slot_ranges(node: object) -> list[tuple[str, str]]:
    """The slot ranges ``node`` serves as a primary (CLUSTER SHARDS/SLOTS as it sees itself)."""
    out = []
    for entry in node.client().execute_command("CLUSTER", "SLOTS"):  # type: ignore[attr-defined]
        if int(entry[2][1]) == node.port:  # type: ignore[attr-defined]
            out.append((entry[0], entry[1]))
    return out
