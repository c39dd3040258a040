"""The owner broker dies: the client is re-placed once, and both balancers follow the new owner."""

from __future__ import annotations

import pytest

from devstack import NODES, Stack, raw_connect, wait_until

pytestmark = pytest.mark.haproxy


def test_owner_killed_client_moves_and_balancers_agree(stack: Stack, haproxy_version):
    ha1, ha2 = stack.balancers
    cid = f"failover-{haproxy_version}"
    assert raw_connect(ha1.port, cid.encode(), version=4, clean=False) == 0
    wait_until(lambda: stack.owner(cid))
    old = stack.owner(cid)
    stack.broker(old).kill()
    stack.wait_agents_see(old, up=False)

    # Reconnect through the other balancer: its agent moves the record (compare-and-set).
    assert raw_connect(ha2.port, cid.encode(), version=4, clean=False) == 0
    wait_until(lambda: ha2.lines(cid))
    moved = ha2.lines(cid)[-1]
    new = stack.owner(cid)
    assert new is not None and new != old and new in NODES
    assert (moved["how"], moved["node"], moved["server"]) == ("moved", new, new)

    # The first balancer now follows the new owner too.
    assert raw_connect(ha1.port, cid.encode(), version=4, clean=False) == 0
    wait_until(lambda: len(ha1.lines(cid)) == 2)
    again = ha1.lines(cid)[-1]
    assert (again["how"], again["node"], again["server"]) == ("hit", new, new)
    assert stack.owner(cid) == new

    # New clients are never placed on the dead broker.
    for i in range(30):
        other = f"after-{haproxy_version}-{i}"
        assert raw_connect(ha1.port, other.encode(), version=4, clean=False) == 0
        assert stack.owner(other) not in (None, old)
