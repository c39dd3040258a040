"""Decisions per second and latency through the engine, on each Redis topology, in one run.

For each topology a fresh set of real servers is started on free ports: one ``redis-server``;
a Sentinel group (a primary, one replica, three Sentinels); a 3-primary Redis Cluster (three
replicas). The agent's decision core (``agent.core.Core``: engine, store, the pipelined
decision connection(s)) then decides persistent CONNECTs (Clean Session 0), ``--concurrency``
at a time, half of them for never-seen ids (a write: ``assigned``), half for ids placed before
(a read: ``hit``). With ``--wait`` the Sentinel topology also runs with ``redis_wait_replicas:
1`` (every placement waits for the replica before the answer).

    .venv/bin/python bench/redis_topologies.py
    .venv/bin/python bench/redis_topologies.py --decisions 40000 --concurrency 64 --wait

Everything shares this machine's cores (the servers, the replicas, this process). Nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.config import Config, NodeConfig
from agent.core import Core
from agent.request import ConnectRequest
from devstack import RedisClusterGroup, RedisServer, SentinelGroup

NODES = tuple(NodeConfig(f"node{i}", "127.0.0.1", 1883 + i) for i in range(1, 4))
_RUNS = itertools.count()


async def run(url: str, *, decisions: int, concurrency: int, wait_replicas: int = 0) -> dict[str, object]:
    cfg = Config(nodes=NODES, redis_url=url, redis_timeout=2.0, metrics_listen=None,
                 redis_wait_replicas=wait_replicas, redis_wait_timeout=0.5)
    core = Core.build(cfg, lambda: frozenset(n.name for n in NODES))
    await core.start()
    try:
        tag = f"{os.getpid()}-{next(_RUNS)}"
        known = [f"known-{tag}-{i}".encode() for i in range(decisions // 2)]
        for start in range(0, len(known), 256):  # placed beforehand: their decisions are hits
            await asyncio.gather(*(core.engine.decide(ConnectRequest(c, proto_ver=4, flags=0))
                                   for c in known[start:start + 256]))
        fresh = [f"new-{tag}-{i}".encode() for i in range(decisions - len(known))]
        work = [c for pair in zip(known, fresh) for c in pair]
        latencies: list[float] = []
        hows: Counter[str] = Counter()
        queue = iter(work)

        async def worker() -> None:
            for cid in queue:
                t = time.perf_counter()
                d = await core.engine.decide(ConnectRequest(cid, proto_ver=4, flags=0))
                latencies.append(time.perf_counter() - t)
                hows[d.how.value] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        latencies.sort()
        return {
            "per_s": len(work) / elapsed,
            "p50_ms": statistics.median(latencies) * 1e3,
            "p99_ms": latencies[int(0.99 * len(latencies))] * 1e3,
            "hows": dict(hows),
            "wait_short": core.store.wait_short,
        }
    finally:
        await core.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decisions", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--wait", action="store_true", help="also Sentinel with redis_wait_replicas: 1")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="topologies-") as tmp:
        single = RedisServer(workdir=Path(tmp) / "single").start()
        try:
            rows.append(("single Redis", asyncio.run(run(single.url, decisions=args.decisions,
                                                         concurrency=args.concurrency))))
        finally:
            single.kill()
        group = SentinelGroup(Path(tmp) / "sentinel").start()
        try:
            rows.append(("Sentinel (primary + 1 replica)", asyncio.run(run(
                group.url, decisions=args.decisions, concurrency=args.concurrency))))
            if args.wait:
                rows.append(("Sentinel, WAIT 1 replica", asyncio.run(run(
                    group.url, decisions=args.decisions, concurrency=args.concurrency, wait_replicas=1))))
        finally:
            group.stop()
        cluster = RedisClusterGroup(Path(tmp) / "cluster").start()
        try:
            rows.append(("Cluster, 3 primaries", asyncio.run(run(cluster.url, decisions=args.decisions,
                                                                 concurrency=args.concurrency))))
        finally:
            cluster.stop()
    print(f"{args.decisions:,} persistent decisions (half new ids, half placed before), "
          f"{args.concurrency} in flight, through agent.core on this machine")
    print("| topology | decisions/s | p50 ms | p99 ms | how | placements short of replicas |")
    print("|---|---:|---:|---:|---|---:|")
    base = rows[0][1]["per_s"]
    for name, r in rows:
        hows = ", ".join(f"{k} {v}" for k, v in sorted(r["hows"].items()))  # type: ignore[attr-defined]
        print(f"| {name} | {r['per_s']:,.0f} ({r['per_s'] / base:.2f}x) | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
              f"| {hows} | {r['wait_short']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
