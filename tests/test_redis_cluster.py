"""Redis Cluster, real: three primaries and three replicas made with ``redis-cli --cluster
create``; two agents behind two HAProxy (3.2: HAProxy is not what differs here), three brokers.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
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
