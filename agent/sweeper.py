"""The record sweep: expired records out, session counts per node in.

Records expire in their value (a bucket holds many clients, so there is no key TTL to rely
on). One agent at a time (``P sweep-lease``) walks every bucket with ``sweep.lua``: expired
owner records and pins are deleted, live sessions are counted per owner node, and the
totals replace ``P sessions``, which ``mqtt-affinity nodes``/``stats`` and the
``mqtt_affinity_node_sessions`` gauge read. A record past its expiry is never honoured even
before the sweep removes it (the decision script checks the expiry), so the sweep is about
memory and counts, not correctness.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from agent.breaker import Breaker, describe

__all__ = ["SweepStore", "Sweeper"]

log = logging.getLogger("mqtt_affinity.sweep")

#: Buckets per pipeline.
BATCH = 256
#: A lease outlives a silent holder by this long.
LEASE_SECONDS = 60.0


class SweepStore(Protocol):
    @property
    def buckets(self) -> int: ...
    async def take_sweep_lease(self, holder: str, seconds: float) -> bool: ...
    async def prepare_sweep(self) -> None: ...
    async def sweep(self, buckets: Iterable[int], now: float) -> tuple[dict[str, int], int]: ...
    async def publish_sessions(self, counts: Mapping[str, int], pins: int, at: float) -> None: ...


class Sweeper:
    def __init__(
        self,
        store: SweepStore,
        breaker: Breaker | None,
        *,
        holder: str,
        interval: Callable[[], float],
        clock: Callable[[], float] = time.time,
        pause: float = 0.002,
    ) -> None:
        self._store = store
        self._breaker = breaker
        self._holder = holder
        self._interval = interval
        self._clock = clock
        self._pause = pause
        self._task: asyncio.Task[None] | None = None
        self.passes = 0

    async def sweep_once(self, *, lease: bool = True) -> tuple[dict[str, int], int] | None:
        """One full pass (if this agent holds the lease); publishes and returns the totals."""
        if lease and not await self._store.take_sweep_lease(self._holder, LEASE_SECONDS):
            return None
        await self._store.prepare_sweep()
        counts: dict[str, int] = {}
        pins = 0
        total = self._store.buckets
        for start in range(0, total, BATCH):
            if lease and start and not await self._store.take_sweep_lease(self._holder, LEASE_SECONDS):
                return None  # lost the lease (a stall longer than its life): another agent sweeps
            part, p = await self._store.sweep(range(start, min(start + BATCH, total)), self._clock())
            for node, n in part.items():
                counts[node] = counts.get(node, 0) + n
            pins += p
            await asyncio.sleep(self._pause)  # other work first: a sweep is never urgent
        await self._store.publish_sessions(counts, pins, self._clock())
        self.passes += 1
        return counts, pins

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="record-sweep")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=5.0)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval())
            if self._breaker is not None and not self._breaker.available:
                continue
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next pass tries again; the breaker owns outages
                if self._breaker is not None:
                    self._breaker.failure(exc, "sweep")
                else:
                    log.warning("record sweep failed: %s", describe(exc))
