"""The Redis circuit breaker: when to stop asking Redis, and when to ask again.

Why: a CONNECT cannot wait on a dead Redis. While the breaker is open the engine answers
every decision locally (the same HRW hash on every agent) without trying Redis at all, and a
background probe closes it as soon as Redis answers again.

When it opens: at once on an outage (refused, reset, a connection that stopped answering),
and after ``timeouts_to_trip`` timeouts in a row, since a lone timeout under a burst may only
mean our own queue of decisions (Redis is still answering). Errors Redis answered with (a
bad reply) never open it: Redis is there.

Logging: one warning when Redis goes, one info line when it is back, other errors at most
once per ``warn_every`` seconds: an outage must not become a log storm.

Pure of I/O except through the injected :class:`Probe`; the clock and sleep are injected
too, so ``tests/test_breaker.py`` drives it with a fake store and a fake clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import redis.exceptions

from agent.logs import RateLimiter

__all__ = ["Breaker", "Probe", "describe", "is_outage", "is_timeout"]

log = logging.getLogger("mqtt_affinity.redis")

PROBE_INITIAL = 0.1
#: At most this long between probes during an outage: how late decisions can come back to
#: Redis after it is back (after a failover: after the new primary is known).
PROBE_MAX = 1.0
TIMEOUTS_TO_TRIP = 3
WARN_EVERY = 60.0
STOP_TIMEOUT = 5.0


class Probe(Protocol):
    """What the breaker needs of the store to find out whether Redis is back."""

    async def ping(self) -> None:
        """Raise unless Redis answers (and make the decision path ready again)."""

    async def reset_connections(self) -> None:
        """Forget idle connections: after an outage they are dead sockets."""


def is_timeout(exc: BaseException) -> bool:
    """A timeout alone is ambiguous: a dead Redis, or just our own queue under a burst."""
    return isinstance(exc, (redis.exceptions.TimeoutError, TimeoutError))


def is_outage(exc: BaseException) -> bool:
    """Errors that mean "Redis is not answering", as opposed to a bad reply."""
    return isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError))


def describe(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__name__
    return (f"{name}: {text}" if text else name)[:200]


class Breaker:
    """Open (Redis unavailable) or closed; a background probe closes it again."""

    def __init__(
        self,
        probe: Probe,
        *,
        probe_timeout: float = 1.0,
        on_recover: Callable[[], Awaitable[None]] | None = None,
        timeouts_to_trip: int = TIMEOUTS_TO_TRIP,
        probe_initial: float = PROBE_INITIAL,
        probe_max: float = PROBE_MAX,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        limiter: RateLimiter | None = None,
        warn_every: float = WARN_EVERY,
    ) -> None:
        self._probe = probe
        self.probe_timeout = probe_timeout
        #: Runs after a successful ping and before the breaker closes (e.g. re-read node
        #: states): decisions after recovery must not use what was known before the outage.
        self.on_recover = on_recover
        #: Runs when the breaker opens (e.g. drop the local cache: its coherence is not known).
        self.on_trip: Callable[[], None] | None = None
        self._timeouts_to_trip = timeouts_to_trip
        self._probe_initial = probe_initial
        self._probe_max = probe_max
        self._sleep = sleep
        self._limiter = limiter or RateLimiter(time.monotonic)
        self._warn_every = warn_every
        self._available = True
        self._timeouts_in_row = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        #: Why Redis is unavailable (for /readyz), None while it is available.
        self.reason: str | None = None
        #: Successful probes, trips: for tests and metrics.
        self.trips = 0

    def is_stopping(self) -> bool:
        # A method, not an attribute read: the flag changes across awaits.
        return self._stopping

    @property
    def available(self) -> bool:
        """False while open: callers must not try Redis."""
        return self._available

    def success(self) -> None:
        """A call that Redis answered."""
        self._timeouts_in_row = 0

    def failure(self, exc: BaseException, where: str) -> None:
        """A call that failed; decides whether this opens the breaker."""
        if is_timeout(exc):
            self._timeouts_in_row += 1
            if self._timeouts_in_row >= self._timeouts_to_trip:
                self.trip(exc)
            else:
                self._limiter.log(log, "timeout", "redis %s timed out; answered locally", where,
                                  interval=self._warn_every)
        elif is_outage(exc):
            self.trip(exc)
        else:
            self._limiter.log(log, f"error-{where}", "redis %s failed (Redis answered, so no fallback mode): %s",
                              where, describe(exc), interval=self._warn_every)

    def trip(self, exc: BaseException) -> None:
        if not self._available:
            return
        self._available = False
        self.trips += 1
        self.reason = describe(exc)
        log.warning("redis unavailable (%s): deciding locally until it is back", self.reason)
        if self.on_trip is not None:
            self.on_trip()
        if not self._stopping and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._probe_loop(), name="redis-probe")

    async def _probe_loop(self) -> None:
        try:
            await self._probe.reset_connections()
        except Exception as exc:  # best effort: in-flight ones fail (and disconnect) by themselves
            log.debug("resetting redis connections failed: %s", describe(exc))
        delay = self._probe_initial
        while not self.is_stopping():
            await self._sleep(delay)
            if self.is_stopping():
                return
            try:
                async with asyncio.timeout(self.probe_timeout):
                    await self._probe.ping()
                    if self.on_recover is not None:
                        await self.on_recover()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.reason = describe(exc)
                log.debug("redis probe failed: %s", self.reason)
                delay = min(delay * 2, self._probe_max)
                continue
            if self.is_stopping():
                return
            self._timeouts_in_row = 0
            self._available = True
            self.reason = None
            log.info("redis is back: decisions come from redis again")
            return

    async def stop(self) -> None:
        """Stop the probe.

        Cancellation alone is not trusted: redis-py can lose a cancel that lands while a
        command is in flight (the command completes normally and the task carries on), so
        the loop also checks ``_stopping`` after every await and the wait is bounded.
        """
        self._stopping = True
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        _, pending = await asyncio.wait([task], timeout=STOP_TIMEOUT)
        if pending:
            log.warning("redis probe did not stop within %.1f s", STOP_TIMEOUT)
