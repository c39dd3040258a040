"""A rolling restart of the brokers (an upgrade), with and without the restart grace.

Three mosquitto brokers keep their sessions on disk (``persistence true``, a folder each), as
VerneMQ, HiveMQ or a mosquitto cluster keep them on the node. 200 persistent QoS 1 subscribers
(paho, clean session 0, reconnecting with 1-2 s backoff) connect through both balancers.
Each broker in turn is stopped (SIGTERM: it saves its sessions) for 5 s and started again; then
one message is published to each of its subscribers, on that broker.

With ``owner_down_grace`` (30 s): while their broker is down, the subscribers' CONNECTs are
refused (``how=wait``; in the first second, before any probe noticed, HAProxy retries the named
broker and gives up, and never redispatches); when it is back they land on it again with session
present = 1 and receive every message.

Then, in the same test, ``owner_down_grace: 0`` (the behaviour before the grace): one broker is
restarted the same way; its subscribers are moved to other brokers at their first reconnect,
start there with session present = 0, and the messages published to their old broker after it
is back stay stranded there.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from devstack import NODES, Stack, wait_until
from devstack.paho_client import Fleet, Subscriber, publish_many

pytestmark = pytest.mark.haproxy

CLIENTS = 200
DOWN_FOR = 5.0  # seconds each broker is stopped


def _restart(stack: Stack, node: str) -> None:
    broker = stack.broker(node)
    broker.stop()  # SIGTERM: mosquitto writes its sessions to its persistence folder
    time.sleep(DOWN_FOR)
    broker.start()


def _publish_to(stack: Stack, node: str, subs: list[Subscriber], tag: str) -> dict[str, bytes]:
    payloads = {s.cid: f"{tag}-{s.cid}".encode() for s in subs}
    publish_many(stack.broker(node).port, [(s.topic or "", payloads[s.cid]) for s in subs])
    return payloads


def test_rolling_restart_keeps_sessions_with_the_grace_and_loses_them_without(redis_server, tmp_workdir,
                                                                               haproxy_version):
    stack = Stack(haproxy_version, workdir=tmp_workdir, redis=redis_server,
                  agent_overrides={"owner_down_grace": 30})
    fleet = Fleet()
    try:
        stack.start_brokers(persistence=True)
        stack.start(balancers=2)
        ha1, ha2 = stack.balancers
        v = haproxy_version
        subs = [fleet.add(f"rr-{v}-{i:03d}", (ha1, ha2)[i % 2].port, f"rr/{v}/{i:03d}") for i in range(CLIENTS)]
        wait_until(lambda: all(s.subscribed.is_set() for s in subs), timeout=30,
                   message=lambda: f"{sum(not s.subscribed.is_set() for s in subs)} subscribers not subscribed")
        home = stack.owners(s.cid for s in subs)
        assert all(s.connected == 1 and s.last and not s.last.session_present for s in subs)
        by_node = {n: [s for s in subs if home[s.cid] == n] for n in NODES}
        assert all(by_node[n] for n in NODES), Counter(home.values())

        # -- rolling restart with the grace ------------------------------------------------------
        for node in NODES:
            theirs = by_node[node]
            before = {s.cid: s.connected for s in theirs}
            others = [s for s in subs if home[s.cid] != node]
            others_before = {s.cid: s.connected for s in others}
            _restart(stack, node)
            wait_until(lambda theirs=theirs, before=before: all(s.connected > before[s.cid] for s in theirs),
                       timeout=30, interval=0.1,
                       message=lambda theirs=theirs, before=before, node=node: f"{node}: "
                       f"{sum(s.connected == before[s.cid] for s in theirs)} subscribers not back")
            lost = [s.cid for s in theirs if not (s.last and s.last.session_present)]
            assert not lost, f"{node}: {len(lost)} of {len(theirs)} came back without their session: {lost[:5]}"
            # Nobody else was disturbed, and nobody left its broker.
            assert all(s.connected == others_before[s.cid] for s in others)
            assert stack.owners(s.cid for s in subs) == home
            payloads = _publish_to(stack, node, theirs, f"after-{node}")
            wait_until(lambda theirs=theirs, p=payloads: all(s.received(p[s.cid]) for s in theirs), timeout=15,
                       message=lambda theirs=theirs, p=payloads, node=node: f"{node}: "
                       f"{sum(not s.received(p[s.cid]) for s in theirs)} messages not delivered")
        # Each broker only ever saw its own clients: none was sent elsewhere while it waited.
        for node in NODES:
            seen = set(stack.broker(node).connected_client_ids())
            assert {s.cid for s in subs if s.cid in seen} == {s.cid for s in by_node[node]}, node
        waits = {b.name: sum(1 for d in b.haproxy.traffic_log() if d["how"] == "wait") for b in (ha1, ha2)}
        assert all(waits.values()), waits  # the refusals really happened, on both balancers

        # -- the same restart without the grace ------------------------------------------------
        for b in (ha1, ha2):
            b.agent.reconfigure(owner_down_grace=0)
        node = NODES[0]
        theirs = by_node[node]
        before = {s.cid: s.connected for s in theirs}
        _restart(stack, node)
        wait_until(lambda: all(s.connected > before[s.cid] for s in theirs), timeout=30, interval=0.1,
                   message=lambda: f"{sum(s.connected == before[s.cid] for s in theirs)} subscribers not back")
        moved = stack.owners(s.cid for s in theirs)
        assert all(m not in (None, node) for m in moved.values()), Counter(moved.values())
        # Every one of them was sent elsewhere at once: a fresh, empty session there.
        assert all(s.last and not s.last.session_present for s in theirs)
        wait_until(lambda: all(s.subscribed.is_set() for s in theirs), timeout=15)
        # Their subscriptions and what is published for them now are stranded on the old broker:
        stranded = _publish_to(stack, node, theirs, "stranded")
        # ... while each of them is alive and subscribed on its new broker (these do arrive).
        markers = {}
        for new in {m for m in moved.values() if m}:
            markers.update(_publish_to(stack, new, [s for s in theirs if moved[s.cid] == new], "marker"))
        wait_until(lambda: all(s.received(markers[s.cid]) for s in theirs), timeout=15)
        assert not [s.cid for s in theirs if s.received(stranded[s.cid])]
        print(f"\nHAProxy {v}: with owner_down_grace 30 s, {CLIENTS}/{CLIENTS} subscribers came back to their "
              f"broker with their session and got every message; refusals (how=wait) {waits}. With 0, "
              f"{len(theirs)}/{len(theirs)} subscribers of {node} moved to {dict(Counter(moved.values()))} with "
              "session present = 0 and 0 of the messages published to their broker after it was back")
    finally:
        fleet.close()
        stack.close()
