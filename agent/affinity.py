"""The affinity engine: which broker a CONNECT goes to, shared through Redis, safe without it.

Why the split between agent and Redis: the agent knows which brokers are healthy (its own
probes) and what the operators want (node-state/weights, refreshed every
``config.state_refresh`` s), so it computes the eligible node sets and the HRW candidate
locally; Redis holds the per-client record and applies it atomically (``decide.lua``), so every
balancer agrees on where a client's session lives.

Why the circuit breaker: a CONNECT cannot wait on a dead Redis. Every decision is bounded by
``config.redis_timeout`` (enforced by the Store); a failed one answers ``fallback`` with HRW over the
nodes known to be usable (configured, healthy, not in maintenance, as of the last refresh),
which every balancer computes identically (``none`` if no node is usable). A refused or reset
connection opens the breaker at once, timeouts after ``TIMEOUTS_TO_TRIP`` in a row (a lone
timeout may just be a burst queueing behind other decisions); while it is open the engine
does not call Redis at all. A background probe (0.1 s doubling to 2 s) closes the breaker
as soon as Redis answers again. One warning when Redis goes away, one info line when it is
back: an outage must not turn into a log storm.

``how`` values: ``hit``, ``assigned``, ``moved``, ``pinned``, ``fallback``, ``none``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import redis.exceptions

from agent import placement
from agent.config import Config, NodeConfig
from agent.request import ConnectRequest
from agent.store import NodeOverrides, Store

__all__ = [
    "AffinityEngine",
    "Decision",
    "Eligibility",
    "NodeView",
    "HOWS",
    "eligibility",
    "is_outage",
]

log = logging.getLogger("mqtt_affinity.affinity")

HOWS = ("hit", "assigned", "moved", "pinned", "fallback", "none")

PROBE_INITIAL = 0.1
PROBE_MAX = 2.0
DEFAULT_TRIM_INTERVAL = 60.0
# Background calls (override refresh, probe, trim) are not on a CONNECT's path, so they get
# more patience than a decision; a too-tight budget there would trip the breaker under load.
BACKGROUND_TIMEOUT_MIN = 0.5
_WARN_EVERY = 60.0
#: Consecutive timeouts (no success in between) that open the breaker. Refused/reset
#: connections open it at once (so does a decision connection that stopped answering: the
#: Store drops it); a lone timeout under load (queued behind a burst of decisions) only falls
#: back for that one decision.
TIMEOUTS_TO_TRIP = 3
STOP_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Decision:
    node: str | None
    how: str
    previous: str | None = None
    pin_ignored: str | None = None
    source: Literal["redis", "local"] = "redis"
    error: str | None = None


@dataclass(frozen=True, slots=True)
class NodeView:
    name: str
    configured_weight: float
    effective_weight: float
    state: str
    healthy: bool


@dataclass(frozen=True, slots=True)
class Eligibility:
    """Node sets for one view of (config, health, overrides)."""

    #: HRW input for new placements: (name, effective weight).
    placeable: tuple[tuple[str, float], ...]
    #: Nodes a client may be sent to: configured, healthy, not in maintenance.
    usable: frozenset[str]
    #: Usable nodes in ``evacuate`` state -> moves per second.
    evacuating: Mapping[str, int] = field(default_factory=dict)
    #: HRW input when Redis is unavailable: the usable nodes.
    fallback: tuple[tuple[str, float], ...] = ()


def _weighted(pairs: Sequence[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
    """Keep the weights, unless they are all zero: then uniform, since some node beats none."""
    if any(w > 0 for _, w in pairs):
        return tuple(pairs)
    return tuple((name, 1.0) for name, _ in pairs)


def eligibility(
    nodes: Iterable[NodeConfig],
    healthy: frozenset[str] | set[str],
    overrides: NodeOverrides,
    default_rate: int,
) -> Eligibility:
    """Pure: placeable = configured ∩ healthy ∩ active ∩ weight > 0; usable = configured ∩ healthy ∩ not maintenance.

    When nothing is placeable but something is usable, new clients go to the usable nodes
    (better a draining broker than no broker).
    """
    placeable: list[tuple[str, float]] = []
    usable_pairs: list[tuple[str, float]] = []
    evacuating: dict[str, int] = {}
    for node in nodes:
        if node.name not in healthy:
            continue
        state = overrides.states.get(node.name, "active")
        if state == "maintenance":
            continue
        weight = overrides.weights.get(node.name, node.weight)
        usable_pairs.append((node.name, weight))
        if state == "active" and weight > 0:
            placeable.append((node.name, weight))
        elif state == "evacuate":
            evacuating[node.name] = overrides.rates.get(node.name, default_rate)
    fallback = _weighted(usable_pairs)
    return Eligibility(
        placeable=tuple(placeable) if placeable else fallback,
        usable=frozenset(name for name, _ in usable_pairs),
        evacuating=evacuating,
        fallback=fallback,
    )


#: Decision.error when the breaker is open (Redis known to be down: not even tried).
REDIS_UNAVAILABLE = "redis unavailable"


def is_outage(exc: BaseException) -> bool:
    """Errors that mean "Redis is not answering", as opposed to a bad reply."""
    return isinstance(
        exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, TimeoutError, OSError)
    )


def is_timeout(exc: BaseException) -> bool:
    """A timeout alone is ambiguous: a dead Redis, or just our own queue of decisions under a burst."""
    return isinstance(exc, (redis.exceptions.TimeoutError, TimeoutError))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__name__
    return (f"{name}: {text}" if text else name)[:200]


class AffinityEngine:
    """Decides placements; owns the breaker and the override refresh, not the Store's lifetime."""

    def __init__(
        self,
        config: Config,
        store: Store,
        healthy: Callable[[], frozenset[str]],
        *,
        clock: Callable[[], float] = time.time,
        agent_id: str | None = None,
        trim_interval: float = DEFAULT_TRIM_INTERVAL,
    ) -> None:
        self._config = config
        self._store = store
        self._healthy = healthy
        self._clock = clock
        self.agent_id = agent_id or f"{socket.gethostname()}:{os.getpid()}"
        # Optional hook (seconds per Redis decision round trip), bound by the app to a histogram.
        self.observe_redis: Callable[[float], None] | None = None
        self._trim_interval = trim_interval
        self._overrides = NodeOverrides()
        self._available = True
        self._probe_task: asyncio.Task[None] | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._cache_key: tuple[object, frozenset[str], object] | None = None
        self._cache: Eligibility | None = None
        self._last_warn: dict[str, float] = {}
        self._stopping = False
        self._timeouts_in_row = 0

    # -- state ------------------------------------------------------------------------

    @property
    def redis_available(self) -> bool:
        """False while the breaker is open (decisions are local)."""
        return self._available

    @property
    def overrides(self) -> NodeOverrides:
        return self._overrides

    @property
    def config(self) -> Config:
        return self._config

    def eligibility(self) -> Eligibility:
        """Current node sets; recomputed only when config, health or overrides change."""
        healthy = frozenset(self._healthy())
        key = (self._config, healthy, self._overrides)
        cached = self._cache_key
        if (
            cached is not None
            and cached[0] is key[0]
            and cached[2] is key[2]
            and cached[1] == healthy
            and self._cache is not None
        ):
            return self._cache
        elig = eligibility(self._config.nodes, healthy, self._overrides, self._config.evacuate_rate)
        self._cache_key, self._cache = key, elig
        return elig

    def node_views(self) -> list[NodeView]:
        healthy = frozenset(self._healthy())
        ov = self._overrides
        return [
            NodeView(
                name=n.name,
                configured_weight=n.weight,
                effective_weight=ov.weights.get(n.name, n.weight),
                state=ov.states.get(n.name, "active"),
                healthy=n.name in healthy,
            )
            for n in self._config.nodes
        ]

    def reload(self, config: Config) -> None:
        """SIGHUP: new node list/weights apply to the next decision. The Store (URL, prefix) stays."""
        self._config = config
        self._cache_key = self._cache = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Load overrides once (a dead Redis only opens the breaker), then refresh in the background."""
        self._stopping = False
        await self.refresh()  # on failure the breaker has logged its one warning
        self._refresh_task = asyncio.create_task(self._refresh_loop(), name="affinity-refresh")

    async def stop(self) -> None:
        """Stop the background tasks.

        Cancellation alone is not trusted: redis-py 8.1 can lose a cancel that lands while a
        command is in flight (the command completes normally and the task carries on), so the
        loops also check ``_stopping`` after every await and the wait is bounded.
        """
        self._stopping = True
        tasks = [t for t in (self._refresh_task, self._probe_task) if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            for t in pending:
                log.warning("background task %s did not stop within %.1f s", t.get_name(), STOP_TIMEOUT)
        self._refresh_task = self._probe_task = None

    async def refresh(self) -> bool:
        """Re-read node overrides now; False (breaker open) if Redis did not answer."""
        if not self._available:
            return False
        try:
            async with asyncio.timeout(self._background_timeout()):
                self._overrides = await self._store.load_node_overrides()
            self._timeouts_in_row = 0
            return True
        except Exception as exc:
            self._on_error(exc, "refresh")
            return False

    async def placed_counts(self) -> dict[str, int] | None:
        """Sessions placed per configured node, None while Redis is unavailable."""
        if not self._available:
            return None
        names = [n.name for n in self._config.nodes]
        try:
            async with asyncio.timeout(self._background_timeout()):
                return await self._store.placed_counts(names, self._clock())
        except Exception as exc:
            self._on_error(exc, "placed-counts")
            return None

    # -- the decision -----------------------------------------------------------------------

    async def decide(self, req: ConnectRequest) -> Decision:
        cid = req.client_id
        if cid is None:
            # No id, nothing to be sticky about: HAProxy's own balancing applies.
            return Decision(None, "none")
        elig = self.eligibility()
        if not self._available:
            return self._fallback(cid, elig, REDIS_UNAVAILABLE)
        candidate = placement.choose(cid, elig.placeable)
        ttl = req.record_ttl(self._config.session_ttl) if req.persistent else None
        started = time.perf_counter()
        try:
            # The Store enforces the budget (one shared timer, not one per call).
            d = await self._store.decide(
                cid,
                persistent=req.persistent,
                candidate=candidate,
                ttl=ttl or 0,
                now=int(self._clock()),
                usable=elig.usable,
                evacuating=elig.evacuating,
                by=req.balancer or self.agent_id,
                timeout=self._config.redis_timeout,
            )
        except Exception as exc:
            self._on_error(exc, "decide")
            return self._fallback(cid, elig, _describe(exc))
        self._timeouts_in_row = 0
        if self.observe_redis is not None:
            self.observe_redis(time.perf_counter() - started)
        return Decision(d.node, d.how, d.previous, d.pin_ignored, "redis")

    @staticmethod
    def _fallback(cid: bytes, elig: Eligibility, error: str) -> Decision:
        node = placement.choose(cid, elig.fallback)
        return Decision(node, "fallback" if node else "none", source="local", error=error)

    # -- breaker ----------------------------------------------------------------------------------

    def _background_timeout(self) -> float:
        return max(BACKGROUND_TIMEOUT_MIN, self._config.redis_timeout * 4)

    def _on_error(self, exc: BaseException, where: str) -> None:
        if is_timeout(exc):
            self._timeouts_in_row += 1
            if self._timeouts_in_row >= TIMEOUTS_TO_TRIP:
                self._trip(exc)
            else:
                self._warn_limited("timeout", "redis %s timed out; answered locally", where)
        elif is_outage(exc):
            self._trip(exc)
        else:
            self._warn_limited(where, "redis %s failed (Redis answered, so no fallback mode): %s", where, _describe(exc))

    def _warn_limited(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last_warn.get(key)
        if last is None or now - last >= _WARN_EVERY:
            self._last_warn[key] = now
            log.warning(msg, *args)

    def _trip(self, exc: BaseException) -> None:
        if not self._available:
            return
        self._available = False
        log.warning("redis unavailable (%s): deciding locally until it is back", _describe(exc))
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.create_task(self._probe(), name="affinity-redis-probe")

    async def _probe(self) -> None:
        try:
            # Idle pooled sockets died with the server; without this each would cost one failed
            # decision after recovery. In-flight ones fail (and disconnect) by themselves.
            await self._store.reset_connections()
        except Exception as exc:  # best effort
            log.debug("resetting redis connections failed: %r", exc)
        delay = PROBE_INITIAL
        while not self._stopping:
            await asyncio.sleep(delay)
            try:
                async with asyncio.timeout(self._background_timeout()):
                    await self._store.ping()
                    overrides = await self._store.load_node_overrides()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("redis probe failed: %s", _describe(exc))
                delay = min(delay * 2, PROBE_MAX)
                continue
            if self._stopping:
                return
            self._overrides = overrides
            self._timeouts_in_row = 0
            self._available = True
            self._probe_task = None
            log.info("redis is back: decisions come from redis again")
            return

    async def _refresh_loop(self) -> None:
        next_trim = time.monotonic() + self._trim_interval
        while not self._stopping:
            await asyncio.sleep(self._config.state_refresh)
            if self._stopping:
                return
            if not self._available:
                continue  # the probe owns recovery; stay silent
            await self.refresh()
            if self._available and not self._stopping and time.monotonic() >= next_trim:
                next_trim = time.monotonic() + self._trim_interval
                await self.trim()

    async def trim(self) -> int:
        """Drop expired members of every placed:<node> set (configured or overridden nodes)."""
        if not self._available:
            return 0
        names = {n.name for n in self._config.nodes}
        ov = self._overrides
        names.update(ov.states, ov.weights, ov.rates)
        try:
            async with asyncio.timeout(self._background_timeout()):
                return await self._store.trim_placed(names, self._clock())
        except Exception as exc:
            self._on_error(exc, "trim")
            return 0
