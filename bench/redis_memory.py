"""Redis memory per persistent session: the agent's layout against the alternatives, one run.

Each layout gets a fresh, empty redis-server (no persistence). Sessions are written the way
each layout writes them, and the figure is the ``INFO memory`` ``used_memory`` delta divided
by the number of sessions:

- ``v2 (buckets)``: the agent's layout. Every session is placed by the agent's own
  ``decide.lua`` (EVALSHA, persistent client, a 1-day TTL), pipelined.
- ``v1 (hash + placed zset)``: the previous layout, as its script wrote it: ``HSET
  P owner:<cid> node placed_at by`` + ``EXPIRE`` + ``ZADD P placed:<node>``.
- ``plain string``: ``SET P<cid> <node> EX <ttl>``, the smallest one-key-per-session record.

    .venv/bin/python bench/redis_memory.py                  # 100,000 sessions, two id shapes
    .venv/bin/python bench/redis_memory.py --sessions 1000000 --ids sensor

Nothing asserts: the figures go into the README with this command.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import placement
from agent.model import DEFAULT_PREFIX, Keys
from agent.store import load_script, refresh_step
from devstack import RedisServer

NODES = ("node1", "node2", "node3")
TTL = 86400
NOW = int(time.time())
BATCH = 2000
#: Decisions per script call (the agent's decision_batch default).
PER_CALL = 16

IDS: dict[str, Callable[[int], bytes]] = {
    # 20 bytes, the shape of most device ids
    "sensor": lambda i: b"sensor-%06d-site-042" % i,
    # 36 bytes: a UUID, what many client libraries generate
    "uuid": lambda i: str(uuid.UUID(int=i * 2654435761 + 12345)).encode(),
}


def used(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def write_v2(r: redis.Redis, ids: list[bytes]) -> None:
    keys = Keys(DEFAULT_PREFIX)
    r.hset(keys.layout, mapping={"version": 2, "buckets": keys.buckets, "v1": "gone"})
    sha = r.script_load(load_script("decide.lua"))
    nodes = [(n, 1.0) for n in NODES]
    for start in range(0, len(ids), BATCH):
        pipe = r.pipeline(transaction=False)
        chunk = ids[start:start + BATCH]
        for at in range(0, len(chunk), PER_CALL):
            # As the agent sends them (decide.lua's header): up to PER_CALL decisions per call,
            # keys stride 2, the node sets once, then 7 fields per decision.
            calls = chunk[at:at + PER_CALL]
            ks = [k for cid in calls for k in keys.client(cid)]
            argv: list[bytes | str | int] = [len(calls), 2, NOW, len(NODES), *NODES, 0, 0]
            for cid in calls:
                argv += [cid, "p", placement.choose(cid, nodes), TTL, refresh_step(TTL), "ha1", ""]
            pipe.evalsha(sha, len(ks), *ks, *argv)
        replies = pipe.execute()
        if start == 0:  # the script really placed them (a wrong argument layout fails loudly)
            assert replies[0][1] == b"assigned", replies[0]


def write_v1(r: redis.Redis, ids: list[bytes]) -> None:
    p = DEFAULT_PREFIX.encode()
    nodes = [(n, 1.0) for n in NODES]
    for start in range(0, len(ids), BATCH):
        pipe = r.pipeline(transaction=False)
        for cid in ids[start:start + BATCH]:
            node = placement.choose(cid, nodes)
            pipe.hset(p + b"owner:" + cid, mapping={"node": node, "placed_at": NOW, "by": "ha1"})
            pipe.expire(p + b"owner:" + cid, TTL)
            pipe.zadd(p + b"placed:" + node.encode(), {cid: NOW + TTL})  # type: ignore[operator]
        pipe.execute()


def write_string(r: redis.Redis, ids: list[bytes]) -> None:
    p = DEFAULT_PREFIX.encode()
    nodes = [(n, 1.0) for n in NODES]
    for start in range(0, len(ids), BATCH):
        pipe = r.pipeline(transaction=False)
        for cid in ids[start:start + BATCH]:
            pipe.set(p + cid, placement.choose(cid, nodes), ex=TTL)  # type: ignore[arg-type]
        pipe.execute()


LAYOUTS: dict[str, Callable[[redis.Redis, list[bytes]], None]] = {
    "v2 (buckets)": write_v2,
    "v1 (hash + placed zset)": write_v1,
    "plain string": write_string,
}


def measure(layout: str, ids: list[bytes], workdir: Path) -> tuple[float, int, float]:
    server = RedisServer(workdir=workdir)
    server.start()
    try:
        r = redis.Redis(port=server.port)
        before = used(r)
        started = time.perf_counter()
        LAYOUTS[layout](r, ids)
        elapsed = time.perf_counter() - started
        after = used(r)
        keys = int(r.dbsize())
        r.close()
        return (after - before) / len(ids), keys, elapsed
    finally:
        server.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--ids", default="sensor,uuid", help="id shapes: " + ", ".join(IDS))
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated: " + ", ".join(LAYOUTS))
    args = ap.parse_args()
    print(f"{args.sessions:,} persistent sessions, TTL {TTL} s, 3 nodes, one fresh redis-server per row")
    print("| ids | layout | bytes per session | keys | write time |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="redis-memory-") as tmp:
        for shape in args.ids.split(","):
            ids = [IDS[shape](i) for i in range(args.sessions)]
            for n, layout in enumerate(args.layouts.split(",")):
                per, keys, secs = measure(layout, ids, Path(tmp) / f"{shape}-{n}")
                print(f"| {shape} ({len(ids[0])} B) | {layout} | {per:,.1f} | {keys:,} | {secs:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
