"""The breaker and the engine with a fake store and a fake clock: no processes, no real time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping

import pytest
import redis.exceptions

from agent.affinity import AffinityEngine, FallbackCause
from agent.breaker import PROBE_INITIAL, PROBE_MAX, Breaker
from agent.cache import OwnerCache
from agent.config import Config, NodeConfig
from agent.logs import RateLimiter
from agent.model import How
from agent.request import ConnectRequest
from agent.rules import NodeOverrides
from agent.store import Answer

LOGGER = "mqtt_affinity.redis"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class FakeStore:
    """Plays Redis: ``error`` (an exception instance) makes every call fail with it."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.decides = 0
        self.pings = 0
        self.resets = 0
        self.cache = OwnerCache(1, 0)  # no client-side cache

    def bucket(self, cid: bytes) -> int:
        return 0

    def prepare(self, usable: Iterable[str], evacuating: Mapping[str, int], waiting: Iterable[str]) -> object:
        return (frozenset(usable), dict(evacuating), frozenset(waiting))

    def queue_refresh(self, cid: bytes, bucket: int, node: str, expiry: int) -> None:
        raise AssertionError("no cache, no refresh")

    def submit(self, cid: bytes, *, persistent: bool, candidate: str | None, ttl: int, now: int, node_args: object,
               by: str, callback: Callable[[Answer | None, BaseException | None], None],
               timeout: float | None, token: str = "", bucket: int | None = None) -> None:
        self.decides += 1
        error = self.error
        answer = Answer(candidate, How.ASSIGNED, None, None, candidate or "", 0, "", 0)
        # As Redis would: the answer comes back from the read path, later.
        asyncio.get_running_loop().call_soon(callback, None if error else answer, error)

    async def ping(self) -> None:
        self.pings += 1
        if self.error is not None:
            raise self.error

    async def reset_connections(self) -> None:
        self.resets += 1


def engine_with(store: FakeStore, clock: FakeClock) -> tuple[AffinityEngine, Breaker]:
    breaker = Breaker(store, sleep=clock.sleep, limiter=RateLimiter(clock))
    config = Config(nodes=(NodeConfig("n1", "h", 1), NodeConfig("n2", "h", 2)), redis_timeout=0.1)
    engine = AffinityEngine(config, store, breaker, NodeOverrides, lambda: frozenset({"n1", "n2"}), clock=clock)
    return engine, breaker


def persistent(cid: bytes) -> ConnectRequest:
    return ConnectRequest(cid, proto_ver=4, flags=0)


async def settle(breaker: Breaker, clock: FakeClock, rounds: int = 50) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def test_refused_opens_at_once_and_the_probe_closes_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    store, clock = FakeStore(), FakeClock()

    async def go() -> None:
        engine, breaker = engine_with(store, clock)
        assert (await engine.decide(persistent(b"a"))).how is How.ASSIGNED
        store.error = redis.exceptions.ConnectionError("Connection refused")
        d = await engine.decide(persistent(b"a"))
        assert d.how is How.FALLBACK and d.cause is FallbackCause.ERROR and d.node in ("n1", "n2")
        assert not breaker.available and breaker.reason == "ConnectionError: Connection refused"
        # While open, Redis is not tried at all.
        calls = store.decides
        for _ in range(100):
            d = await engine.decide(persistent(b"b"))
            assert d.cause is FallbackCause.UNAVAILABLE
        assert store.decides == calls
        await settle(breaker, clock)
        assert store.resets == 1 and store.pings >= 3
        # The probe backs off: 0.1 s doubling, capped at 1 s (a failover is noticed within a second).
        assert PROBE_INITIAL == 0.1 and PROBE_MAX == 1.0
        assert clock.sleeps[:6] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0] and max(clock.sleeps) == 1.0
        store.error = None
        await settle(breaker, clock)
        assert breaker.available and breaker.reason is None
        assert (await engine.decide(persistent(b"c"))).how is How.ASSIGNED
        await breaker.stop()

    asyncio.run(go())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(warnings) == 1 and "redis unavailable" in warnings[0].getMessage()
    assert len(infos) == 1 and "redis is back" in infos[0].getMessage()


def test_timeouts_open_it_only_in_a_row() -> None:
    store, clock = FakeStore(), FakeClock()

    async def go() -> None:
        engine, breaker = engine_with(store, clock)
        for _ in range(5):  # a lone timeout, then a success: never opens
            store.error = TimeoutError()
            assert (await engine.decide(persistent(b"x"))).cause is FallbackCause.ERROR
            assert breaker.available
            store.error = None
            assert (await engine.decide(persistent(b"x"))).how is How.ASSIGNED
        store.error = TimeoutError()
        await engine.decide(persistent(b"x"))
        await engine.decide(persistent(b"x"))
        assert breaker.available
        await engine.decide(persistent(b"x"))  # the third in a row
        assert not breaker.available
        await breaker.stop()

    asyncio.run(go())


def test_an_error_reply_never_opens_it() -> None:
    store, clock = FakeStore(), FakeClock()

    async def go() -> None:
        engine, breaker = engine_with(store, clock)
        store.error = redis.exceptions.ResponseError("WRONGTYPE")
        for _ in range(10):
            d = await engine.decide(persistent(b"x"))
            assert d.how is How.FALLBACK and d.cause is FallbackCause.ERROR
        assert breaker.available and breaker.trips == 0

    asyncio.run(go())


def test_no_log_storm(caplog: pytest.LogCaptureFixture) -> None:
    """Thousands of failures give a handful of lines: one per condition, then one a minute."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    store, clock = FakeStore(), FakeClock()

    async def go() -> None:
        engine, breaker = engine_with(store, clock)
        for _ in range(1000):
            store.error = TimeoutError()
            await engine.decide(persistent(b"x"))
            store.error = None
            await engine.decide(persistent(b"x"))  # resets the run: never trips
            store.error = redis.exceptions.ResponseError("bad")
            await engine.decide(persistent(b"x"))
        clock.now += 61
        store.error = TimeoutError()
        await engine.decide(persistent(b"x"))
        await breaker.stop()

    asyncio.run(go())
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 3, lines
    assert "similar suppressed" in lines[-1]


def test_recovery_reads_overrides_before_closing() -> None:
    store, clock = FakeStore(), FakeClock()
    order: list[str] = []

    async def go() -> None:
        engine, breaker = engine_with(store, clock)

        async def recover() -> None:
            order.append("refresh")
            assert not breaker.available  # still open while the overrides load

        breaker.on_recover = recover
        store.error = ConnectionRefusedError()
        await engine.decide(persistent(b"x"))
        store.error = None
        await settle(breaker, clock)
        assert order == ["refresh"] and breaker.available
        await breaker.stop()

    asyncio.run(go())
