"""An agent that dies or restarts under load costs nothing (issue 8), on HAProxy 2.6 and 3.2.

The shipped deployment shape (devstack's default): two balancers, each asking its own agent
and the other's as backup, one Redis, three brokers. An open-loop load of persistent CONNECTs
(300/s over 600 ids, each id alternating balancers) runs while one agent is SIGKILLed and
restarted, or restarted with SIGTERM; every CONNECT is then joined with its HAProxy log line
and its id's Redis record (devstack.scenario.analyse). A third scenario floods one agent with
connections that never finish their HELLO.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from agent.spop import Status
from agent.spop.frames import FrameType, decode_disconnect_payload, decode_frame, encode_haproxy_hello
from devstack import Stack, wait_until
from devstack.paho_client import connect_once
from devstack.scenario import OpenLoopLoad, Report, analyse, run_scenario

pytestmark = pytest.mark.haproxy

RATE, IDS = 300, 600


@pytest.fixture
def make_stack(tmp_workdir, redis_server, brokers, haproxy_version):
    stacks: list[Stack] = []

    def make(**agent_overrides: object) -> Stack:
        s = Stack(haproxy_version, workdir=tmp_workdir, redis=redis_server, brokers=brokers,
                  agent_overrides=agent_overrides)
        stacks.append(s)
        return s.start(balancers=2)

    yield make
    for s in stacks:
        s.close()


def _zero_cost(report: Report) -> None:
    detail = f"{report.summary()}\nexamples: {report.examples}\n{report.failures}"
    assert report.failures == [], detail
    assert report.logged == report.connects, detail
    assert report.no_connack == 0, detail  # every client got its CONNACK
    assert report.spoe_errors == 0, detail  # every final agent call succeeded
    assert report.waited == 0, detail  # none waited out `timeout processing`
    assert report.no_decision == 0, detail  # every CONNECT was routed by an agent's answer
    assert report.off_record == 0, detail  # ... to the node of its Redis record
    assert report.split_ids == 0, detail  # and no id reached two brokers


def _spoa_log(stack: Stack, balancer: int) -> str:
    return "\n".join(line for line in stack.balancers[balancer].haproxy.log_lines()
                     if "be_spoa/" in line and not line.startswith("bal="))


def _calls_to(stack: Stack, balancer: int, server: str) -> int:
    """Sessions HAProxy opened to an agent server of be_spoa (3.1+: one per call; 2.6: connections)."""
    rows = stack.balancers[balancer].haproxy.stats()
    return next(int(r["stot"]) for r in rows if r["pxname"] == "be_spoa" and r["svname"] == server)


def test_sigkill_and_restart_of_an_agent_under_load(make_stack, haproxy_version):
    stack = make_stack()
    victim = stack.agents["ha1"]
    ports = [b.port for b in stack.balancers]
    load = OpenLoopLoad(ports, [f"kill-{haproxy_version}-{i:03d}" for i in range(IDS)], rate=RATE, duration=9.0)

    def restart() -> None:
        victim.start()
        victim.wait_listening()

    timeline = run_scenario(load, [(2.0, "SIGKILL agent ha1", victim.kill), (6.5, "start agent ha1", restart)])
    report = analyse(load.attempts, [b.haproxy for b in stack.balancers], stack.owners)
    _zero_cost(report)
    # It really happened: ha1 marked its own agent DOWN (at its first refused connection, not
    # by the health check), asked ha2's agent meanwhile, and took its own back once restarted.
    log = _spoa_log(stack, 0)
    assert re.search(r"be_spoa/spoa1 is DOWN, reason: Health analyze", log), (log, timeline)
    wait_until(lambda: stack.balancers[0].haproxy.server_status("be_spoa", "spoa1") == "UP", timeout=10)
    assert _calls_to(stack, 0, "spoa2") > 0, timeline


def test_sigterm_restart_of_an_agent_under_load(make_stack, haproxy_version):
    stack = make_stack(drain_period=None)  # the agent's default drain_period
    victim = stack.agents["ha1"]
    ports = [b.port for b in stack.balancers]
    load = OpenLoopLoad(ports, [f"term-{haproxy_version}-{i:03d}" for i in range(IDS)], rate=RATE, duration=8.5)
    exit_codes = []

    def restart() -> None:  # what `systemctl restart` does: stop, wait for the exit, start
        exit_codes.append(victim.stop(timeout=30))
        victim.start()
        victim.wait_listening()

    timeline = run_scenario(load, [(2.0, "SIGTERM agent ha1 and start it again", restart)])
    report = analyse(load.attempts, [b.haproxy for b in stack.balancers], stack.owners)
    _zero_cost(report)
    assert exit_codes == [0]
    # The drain is what made HAProxy move away: its health check failed with the agent's
    # answer (Layer7), while the agent still served, before the agent disconnected.
    log = _spoa_log(stack, 0)
    assert re.search(r"be_spoa/spoa1 is DOWN, reason: Layer7 invalid response", log), (log, timeline)
    stderr = victim.stderr_text()
    assert stderr.index("draining for 3s") < stderr.index("stopping: finishing in-flight"), stderr
    assert _calls_to(stack, 0, "spoa2") > 0, timeline


async def _half_hello(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float]:
    """A connection that sends half a HELLO and stalls; returns it with when it was opened."""
    hello = encode_haproxy_hello(capabilities="pipelining")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    opened = time.monotonic()
    writer.write(hello[: len(hello) // 2])
    return reader, writer, opened


async def _closing(reader: asyncio.StreamReader) -> tuple[int | None, float]:
    """The status of the AGENT-DISCONNECT read on it (None if closed without one), and when."""
    data = await reader.read()
    closed = time.monotonic()
    status = None
    if len(data) >= 4:
        frame = decode_frame(data)[0]
        if frame.type == FrameType.AGENT_DISCONNECT:
            status = decode_disconnect_payload(frame.payload).status
    return status, closed


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_thousand_half_hellos_are_closed_in_time_and_a_client_is_served_meanwhile(make_stack, haproxy_version):
    hello_timeout = 2.0
    stack = make_stack(hello_timeout=hello_timeout)
    agent = stack.agents["ha1"]
    assert agent.pid is not None
    rss_before = _rss_kib(agent.pid)

    async def scenario() -> tuple[list[tuple[int | None, float]], int]:
        conns = [await _half_hello(agent.spop_port) for _ in range(1000)]
        all_open = time.monotonic()
        rss_open = _rss_kib(agent.pid)
        # Meanwhile a client connects through ha1, whose own agent holds those 1,000.
        cid = f"half-hello-{haproxy_version}"
        result = await asyncio.to_thread(connect_once, stack.balancers[0].port, cid, protocol="3.1.1", clean=False)
        assert result.ok, result
        line = await asyncio.to_thread(stack.balancers[0].wait_line, cid)
        assert (line["how"], line["err"], line["server"]) == ("assigned", "-", stack.owner(cid)), line
        assert time.monotonic() - all_open < hello_timeout, "the client was not served while they were open"
        # (bounded: without the HELLO timeout they would stay open forever)
        closes = await asyncio.wait_for(asyncio.gather(*(_closing(r) for r, _, _ in conns)), hello_timeout + 30)
        for _, w, _ in conns:
            w.close()
        # (status, seconds from its opening to its close) for each
        return [(status, closed - opened) for (status, closed), (_, _, opened) in zip(closes, conns)], rss_open

    closes, rss_open = asyncio.run(scenario())
    assert {status for status, _ in closes} == {Status.TIMEOUT}, closes[:5]
    # Each is closed within the HELLO timeout of its opening: never before, and after it by at
    # most a generous margin (the machine is shared).
    lifetimes = sorted(t for _, t in closes)
    assert lifetimes[0] >= hello_timeout - 0.1 and lifetimes[-1] <= hello_timeout + 2.0, (lifetimes[0], lifetimes[-1])
    per_connection = (rss_open - rss_before) * 1024 / 1000
    assert per_connection < 8 * 1024, f"{per_connection:.0f} bytes of RSS per half-open connection"
    print(f"agent RSS {rss_before} KiB -> {rss_open} KiB with 1,000 half-open connections "
          f"({per_connection:.0f} B each); closed {lifetimes[0]:.2f}-{lifetimes[-1]:.2f} s after opening")
    assert "sent no HELLO within 2s" in agent.stderr_text()
    assert agent.running and stack.exited() == []


def test_second_sigterm_cuts_the_drain_short(tmp_workdir, redis_server, brokers, haproxy_version):
    with Stack(haproxy_version, workdir=tmp_workdir, redis=redis_server, brokers=brokers,
               agent_overrides={"drain_period": 60}) as stack:
        stack.start(balancers=1)
        victim = stack.agents["ha1"]
        victim.send_signal(signal.SIGTERM)
        wait_until(lambda: "draining for 60s" in victim.stderr_text(), timeout=10)
        # Draining: HAProxy's health check of the agent fails, and so does its readiness.
        stack.balancers[0].haproxy.wait_server_status("be_spoa", "spoa1", "DOWN", timeout=10)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{victim.metrics_port}/readyz", timeout=5)
        assert info.value.code == 503 and b"draining" in info.value.read()
        victim.send_signal(signal.SIGTERM)
        # Well before the 60 s drain would have ended (wait_stopped SIGKILLs after its timeout).
        assert victim.wait_stopped(timeout=20) == 0
        assert "drain cut short" in victim.stderr_text()
