"""Active evacuation: close an evacuating node's client connections, at a rate all agents share.

``mqtt-affinity evacuate NODE --rate R`` puts NODE in ``evacuate`` (no new clients; a client of
NODE that reconnects is moved, at most R moves per second, by ``decide.lua``). MQTT clients
stay connected for days, so on its own that never empties the node. With ``haproxy_socket``
configured, each agent also closes NODE's client connections on its own HAProxy, through the
runtime API (``shutdown session``), taking one token per connection from a token bucket in
Redis (``P evict:<node>``, ``agent/lua/evict.lua``): R closes per second in total across every
balancer. Each closed client reconnects with its own backoff and is moved as above.

The same loop publishes this HAProxy's client connections per node (``P conns:<node>:<pid>`` of
that HAProxy process, a short-lived hash: two agents of one balancer write the same key) for
``mqtt-affinity nodes`` and ``evacuate --wait``.

Nothing is closed while Redis is unavailable (no shared budget), nor when no other node could
take the clients (they would only come back to the same node).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from agent.config import Config
from agent.haproxy_api import RuntimeAPI, RuntimeAPIError
from agent.logs import warn_limited
from agent.model import Keys
from agent.rules import Eligibility

__all__ = ["EvictionObserver", "Evacuator", "burst_for", "evacuation_targets", "evict_script"]

log = logging.getLogger("mqtt_affinity.evacuate")

#: Seconds between two eviction rounds while a node is evacuating.
TICK = 0.1
#: Seconds between two publications of the connection counts (and reads when idle).
PUBLISH_EVERY = 1.0
#: Lifetime of a published ``conns:<agent>`` hash: a dead agent's counts vanish.
CONNS_TTL = 5
#: Seconds the runtime API may fail before a warning (HAProxy often starts after its agent).
API_PATIENCE = 10.0


def burst_for(rate: int) -> int:
    """Token bucket capacity for ``rate`` per second: a fifth of a second's worth (at least 1),
    so a round every ``TICK`` gets its share and nobody can take a whole second at once."""
    return max(1, math.ceil(rate / 5))


def evict_script() -> str:
    """The token bucket script, ``agent/lua/evict.lua`` (package data)."""
    return resources.files("agent").joinpath("lua", "evict.lua").read_text(encoding="utf-8")


def evacuation_targets(elig: Eligibility) -> dict[str, int]:
    """Evacuating nodes whose clients have somewhere else to go -> closes per second."""
    return {
        node: rate
        for node, rate in elig.evacuating.items()
        if rate > 0 and any(n != node for n, _ in elig.placeable)
    }


class EvictionObserver(Protocol):
    def evicted(self, node: str, count: int) -> None: ...


@dataclass
class _Progress:
    """One node's evacuation on this balancer, for the log."""

    closed: int = 0
    empty_logged: bool = False


