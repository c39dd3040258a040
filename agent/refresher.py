"""Background reads of what operators set in Redis: node states, weights, evacuation rates.

The engine decides with the overrides held here (read every ``state_refresh`` seconds, so a
``drain`` applies on every balancer within about a second), and this loop also trims expired
members of the per-node session sets and answers the session counts the metrics show. It
never runs while the breaker is open: the breaker's probe owns recovery and calls
:meth:`Refresher.load` before it closes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from agent.breaker import Breaker
from agent.config import Config
from agent.rules import NodeOverrides

__all__ = ["OverrideStore", "Refresher", "background_timeout"]

log = logging.getLogger("mqtt_affinity.refresh")

DEFAULT_TRIM_INTERVAL = 60.0
# Background calls are not on a CONNECT's path, so they get more patience than a decision;
# a too-tight budget there would trip the breaker under load.
BACKGROUND_TIMEOUT_MIN = 0.5


def background_timeout(config: Config) -> float:
    return max(BACKGROUND_TIMEOUT_MIN, config.redis_timeout * 4)


class OverrideStore(Protocol):
    async def load_node_overrides(self) -> NodeOverrides: ...
    async def trim_placed(self, nodes: Iterable[str], now: float) -> int: ...
    async def placed_counts(self, nodes: Iterable[str], now: float) -> dict[str, int]: ...


class Refresher:
    """Holds the current :class:`NodeOverrides` and keeps them fresh."""

    def __init__(
        self,
        config: Config,
        store: OverrideStore,
        breaker: Breaker,
        *,
        clock: Callable[[], float] = time.time,
        trim_interval: float = DEFAULT_TRIM_INTERVAL,
    ) -> None:
        self._config = config
        self._store = store
        self._breaker = breaker
        self._clock = clock
        self._trim_interval = trim_interval
        self.overrides = NodeOverrides()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def reload(self, config: Config) -> None:
        self._config = config

    def _node_names(self) -> set[str]:
        """Configured nodes and every node an operator named (a removed node's sets still age out)."""
        ov = self.overrides
        return {n.name for n in self._config.nodes} | set(ov.states) | set(ov.weights) | set(ov.rates)

    async def load(self) -> None:
        """Read the overrides now; raises on failure (the breaker's probe uses this)."""
        async with asyncio.timeout(background_timeout(self._config)):
            self.overrides = await self._store.load_node_overrides()

    async def refresh(self) -> bool:
        """Read the overrides now; False if Redis is unavailable or did not answer."""
        if not self._breaker.available:
            return False
        try:
            await self.load()
        except Exception as exc:
            self._breaker.failure(exc, "refresh")
            return False
        self._breaker.success()
        return True

    async def trim(self) -> int:
        """Drop expired members of every ``placed:<node>`` set; how many went."""
        if not self._breaker.available:
            return 0
        try:
            async with asyncio.timeout(background_timeout(self._config)):
                return await self._store.trim_placed(self._node_names(), self._clock())
        except Exception as exc:
            self._breaker.failure(exc, "trim")
            return 0

    async def placed_counts(self) -> dict[str, int] | None:
        """Sessions placed per configured node; None while Redis is unavailable."""
        if not self._breaker.available:
            return None
        try:
            async with asyncio.timeout(background_timeout(self._config)):
                return await self._store.placed_counts([n.name for n in self._config.nodes], self._clock())
        except Exception as exc:
            self._breaker.failure(exc, "placed-counts")
            return None

    async def start(self) -> None:
        """Load once (a dead Redis only opens the breaker), then refresh in the background."""
        self._stopping = False
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="override-refresh")

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=5.0)

    async def _loop(self) -> None:
        next_trim = time.monotonic() + self._trim_interval
        while not self._stopping:
            await asyncio.sleep(self._config.state_refresh)
            if self._stopping or not self._breaker.available:
                continue  # the breaker's probe owns recovery; stay silent
            await self.refresh()
            if self._breaker.available and not self._stopping and time.monotonic() >= next_trim:
                next_trim = time.monotonic() + self._trim_interval
                await self.trim()
