"""The agent's event loop (``event_loop``): uvloop by default when installed, asyncio on request;
both serve real decisions through HAProxy (the rest of the suite runs on the default)."""

from __future__ import annotations

import asyncio

import pytest

from agent.app import loop_factory
from devstack import Stack, connect_many, records, wait_until
from devstack.haproxy import parse_log_line

pytestmark = [pytest.mark.integration, pytest.mark.haproxy]


def test_loop_factory_names_what_it_builds() -> None:
    factory, name = loop_factory("auto")
    assert name == "uvloop" and factory is not None  # a test dependency of this project
    loop = factory()
    try:
        assert type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()
    assert loop_factory("asyncio") == (None, "asyncio")


@pytest.mark.parametrize(("choice", "expected"), [("auto", "uvloop"), ("asyncio", "asyncio")])
def test_the_agent_decides_on_either_loop(choice: str, expected: str, tmp_workdir, redis_server, brokers) -> None:
    stack = Stack("3.2", workdir=tmp_workdir, redis=redis_server, brokers=brokers,
                  agent_overrides={"event_loop": choice})
    try:
        stack.start(balancers=1)
        ids = [f"loop-{choice}-{i:02d}".encode() for i in range(50)]
        assert asyncio.run(connect_many(stack.balancers[0].port, ids, version=4, clean=False)) == [0] * 50
        assert asyncio.run(connect_many(stack.balancers[0].port, ids, version=4, clean=False)) == [0] * 50
        agent = next(iter(stack.agents.values()))
        assert f"event loop: {expected}" in agent.stderr_text()
        with stack.r as r:
            owners = records.owners(r, ids)
        assert all(owners[c.decode()] for c in ids), owners  # placed in Redis by this agent
        # HAProxy routed each CONNECT where the agent said: assigned the first time, a hit the second.
        lines = [f for ln in wait_until(lambda: _logged(stack, 100), timeout=10)
                 if (f := parse_log_line(ln)) is not None]
        hows = {(f["cid"], f["how"]) for f in lines}
        assert {h for _, h in hows} == {"assigned", "hit"}, hows
        assert all(f["server"] == owners[f["cid"]] for f in lines), lines
    finally:
        stack.close()


def _logged(stack: Stack, n: int) -> list[str] | None:
    lines = [ln for ln in stack.balancers[0].haproxy.log_lines() if "cid=loop-" in ln]
    return lines if len(lines) >= n else None
