"""Redis dies: both balancers keep routing, and agree; Redis returns: decisions come from it again."""

from __future__ import annotations

import pytest

from devstack import NODES, Stack, raw_connect, wait_until

pytestmark = pytest.mark.haproxy


def test_redis_killed_then_back(stack: Stack, haproxy_version):
    ha1, ha2 = stack.balancers
    stack.redis.kill()
    ids = [f"outage-{haproxy_version}-{i}" for i in range(20)]
    for cid in ids:
        assert raw_connect(ha1.port, cid.encode(), version=4, clean=False) == 0
        assert raw_connect(ha2.port, cid.encode(), version=4, clean=False) == 0
    wait_until(lambda: all(ha1.lines(c) and ha2.lines(c) for c in ids))
    for cid in ids:
        (a,), (b,) = ha1.lines(cid), ha2.lines(cid)
        # Answered by the agents' local hashing, inside the SPOE budget (no error), identically.
        assert a["how"] == b["how"] == "fallback", (a, b)
        assert a["err"] == b["err"] == "-", (a, b)
        assert a["node"] == b["node"] == a["server"] == b["server"] in NODES

    stack.redis.start()  # same port, empty: the agents reconnect on their own

    def from_redis(i: int = 0) -> bool:
        cid = f"back-{haproxy_version}-{i}"
        raw_connect(ha1.port, cid.encode(), version=4, clean=False)
        return stack.owner(cid) is not None

    wait_until(lambda: from_redis(), timeout=20)
    for i in range(1, 6):
        cid = f"back-{haproxy_version}-{i}"
        assert raw_connect(ha1.port, cid.encode(), version=4, clean=False) == 0
        assert raw_connect(ha2.port, cid.encode(), version=4, clean=False) == 0
        wait_until(lambda cid=cid: ha1.lines(cid) and ha2.lines(cid))
        (a,), (b,) = ha1.lines(cid), ha2.lines(cid)
        assert (a["how"], b["how"]) == ("assigned", "hit")
        assert a["node"] == b["node"] == stack.owner(cid)
    # The agents said so once each, not once per decision.
    for bal in stack.balancers:
        text = bal.agent.stderr_text()
        assert text.lower().count("redis") < 40, text[-3000:]
