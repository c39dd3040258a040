"""Background reads of what operators set in Redis: node states, weights, evacuation rates.

The engine decides with the overrides held here (read every ``state_refresh`` seconds, so a
``drain`` applies on every balancer within about a second), together with the key layout.
It never runs while the breaker is open: the breaker's probe owns recovery and calls
:meth:`Refresher.load` before it closes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from agent.breaker import Breaker
from agent.config import Config
from agent.rules import NodeOverrides
from agent.store import Layout

__all__ = ["OverrideStore", "Refresher", "background_timeout"]

log = logging.getLogger("mqtt_affinity.refresh")

# Background calls are not on a CONNECT's path, so they get more patience than a decision;
# a too-tight budget there would trip the breaker under load.
BACKGROUND_TIMEOUT_MIN = 0.5


def background_timeout(config: Config) -> float:
    return max(BACKGROUND_TIMEOUT_MIN, config.redis_timeout * 4)


class OverrideStore(Protocol):
    async def load_layout(self) -> Layout: ...
    async def load_node_overrides(self) -> NodeOverrides: ...
    async def session_counts(self) -> tuple[dict[str, int], float | None]: ...
    async def keep_tracking(self) -> None: ...


class Refresher:
    """Holds the current :class:`NodeOverrides` and keeps them fresh."""

    def __init__(
        self,
        config: Config,
        store: OverrideStore,
        breaker: Breaker,
    ) -> None:
        self._config = config
        self._store = store
        self._breaker = breaker
        self.overrides = NodeOverrides()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def reload(self, config: Config) -> None:
        self._config = config

    async def load(self) -> None:
        """Read the overrides now (and keep client-side caching on); raises on failure (the
        breaker's probe uses this)."""
        async with asyncio.timeout(background_timeout(self._config)):
            await self._store.load_layout()
            self.overrides = await self._store.load_node_overrides()
            await self._store.keep_tracking()

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

    async def session_counts(self) -> tuple[dict[str, int], float | None] | None:
        """Sessions per node from the last sweep (and when it ran); None while Redis is unavailable."""
        if not self._breaker.available:
            return None
        try:
            async with asyncio.timeout(background_timeout(self._config)):
                return await self._store.session_counts()
        except Exception as exc:
            self._breaker.failure(exc, "session-counts")
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
        while not self._stopping:
            await asyncio.sleep(self._config.state_refresh)
            if self._stopping or not self._breaker.available:
                continue  # the breaker's probe owns recovery; stay silent
            await self.refresh()
