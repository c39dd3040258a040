"""The shipped HAProxy configs, on HAProxy 2.6 and 3.2, with real brokers and no agent.

Also the end-to-end proof of the process classes (the devstack package).
"""

from __future__ import annotations

import socket

import pytest

from devstack import (
    HAPROXY_CFG,
    NATIVE_STICK_CFG,
    HAProxy,
    free_port,
    haproxy_env,
    parse_log_line,
)
from devstack.mqtt import connect_packet, read_packet
from devstack.paho_client import connect_once
from tests.support.mini_spoa import MiniSpoa

pytestmark = pytest.mark.haproxy


def _env(brokers, **kw):
    return haproxy_env(mqtt_port=free_port(), broker_addrs=[b.addr for b in brokers], **kw)


@pytest.mark.parametrize("cfg", [HAPROXY_CFG, NATIVE_STICK_CFG], ids=lambda p: p.name)
@pytest.mark.parametrize("agents", [1, 2], ids=["own-agent", "own+peer-agent"])
def test_shipped_config_is_valid(haproxy_version, cfg, agents, tmp_path):
    env = haproxy_env(
        mqtt_port=free_port(), broker_addrs=["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"],
        spoa_addrs=[f"127.0.0.1:{free_port()}" for _ in range(agents)],
    )
    HAProxy(haproxy_version, cfg, env, workdir=tmp_path).check()


@pytest.mark.parametrize("peer", [False, True], ids=["no-peer", "peer"])
def test_the_peer_agent_is_a_backup_only_when_given(haproxy_version, haproxy_factory, brokers, peer):
    own, other = MiniSpoa("node1").start(), MiniSpoa("node3").start()
    try:
        env = _env(brokers, spoa_addrs=[f"127.0.0.1:{own.port}"] + ([f"127.0.0.1:{other.port}"] if peer else []))
        ha = haproxy_factory(HAPROXY_CFG, env)
        assert ha.servers("be_spoa") == (["spoa1", "spoa2"] if peer else ["spoa1"])
        for name in ha.servers("be_spoa"):
            ha.wait_server_status("be_spoa", name, "UP")
        rows = {r["svname"]: r for r in ha.stats() if r["pxname"] == "be_spoa"}
        assert rows["spoa1"]["bck"] == "0"
        if peer:
            assert rows["spoa2"]["bck"] == "1"
        port = int(env["MQTT_BIND"].rsplit(":", 1)[1])
        assert connect_once(port, "own-first").ok
        # The own agent answers while it is UP (the backup is never asked).
        assert ha.wait_log(lambda d: d["cid"] == "own-first")["server"] == "node1"
    finally:
        own.kill()
        other.kill()


@pytest.mark.parametrize("fate", ["drop", "stall"])
def test_a_failed_call_is_asked_again(haproxy_version, haproxy_factory, brokers, tmp_workdir, fate):
    """The first NOTIFY for this id dies with its connection (drop: the agent closes it
    unanswered, err1 >= 256) or is never answered (stall: err1 = 1, `timeout processing`):
    HAProxy asks again and routes on the second answer."""
    kw = {"drop_once" if fate == "drop" else "stall_once": b"asked-twice"}
    spoa = MiniSpoa("node2", workdir=tmp_workdir("mini-spoa"), **kw).start()
    try:
        env = _env(brokers, spoa_port=spoa.port)
        ha = haproxy_factory(HAPROXY_CFG, env)
        ha.wait_server_status("be_mqtt", "node2", "UP")
        ha.wait_server_status("be_spoa", "spoa1", "UP")
        port = int(env["MQTT_BIND"].rsplit(":", 1)[1])
        assert connect_once(port, "asked-twice").ok
        line = ha.wait_log(lambda d: d["cid"] == "asked-twice")
        assert line["err1"] not in (None, "-"), line  # the first call failed ...
        assert int(line["err1"]) >= 256 if fate == "drop" else line["err1"] == "1", line  # ... for this reason
        assert (line["err"], line["err2"], line["how"], line["server"]) == ("-", "-", "mini", "node2"), line
        assert [m["args"]["client_id"][1] for m in spoa.messages()].count(b"asked-twice".hex()) == 2
    finally:
        spoa.kill()


def test_invalid_config_is_reported(haproxy_version, tmp_path):
    bad = tmp_path / "bad.cfg"
    bad.write_text("frontend x\n    bind 127.0.0.1:1\n    no-such-keyword here\n")
    with pytest.raises(Exception) as info:
        HAProxy(haproxy_version, bad, {}, workdir=tmp_path).check()
    assert "no-such-keyword" in str(info.value)


