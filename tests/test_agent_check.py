"""HAProxy's agent-check, served by the agent: the answer for each node, the TCP exchange, and
(integration) what both HAProxy versions make of it: drain, maintenance and weight set with the
CLI appear in HAProxy's own stats on every balancer, the hash fallback follows them, and a dead
agent changes nothing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import pytest

from agent.agent_check import AgentCheckServer, percent, reply
from agent.config import NodeConfig
from agent.model import NodeState
from agent.rules import NodeOverrides
from devstack import NODES, Balancer, Stack, agent_command, raw_connect, wait_until

CONFIGURED = (NodeConfig("node1", "h", 1, 1.0), NodeConfig("node2", "h", 2, 1.0), NodeConfig("node3", "h", 3, 2.0))


# --------------------------------------------------------------------------- the answer


def test_reply_per_state_and_weight() -> None:
    ov = NodeOverrides()
    # Relative to the heaviest node in force (node3, weight 2): HAProxy's servers all weigh 100.
    assert [reply(n.name, CONFIGURED, ov)[0] for n in CONFIGURED] == ["ready up 50%", "ready up 50%",
                                                                      "ready up 100%"]
    ov = NodeOverrides(states={"node1": NodeState.DRAIN, "node2": NodeState.EVACUATE,
                               "node3": NodeState.MAINTENANCE})
    assert [reply(n.name, CONFIGURED, ov) for n in CONFIGURED] == [
        ("drain 50%", "drain"), ("drain 50%", "evacuate"), ("maint 100%", "maintenance")]
    # A node the config does not have: the agents never send a client there, nor should the hash.
    assert reply("node9", CONFIGURED, ov) == ("drain 0%", "unknown")


def test_percent_follows_overrides_and_keeps_resolution() -> None:
    assert percent("node1", CONFIGURED, NodeOverrides(weights={"node1": 4})) == 100
    assert percent("node3", CONFIGURED, NodeOverrides(weights={"node1": 4})) == 50
    assert percent("node1", CONFIGURED, NodeOverrides(weights={"node1": 0})) == 0
    # A positive weight is never rounded down to 0% (that would be a drain).
    assert percent("node1", CONFIGURED, NodeOverrides(weights={"node1": 0.001})) == 1
    # Every weight 0: the agents place uniformly, so HAProxy gets 100% each.
    zero = NodeOverrides(weights={"node1": 0, "node2": 0, "node3": 0})
    assert {percent(n.name, CONFIGURED, zero) for n in CONFIGURED} == {100}


async def _ask(port: int, data: bytes, *, close_write: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    if close_write:
        writer.write_eof()
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


def test_server_answers_one_line_per_connection() -> None:
    seen: list[str] = []

    class Obs:
        def agent_check(self, state: str) -> None:
            seen.append(state)

    overrides = NodeOverrides(states={"node2": NodeState.DRAIN})

    async def main() -> None:
        server = AgentCheckServer("127.0.0.1", 0, lambda: CONFIGURED, lambda: overrides, observer=Obs())
        await server.start()
        try:
            assert await _ask(server.port, b"node1\n") == b"ready up 50%\n"
            assert await _ask(server.port, b"node2\r\n") == b"drain 50%\n"
            assert await _ask(server.port, b"node3", close_write=True) == b"ready up 100%\n"
            assert await _ask(server.port, b"ghost\n") == b"drain 0%\n"
            assert await _ask(server.port, b"", close_write=True) == b""  # no name: nothing to say
            assert await _ask(server.port, b"x" * 1000 + b"\n") == b""  # not a node name
        finally:
            await server.stop()

    asyncio.run(main())
    assert seen == ["active", "drain", "active", "unknown"]


def test_server_says_nothing_before_the_states_are_read() -> None:
    """Started while Redis is down: an answer from an empty view would undo HAProxy's drains."""
    loaded = False

    async def main() -> list[bytes]:
        server = AgentCheckServer("127.0.0.1", 0, lambda: CONFIGURED, NodeOverrides, ready=lambda: loaded)
        await server.start()
        try:
            return [await _ask(server.port, b"node1\n"), await _set_and_ask(server.port)]
        finally:
            await server.stop()

    async def _set_and_ask(port: int) -> bytes:
        nonlocal loaded
        loaded = True
        return await _ask(port, b"node1\n")

    assert asyncio.run(main()) == [b"", b"ready up 50%\n"]


# --------------------------------------------------------------------------- with HAProxy


