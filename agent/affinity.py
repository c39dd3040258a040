"""The affinity engine: which broker a CONNECT goes to, shared through Redis, safe without it.

Why the split between agent and Redis: the agent knows which brokers are healthy (its own
probes) and what the operators want (node states and weights, kept fresh by the
:class:`~agent.refresher.Refresher`), so it computes the eligible node sets and the HRW
candidate locally (:mod:`agent.rules`, pure); Redis holds the per-client record and applies
it atomically (``decide.lua``), so every balancer agrees on where a client's session lives.

When Redis cannot answer (the :class:`~agent.breaker.Breaker` is open, or this one call
failed), the decision is ``fallback``: HRW over the usable nodes, which every balancer
computes identically (``none`` if no node is usable).

The hot path is :meth:`AffinityEngine.decide_cb`: no coroutine, no task. A decision the local
cache can answer (:mod:`agent.cache`: a plain hit, kept honest by Redis) is answered at once;
any other is queued on the store, and the callback runs from the Redis read path.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from agent import placement
from agent.breaker import Breaker, describe
from agent.cache import CacheEntry, OwnerCache
from agent.config import Config
from agent.model import How
from agent.request import ConnectRequest
from agent.rules import (
    Eligibility,
    NodeOverrides,
    NodeView,
    cached_outcome,
    eligibility,
    grace_nodes,
    node_views,
)
from agent.store import Answer, refresh_step

__all__ = ["AffinityEngine", "Decision", "DecisionObserver", "DecisionStore", "FallbackCause"]


class FallbackCause(StrEnum):
    """Why a decision did not come from Redis."""

    #: The breaker is open: Redis is known to be down and was not tried.
    UNAVAILABLE = "unavailable"
    #: This call failed (timeout, error reply, connection lost).
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Decision:
    node: str | None
    how: How
    previous: str | None = None
    pin_ignored: str | None = None
    #: None when Redis decided; otherwise why the agent decided alone.
    cause: FallbackCause | None = None
    #: The error text of a failed call, for the debug log.
    error: str | None = None
    #: Answered from the local cache (what Redis said before, still valid).
    cached: bool = False

    @property
    def source(self) -> str:
        if self.cause is not None:
            return "local"
        return "cache" if self.cached else "redis"


_NO_ID = Decision(None, How.NONE)

Done = Callable[[Decision], None]


class DecisionStore(Protocol):
    """What the engine needs of the store (``agent.store.RedisStore`` is one)."""

    @property
    def cache(self) -> OwnerCache: ...

    def bucket(self, cid: bytes) -> int: ...

    def prepare(self, usable: frozenset[str], evacuating: Mapping[str, int], waiting: frozenset[str]) -> Any:
        """The shared arguments of every decision while these sets hold (opaque to the engine)."""

    def submit(self, cid: bytes, *, persistent: bool, candidate: str | None, ttl: int, now: int, node_args: Any,
               by: str, callback: Callable[[Answer | None, BaseException | None], None],
               timeout: float | None, token: str = "", bucket: int | None = None) -> None: ...

    def queue_refresh(self, cid: bytes, bucket: int, node: str, expiry: int) -> None:
        """Write behind: extend the record's expiry (a hit answered from the cache)."""


class DecisionObserver(Protocol):
    """Metric hook for the engine; must be cheap."""

    def redis_round_trip(self, seconds: float) -> None: ...


class _NoObserver:
    def redis_round_trip(self, seconds: float) -> None:
        pass


class _State:
    """What every decision needs while config, health, overrides and grace stay the same."""

    __slots__ = ("args", "args_clean", "config", "elig", "healthy", "overrides", "until")

    def __init__(self, config: Config, healthy: frozenset[str], overrides: NodeOverrides, elig: Eligibility,
                 args: Any, args_clean: Any, until: float) -> None:
        self.config = config
        self.healthy = healthy
        self.overrides = overrides
        self.elig = elig
        #: Decision arguments for persistent clients (with the nodes in restart grace) ...
        self.args = args
        #: ... and for clean ones (nobody waits).
        self.args_clean = args_clean
        #: When a node leaves its grace (the state must be rebuilt then).
        self.until = until


