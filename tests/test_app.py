"""The wired agent in-process: one log line per node transition, state metrics read at scrape time."""

from __future__ import annotations

import asyncio
import logging
import urllib.request

import pytest

from agent.app import App
from agent.config import Config, NodeConfig
from devstack import free_port

pytestmark = pytest.mark.integration


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_one_line_per_node_transition_and_metrics_without_redis(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    metrics_port = free_port()
    dead_broker, dead_redis = free_port(), free_port()
    cfg = Config(
        nodes=(NodeConfig("n1", "127.0.0.1", dead_broker),),
        listen=("127.0.0.1", 0),
        metrics_listen=("127.0.0.1", metrics_port),
        redis_url=f"redis://127.0.0.1:{dead_redis}/0",
        redis_timeout=0.2,
    )

    async def go() -> str:
        app = App(cfg)
        await app.start()
        try:
            return await asyncio.to_thread(scrape, metrics_port)
        finally:
            await app.stop()

    text = asyncio.run(go())
    down = [r for r in caplog.records if "node n1 is down" in r.getMessage()]
    assert len(down) == 1, [r.getMessage() for r in caplog.records]
    assert down[0].name == "mqtt_affinity.health"
    assert all(r.name.startswith("mqtt_affinity") for r in caplog.records if r.name.startswith(("agent", "mqtt")))
    # State read at scrape time: the probe found n1 down, the breaker found Redis down;
    # session counts could not be read, so the series is absent rather than stale.
    assert 'mqtt_affinity_node_up{node="n1"} 0.0' in text
    assert 'mqtt_affinity_node_state{node="n1",state="active"} 1.0' in text
    assert "mqtt_affinity_redis_up 0.0" in text
    assert "mqtt_affinity_node_sessions{" not in text