def _cli(config: os.PathLike[str], *args: str) -> None:
    res = subprocess.run([agent_command(), *args, "--config", str(config)], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, (args, res.stdout, res.stderr)


def _servers(b: Balancer) -> dict[str, tuple[str, int]]:
    return {r["svname"]: (r["status"], int(r["weight"])) for r in b.haproxy.stats()
            if r["pxname"] == "be_mqtt" and r["svname"] in NODES}


def _shows(b: Balancer, want: dict[str, tuple[str, int | None]]) -> bool:
    now = _servers(b)
    return all(now[n][0] == status and weight in (None, now[n][1]) for n, (status, weight) in want.items())


def _until_both(stack: Stack, want: dict[str, tuple[str, int | None]], started: float) -> float:
    """Poll both balancers' stats until each shows ``want`` (weight None: any); seconds since ``started``."""
    for b in stack.balancers:
        wait_until(lambda b=b: _shows(b, want), timeout=10, interval=0.05,
                   message=lambda b=b: f"{b.name}: {_servers(b)}, want {want}")
    return time.monotonic() - started


@pytest.mark.haproxy
def test_node_states_show_in_haproxy_and_outlive_the_agent(stack: Stack, haproxy_version: str) -> None:
    ha1 = stack.balancers[0]
    cfg = ha1.agent.config_path
    up = {n: ("UP", 100) for n in NODES}
    _until_both(stack, up, time.monotonic())

    # drain set with the CLI: DRAIN in both HAProxy's stats within 3 s (the bound).
    t0 = time.monotonic()
    _cli(cfg, "drain", "node2")
    took_drain = _until_both(stack, {"node2": ("DRAIN (agent)", 100)}, t0)
    assert took_drain < 3.0, took_drain
    # evacuate is a drain for HAProxy too; maintenance takes the server out.
    t0 = time.monotonic()
    _cli(cfg, "maintenance", "node3")
    took_maint = _until_both(stack, {"node3": ("MAINT", 100)}, t0)
    assert took_maint < 3.0, took_maint
    # A weight override: HAProxy's weights follow the agents' proportions (heaviest = 100).
    t0 = time.monotonic()
    _cli(cfg, "weight", "node1", "4")
    # (a server in MAINT keeps showing its old weight: HAProxy applies the new one when it is back)
    took_weight = _until_both(stack, {"node1": ("UP", 100), "node2": ("DRAIN (agent)", 25), "node3": ("MAINT", None)},
                              t0)
    assert took_weight < 3.0, took_weight
    print(f"HAProxy {haproxy_version}: drain {took_drain:.2f}s, maint {took_maint:.2f}s, weight {took_weight:.2f}s")
    _cli(cfg, "activate", "node3")
    _until_both(stack, {"node3": ("UP", 25)}, time.monotonic())

    # Kill ha1's agent: HAProxy keeps what it was told (an unreachable agent is not an error).
    ha1.agent.kill()
    ha1.haproxy.wait_server_status("be_spoa", "spoa1", "DOWN")
    def agent_checks() -> dict[str, str]:
        return {r["svname"]: r["agent_status"] for r in ha1.haproxy.stats()
                if r["pxname"] == "be_mqtt" and r["svname"] in NODES}

    # Every server's agent-check has failed to connect since (L4CON), and the state stays.
    wait_until(lambda: set(agent_checks().values()) == {"L4CON"}, timeout=10,
               message=lambda: f"HAProxy did not find the dead agent: {agent_checks()}")
    assert _servers(ha1) == {"node1": ("UP", 100), "node2": ("DRAIN (agent)", 25), "node3": ("UP", 25)}

    # The agent restarted while Redis is down knows no node state: it says nothing (an answer from
    # an empty view, "ready", would undo the drain), and HAProxy keeps what it has.
    assert stack.redis is not None
    stack.redis.stop()
    ha1.agent.start().wait_listening()
    def last_agent_check(server: str) -> str:
        return next(r["last_agt"] for r in ha1.haproxy.stats() if r["pxname"] == "be_mqtt" and r["svname"] == server)

    # HAProxy reached it (no longer L4CON) and got no line.
    wait_until(lambda: "empty response" in last_agent_check("node2"), timeout=10,
               message=lambda: f"{last_agent_check('node2')!r}\n{ha1.agent.log_text()[-2000:]}")
    assert "node states not read from Redis yet" in ha1.agent.stderr_text()
    assert _servers(ha1)["node2"] == ("DRAIN (agent)", 25)
    ha1.agent.kill()
    stack.redis.start()
    ha1.haproxy.wait_server_status("be_spoa", "spoa1", "DOWN")
    # ha1's backup agent is ha2's (it would answer from a Redis that lost the drain on restart).
    stack.balancers[1].agent.kill()
    ha1.haproxy.wait_server_status("be_spoa", "spoa2", "DOWN")

    # With no agent to ask (the nbsrv guard skips SPOE), HAProxy's hash fallback routes, and it
    # does not pick the drained node2 for new clients ...
    clients = [f"fallback-{haproxy_version}-{i}" for i in range(40)]
    landed = {}
    for c in clients:
        assert raw_connect(ha1.port, c.encode(), version=4, clean=True) == 0
    for c in clients:
        landed[c] = ha1.wait_line(c)["server"]
    assert "node2" not in landed.values(), landed
    # ... whereas once node2 is ready again (set by hand: the agent is dead), some of them go there.
    ha1.haproxy.runtime("set server be_mqtt/node2 state ready")
    ha1.haproxy.runtime("set server be_mqtt/node2 weight 100")
    for c in clients:
        assert raw_connect(ha1.port, c.encode(), version=4, clean=True) == 0
    again = {c: ha1.wait_line(c, seen_before=1)["server"] for c in clients}
    assert "node2" in again.values(), again
