"""The owner broker dies: its persistent clients wait out the restart grace (their CONNECT is
refused, how=wait, on every balancer), then are re-placed once, and both balancers follow the
new owner. Clean sessions never wait."""

from __future__ import annotations

import subprocess
import time

import pytest

from devstack import NODES, Stack, agent_command, raw_connect, wait_until

pytestmark = pytest.mark.haproxy

GRACE = 5.0  # owner_down_grace of the agents here (seconds)


def refused(port: int, cid: str) -> bool:
    """A persistent CONNECT that HAProxy closes without a CONNACK."""
    try:
        raw_connect(port, cid.encode(), version=4, clean=False)
    except (ConnectionError, OSError):
        return True
    return False


def test_owner_killed_clients_wait_then_move_and_balancers_agree(stack_factory, haproxy_version):
    stack: Stack = stack_factory(2, agent_overrides={"owner_down_grace": GRACE})
    ha1, ha2 = stack.balancers
    cid = f"failover-{haproxy_version}"
    assert raw_connect(ha1.port, cid.encode(), version=4, clean=False) == 0
    wait_until(lambda: stack.owner(cid))
    old = stack.owner(cid)
    killed_at = time.monotonic()
    stack.broker(old).kill()
    stack.wait_agents_see(old, up=False)

    # Within the grace: refused on both balancers, record untouched; a clean session still connects.
    for b in (ha1, ha2):
        seen = len(b.lines(cid))
        assert refused(b.port, cid), b.name
        line = b.wait_line(cid, seen)
        assert (line["how"], line["node"], line["server"]) == ("wait", "-", "<NOSRV>"), line
    assert stack.owner(cid) == old
    clean = raw_connect(ha2.port, cid.encode() + b"-clean", version=4, clean=True)
    assert clean == 0
    # Counted by each agent, and `show` says why.
    for b in (ha1, ha2):
        assert 'mqtt_affinity_decisions_total{how="wait"} 1.0' in b.agent.metrics_text(), b.name
    res = subprocess.run([agent_command(), "show", cid, "--config", str(ha1.agent.config_path)],
                         capture_output=True, text=True, timeout=30)
    assert f"{old} is down for less than owner_down_grace: the CONNECT is refused" in res.stdout, res.stdout

    # Reconnecting (as a client's backoff would) through the other balancer: refused until the
    # grace has passed, then its agent moves the record (compare-and-set), once.
    answers: list[dict[str, str]] = []

    def attempt() -> bool:
        seen = len(ha2.lines(cid))
        connected = not refused(ha2.port, cid)
        answers.append(ha2.wait_line(cid, seen))
        return connected

    wait_until(attempt, timeout=GRACE + 10, interval=0.2, message=f"{cid} was never moved")
    assert time.monotonic() - killed_at >= GRACE
    *waited, moved = answers
    assert waited and {d["how"] for d in waited} == {"wait"}, answers
    new = stack.owner(cid)
    assert new is not None and new != old and new in NODES
    assert (moved["how"], moved["node"], moved["server"]) == ("moved", new, new)

    # The first balancer now follows the new owner too.
    seen = len(ha1.lines(cid))
    assert raw_connect(ha1.port, cid.encode(), version=4, clean=False) == 0
    again = ha1.wait_line(cid, seen)
    assert (again["how"], again["node"], again["server"]) == ("hit", new, new)
    assert stack.owner(cid) == new

    # New clients are never placed on the dead broker.
    for i in range(30):
        other = f"after-{haproxy_version}-{i}"
        assert raw_connect(ha1.port, other.encode(), version=4, clean=False) == 0
        assert stack.owner(other) not in (None, old)
