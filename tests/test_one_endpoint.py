"""One URL, one database for every client: a pin written by the CLI on ``?db=3`` is what the
next decision (over the pipelined connection) reads."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from agent.config import load_config
from agent.core import Core
from agent.model import How
from agent.request import ConnectRequest
from devstack import records

pytestmark = pytest.mark.integration


def test_db_in_the_query_is_used_by_the_cli_and_by_decisions(redis_server: Any, tmp_path: Path) -> None:
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]  # "brokers" the CLI can probe
    ports = [s.getsockname()[1] for s in listeners]
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"redis_url: redis://127.0.0.1:{redis_server.port}/0?db=3\n"
        "nodes:\n"
        f"  - {{name: n1, address: '127.0.0.1:{ports[0]}'}}\n"
        f"  - {{name: n2, address: '127.0.0.1:{ports[1]}'}}\n"
    )
    cli = Path(sys.executable).parent / "mqtt-affinity"
    for node in ("n1", "n2"):
        out = subprocess.run([str(cli), "pin", f"dev-{node}", node, "--config", str(cfg)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr

    async def decide(cid: bytes) -> Any:
        core = Core.build(load_config(cfg), lambda: frozenset({"n1", "n2"}))
        await core.start()
        try:
            return await core.engine.decide(ConnectRequest(cid, proto_ver=4, flags=0))
        finally:
            await core.stop()

    for node in ("n1", "n2"):
        d = asyncio.run(decide(f"dev-{node}".encode()))
        assert (d.node, d.how) == (node, How.PINNED)
    db3 = redis.Redis(port=redis_server.port, db=3)
    db0 = redis.Redis(port=redis_server.port, db=0)
    assert records.owner(db3, b"dev-n1").node == "n1"  # type: ignore[union-attr]  # decisions wrote on db 3
    assert db0.dbsize() == 0
    for s in listeners:
        s.close()