def test_no_agent_hash_fallback_is_sticky(haproxy_version, haproxy_factory, brokers):
    env = _env(brokers, balancer_name="ha-test")
    ha = haproxy_factory(HAPROXY_CFG, env)
    for node in ("node1", "node2", "node3"):
        ha.wait_server_status("be_mqtt", node, "UP")
    # Nothing listens on SPOA_ADDR: the spop health check marks the agent DOWN.
    ha.wait_server_status("be_spoa", "spoa1", "DOWN")

    port = int(env["MQTT_BIND"].rsplit(":", 1)[1])
    cid = f"sticky-{haproxy_version}"
    for n in (1, 2):
        result = connect_once(port, cid, protocol="3.1.1")
        assert result.ok, result
        # HAProxy logs a TCP connection when it closes: wait for this one's line.
        ha.wait_log(lambda d, n=n: len([x for x in ha.traffic_log() if x["cid"] == cid]) >= n)

    lines = [d for d in ha.traffic_log() if d["cid"] == cid]
    assert len(lines) == 2, lines
    chosen = {d["server"] for d in lines}
    assert len(chosen) == 1 and chosen <= {"node1", "node2", "node3"}, lines
    for d in lines:
        assert d["backend"] == "be_mqtt"
        assert d["balancer"] == "ha-test"
        assert d["node"] == "-"  # no agent answer: the hash fallback routed it
        assert d["err"] == "-"  # the nbsrv guard skipped the agent: no SPOE error

    # The broker behind that server name really received both CONNECTs.
    broker = brokers[int(chosen.pop()[-1]) - 1]
    assert broker.connected_client_ids().count(cid) == 2, broker.log_text()


def test_native_stick_baseline_routes(haproxy_version, haproxy_factory, brokers):
    env = _env(brokers)
    ha = haproxy_factory(NATIVE_STICK_CFG, env)
    ha.wait_server_status("be_mqtt", "node1", "UP")
    port = int(env["MQTT_BIND"].rsplit(":", 1)[1])
    for _ in range(2):
        assert connect_once(port, "native-1").ok
    ha.wait_log(lambda d: len([x for x in ha.traffic_log() if x["cid"] == "native-1"]) >= 2)
    servers = {d["server"] for d in ha.traffic_log() if d["cid"] == "native-1"}
    assert len(servers) == 1, ha.log_text()


def test_runtime_api_and_stats(haproxy_version, haproxy_factory, brokers):
    env = _env(brokers)
    ha = haproxy_factory(HAPROXY_CFG, env)
    assert f"Version: {haproxy_version}." in ha.runtime("show info")
    rows = {(r["pxname"], r["svname"]) for r in ha.stats()}
    assert {("fe_mqtt", "FRONTEND"), ("be_mqtt", "node1"), ("be_spoa", "spoa1")} <= rows
    ha.runtime("disable server be_mqtt/node2")
    ha.wait_server_status("be_mqtt", "node2", "MAINT")


def test_parse_log_line():
    line = (
        "bal=ha1 127.0.0.1:40000 [01/Jan/2026:00:00:00.000] fe_mqtt be_mqtt/node2 0/0/12 40 -- "
        "cid=abc node=node2 how=sticky err=- ptime=1"
    )
    d = parse_log_line(line)
    assert d and d["server"] == "node2" and d["cid"] == "abc" and d["how"] == "sticky" and d["ptime"] == "1"
    assert parse_log_line("[WARNING] something else") is None


def test_spoe_answer_routes(haproxy_version, haproxy_factory, brokers, tmp_workdir):
    """With a minimal SPOP peer answering node=node2: the message carries the expected
    arguments and the client lands on node2 (proves spoe-mqtt.conf + `mode spop` on 3.2)."""
    spoa = MiniSpoa("node2", workdir=tmp_workdir("mini-spoa")).start()
    try:
        env = _env(brokers, spoa_port=spoa.port, balancer_name="ha-spoe")
        ha = haproxy_factory(HAPROXY_CFG, env)
        ha.wait_server_status("be_mqtt", "node2", "UP")
        ha.wait_server_status("be_spoa", "spoa1", "UP")
        port = int(env["MQTT_BIND"].rsplit(":", 1)[1])
        for cid in ("spoe-a", "spoe-b", "spoe-c"):
            assert connect_once(port, cid, username="alice").ok
            line = ha.wait_log(lambda d, cid=cid: d["cid"] == cid)
            assert (line["server"], line["node"], line["how"], line["err"]) == ("node2", "node2", "mini", "-"), line
        assert brokers[1].connected_client_ids().count("spoe-a") == 1

        msg = next(m for m in spoa.messages() if m["args"]["client_id"][1] == b"spoe-a".hex())
        args = msg["args"]
        assert msg["message"] == "mqtt-connect"
        assert set(args) == {"client_id", "username", "src", "proto_ver", "flags", "sess_expiry", "balancer"}
        assert args["balancer"] == [8, "ha-spoe"]  # STRING
        assert args["src"] == [6, "127.0.0.1"]  # IPV4
        assert args["username"] == [9, b"alice".hex()]  # BINARY
        assert args["proto_ver"] == [9, b"4".hex()]
        assert args["sess_expiry"][0] == 0  # NULL on 3.1.1
    finally:
        spoa.kill()