class AffinityEngine:
    """Decides placements. Owns nothing with a lifetime: the breaker and the refresher do."""

    def __init__(
        self,
        config: Config,
        store: DecisionStore,
        breaker: Breaker,
        overrides: Callable[[], NodeOverrides],
        healthy: Callable[[], frozenset[str]],
        *,
        down_since: Callable[[], Mapping[str, float]] = dict,
        observer: DecisionObserver | None = None,
        clock: Callable[[], float] = time.time,
        agent_id: str | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._breaker = breaker
        self._overrides = overrides
        self._healthy = healthy
        self._down_since = down_since
        self._observer: DecisionObserver = observer or _NoObserver()
        self._clock = clock
        self.agent_id = agent_id or f"{socket.gethostname()}:{os.getpid()}"
        self._state: _State | None = None

    @property
    def config(self) -> Config:
        return self._config

    @property
    def redis_available(self) -> bool:
        return self._breaker.available

    def reload(self, config: Config) -> None:
        """SIGHUP: the new node list and weights apply to the next decision."""
        self._config = config
        self._state = None

    # -- the state of the world ---------------------------------------------------------------

    def _current(self) -> _State:
        """Rebuilt only when config, health, overrides or a grace change (not per CONNECT)."""
        healthy = self._healthy()
        overrides = self._overrides()
        st = self._state
        if (
            st is not None
            and st.config is self._config
            and st.overrides is overrides
            and (st.healthy is healthy or st.healthy == healthy)
            and (st.until == 0 or self._clock() < st.until)
        ):
            return st
        config = self._config
        elig = eligibility(config.nodes, healthy, overrides, config.evacuate_rate)
        waiting, until = frozenset[str](), 0.0
        grace = config.owner_down_grace
        down = self._down_since()
        if grace > 0 and down:
            now = self._clock()
            waiting = grace_nodes(down, overrides, grace, now)
            ends = [since + grace for n, since in down.items() if n in waiting]
            until = min(ends) if ends else 0.0
        store = self._store
        args = store.prepare(elig.usable, elig.evacuating, waiting)
        args_clean = args if not waiting else store.prepare(elig.usable, elig.evacuating, frozenset())
        st = self._state = _State(config, healthy, overrides, elig, args, args_clean, until)
        return st

    def eligibility(self) -> Eligibility:
        """Current node sets."""
        return self._current().elig

    def waiting(self) -> frozenset[str]:
        """Nodes down for less than ``owner_down_grace`` (not in maintenance): their
        persistent clients wait instead of moving (``how=wait``)."""
        grace = self._config.owner_down_grace
        down = self._down_since()
        if grace <= 0 or not down:
            return frozenset()
        return grace_nodes(down, self._overrides(), grace, self._clock())

    def node_views(self) -> list[NodeView]:
        return node_views(self._config.nodes, self._healthy(), self._overrides(), self.eligibility())

    # -- the decision ----------------------------------------------------------------------------

    def decide_cb(self, req: ConnectRequest, done: Done) -> None:
        """Decide ``req`` and call ``done(decision)``: at once (no id, fallback, a cache hit) or
        from the Redis read path. Never raises."""
        cid = req.client_id
        if cid is None:
            # No id, nothing to be sticky about: HAProxy's own balancing applies.
            done(_NO_ID)
            return
        st = self._current()
        elig = st.elig
        breaker = self._breaker
        if not breaker.available:
            done(self._fallback(cid, elig, FallbackCause.UNAVAILABLE, breaker.reason))
            return
        persistent = req.persistent
        config = self._config
        now = int(self._clock())
        ttl = (req.record_ttl(config.session_ttl) or 0) if persistent else 0
        store = self._store
        cache = store.cache
        if cache.enabled:
            entry = cache.get(cid)
            if entry is not None:
                expiry = now + ttl if ttl else 0
                out = cached_outcome(cid, entry.owner, entry.owner_expiry, entry.pin, entry.pin_expiry,
                                     persistent=persistent, expiry=expiry, now=now, elig=elig)
                if out is not None:
                    node, how, previous, pin_ignored = out
                    if (persistent and node == entry.owner and expiry and entry.owner_expiry
                            and expiry - entry.owner_expiry >= refresh_step(ttl)):
                        store.queue_refresh(cid, entry.bucket, node, expiry)
                    done(Decision(node, how, previous, pin_ignored, cached=True))
                    return
        bucket = store.bucket(cid)
        epoch = cache.epoch(bucket)
        started = time.perf_counter()
        observer = self._observer

        def answered(answer: Answer | None, exc: BaseException | None) -> None:
            if exc is not None or answer is None:
                breaker.failure(exc or RuntimeError("no answer"), "decide")
                done(self._fallback(cid, elig, FallbackCause.ERROR, describe(exc or RuntimeError("no answer"))))
                return
            breaker.success()
            observer.redis_round_trip(time.perf_counter() - started)
            if cache.enabled:
                cache.put(cid, CacheEntry(answer.owner, answer.owner_expiry, answer.pin, answer.pin_expiry, bucket),
                          epoch)
            done(Decision(answer.node, answer.how, answer.previous, answer.pin_ignored))

        store.submit(
            cid,
            persistent=persistent,
            candidate=placement.choose(cid, elig.placeable),
            ttl=ttl,
            now=now,
            node_args=st.args if persistent else st.args_clean,
            by=req.balancer or self.agent_id,
            callback=answered,
            timeout=config.redis_timeout,
            bucket=bucket,
        )

    async def decide(self, req: ConnectRequest) -> Decision:
        """The same decision, awaited (tests, tools)."""
        fut: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()

        def done(d: Decision) -> None:
            if not fut.done():
                fut.set_result(d)

        self.decide_cb(req, done)
        return await fut

    @staticmethod
    def _fallback(cid: bytes, elig: Eligibility, cause: FallbackCause, error: str | None) -> Decision:
        node = placement.choose(cid, elig.fallback)
        return Decision(node, How.FALLBACK if node else How.NONE, cause=cause, error=error)
