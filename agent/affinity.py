"""The affinity engine: which broker a CONNECT goes to, shared through Redis, safe without it.

Why the split between agent and Redis: the agent knows which brokers are healthy (its own
probes) and what the operators want (node states and weights, kept fresh by the
:class:`~agent.refresher.Refresher`), so it computes the eligible node sets and the HRW
candidate locally (:mod:`agent.rules`, pure); Redis holds the per-client record and applies
it atomically (``decide.lua``), so every balancer agrees on where a client's session lives.

When Redis cannot answer (the :class:`~agent.breaker.Breaker` is open, or this one call
failed), the decision is ``fallback``: HRW over the usable nodes, which every balancer
computes identically (``none`` if no node is usable).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from agent import placement
from agent.breaker import Breaker, describe
from agent.config import Config
from agent.model import How
from agent.request import ConnectRequest
from agent.rules import Eligibility, NodeOverrides, NodeView, eligibility, grace_nodes, node_views

__all__ = ["AffinityEngine", "Decision", "DecisionObserver", "DecisionStore", "FallbackCause", "StoreAnswer"]


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

    @property
    def source(self) -> str:
        return "redis" if self.cause is None else "local"


class StoreAnswer(Protocol):
    @property
    def node(self) -> str | None: ...
    @property
    def how(self) -> How: ...
    @property
    def previous(self) -> str | None: ...
    @property
    def pin_ignored(self) -> str | None: ...


class DecisionStore(Protocol):
    """The one call the engine makes per CONNECT (``agent.store.RedisStore`` is one)."""

    async def decide(
        self,
        cid: bytes,
        *,
        persistent: bool,
        candidate: str | None,
        ttl: int | None,
        now: int,
        usable: Iterable[str],
        evacuating: Mapping[str, int] | None = None,
        waiting: Iterable[str] = (),
        by: str = "",
        timeout: float | None = None,
    ) -> StoreAnswer: ...


class DecisionObserver(Protocol):
    """Metric hook for the engine; must be cheap."""

    def redis_round_trip(self, seconds: float) -> None: ...


class _NoObserver:
    def redis_round_trip(self, seconds: float) -> None:
        pass


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
        self._cache_key: tuple[Config, frozenset[str], NodeOverrides] | None = None
        self._cache: Eligibility | None = None

    @property
    def config(self) -> Config:
        return self._config

    @property
    def redis_available(self) -> bool:
        return self._breaker.available

    def reload(self, config: Config) -> None:
        """SIGHUP: the new node list and weights apply to the next decision."""
        self._config = config
        self._cache_key = self._cache = None

    def eligibility(self) -> Eligibility:
        """Current node sets; recomputed only when config, health or overrides change."""
        healthy = self._healthy()
        overrides = self._overrides()
        cached = self._cache_key
        if (
            cached is not None
            and self._cache is not None
            and cached[0] is self._config
            and cached[2] is overrides
            and cached[1] == healthy
        ):
            return self._cache
        elig = eligibility(self._config.nodes, healthy, overrides, self._config.evacuate_rate)
        self._cache_key, self._cache = (self._config, healthy, overrides), elig
        return elig

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

    async def decide(self, req: ConnectRequest) -> Decision:
        cid = req.client_id
        if cid is None:
            # No id, nothing to be sticky about: HAProxy's own balancing applies.
            return Decision(None, How.NONE)
        elig = self.eligibility()
        if not self._breaker.available:
            return self._fallback(cid, elig, FallbackCause.UNAVAILABLE, self._breaker.reason)
        candidate = placement.choose(cid, elig.placeable)
        ttl = req.record_ttl(self._config.session_ttl) if req.persistent else None
        started = time.perf_counter()
        try:
            # The store enforces the budget (one shared timer, not one per call).
            d = await self._store.decide(
                cid,
                persistent=req.persistent,
                candidate=candidate,
                ttl=ttl or 0,
                now=int(self._clock()),
                usable=elig.usable,
                evacuating=elig.evacuating,
                waiting=self.waiting() if req.persistent else (),
                by=req.balancer or self.agent_id,
                timeout=self._config.redis_timeout,
            )
        except Exception as exc:
            self._breaker.failure(exc, "decide")
            return self._fallback(cid, elig, FallbackCause.ERROR, describe(exc))
        self._breaker.success()
        self._observer.redis_round_trip(time.perf_counter() - started)
        return Decision(d.node, d.how, d.previous, d.pin_ignored)

    @staticmethod
    def _fallback(cid: bytes, elig: Eligibility, cause: FallbackCause, error: str | None) -> Decision:
        node = placement.choose(cid, elig.fallback)
        return Decision(node, How.FALLBACK if node else How.NONE, cause=cause, error=error)
