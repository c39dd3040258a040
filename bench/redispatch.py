#!/usr/bin/env python3
"""What HAProxy does with a client whose route names a broker that refuses connections.

The question behind ``force-persist`` in haproxy/haproxy.cfg: when the agent names a
persistent client's broker (``how=hit``) and that broker has just died, does HAProxy send
the client to another broker (which would start an empty session there)?

For each HAProxy version and each config (the shipped one, and the one before issue 11 or any
other ``--old`` file), three answers from a minimal SPOP peer (tests/support/mini_spoa.py):

- ``hit node2``: the agent named the persistent client's broker;
- ``none node2``: a clean session the agent placed by hash (no record);
- no answer (``how=none``, no node): HAProxy's own hash fallback, for a client id that
  HAProxy's hash maps to node2;

and two moments of a node2 outage (its mosquitto is SIGKILLed):

- ``unnoticed``: HAProxy still believes node2 is UP (its health check is paused with
  ``disable health`` before the kill: the first second of a real outage);
- ``noticed``: HAProxy's check has marked node2 DOWN (the agent, slower, still answers node2).

Per attempt: where the client got a CONNACK (the brokers' own logs), or that its connection
was closed without one, how long that took, and the backend's retry/redispatch counters
(``show stat`` wretr/wredis). Run from the repository root:

    .venv/bin/python bench/redispatch.py [--haproxy both|2.6|3.2] [--old FILE]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from devstack import HAPROXY_CFG, HAProxy, Mosquitto, free_port, haproxy_env, wait_until  # noqa: E402
from devstack.mqtt import connect_packet, read_packet  # noqa: E402
from tests.support.mini_spoa import MiniSpoa  # noqa: E402

ANSWERS = (("hit", "node2"), ("none", "node2"), ("none", ""))


def attempt(port: int, cid: str, brokers: list[Mosquitto]) -> tuple[str, float]:
    """CONNECT (clean session 0) through HAProxy: (outcome, seconds)."""
    before = {b.label: b.connected_client_ids().count(cid) for b in brokers}
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(connect_packet(cid.encode(), version=4, clean=False))
        try:
            ptype, _ = read_packet(s)
            got = "CONNACK" if ptype == 2 else f"packet {ptype}"
        except (ConnectionError, OSError):
            got = "closed"
    took = time.monotonic() - t0
    if got != "CONNACK":
        return "closed without CONNACK", took
    where = wait_until(lambda: [b.label for b in brokers if b.connected_client_ids().count(cid) > before[b.label]],
                       timeout=5)
    return f"CONNACK from {','.join(where)}", took


def counters(ha: HAProxy) -> tuple[int, int]:
    row = next(r for r in ha.stats() if r["pxname"] == "be_mqtt" and r["svname"] == "BACKEND")
    return int(row["wretr"] or 0), int(row["wredis"] or 0)


def run_one(version: str, cfg: Path, how: str, node: str, work: Path) -> list[list[str]]:
    brokers = [Mosquitto(workdir=work / f"node{i}", label=f"node{i}") for i in (1, 2, 3)]
    for b in brokers:
        b.start()
    spoa = MiniSpoa(node, workdir=work / "spoa", how=how).start()
    port = free_port()
    env = haproxy_env(mqtt_port=port, broker_addrs=[b.addr for b in brokers], spoa_port=spoa.port,
                      extra={"AGENT_CHECK_PORT": str(free_port())})
    ha = HAProxy(version, cfg, env, workdir=work / "haproxy")
    rows = []
    try:
        ha.start()
        for n in ("node1", "node2", "node3"):
            ha.wait_server_status("be_mqtt", n, "UP")
        ha.wait_server_status("be_spoa", "spoa1", "UP")
        # A client id that lands on node2 while everything is up (for the no-answer case: HAProxy's hash).
        cid = None
        for i in range(200):
            c = f"probe-{i}"
            out, _ = attempt(port, c, brokers)
            if out == "CONNACK from node2":
                cid = c
                break
        assert cid is not None, "no client id lands on node2"
        ha.runtime("disable health be_mqtt/node2")
        brokers[1].kill()
        for moment in ("unnoticed", "noticed"):
            if moment == "noticed":
                ha.runtime("enable health be_mqtt/node2")
                ha.wait_server_status("be_mqtt", "node2", "DOWN", timeout=10)
            r0 = counters(ha)
            out, took = attempt(port, cid, brokers)
            r1 = counters(ha)
            answer = f"{how} {node}" if node else "no node (hash)"
            rows.append([version, cfg.name, answer, moment, out, f"{took * 1000:.0f}",
                         str(r1[0] - r0[0]), str(r1[1] - r0[1])])
    finally:
        ha.stop()
        spoa.kill()
        for b in brokers:
            b.kill()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--haproxy", choices=("both", "2.6", "3.2"), default="both")
    ap.add_argument("--old", metavar="FILE", help="config to compare with (default: haproxy.cfg of commit 6b40bf0)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="redispatch-"))
    old = Path(args.old) if args.old else tmp / "haproxy-before-issue-11.cfg"
    if not args.old:
        old.write_text(subprocess.run(["git", "show", "6b40bf0:haproxy/haproxy.cfg"], cwd=ROOT, check=True,
                                      capture_output=True, text=True).stdout)
    versions = ("2.6", "3.2") if args.haproxy == "both" else (args.haproxy,)
    rows = []
    n = 0
    for version in versions:
        for cfg in (old, HAPROXY_CFG):
            for how, node in ANSWERS:
                n += 1
                rows += run_one(version, cfg, how, node, tmp / f"run{n}")
    head = ["haproxy", "config", "agent answer", "node2 outage", "client got", "ms", "retries", "redispatches"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    for line in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