# --------------------------------------------------------------------------- issue 11: the grace window


def _attempt(port: int, cid: str) -> str:
    """A persistent CONNECT: "CONNACK", or "closed" when HAProxy closes without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(connect_packet(cid.encode(), version=4, clean=False))
        try:
            return "CONNACK" if read_packet(s)[0] == 2 else "other"
        except (ConnectionError, OSError):
            return "closed"


def _answering(how: str, node: str, brokers, haproxy_factory, tmp_workdir):
    spoa = MiniSpoa(node, how=how, workdir=tmp_workdir(f"mini-spoa-{how}")).start()
    env = _env(brokers, spoa_port=spoa.port)
    ha = haproxy_factory(HAPROXY_CFG, env, label=how)
    for n in ("node1", "node2", "node3"):
        ha.wait_server_status("be_mqtt", n, "UP")
    ha.wait_server_status("be_spoa", "spoa1", "UP")
    return spoa, ha, int(env["MQTT_BIND"].rsplit(":", 1)[1])


def _backend_counters(ha: HAProxy) -> tuple[int, int]:
    row = next(r for r in ha.stats() if r["pxname"] == "be_mqtt" and r["svname"] == "BACKEND")
    return int(row["wretr"] or 0), int(row["wredis"] or 0)


def test_wait_is_refused_before_any_broker(haproxy_version, haproxy_factory, brokers, tmp_workdir):
    """how=wait (owner restarting): HAProxy closes the client's connection without a broker."""
    spoa, ha, port = _answering("wait", "", brokers, haproxy_factory, tmp_workdir)
    try:
        assert _attempt(port, "waiter") == "closed"
        line = ha.wait_log(lambda d: d["cid"] == "waiter")
        assert (line["how"], line["node"], line["server"]) == ("wait", "-", "<NOSRV>"), line
        assert line["termination"].startswith("PR"), line  # rejected by a tcp-request rule
        assert all("waiter" not in b.connected_client_ids() for b in brokers)
    finally:
        spoa.kill()


@pytest.mark.parametrize("moment", ["unnoticed", "noticed"])
def test_an_agent_named_broker_that_refuses_is_never_swapped(haproxy_version, haproxy_factory, brokers,
                                                             tmp_workdir, moment):
    """The agent names node2 for a persistent client (how=hit) just as node2 dies: HAProxy must not
    send the client to another broker (an empty session there), whether its own check has noticed
    the death (node2 DOWN) or not yet (the first second). A clean-session answer and the hash
    fallback still move to a live broker (bench/redispatch.py prints the whole table)."""
    hit, ha_hit, port_hit = _answering("hit", "node2", brokers, haproxy_factory, tmp_workdir)
    clean, ha_clean, port_clean = _answering("none", "node2", brokers, haproxy_factory, tmp_workdir)
    try:
        for ha in (ha_hit, ha_clean):
            if moment == "unnoticed":
                ha.runtime("disable health be_mqtt/node2")  # HAProxy keeps believing node2 is UP
        brokers[1].kill()
        if moment == "noticed":
            for ha in (ha_hit, ha_clean):
                ha.wait_server_status("be_mqtt", "node2", "DOWN")
        before = _backend_counters(ha_hit)
        assert _attempt(port_hit, "persistent-1") == "closed"
        line = ha_hit.wait_log(lambda d: d["cid"] == "persistent-1")
        assert (line["how"], line["server"]) == ("hit", "node2"), line
        assert _backend_counters(ha_hit)[1] == before[1]  # no redispatch
        assert _backend_counters(ha_hit)[0] == before[0] + 2  # retries 2, on node2 each time
        assert not any("persistent-1" in b.connected_client_ids() for b in (brokers[0], brokers[2]))

        assert _attempt(port_clean, "clean-1") == "CONNACK"
        line = ha_clean.wait_log(lambda d: d["cid"] == "clean-1")
        assert line["how"] == "none" and line["server"] in ("node1", "node3"), line
    finally:
        hit.kill()
        clean.kill()
