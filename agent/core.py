"""The decision core wired together: store, breaker, override refresher, engine.

One place builds them, so the agent (``agent.app``) and the tests run the same wiring.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent.affinity import AffinityEngine, DecisionObserver
from agent.breaker import Breaker
from agent.config import Config
from agent.refresher import Refresher, background_timeout
from agent.store import RedisStore
from agent.sweeper import Sweeper

__all__ = ["Core"]


@dataclass
class Core:
    store: RedisStore
    breaker: Breaker
    refresher: Refresher
    engine: AffinityEngine
    sweeper: Sweeper

    @classmethod
    def build(
        cls,
        config: Config,
        healthy: Callable[[], frozenset[str]],
        *,
        down_since: Callable[[], Mapping[str, float]] = dict,
        observer: DecisionObserver | None = None,
        store: RedisStore | None = None,
    ) -> Core:
        store = store or RedisStore.from_config(config)
        breaker = Breaker(store, probe_timeout=background_timeout(config))
        refresher = Refresher(config, store, breaker)
        # Decisions after an outage must use what operators set meanwhile; the local cache
        # is dropped when Redis goes, and comes back only with CLIENT TRACKING.
        breaker.on_recover = refresher.load
        breaker.on_trip = store.cache.clear
        engine = AffinityEngine(
            config, store, breaker, lambda: refresher.overrides, healthy, down_since=down_since, observer=observer
        )
        sweeper = Sweeper(store, breaker, holder=engine.agent_id, interval=lambda: engine.config.sweep_interval)
        return cls(store, breaker, refresher, engine, sweeper)

    async def start(self, *, sweep: bool = True) -> None:
        """Connect and learn who serves (so that a later failover is noticed), load the
        overrides once (a dead Redis only opens the breaker), then keep them fresh.
        ``sweep``: also run the record sweep (worker 0 only, with ``workers`` > 1)."""
        try:
            async with asyncio.timeout(background_timeout(self.engine.config)):
                await self.store.ping()
        except Exception as exc:
            self.breaker.failure(exc, "start")
        await self.refresher.start()
        if self.breaker.available:
            await self.store.keep_tracking()
        if sweep:
            await self.sweeper.start()

    def reload(self, config: Config) -> None:
        self.refresher.reload(config)
        self.engine.reload(config)

    async def stop(self) -> None:
        await self.sweeper.stop()
        await self.refresher.stop()
        await self.breaker.stop()
        await self.store.close()
