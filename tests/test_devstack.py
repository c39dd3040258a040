"""The dev stack itself (devstack/): what the tests, the benchmarks and the demo rely on."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from agent.config import load_config
from devstack import (
    Mosquitto,
    ProcessFailed,
    Stack,
    free_port,
    haproxy_env,
    wait_until,
    write_agent_config,
)
from devstack.procs import _ephemeral_range


def test_free_ports_are_below_the_ephemeral_range_and_not_repeated():
    lo, _ = _ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(10000 <= p < max(lo, 12001) for p in ports), ports


def test_haproxy_env_carries_several_agents():
    brokers = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    env = haproxy_env(mqtt_port=5, broker_addrs=brokers, spoa_addrs=["127.0.0.1:7", "127.0.0.1:8", "127.0.0.1:6"])
    assert (env["SPOA_ADDR"], env["SPOA_PEER_ADDR"], env["SPOA_PEER2_ADDR"]) == (
        "127.0.0.1:7", "127.0.0.1:8", "127.0.0.1:6")
    assert haproxy_env(mqtt_port=5, broker_addrs=brokers, spoa_port=9)["SPOA_ADDR"] == "127.0.0.1:9"
    with pytest.raises(ValueError):
        haproxy_env(mqtt_port=5, broker_addrs=brokers, spoa_port=9, spoa_addrs=["127.0.0.1:7"])


def test_agent_config_is_what_the_agent_reads(tmp_path: Path):
    path = write_agent_config(
        tmp_path / "agent.yaml", spop_port=1001, metrics_port=1002, redis_url="redis://127.0.0.1:1003/0",
        nodes=[("node1", "127.0.0.1:1004"), ("node2", "127.0.0.1:1005")],
        overrides={"log_level": "debug", "redis_timeout": 0.5, "health": {"check": "tcp", "interval": 0.7}},
    )
    cfg = load_config(path)
    assert cfg.redis_url == "redis://127.0.0.1:1003/0"
    assert [(n.name, n.port, n.weight) for n in cfg.nodes] == [("node1", 1004, 1), ("node2", 1005, 1)]
    assert cfg.redis_timeout == 0.5 and cfg.health.interval == 0.7
    assert "  - {name: node2, address: \"127.0.0.1:1005\", weight: 1}" in path.read_text()


def test_stack_stops_what_it_started_and_only_that(haproxy_version, tmp_workdir, redis_server, tmp_path):
    bad = tmp_path / "bad.cfg"
    bad.write_text("frontend x\n    bind 127.0.0.1:1\n    no-such-keyword here\n")
    with pytest.raises(ProcessFailed, match="no-such-keyword"):
        with Stack(haproxy_version, workdir=tmp_workdir, redis=redis_server) as stack:
            stack.start_brokers()
            agent = stack.start_agent("ha1")
            assert agent.running and stack.redis_url == redis_server.url
            stack.start_balancer("ha1", cfg_path=bad)
    assert [p.name for p in stack.processes] == [
        "mosquitto-node1", "mosquitto-node2", "mosquitto-node3", "agent-ha1",
    ]  # fmt: skip
    assert not any(p.running for p in stack.processes)
    assert stack.balancers == []
    assert redis_server.running  # passed in: its owner stops it


@pytest.mark.integration
@pytest.mark.parametrize("persistence", [False, True])
def test_mosquitto_persistence_keeps_sessions_across_a_restart(tmp_workdir, persistence):
    from devstack.paho_client import SessionClient, publish_direct

    broker = Mosquitto(workdir=tmp_workdir("broker"), label="persist", persistence=persistence).start()
    try:
        sub = SessionClient("keeper", "3.1.1").connect(broker.port)
        sub.subscribe("t/keeper")
        sub.disconnect()
        publish_direct(broker.port, "t/keeper", [b"queued"])
        broker.stop()  # SIGTERM: a persistent broker saves its sessions
        assert broker.persistence_file.exists() == persistence
        if persistence:
            assert os.stat(broker.persistence_file).st_size > 0
        broker.start()
        back = SessionClient("keeper", "3.1.1").connect(broker.port)
        try:
            got = back.wait_messages(1, timeout=5 if persistence else 0.5)
        finally:
            back.disconnect()
        assert back.session_present is persistence
        assert [p for _, p in got] == ([b"queued"] if persistence else [])
    finally:
        broker.kill()


def test_fleet_clients_work_above_file_descriptor_1023(tmp_workdir):
    """paho's own loop uses select(), which cannot watch a descriptor above 1023: a test process
    with a few hundred clients gets there. The Fleet drives them over epoll instead."""
    from devstack.paho_client import Fleet, publish_many

    broker = Mosquitto(workdir=tmp_workdir("broker"), label="fleet").start()
    gc.collect()  # sockets other tests left to the collector would free low descriptors later
    filler = [os.pipe()]
    while filler[-1][1] < 1030:  # every descriptor up to 1030 taken: the clients' sockets come after
        filler.append(os.pipe())
    try:
        with Fleet() as fleet:
            subs = [fleet.add(f"fleet-{i}", broker.port, f"fleet/{i}") for i in range(5)]
            wait_until(lambda: all(s.subscribed.is_set() for s in subs), timeout=10)
            assert max(s.client.socket().fileno() for s in subs) > 1023
            publish_many(broker.port, [(f"fleet/{i}", b"hello") for i in range(5)])
            wait_until(lambda: all(s.received(b"hello") for s in subs), timeout=10)
            assert all(s.connected == 1 and not s.last.session_present for s in subs)
    finally:
        for r, w in filler:
            os.close(r)
            os.close(w)
        broker.kill()
