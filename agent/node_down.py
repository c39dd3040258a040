"""What the agents' probes see, published for operators: ``P node-down`` (node -> unix time).

Informational only: the decisions use each agent's own health monitor. The CLI reads it to
say since when a node is down and whether its persistent clients are still in their restart
grace (``owner_down_grace``), i.e. whether their next CONNECT is refused (``how=wait``) or
moves them. Written on the health monitor's transitions: HSET on down (the latest agent to
notice wins: the agents notice within about a probe interval of each other), HDEL on up.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis

from agent.logs import warn_limited
from agent.model import Keys

__all__ = ["NodeDownPublisher"]

log = logging.getLogger("mqtt_affinity.health")

WRITE_TIMEOUT = 1.0


class NodeDownPublisher:
    """``on_change(name, up)`` is the health monitor's callback; the write runs in the background."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._tasks: set[asyncio.Task[None]] = set()

    def on_change(self, node: str, up: bool) -> None:
        task = asyncio.get_running_loop().create_task(self._write(node, up, time.time()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, node: str, up: bool, when: float) -> None:
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                if up:
                    await self._redis.hdel(self._keys.node_down, node)
                else:
                    await self._redis.hset(self._keys.node_down, node, f"{when:.3f}")
        except Exception as exc:  # informational: a Redis outage must not matter here
            warn_limited(log, "node-down-publish", "could not publish that %s is %s: %s", node,
                         "up" if up else "down", exc, interval=60.0)

    async def stop(self) -> None:
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=WRITE_TIMEOUT)