class Evacuator:
    """One per agent process with ``haproxy_socket`` configured."""

    def __init__(
        self,
        config: Config,
        redis: Redis,
        eligibility: Callable[[], Eligibility],
        redis_available: Callable[[], bool],
        *,
        observer: EvictionObserver | None = None,
        api: RuntimeAPI | None = None,
    ) -> None:
        self._config = config
        self._keys = Keys(config.key_prefix)
        self._redis = redis
        self._eligibility = eligibility
        self._redis_available = redis_available
        self._published: bytes | None = None  # the conns key last written
        self._api_failing_since: float | None = None
        self._api_warned = False
        self._observer = observer
        self._api = api or self._make_api(config)
        self._take = redis.register_script(evict_script())
        #: This HAProxy's client connections per node, as last read (None: not read yet).
        self.connections: dict[str, int] | None = None
        #: Nodes this agent is evacuating now.
        self._active: dict[str, _Progress] = {}
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def _make_api(config: Config) -> RuntimeAPI:
        assert config.haproxy_socket is not None
        return RuntimeAPI(config.haproxy_socket)

    @property
    def api(self) -> RuntimeAPI:
        return self._api

    def reload(self, config: Config) -> None:
        if config.haproxy_socket != self._config.haproxy_socket and config.haproxy_socket is not None:
            self._api = self._make_api(config)
        self._config = config

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="evacuator")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=5.0)
        if self._published is not None:
            try:  # the counts would otherwise linger until they expire
                await asyncio.wait_for(self._redis.delete(self._published), 1.0)
            except Exception:
                pass

    # -- one read of HAProxy ---------------------------------------------------------------------

    async def read_connections(self) -> dict[str, int] | None:
        """This HAProxy's client connections per configured node, now; None if it does not answer."""
        try:
            per_server = await self._api.server_connections(self._config.haproxy_backend)
        except RuntimeAPIError as exc:
            # HAProxy usually starts after its agent (and restarts now and then): say so only when
            # it lasts.
            now = time.monotonic()
            if self._api_failing_since is None:
                self._api_failing_since = now
            if now - self._api_failing_since >= API_PATIENCE:
                self._api_warned = warn_limited(log, "runtime-api", "HAProxy runtime API: %s", exc,
                                                interval=60.0) or self._api_warned
            else:
                log.debug("HAProxy runtime API: %s", exc)
            return None
        if self._api_warned:
            log.info("HAProxy runtime API %s answers again", self._api)
        self._api_failing_since, self._api_warned = None, False
        names = {n.name for n in self._config.nodes}
        self.connections = {n: c for n, c in per_server.items() if n in names}
        return self.connections

    async def _publish(self, conns: Mapping[str, int]) -> None:
        try:
            key = self._keys.conns(await self._api.identity())
        except RuntimeAPIError:
            return  # read_connections() has said why
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(key)
        fields: dict[str | bytes, str | int] = {n: c for n, c in conns.items()}
        fields["_at"] = f"{time.time():.3f}"
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]  # redis-py's mapping type is invariant
        pipe.expire(key, CONNS_TTL)
        await pipe.execute()
        self._published = key

    # -- the loop ----------------------------------------------------------------------------

    async def _loop(self) -> None:
        next_publish = 0.0
        while True:
            try:
                await self._round(time.monotonic() >= next_publish)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:  # Redis went away mid-round: the breaker knows
                warn_limited(log, "evacuate-redis", "evacuation round: Redis: %s", exc, interval=60.0)
            except Exception:
                warn_limited(log, "evacuate-round", "evacuation round failed", exc_info=True, interval=60.0)
            if time.monotonic() >= next_publish:
                next_publish = time.monotonic() + PUBLISH_EVERY
            await asyncio.sleep(TICK)

    async def _round(self, publish: bool) -> None:
        if not self._redis_available():
            return  # no shared budget, nowhere to publish: wait for Redis (evacuations carry on then)
        targets = evacuation_targets(self._eligibility())
        if targets or publish:
            conns = await self.read_connections()
            if conns is not None:
                if publish:
                    await self._publish(conns)
                await self._evict(targets, conns)
        for node in [n for n in self._active if n not in targets]:
            log.info("node %s is no longer evacuating (closed %d client connections on this balancer)", node,
                     self._active.pop(node).closed)

    async def _evict(self, targets: Mapping[str, int], conns: Mapping[str, int]) -> None:
        for node, rate in targets.items():
            have = conns.get(node, 0)
            progress = self._active.get(node)
            if progress is None:
                progress = self._active[node] = _Progress()
                log.info("node %s is evacuating: closing its %d client connections on this balancer, at most "
                         "%d/s across all balancers", node, have, rate,
                         extra={"fields": {"node": node, "connections": have, "rate": rate}})
            if have <= 0:
                if not progress.empty_logged:
                    progress.empty_logged = True
                    log.info("node %s: no client connection left on this balancer (closed %d)", node,
                             progress.closed)
                continue
            progress.empty_logged = False
            burst = burst_for(rate)
            key = self._keys.evict(node)
            granted = int(await self._take(keys=[key], args=[rate, burst, min(have, burst)]))
            if granted <= 0:
                continue
            closed = 0
            try:
                ids = await self._api.sessions(self._config.haproxy_backend, node)
                if ids:
                    closed = await self._api.shutdown(ids[:granted])
            finally:
                if closed < granted:  # give back what was not used, for the other balancers
                    await self._take(keys=[key], args=[rate, burst, -(granted - closed)])
            if closed:
                progress.closed += closed
                if self._observer is not None:
                    self._observer.evicted(node, closed)
                log.debug("node %s: closed %d client connections", node, closed)
